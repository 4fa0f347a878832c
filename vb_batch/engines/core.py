"""The run core every engine shares, and the small protocol an engine implements.

A run, whatever executes it:

    engine.check(cfg, backend)           refuse what this engine cannot do (fast, nothing opened)
    run = start_run(cfg, engine.name)    source, plan, sink; input/output overlap, ids, the output's
                                         ownership and fingerprint checked before anything is changed
    with run.sink.lease_held():          one writer per output
        with engine.session(run, backend) as session:    load the model / join the cluster
            done = run.sink.open()       recover, apply the mode; committed ids -> run.resume
            with tracked_run(run):       progress, error budget, commit + run record + _SUCCESS
                engine.execute(run, session)
        after(summary)                   e.g. the report; then the run record gets the final times

A resume whose input ids are all committed opens the sink first and returns
without loading the model or joining a cluster.

Time: every thread of the run (and every Ray or Spark task, through its part
reports) collects seconds per phase (`vb_batch.timing`) into `run.times`; the
summary gives those, and the driver's wall time split into start, model
load, processing, closing and `after`, with what is left unexplained.

An engine only decides where the stages run. Whatever it runs, it reports
each written part with `run.apply(report)` (one schema, `PART_SCHEMA`: file,
rows, skipped, error codes, model seconds, model nodes), so the summary, the
commits and the progress bar work the same everywhere. What a worker process
needs lives beside it, shared by every engine: the resume filter
(`engines/resume.py`), part reports and staged files (the sinks' worker half,
`vb_batch.io.sinks.staging`), the cached backend, rebatching and read-ahead
(`vb_batch.pipeline.stream`); the summary is
`engines/summary.py`; the input checks before anything is touched `engines/checks.py`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from vb_batch.codecs import kernels
from vb_batch.config import ConfigError, JobConfig, redacted
from vb_batch.engines.checks import check_ids, check_paths
from vb_batch.engines.resume import ResumeFilter
from vb_batch.engines.summary import RunSummary
from vb_batch.io.filesystems import (
    check_bucket,
)
from vb_batch.io.formats import open_sink
from vb_batch.io.positions import InputState, relative_name, usable
from vb_batch.io.sinks import Sink, schema_fingerprint
from vb_batch.io.sinks.staging import part_report
from vb_batch.io.sources import Source, open_source
from vb_batch.logs import Progress, print_estimate
from vb_batch.masking import mask_text, mask_url, secret_values
from vb_batch.models.base import ModelBackend, cost_estimate, resolved_model_settings
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.timing import PhaseTimes, collecting

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One job run as the engines see it: config, source, plan, sink, summary, the committed ids."""

    cfg: JobConfig
    source: Source
    plan: ResolvedJob
    sink: Sink
    summary: RunSummary
    started: float
    resume: ResumeFilter | None = None
    advance: Callable[[int], None] = lambda rows: None
    times: PhaseTimes = field(default_factory=PhaseTimes)  # seconds per phase, every thread and worker
    ids: pa.Array | None = None  # the input's pending ids, when they are a column (read by the id checks)
    state: InputState | None = None  # where the input stood at the start (`vb_batch.io.positions`)
    position: dict[str, Any] | None = None  # the recorded input position this run skips files by
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def apply(self, report: dict[str, Any]) -> None:
        """Count one part report (see `PART_SCHEMA`); a reported file is staged for the next commit."""
        with self._lock:
            if report["file"]:
                self.sink.stage(report["file"], report["rows"])
            summary = self.summary
            summary.count_errors(report["rows"], report["error_codes"])
            summary.rows_skipped += report["skipped"]
            if report["model_seconds"]:
                summary.model_seconds = (summary.model_seconds or 0.0) + report["model_seconds"]
            for entry in report["model_nodes"]:
                summary.model_nodes[entry["node"]] = summary.model_nodes.get(entry["node"], 0) + entry["rows"]
            self.times.merge({entry["name"]: entry["seconds"] for entry in report.get("phases") or []})
            self.advance(report["rows"] + report["skipped"])

    def pending_batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        """The source's rows, minus those already committed, in batches of at most `rows` (one process)."""
        for batch in self.source.batches(rows):
            batch, skipped = self.resume.apply(batch) if self.resume else (batch, 0)
            if skipped:
                self.apply(part_report(0, skipped=skipped))
            if batch.num_rows:
                yield batch


