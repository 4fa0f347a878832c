"""Everything that touches storage or the network: sources, sinks, filesystems, fetches, encodings.

    sources.py      inputs as units and record batches (Parquet, folders, Delta, Iceberg), ids
    formats.py      input format detection and the output sink registry
    sinks/          both halves of every sink (driver: check, open, commit, close, recover; worker:
                    staged part files, compaction) for Parquet, Delta and Iceberg
    tables/         Delta and Iceberg tables read as Arrow datasets, catalogs
    lease.py        one writer per output      outputs.py  reading an output back (load_arrays)
    filesystems.py  fsspec and pyarrow filesystems from one URL + options
    uri.py, fetch.py, http.py, retry.py   URI rules, bounded reads, the one HTTP transport and retry helper
    images.py       bounded image decoding     encodings.py  storage encodings of maps (png, array)
    describe.py     every output column in words            filters.py  input.filter expressions
"""
