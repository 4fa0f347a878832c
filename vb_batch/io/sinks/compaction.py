"""Compaction of a whole output (`vb-batch compact OUTPUT`): merge the small files that nightly appends leave.

What it promises, on every format:

- the rows do not change: the same row count, ids and column values (the order of rows within
  the output is not kept);
- files with fewer rows than `rows_per_file` are merged into files of `rows_per_file` rows (the
  last may hold fewer); full files stay as they are. Rows are streamed one small file at a time
  into one open writer (`sinks.staging.PartWriter`), never the whole output;
- one atomic commit in the format's own log removes the small files and adds the merged ones,
  so a reader sees the table as it was or as it is after, never a mix;
- it is a writer like a run: it holds the output's writer lease (run id `compact-<hex>`; a run or
  another compaction on the output is refused naming the holder, exit 3), and it takes a new
  writer epoch through the sink's fence (`vb_batch.io.sinks.base`, "Fencing"), so a paused writer
  that lost the lease can add nothing after it, and a compaction that lost its lease commits nothing;
- kill -9 anywhere is recovered by the next run or compaction exactly as a killed run is (a commit
  record rolled forward, staged or moved files dropped); running it again finishes the work.

Per format:

  parquet  the merged files are staged under `_vb/staging/<compact run>/`; after a fence record
           (the compaction's epoch, before anything is staged), one commit record adds them and
           removes the small files (`vb.operation: compact`; no input `position`: the newest record
           that has one still says where the input stands), then they move into place and the
           small files are deleted. Readers (`vb_batch.io.outputs`) take the newest record only
           once its files are all in place; a reader that listed the small files before their
           deletion gets FileNotFoundError and opens the output again.
  delta    the merged files are staged, moved next to the table's data under an intent (as the
           sink's own commits), then one table version adds them and removes the small files
           (both `dataChange: false`), with the app transactions `vb_batch.writer` (the epoch,
           checked at the exact version committed) and `vb_batch:<run>`, and commit info
           `vb.operation: compact` beside the job's `vb.*` keys. Then VACUUM removes files that
           no version references and that are older than the retention; Delta's own check refuses
           a retention below the table's `delta.deletedFileRetentionDuration` (7 days by default)
           unless the caller turns it off (`enforce_retention=False`).
  iceberg  the merged files are written into the table's `data/` under names of this run, one
           overwrite snapshot through the catalog deletes the small files and adds them (summary:
           `vb.operation: compact`, run, epoch; table properties such as `vb.input-position` kept);
           then snapshots older than the retention are expired (the current one always stays; the
           input position moves to it, as no snapshot since it removed rows) and the data and manifest
           files only expired snapshots referenced, inside the table's location, are deleted.

Not compacted (refused with `ConfigError`): partitioned Delta and Iceberg tables, Delta files
with deletion vectors and Iceberg tables with delete files (compact those with the engine that wrote them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from vb_batch.config import ConfigError, OutputConfig, load_config, parse_override
from vb_batch.io.formats import SINKS, detect_format
from vb_batch.io.positions import (
    COMPACTION,
    OPERATION_KEY,
    POSITION_KEY,
    decode_position,
    encode_position,
)
from vb_batch.io.sinks.metadata import META_DIR, marker_schema, write_atomic
from vb_batch.io.sinks.paths import check_real_paths
from vb_batch.io.sinks.staging import PartWriter, StagedFile, is_part_name

log = logging.getLogger(__name__)

BATCH_ROWS = 256  # rows read at a time from a small file: images make rows large
DEFAULT_RETENTION_HOURS = 168.0


@dataclass
class CompactionResult:
    """What a compaction did: data files before and after, the rows they hold, and per format what else."""

    output: str
    format: str
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    files_merged: int = 0  # small files rewritten
    files_written: int = 0  # merged files added
    files_removed: int = 0  # files deleted from storage (small files, vacuum, expired snapshots)
    seconds: float = 0.0
    done: list[str] = field(default_factory=list)

    def render(self) -> str:
        shown = self.output if self.format in self.output else f"{self.output} ({self.format})"
        lines = [f"compact {shown}: {self.files_before} -> {self.files_after} data files, {self.rows} rows, "
                 f"{self.seconds:.1f} s"]
        return "\n".join(lines + [f"  {line}" for line in self.done])


def output_for_compaction(path: str | None = None, config: str | None = None, fmt: str = "auto",
                          table: str | None = None, catalog: list[str] = (), storage: list[str] = ()) -> OutputConfig:
    """The `output` section to compact: a job YAML's (`config`), or one built from a path or an Iceberg table.

    `catalog` and `storage` are `key=value` items (values as YAML), as `--catalog` / `--storage` give them.
    """
    if config:
        data = load_config(config).output.model_dump()
        if path:
            data["path"] = path
    elif path or table:
        data = {"path": path or ""}
    else:
        raise ConfigError("compact: give the output (a path or URL, or --table and --catalog for Iceberg) "
                          "or --config JOB.yaml")
    for name, items in (("catalog", catalog), ("storage", storage)):
        for item in items:
            keys, value = parse_override(item)
            node = data.setdefault(name, {})
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
    if table:
        data["table"] = table
    if fmt != "auto":
        data["format"] = fmt
    elif not config:
        data["format"] = "iceberg" if table else _detected(data)
    if data["format"] == "iceberg":
        data["path"] = ""
    try:
        return OutputConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"output.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"compact: {problems}") from None


def _detected(data: dict[str, Any]) -> str:
    from vb_batch.config import StorageOptions

    try:
        found = detect_format(data["path"], StorageOptions(**data.get("storage", {})))
    except FileNotFoundError:
        raise ConfigError(f"compact: output {data['path']!r}: nothing there") from None
    if found == "iceberg":
        raise ConfigError(f"compact: {data['path']!r} is an Iceberg table: it is compacted through its catalog; "
                          "give --table NAMESPACE.NAME and --catalog key=value ...")
    if found == "images":
        raise ConfigError(f"compact: {data['path']!r} holds no Parquet, Delta or Iceberg output")
    return found


def compact_output(cfg: OutputConfig, rows_per_file: int | None = None,
                   retention_hours: float = DEFAULT_RETENTION_HOURS, enforce_retention: bool = True,
                   progress: Callable[[str], None] | None = None, run_id: str | None = None) -> CompactionResult:
    """Merge the small data files of the output `cfg` into files of `rows_per_file` rows (default
    `cfg.rows_per_file`), then remove what no reader needs past `retention_hours` (see the module docstring).

    >>> compact_output(OutputConfig(path="s3://lake/labels", format="delta"), rows_per_file=4096)  # doctest: +SKIP
    """
    per_file = rows_per_file if rows_per_file is not None else cfg.rows_per_file
    if per_file <= 0:
        raise ConfigError(f"compact: --rows-per-file must be positive, not {per_file}")
    if retention_hours < 0:
        raise ConfigError(f"compact: --retention-hours must be 0 or more, not {retention_hours}")
    say = progress or log.info
    started = time.perf_counter()
    run_id = run_id or f"compact-{uuid.uuid4().hex[:12]}"
    sink = _open_sink(cfg, run_id)
    result = CompactionResult(cfg.name, cfg.format)
    with sink.lease_held():
        compactor = {"parquet": _parquet, "delta": _delta, "iceberg": _iceberg}[cfg.format]
        compactor(sink, cfg.model_copy(update={"rows_per_file": per_file}), result, say,
                  retention_hours=retention_hours, enforce_retention=enforce_retention)
    result.seconds = time.perf_counter() - started
    return result


def _open_sink(cfg: OutputConfig, run_id: str):
    """The output's sink, with the schema its data has (field and job metadata included)."""
    cls = SINKS[cfg.format]
    if cfg.format == "parquet":
        probe = cls(cfg, run_id, pa.schema([]))
        check_real_paths(probe.fs, probe.root, probe.describe(), probe.table_dirs)
        schema = marker_schema(probe.fs, probe.meta)
        files = probe.committed_files()
        if schema is None and files:
            schema = pq.read_schema(probe._path(files[0]), filesystem=probe.arrow_fs)
        if schema is None:
            raise ConfigError(f"compact: {probe.describe()} is not a vb_batch output (no {META_DIR}/ records)")
    elif cfg.format == "delta":
        from vb_batch.io.tables.delta import delta_table, open_delta

        if delta_table(cfg.path, cfg.storage) is None:
            raise ConfigError(f"compact: output.path {cfg.path!r}: no Delta table there")
        schema = open_delta(cfg.path, cfg.storage).schema
    else:
        from vb_batch.io.tables.iceberg import (
            iceberg_catalog,
            iceberg_schema,
            iceberg_table,
        )

        table = iceberg_table(iceberg_catalog(cfg.catalog, cfg.storage), cfg.table)
        if table is None:
            raise ConfigError(f"compact: output.table {cfg.table!r}: no such Iceberg table")
        schema = iceberg_schema(table)
    sink = cls(cfg, run_id, schema)
    check_real_paths(sink.fs, sink.root, sink.describe(), sink.table_dirs)
    return sink