def start_run(cfg: JobConfig, engine: str, started: float | None = None) -> Run:
    """Open the source, plan the output and check everything that must hold before the output is touched."""
    started = started or time.perf_counter()
    try:
        kernels.mode()  # a bad VB_BATCH_CODEC_KERNELS is the operator's error (exit 2), not every row's
    except ValueError as error:
        raise ConfigError(str(error)) from None
    source = open_source(cfg.input)
    check_paths(cfg, source)
    if cfg.output.format != "iceberg":
        check_bucket(cfg.output.path, cfg.output.storage, "output.path")
    plan = ResolvedJob.build(cfg, source.schema, image_column=source.image_column, uri_column=source.uri_column)
    schema = plan.output_schema()
    sink = open_sink(cfg.output, plan.run_id, schema, source.id_column,
                     fingerprint=schema_fingerprint(schema, plan.model, plan.profile),
                     retry_failed=cfg.run.retry_failed)
    sink.check()
    summary = RunSummary(run_id=plan.run_id, output=mask_url(cfg.output.name), engine=engine,
                         model_settings=resolved_model_settings(cfg.model))
    # A resume opens only what its output's input position does not call done (read-only here; checked
    # again once the lease is held, `check_position`); the id checks then read only what is pending.
    state = source.state()
    position = sink.input_position() if cfg.output.mode == "resume" else None
    if usable(position, state, cfg.run.retry_failed):
        source.skip_done(source.done_by(position, state))
    if source.unread:
        summary.files_unread = len(source.unread)
        summary.rows_unread = sum(rows or 0 for rows in source.unread.values())
        summary.input_position = describe_position(position)
    else:
        position = None
    ids = checked_ids(source, summary)
    # The pending ids: a resume looks up only these among the committed ones, and returns before the
    # model loads when all are.
    keep_ids = ids is not None and cfg.output.mode == "resume"
    return Run(cfg, source, plan, sink, summary, started, ids=ids if keep_ids else None, state=state,
               position=position)


def checked_ids(source: Source, summary: RunSummary) -> pa.Array | None:
    """`check_ids` on what the source will read; the rows `input.duplicate_ids: first` skips, counted."""
    ids = check_ids(source)
    duplicates = sum(len(rows) for rows in (source.skip_rows or {}).values())
    summary.skipped_by_code.pop("duplicate_id", None)
    if duplicates:
        summary.skipped_by_code["duplicate_id"] = duplicates
    return ids


def check_position(run: Run, done: pa.Array | None) -> pa.Array | None:
    """With the lease held: the files this run left unread must still be done by the output's position;
    the committed ids among the pending ones (`done`, again for the whole input when it changed).

    The position was read before the lease, and the run holding the output meanwhile, or this run's
    own recovery (a committed file found lost), may have voided it: then the files' rows may be gone
    from the output, and this run reads the whole input after all.
    """
    if not run.source.unread:
        return done
    now = run.sink.input_position()
    kept = run.source.done_by(now, run.state) if usable(now, run.state, run.cfg.run.retry_failed) else {}
    lost = set(run.source.unread) - set(kept)
    if not lost:
        return done
    log.warning("%s: %d input file(s) recorded as done are no longer (the output changed: rows removed); "
                "reading the whole input", run.sink.describe(), len(lost))
    run.source, run.position, summary = open_source(run.cfg.input), None, run.summary
    run.ids = checked_ids(run.source, summary)
    summary.files_unread, summary.rows_unread, summary.input_position = 0, 0, ""
    return run.sink.committed_ids(among=run.ids)


