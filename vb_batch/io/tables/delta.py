"""A Delta Lake table as a pyarrow dataset (`deltalake`), read through vb_batch's filesystems.

The Delta sink (`vb_batch.io.sinks.delta`) commits through the same table; the
job-level `vb.*` keys it writes into each commit's info come back here.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from vb_batch.config import StorageOptions
from vb_batch.io.filesystems import arrow_filesystem, delta_storage_options, fsspec_filesystem
from vb_batch.io.tables.arrow import JOB_KEYS, file_dataset, local_uri, with_metadata


def delta_table(uri: str, storage: StorageOptions | None):
    """The `DeltaTable` at `uri`, or None when there is none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    # Not `DeltaTable.is_deltatable` / `.history()`: they hold the GIL through their requests,
    # which stalls every other thread of the process (an S3 server in the same process deadlocks).
    try:
        return DeltaTable(local_uri(uri), storage_options=delta_storage_options(uri, storage))
    except TableNotFoundError:
        return None


def delta_job_metadata(uri: str, storage: StorageOptions | None, version: int) -> dict[str, str]:
    """The job-level `vb.*` keys of the newest vb_batch commit, from the commit infos in `_delta_log/`."""
    fs, root = fsspec_filesystem(uri, storage)
    for v in range(version, -1, -1):
        try:
            with fs.open(posixpath.join(root, "_delta_log", f"{v:020d}.json"), "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:  # expired by log retention: nothing older is left either
            break
        for line in lines:
            info = json.loads(line).get("commitInfo") or {}
            if "vb.job" in info:
                return {k: str(info[k]) for k in JOB_KEYS if k in info}
    return {}


def open_delta(uri: str, storage: StorageOptions | None = None, vb_metadata: bool = True, table=None) -> pads.Dataset:
    """The current version of a Delta table as a pyarrow dataset, read through vb_batch's filesystem.

    Fragments are the table's Parquet files (absolute paths in
    `arrow_filesystem(uri)`), with partition values as partition expressions;
    the schema carries field metadata and (`vb_metadata`: a vb_batch output)
    the job-level `vb.*` keys of the latest vb_batch commit in the history. `table`: a `DeltaTable`
    already loaded (its version is the one read).
    """
    table = table if table is not None else delta_table(uri, storage)
    if table is None:
        raise FileNotFoundError(f"no Delta table at {uri!r}")
    fs, root = arrow_filesystem(uri, storage)
    scan = table.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, fs))
    files = [(posixpath.join(root, f.path), f.partition_expression) for f in scan.get_fragments()]
    job = delta_job_metadata(uri, storage, table.version()) if vb_metadata else {}
    return file_dataset(files, with_metadata(scan.schema, {}, job), fs)
