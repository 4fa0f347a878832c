"""The old home of the lake-table helpers and the lake sink base, kept so that old imports go on working.

Reading lake tables as Arrow is `vb_batch.io.tables.arrow`; the sink base of
Delta and Iceberg is `vb_batch.io.sinks.lake`.
"""

from __future__ import annotations

from vb_batch.io.sinks.lake import TableSink
from vb_batch.io.tables.arrow import JOB_KEYS, file_dataset, job_metadata, local_uri, with_metadata

__all__ = ["JOB_KEYS", "TableSink", "file_dataset", "job_metadata", "local_uri", "with_metadata"]
