"""Sinks: where annotated rows go. Both halves of every sink live here (Ray Data's `Datasink` is the model).

    base       the driver half, one protocol for every format: check, lease, open (recover,
               apply the mode), stage, commit, close; ownership and the run records
    staging    the worker half: the one staged writer (`PartWriter`, roll-over at
               `output.rows_per_file`), part reports, `StagedParts` for tasks, compaction
    metadata   metadata files written whole or not at all, read without trusting them;
               the job fingerprint and the marker `_vb/output.json`
    paths      every path vb_batch uses inside a local output is real (no link out of it)
    parquet    a Parquet dataset with commit records under `_vb/`
    lake       the base of lake-table sinks: commits through the table's own log
    delta      a Delta table (`deltalake`, the `lake` extra; imported only when used)
    iceberg    an Iceberg table in a catalog (`pyiceberg`, the `lake` extra; imported only when used)
    compaction `vb-batch compact`: an output's small files merged in one commit of its format, under
               the writer lease (imported only when used)

`vb_batch.io.formats` picks the sink class for `output.format`; engines use the
protocol through the run core (`vb_batch.engines.core`) and write from workers
with `StagedParts` / `compact`. Reading a lake table is `vb_batch.io.tables`.

This package re-exports the names of the module it replaced (the Parquet sink
and the shared rules), so `from vb_batch.io.sinks import ...` keeps working.
"""

from __future__ import annotations

from vb_batch.io.sinks.base import Sink
from vb_batch.io.sinks.metadata import (
    MARKER,
    META_DIR,
    OWN_FILES,
    data_fingerprint,
    fingerprint_changes,
    marker_record,
    marker_schema,
    read_json,
    schema_fingerprint,
    write_atomic,
)
from vb_batch.io.sinks.parquet import ParquetSink, commit_records, visible_files

replay = visible_files  # the old name (vb_batch.registry.replay is another thing)
from vb_batch.io.sinks.paths import check_real_folder, check_real_paths
from vb_batch.io.sinks.staging import (
    PART_RE,
    PART_SCHEMA,
    Compactor,
    PartWriter,
    StagedFile,
    StagedParts,
    compact,
    is_part_name,
    part_file_name,
    part_report,
    stage_parts,
)

__all__ = [
    "MARKER", "META_DIR", "OWN_FILES", "PART_RE", "PART_SCHEMA", "Compactor", "ParquetSink", "PartWriter", "Sink",
    "StagedFile", "StagedParts", "check_real_folder", "check_real_paths", "commit_records", "compact",
    "data_fingerprint", "fingerprint_changes", "is_part_name", "marker_record", "marker_schema", "part_file_name",
    "part_report", "read_json", "replay", "schema_fingerprint", "visible_files", "stage_parts", "write_atomic",
]
