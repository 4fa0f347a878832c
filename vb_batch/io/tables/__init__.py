"""Lake tables read as Arrow (the read side of Delta Lake and Iceberg; their sinks are in `vb_batch.io.sinks`).

    arrow     what both formats share: the job-level `vb.*` keys, a schema with vb_batch's
              metadata put back, a pyarrow dataset over a snapshot's files, local table URIs
    delta     a Delta table as a pyarrow dataset (`deltalake`, the `lake` extra)
    iceberg   catalogs, and an Iceberg table as a pyarrow dataset (`pyiceberg`, the `lake` extra)

Sources (`vb_batch.io.sources`), outputs (`vb_batch.io.outputs`) and the lake
sinks read tables through these modules; nothing here writes.
"""