def _plan(counts: dict[str, int], per_file: int) -> list[str]:
    """The small files worth merging (fewer rows than `per_file`), or [] when merging would not
    reduce their number."""
    small = [name for name, rows in counts.items() if rows < per_file]
    return small if len(small) > math.ceil(sum(counts[n] for n in small) / per_file) else []


def _merge(batches: Iterator[pa.RecordBatch], schema: pa.Schema | None, cfg: OutputConfig, run_id: str,
           staging: str) -> list[StagedFile]:
    """Stream `batches` into new part files of `cfg.rows_per_file` rows in `staging` (with `schema`, None:
    the first batch's); the files written."""
    written: list[StagedFile] = []
    writer: PartWriter | None = None
    try:
        for batch in batches:
            if writer is None:
                writer = PartWriter(schema or batch.schema, cfg, run_id, staging, written.append)
            writer.write(batch)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return written


def _file_batches(arrow_fs, paths: list[str], say: Callable[[str], None]) -> Iterator[pa.RecordBatch]:
    for n, path in enumerate(paths, 1):
        with arrow_fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
        if n % 100 == 0 or n == len(paths):
            say(f"compact: read {n}/{len(paths)} small files")


# ---------------------------------------------------------------------------- parquet


def _parquet(sink, cfg: OutputConfig, result: CompactionResult, say, **_) -> None:
    sink._fence()
    sink._recover()  # what a killed run or compaction left: records rolled forward, staging dropped
    files = sink.committed_files()
    counts = {name: pq.read_metadata(sink._path(name), filesystem=sink.arrow_fs).num_rows for name in files}
    result.files_before, result.rows = len(files), sum(counts.values())
    small = _plan(counts, cfg.rows_per_file)
    if not small:
        result.files_after = len(files)
        result.done.append(f"nothing to merge ({len(files)} files: merging the short ones would not make fewer)")
        return
    if sink.lease.taken_over_from is None:
        # This compaction's epoch in the log before anything is staged: a writer that takes the lease
        # over from here on gets a higher one, so this compaction's record would be stale (base, "Fencing").
        sink._write_record({"files": [], "fence": True})
    say(f"compact: merging {len(small)} small files of {sink.describe()} into files of {cfg.rows_per_file} rows")
    # The newest file's schema: its field and job metadata are the newest run's, as a reader shows them.
    schema = pq.read_schema(sink._path(small[-1]), filesystem=sink.arrow_fs)
    written = _merge(_file_batches(sink.arrow_fs, [sink._path(n) for n in small], say), schema, cfg,
                     sink.run_id, sink.staging)
    _check_rows(sink, small, counts, written)
    sink.lease.check()
    new = [f.name for f in written]
    sink._write_record({"files": new, "removes": small, OPERATION_KEY: COMPACTION})
    sink._apply(new, small)  # in place first, then the small files go (readers: `vb_batch.io.outputs`)
    sink.remove_own_staging()
    result.files_merged, result.files_written, result.files_removed = len(small), len(new), len(small)
    result.files_after = len(sink.committed_files())
    result.done.append(f"merged {len(small)} small files into {len(new)} (one commit record)")


