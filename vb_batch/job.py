"""Running a job: pick the engine, and the summary every engine returns."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vb_batch.config import JobConfig, load_config, redacted

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did; printed at the end and written to `<output>/_vb/runs/<run_id>.json`."""

    run_id: str
    output: str
    engine: str
    rows_read: int = 0
    rows_skipped: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    success: bool = False
    message: str = ""
    report: str = ""
    # Where the model's time went, from engines that measure it (None elsewhere): seconds in the
    # model stage, summed over model workers; seconds to load the model (local); seconds the model
    # thread waited for decoded input and for the writer (local: a fed model waits near zero).
    model_seconds: float | None = None
    model_load_seconds: float | None = None
    model_input_wait_seconds: float | None = None
    model_output_wait_seconds: float | None = None

    @property
    def rows_processed(self) -> int:
        return self.rows_ok + self.rows_failed

    @property
    def rows_per_second(self) -> float:
        return self.rows_processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_fraction(self) -> float:
        return self.rows_failed / self.rows_processed if self.rows_processed else 0.0

    def within_error_budget(self, max_fraction: float) -> bool:
        """False (with a message) when more than `max_fraction` of the processed rows failed."""
        if self.error_fraction <= max_fraction:
            return True
        self.message = (
            f"error fraction {self.error_fraction:.3f} exceeds run.max_error_fraction={max_fraction}; "
            "rows that succeeded are committed"
        )
        return False

    def count_errors(self, codes: list[str | None]) -> None:
        failed = Counter(c for c in codes if c is not None)
        self.rows_failed += sum(failed.values())
        self.rows_ok += sum(1 for c in codes if c is None)
        for code, n in failed.items():
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": round(self.rows_per_second, 3)}

    def model_line(self) -> str:
        """e.g. "1.92 s, 80% of the run; waited 0.04 s for input, 0.00 s for the writer; loaded in 0.38 s"."""
        parts = [f"{self.model_seconds:.2f} s"]
        if self.model_input_wait_seconds is not None:  # one model thread (local)
            if self.seconds > 0:
                parts[0] += f", {self.model_seconds / self.seconds:.0%} of the run"
            parts.append(
                f"waited {self.model_input_wait_seconds:.2f} s for input, "
                f"{self.model_output_wait_seconds or 0.0:.2f} s for the writer"
            )
        else:
            parts[0] += " summed over the model workers"
        if self.model_load_seconds is not None:
            parts.append(f"loaded in {self.model_load_seconds:.2f} s")
        return "; ".join(parts)

    def render(self) -> str:
        status = "finished" if self.success else "FAILED"
        lines = [
            f"vb-batch run {self.run_id} {status} ({self.engine} engine) in {self.seconds:.1f} s",
            f"  rows: {self.rows_ok} ok, {self.rows_failed} failed, {self.rows_skipped} skipped (already done)"
            f" of {self.rows_read} read; {self.rows_per_second:.2f} rows/s",
        ]
        for code, n in sorted(self.errors_by_code.items(), key=lambda kv: -kv[1]):
            lines.append(f"  error {code}: {n} row(s)")
        if self.model_seconds is not None:
            lines.append(f"  model: {self.model_line()}")
        lines.append(f"  output: {self.output}")
        if self.report:
            lines.append(f"  report: {self.report}")
        if self.message:
            lines.append(f"  {self.message}")
        return "\n".join(lines)


@contextlib.contextmanager
def tracked_run(
    cfg: JobConfig, sink, summary: RunSummary, started: float, total_rows: int | None,
    record: Callable[[], dict[str, Any]] = dict,
) -> Iterator[Callable[[int], None]]:
    """What every engine does around its loop: progress, the error budget, and closing the sink.

    Yields `advance(rows)` for the progress bar. On the way out the sink commits what was
    written (also after a failure) and writes `_SUCCESS` only when the run succeeded; the run
    record gets the summary, the redacted config and `record()`.
    """
    bar = tqdm(total=total_rows, unit="img", desc="vb-batch", disable=not cfg.run.progress, smoothing=0.1)

    def advance(rows: int) -> None:
        bar.update(rows)
        bar.set_postfix(ok=summary.rows_ok, failed=summary.rows_failed, refresh=False)

    try:
        yield advance
        summary.success = summary.within_error_budget(cfg.run.max_error_fraction)
    except BaseException as exc:
        summary.message = f"stopped by {type(exc).__name__}: {exc}"
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
        sink.close(success=summary.success, summary={**summary.as_dict(), "config": redacted(cfg), **record()})


def run_job(cfg: JobConfig, backend=None) -> RunSummary:
    """Run a validated job on its configured engine, then write its HTML report."""
    if cfg.engine.kind == "local":
        from vb_batch.engines.local import run_local

        summary = run_local(cfg, backend=backend)
    elif cfg.engine.kind == "ray":
        from vb_batch.engines.ray import run_ray

        summary = run_ray(cfg, backend=backend)
    elif cfg.engine.kind == "spark":
        from vb_batch.engines.spark import run_spark

        summary = run_spark(cfg, backend=backend)
    else:
        raise ValueError(f"engine.kind: unknown engine {cfg.engine.kind!r}")
    if cfg.output.report:
        from vb_batch.io.outputs import output_location
        from vb_batch.report import write_report

        try:
            location = output_location(cfg.output)
            summary.report = write_report(location, cfg.output.storage, cfg.output.report_samples)
        except Exception as exc:  # noqa: BLE001 - the labels are committed; a report fault must not fail the job
            log.warning("could not write the run report: %s", exc)
    return summary


def annotate(config: str | Path | dict[str, Any] | JobConfig, overrides: list[str] | None = None, backend=None) -> RunSummary:
    """Annotate an image table; the Python twin of `vb-batch run CONFIG key=value ...`.

    >>> summary = annotate({"input": {"path": "images/"}, "output": {"path": "out/"},
    ...                     "tasks": ["depth", "normals"],
    ...                     "model": {"backend": "marigold", "path": "prs-eth/marigold-depth-v1-1"}})  # doctest: +SKIP
    >>> print(summary.render())                                                                      # doctest: +SKIP
    """
    cfg = config if isinstance(config, JobConfig) else load_config(config, overrides)
    return run_job(cfg, backend=backend)