def input_read(run: Run) -> dict[str, Any] | None:
    """The input position this run may record once it went through its whole input (None: an image listing)."""
    if run.state is None:
        return None
    source = run.source
    rows = {relative_name(url, source.root()): n for url, n in source.unread.items() if n is not None}
    unread = {relative_name(url, source.root()) for url in source.unread}
    read = source.rows_by_file() if run.state.kind == "files" else {}
    position = run.state.position({**{name: rows.get(name) for name in unread}, **read})
    if run.position is not None and same_position(position, run.position):
        return None  # nothing new was found: the output already says so, no commit needed
    position.update(run_id=run.plan.run_id, recorded=time.time())
    return position


def same_position(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two input positions say the same (who recorded them and when aside)."""
    def said(p: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if k not in ("run_id", "recorded", "output_snapshot")}
    return said(a) == said(b)


def describe_position(position: dict[str, Any] | None) -> str:
    """An input position in words, for the summary."""
    if not position:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(position.get("recorded", 0)))
    if position.get("kind") == "files":
        what = f"a listing of {len(position.get('files') or {})} file(s)"
    else:
        what = f"{position.get('kind')} {'version' if position.get('kind') == 'delta' else 'snapshot'} " \
               f"{position.get('input_version')}"
    return f"{what}, recorded by run {position.get('run_id', '?')} at {when} UTC"


@contextlib.contextmanager
def tracked_run(run: Run, record: Callable[[], dict[str, Any]] = dict) -> Iterator[None]:
    """What every engine does around its loop: progress, the error budget, and closing the sink.

    On the way out the sink commits what was written (also after a failure)
    and writes `_SUCCESS` only when the run succeeded; the run record gets the
    summary, the redacted config and `record()`.
    """
    cfg, summary = run.cfg, run.summary
    # A bar on a terminal, JSON progress events with --log-format json, nothing in a log file (`vb_batch.logs`).
    progress = Progress(summary.run_id, summary.engine, summary.rows_read, enabled=cfg.run.progress)

    def advance(rows: int) -> None:
        progress.update(rows, summary.rows_ok, summary.rows_failed)

    run.advance = advance
    if summary.rows_unread:
        advance(summary.rows_unread)  # skipped unread: done as soon as the run starts
    try:
        yield
        # Every row read was processed, or dropped before the model as already committed.
        summary.rows_skipped = max(summary.rows_skipped, summary.rows_read - summary.rows_processed)
        summary.success = summary.within_error_budget(cfg.run.max_error_fraction)
        # The whole input went through: where it stood is recorded after the last commit.
        run.sink.position = input_read(run)
    except BaseException as exc:
        # The run record is stored with the output: what an exception says is masked like the config.
        summary.message = mask_text(f"stopped by {type(exc).__name__}: {exc}", secret_values(cfg.model_dump(mode="json")))
        raise
    finally:
        progress.close()
        summary.seconds = time.perf_counter() - run.started
        summary.take_times(run.times)
        run.sink.close(success=summary.success, summary={**summary.as_dict(), "config": redacted(cfg), **record()})


# ---------------------------------------------------------------------------- engines


class Engine:
    """What an engine implements: see the module docstring. Engines are registered in `vb_batch.engines.ENGINES`."""

    name: ClassVar[str]
    # Whether a backend *instance* can be used (only where the model runs in this process).
    accepts_backend_instance: ClassVar[bool] = False

    def check(self, cfg: JobConfig, backend: ModelBackend | None) -> None:
        """Refuse a job this engine cannot run, before anything is opened."""
        if backend is not None and not self.accepts_backend_instance:
            raise ConfigError(
                f"engine.kind: the {self.name} engine builds the model in each worker from model.*; a backend "
                "instance works only with the local engine; name your own as model.backend: package.module:Class"
            )

    @contextlib.contextmanager
    def session(self, run: Run, backend: ModelBackend | None) -> Iterator[Any]:
        """Set up what `execute` needs (a loaded model, a cluster connection) and tear it down after."""
        yield backend

    def execute(self, run: Run, session: Any) -> None:
        raise NotImplementedError


def execute_run(engine: Engine, cfg: JobConfig, backend: ModelBackend | None = None,
                after: Callable[[RunSummary], None] | None = None) -> RunSummary:
    """Run `cfg` on `engine`: the run core every engine shares (see the module docstring).

    `after(summary)` runs once the rows are committed, still holding the output (the report);
    its time is part of the run's, and the run record is rewritten with the final times.
    """
    engine.check(cfg, backend)
    started = time.perf_counter()
    clock = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        run.summary.wall_seconds[name] = round(run.summary.wall_seconds.get(name, 0.0) + now - clock[0], 4)
        clock[0] = now

    with contextlib.ExitStack() as scope:
        run = start_run(cfg, engine.name, started)
        scope.enter_context(collecting(run.times))
        scope.enter_context(run.sink.lease_held())
        # Resume never clears anything: open first, and skip the model when every input id is committed.
        done = run.sink.open(among=run.ids) if cfg.output.mode == "resume" else None
        done = check_position(run, done)
        if done is not None:
            run.source.done_ids = done  # units whose ids are all committed are not read
        if done is not None and (all_committed(run.ids, done) or nothing_pending(run.source)):
            run.resume = ResumeFilter(done, run.source.id_column, key=run.plan.run_id)
            run.summary.rows_read = (len(run.ids) if run.ids is not None else 0) + run.summary.rows_unread
            lap("start")
            with tracked_run(run, lambda: {"nothing_to_do": True}):
                run.summary.message = "nothing to do: every input id is committed (the model was not loaded)"
            lap("closing")
        else:
            lap("start")
            with engine.session(run, backend) as session:
                lap("model_load")
                if cfg.output.mode != "resume":
                    done = run.sink.open()
                run.resume = ResumeFilter(done, run.source.id_column, key=run.plan.run_id)
                run.summary.rows_read = run.source.count_rows() + run.summary.rows_unread
                log.info("run %s on %s: %s", run.plan.run_id, engine.name, redacted(cfg))
                estimate_cost(run)
                try:
                    with tracked_run(run):
                        lap("start")
                        try:
                            engine.execute(run, session)
                        finally:
                            lap("processing")
                finally:
                    lap("closing")
            lap("closing")
        if after is not None:
            after(run.summary)
            lap("after")
        finish_times(run)
    return run.summary


def estimate_cost(run: Run) -> None:
    """For backends that price their calls (hosted models): requests and cost before any is made."""
    pending = max(0, run.summary.rows_read - run.summary.rows_unread - len(run.resume or []))
    passes = sum(task.passes(run.plan.ctx) for task in run.plan.tasks)
    estimate = cost_estimate(run.cfg.model, pending, passes)
    if estimate is None:
        return
    from vb_batch.models.hosted import describe_estimate

    run.summary.estimate = estimate
    line = f"vb-batch estimate: {describe_estimate(run.summary.estimate)}"
    log.info(line)
    if run.cfg.run.progress:
        print_estimate(line, estimate)  # a line on stderr, or a JSON event


def nothing_pending(source: Source) -> bool:
    """Whether an input position left no data file to read."""
    return bool(source.unread) and not any(True for _ in source.dataset.get_fragments())


def all_committed(ids: pa.Array | None, done: pa.Array) -> bool:
    """Whether every input id is among the committed ones (False when the input has no id column)."""
    if ids is None or len(done) < len(ids):
        return False
    try:
        return bool(pc.all(pc.is_in(ids, value_set=done.cast(ids.type))).as_py()) if len(ids) else True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # ids of another type than the output's: run normally
        return False


def finish_times(run: Run) -> None:
    """The run's final times, including closing and `after`, into the summary and the run record."""
    summary = run.summary
    summary.seconds = time.perf_counter() - run.started
    summary.take_times(run.times)
    summary.unexplained_seconds = round(max(0.0, summary.seconds - sum(summary.wall_seconds.values())), 4)
    with contextlib.suppress(Exception):  # the record written at close stands if this one cannot be
        run.sink.update_run_record(summary.as_dict())



