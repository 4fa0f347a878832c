"""The engine-free stages of a job, as functions on Arrow record batches, and the one loop that runs them.

    resolved.py  ResolvedJob (a job config resolved for an input schema; once `Plan`), new_run_id, row_seed
    columns.py   the columns a batch carries between stages, and reading and writing them
    rows.py      per-row work: the shared row threads (map_rows) and the row guard (row_error)
    inputs.py    stage 1 (CPU): fetch_decode, rows -> RGB uint8; model_resolution, needed_size
    model.py     stage 2 (GPU): run_model, ModelBatcher (rows of one working size share calls),
                 check_backend, decode_on_device
    outputs.py   stage 3 (CPU): decode_encode, answers -> values -> storage encoding, summaries, provenance
    grid.py      the grid a map is stored at: resize_values, grid metadata
    stream.py    streams in a worker: cached_backend, rebatch, read_ahead
    loop.py      annotate_stream: the one per-batch loop every engine and integration calls

Every engine (local threads, Ray tasks and actors, Spark executors) and every
integration (Ray Data, Spark DataFrames) runs these same functions; it only
decides where. A fault of one row never fails its batch: the row keeps its
input columns, gets null outputs and a `vb_error {code, message}`.

Import from the submodules; this package module imports nothing, so that a
light caller (`vb_batch.pipeline.columns`) stays light.
"""