def _check_rows(sink, small: list[str], counts: dict[str, int], written: list[StagedFile]) -> None:
    expected, got = sum(counts[n] for n in small), sum(f.rows for f in written)
    if expected != got:  # never commit a rewrite that lost or added rows
        raise RuntimeError(f"{sink.describe()}: the merged files hold {got} rows, the small files {expected}; "
                           "nothing was committed")


# ---------------------------------------------------------------------------- delta


def _delta(sink, cfg: OutputConfig, result: CompactionResult, say, retention_hours: float,
           enforce_retention: bool) -> None:
    from deltalake.transaction import AddAction, RemoveAction

    from vb_batch.io.sinks.delta import _delta_stats

    hours = math.ceil(retention_hours)
    _vacuum(sink, hours, enforce_retention, dry_run=True)  # a retention Delta refuses: before any work
    sink._fence()
    sink._recover()  # files a killed run or compaction moved in and never committed: deleted
    table = sink._table()
    if table.metadata().partition_columns:
        raise ConfigError(f"compact: {sink.describe()} is partitioned by {table.metadata().partition_columns}; "
                          "vb_batch compacts unpartitioned tables only: use the table's OPTIMIZE")
    actions = pa.table(table.get_add_actions(flatten=True))
    if any(name.startswith("deletionVector") and actions.column(name).null_count < actions.num_rows
           for name in actions.column_names):
        raise ConfigError(f"compact: {sink.describe()} has deletion vectors; compact it with the engine that "
                          "wrote them (OPTIMIZE)")
    entries = actions.to_pylist()
    counts = {}
    for entry in entries:
        rows = entry.get("num_records")
        if rows is None:  # no stats: the footer says
            rows = pq.read_metadata(sink._path(entry["path"]), filesystem=sink.arrow_fs).num_rows
        counts[entry["path"]] = rows
    sizes = {entry["path"]: entry["size_bytes"] for entry in entries}
    result.files_before, result.rows = len(entries), sum(counts.values())
    # Only files vb_batch can rewrite as plain part files in the table's root (never another writer's layout).
    small = _plan({p: n for p, n in counts.items() if is_part_name(p)}, cfg.rows_per_file)
    if small:
        say(f"compact: merging {len(small)} small files of {sink.describe()} into files of {cfg.rows_per_file} rows")
        schema = pq.read_schema(sink._path(small[-1]), filesystem=sink.arrow_fs)  # the newest run's metadata
        written = _merge(_file_batches(sink.arrow_fs, [sink._path(p) for p in small], say), schema, cfg,
                         sink.run_id, sink.staging)
        _check_rows(sink, small, counts, written)
        sink.lease.check()
        key = f"{sink.run_id}-00000"
        targets = [sink._data_path(f.name) for f in written]
        intent = posixpath.join(sink.meta, "intents", f"{key}.json")
        write_atomic(sink.fs, intent, json.dumps({"key": key, "files": targets}).encode())
        for staged, target in zip((sink._staged_path(f.name) for f in written), targets):
            sink.fs.mv(staged, target)
        now = int(time.time() * 1000)
        adds = [AddAction(posixpath.relpath(t, sink.root), sink.fs.size(t), {}, now, False,
                          _delta_stats(pq.read_metadata(t, filesystem=sink.arrow_fs))) for t in targets]
        removes = [RemoveAction(p, False, now, sizes[p], {}) for p in small]

        def commit(table, props) -> None:
            table.create_write_transaction([*adds, *removes], mode="append", schema=table.schema(),
                                           commit_properties=props)

        sink._commit_fenced(commit, key, info={OPERATION_KEY: COMPACTION})
        sink.fs.rm(intent)
        sink.remove_own_staging()
        result.files_merged, result.files_written = len(small), len(written)
        result.done.append(f"merged {len(small)} small files into {len(written)} (table version "
                           f"{sink._table().version()})")
    else:
        result.done.append(f"nothing to merge ({len(entries)} files: merging the short ones would not make fewer)")
    result.files_after = len(sink._table().file_uris())
    sink.lease.check()  # a vacuum must not remove files a new holder moved in and has not committed yet
    say(f"compact: vacuum of files no version references, older than {hours} h")
    # delta-rs lists every tombstone past the retention, also those an earlier vacuum deleted: count what is there.
    present = [p for p in _vacuum(sink, hours, enforce_retention, dry_run=True) if sink.fs.exists(sink._path(p))]
    _vacuum(sink, hours, enforce_retention, dry_run=False)
    result.files_removed += len(present)
    result.done.append(f"vacuum: {len(present)} unreferenced files older than {hours} h removed")


def _vacuum(sink, hours: int, enforce_retention: bool, dry_run: bool) -> list[str]:
    """Delta's VACUUM of files no version references, older than `hours`; a retention it refuses is a ConfigError."""
    from deltalake.transaction import CommitProperties

    try:
        return sink._table().vacuum(retention_hours=hours, dry_run=dry_run, enforce_retention_duration=enforce_retention,
                                    commit_properties=CommitProperties(custom_metadata={OPERATION_KEY: COMPACTION}))
    except Exception as exc:
        if enforce_retention and "retention" in str(exc).lower():
            raise ConfigError(f"compact: --retention-hours {hours}: {exc}; Delta refuses a retention shorter than "
                              "the table's delta.deletedFileRetentionDuration (readers of older versions may still "
                              "need those files); pass --allow-short-retention to override") from None
        raise


# ---------------------------------------------------------------------------- iceberg


def _iceberg(sink, cfg: OutputConfig, result: CompactionResult, say, retention_hours: float, **_) -> None:
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan, parquet_file_to_data_file

    from vb_batch.io.filesystems import split_scheme

    sink._fence()  # a compaction that took the lease over commits its epoch and drops the parts the old run staged
    table = sink.catalog.load_table(cfg.table)
    if table.spec().fields:
        raise ConfigError(f"compact: {sink.describe()} is partitioned; vb_batch compacts unpartitioned tables "
                          "only: use the engine's rewrite_data_files")
    tasks = list(table.scan().plan_files())
    if any(task.delete_files for task in tasks):
        raise ConfigError(f"compact: {sink.describe()} has row-level delete files; compact it with the engine "
                          "that wrote them (rewrite_data_files)")
    by_path = {task.file.file_path: task for task in tasks}
    counts = {path: task.file.record_count for path, task in by_path.items()}
    result.files_before, result.rows = len(tasks), sum(counts.values())
    small = _plan(counts, cfg.rows_per_file)
    key = f"{sink.run_id}-compact"
    if small:
        say(f"compact: merging {len(small)} small files of {sink.describe()} into files of {cfg.rows_per_file} rows")
        scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())

        def batches() -> Iterator[pa.RecordBatch]:
            for n, path in enumerate(small, 1):
                yield from scan.to_record_batches([by_path[path]])
                if n % 100 == 0 or n == len(small):
                    say(f"compact: read {n}/{len(small)} small files")

        written = _merge(batches(), None, cfg, sink.run_id, sink.staging)  # the table's schema, as scanned
        try:
            _check_rows(sink, small, counts, written)
            scheme = split_scheme(sink.location)[0]
            urls = [f"{scheme}://{sink._data_path(f.name)}" for f in written]
            added = [parquet_file_to_data_file(table.io, table.metadata, url) for url in urls]

            def build(tx) -> None:
                current = {task.file.file_path for task in sink.table.scan().plan_files()}
                gone = [path for path in small if path not in current]
                if gone:  # never write a snapshot that would keep rows twice
                    raise RuntimeError(f"{sink.describe()}: {len(gone)} small files left the table while it "
                                       "was compacted; nothing was committed, run compact again")
                properties = {**sink._snapshot_properties(key), OPERATION_KEY: COMPACTION}
                with tx.update_snapshot(snapshot_properties=properties).overwrite() as overwrite:
                    for path in small:
                        overwrite.delete_data_file(by_path[path].file)
                    for data_file in added:
                        overwrite.append_data_file(data_file)

            sink._commit_fenced(build, key)
        except BaseException:
            _drop_uncommitted(sink, key, written)
            raise
        result.files_merged, result.files_written = len(small), len(written)
        result.done.append(f"merged {len(small)} small files into {len(written)} (one overwrite snapshot)")
    else:
        result.done.append(f"nothing to merge ({len(tasks)} files: merging the short ones would not make fewer)")
    result.files_after = len(list(sink.catalog.load_table(cfg.table).scan().plan_files()))
    say(f"compact: expiring snapshots older than {retention_hours:g} h")
    _expire_snapshots(sink, retention_hours, result)


def _drop_uncommitted(sink, key: str, written: list[StagedFile]) -> None:
    """Delete this compaction's files when its snapshot did not land and it still holds the table."""
    try:
        sink.lease.check()
        landed = any(s.summary.get("vb.commit") == key for s in sink.catalog.load_table(sink.cfg.table).snapshots())
    except Exception:  # noqa: BLE001 - lost, or the catalog cannot say: the files stay for orphan removal
        return
    for f in [] if landed else written:
        with contextlib.suppress(FileNotFoundError):
            sink.fs.rm(sink._data_path(f.name))


def _expire_snapshots(sink, retention_hours: float, result: CompactionResult) -> None:
    """Expire snapshots older than the retention in one fenced commit, then delete the data and manifest
    files inside the table's location that only expired snapshots referenced.

    The heads of branches and tags stay whatever their age. The input position (`vb_batch.io.positions`)
    names the output's snapshot it was recorded at and holds only while the history back to it is there;
    while it holds, it is moved to the current snapshot in the same commit (the snapshots between
    removed no rows), so expiring what is older does not void it.
    """
    from pyiceberg.table.update.snapshot import ExpireSnapshots

    cutoff_ms = int((datetime.now(timezone.utc) - timedelta(hours=retention_hours)).timestamp() * 1000)
    position = sink.input_position()
    done: dict[str, Any] = {"expired": 0, "garbage": set()}

    def build(tx) -> None:
        metadata = tx.table_metadata
        protected = {ref.snapshot_id for ref in metadata.refs.values()}
        if position is not None and decode_position(metadata.properties.get(POSITION_KEY)) == position:
            tx.set_properties({POSITION_KEY: encode_position({**position,
                                                              "output_snapshot": metadata.current_snapshot_id})})
        elif metadata.properties.get(POSITION_KEY):
            protected |= _ancestors(metadata)  # a position this run did not check: its history stays
        expired = [s for s in metadata.snapshots if s.timestamp_ms < cutoff_ms and s.snapshot_id not in protected]
        gone = {s.snapshot_id for s in expired}
        kept = [s for s in metadata.snapshots if s.snapshot_id not in gone]
        done["expired"], done["garbage"] = len(expired), set()
        if expired:
            ExpireSnapshots(tx).by_ids(sorted(gone)).commit()
            done["garbage"] = _snapshot_files(sink.table.io, expired) - _snapshot_files(sink.table.io, kept)

    sink._commit_fenced(build, key=None)
    location = sink.location.rstrip("/") + "/"
    removed = 0
    for path in sorted(done["garbage"]):
        if not path.startswith(location):  # never anything outside the table's own layout
            continue
        try:
            sink.table.io.delete(path)
            removed += 1
        except Exception as exc:  # noqa: BLE001 - a file the store keeps is garbage, not a failed compaction
            log.warning("%s: could not delete %s, which no snapshot references any more: %s", sink.describe(), path,
                        exc)
    result.files_removed += removed
    result.done.append(f"expired {done['expired']} snapshots older than {retention_hours:g} h; removed {removed} "
                       "files only they referenced")


def _ancestors(metadata) -> set[int]:
    """The current snapshot and all its ancestors still in the table's history."""
    found: set[int] = set()
    snapshot = metadata.snapshot_by_id(metadata.current_snapshot_id) if metadata.current_snapshot_id else None
    while snapshot is not None and snapshot.snapshot_id not in found:
        found.add(snapshot.snapshot_id)
        parent = snapshot.parent_snapshot_id
        snapshot = metadata.snapshot_by_id(parent) if parent is not None else None
    return found


def _snapshot_files(io, snapshots) -> set[str]:
    """Every file the snapshots reference: manifest lists, manifests, and their live data files."""
    files: set[str] = set()
    for snapshot in snapshots:
        files.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(io):
            files.add(manifest.manifest_path)
            files.update(entry.data_file.file_path for entry in manifest.fetch_manifest_entry(io, discard_deleted=True))
    return files
