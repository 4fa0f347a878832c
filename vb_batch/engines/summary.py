"""The run summary: rows ok / failed / skipped, errors by code, where the time went; rendered at the end of a run.

One `RunSummary` per run, filled by the run core from the engines' part
reports (`vb_batch.engines.core.Run.apply`) and the per-thread phase
collectors (`vb_batch.timing`); stored as the run record under `_vb/runs/`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from vb_batch.timing import COUNTS, USAGE_COUNTS, PhaseTimes



# ---------------------------------------------------------------------------- the summary


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
    # Rows skipped for a reason other than "already committed", by code (`duplicate_id`: a later row
    # of an id under `input.duplicate_ids: first`); they are counted in `rows_skipped` too.
    skipped_by_code: dict[str, int] = field(default_factory=dict)
    # Input files a recorded input position calls done (`vb_batch.io.positions`): skipped without
    # being opened, with their rows (as the position or the table's log counts them; with an
    # input.filter, a lake table's are not known), counted in rows_read and rows_skipped too.
    files_unread: int = 0
    rows_unread: int = 0
    input_position: str = ""  # the position this run started from, in words ("" when none counted)
    seconds: float = 0.0
    success: bool = False
    message: str = ""
    report: str = ""
    # Where the model's time went (None where an engine did not run the model), summed over the
    # model workers: seconds in model calls, seconds to load the model (local), and seconds the
    # model worker waited for input and for its output to be taken; `model_busy` is the calls'
    # share of the three. What each engine measures:
    #   local: the one model thread of `annotate_stream` (`ModelClock`): calls; the wait for decoded
    #          input; the wait to hand a batch on to the io threads and the writer.
    #   spark: the same `ModelClock`, one per task, carried in the part reports and summed.
    #   ray:   each model actor around its `__call__`: calls in `run_model`; the time between
    #          calls (from the actor's start to its first call, then from one call's return to the
    #          next) as input wait. Ray Data does not tell an actor why no batch came (no input yet,
    #          or its output not taken), so a backed-up output shows as input wait; output wait is 0.
    model_seconds: float | None = None
    model_load_seconds: float | None = None
    model_input_wait_seconds: float | None = None
    model_output_wait_seconds: float | None = None
    model_nodes: dict[str, int] = field(default_factory=dict)  # rows per node that ran the model (Ray)
    # Model calls (one per task, pass and group of rows) and the images they answered, summed over workers.
    model_calls: int | None = None
    model_images: int | None = None
    # Busy seconds per phase (`vb_batch.timing.PHASES`), summed over threads and workers: they overlap,
    # so their sum may exceed `seconds`.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # The driver's wall time, in order: start (source, plan, checks, lease, sink), model_load,
    # processing (the engine's loop), closing (last commit, run record), after (the report);
    # `unexplained_seconds` is `seconds` minus their sum.
    wall_seconds: dict[str, float] = field(default_factory=dict)
    unexplained_seconds: float = 0.0
    estimate: dict[str, Any] | None = None  # hosted backends: requests and cost, before the run
    # Hosted backends: what the services billed this run (input, output, thought tokens; cost in US$ at the
    # model's token prices, summed over the rows' `vb_usage`), None where nothing was reported.
    usage: dict[str, float] | None = None
    model_settings: dict[str, Any] = field(default_factory=dict)  # defaults resolved from the checkpoint

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

    def count_errors(self, rows: int, codes: list[str]) -> None:
        """Count `rows` processed rows, of which those in `codes` (one code per failed row) failed."""
        self.rows_failed += len(codes)
        self.rows_ok += rows - len(codes)
        for code, n in Counter(codes).items():
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + n

    @property
    def model_busy(self) -> float | None:
        """Model calls' share of the model stage's time (calls + input wait + output wait); None if unmeasured."""
        if self.model_seconds is None or self.model_input_wait_seconds is None:
            return None
        stage = self.model_seconds + self.model_input_wait_seconds + (self.model_output_wait_seconds or 0.0)
        return self.model_seconds / stage if stage > 0 else None

    def as_dict(self) -> dict[str, Any]:
        busy = self.model_busy
        return {**asdict(self), "rows_per_second": round(self.rows_per_second, 3),
                "model_busy": None if busy is None else round(busy, 4)}

    def add_model_waits(self, report: dict[str, Any]) -> None:
        """Add a worker's part report's model waits (input, output) to the run's; reports without them add none."""
        for key in ("model_input_wait_seconds", "model_output_wait_seconds"):
            if report.get(key) is not None:
                setattr(self, key, (getattr(self, key) or 0.0) + report[key])

    def take_times(self, times: PhaseTimes) -> None:
        """Seconds per phase, and the model's call counts that travel with them, from the run's collector."""
        phases = times.as_dict()
        counts = {name: phases.pop(name) for name in COUNTS if name in phases}
        self.phase_seconds = phases
        if "model_calls" in counts:
            self.model_calls = round(counts["model_calls"])
            self.model_images = round(counts.get("model_images", 0))
        if any(name in counts for name in USAGE_COUNTS):
            self.usage = {name.removeprefix("usage_"): round(counts.get(name, 0), 6) if name == "usage_cost"
                          else round(counts.get(name, 0)) for name in USAGE_COUNTS}

    def model_line(self) -> str:
        """e.g. "1.92 s, 80% of the run; loaded in 0.38 s; 12 calls of 4.0 images on average"."""
        parts = [f"{self.model_seconds:.2f} s"]
        if self.engine == "local":  # one model thread
            if self.seconds > 0:
                parts[0] += f", {self.model_seconds / self.seconds:.0%} of the run"
        else:
            parts[0] += " summed over the model workers"
        if self.model_load_seconds is not None:
            parts.append(f"loaded in {self.model_load_seconds:.2f} s")
        if self.model_calls:
            parts.append(f"{self.model_calls} calls of {self.model_images / self.model_calls:.1f} images on average")
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
        if self.files_unread:
            lines.append(f"  skipped unread: {self.files_unread} input file(s) ({self.rows_unread} of the skipped "
                         f"rows), done as of {self.input_position}")
        for code, n in sorted(self.skipped_by_code.items()):
            lines.append(f"  skipped {code}: {n} row(s) (not already done: see input.duplicate_ids)")
        if self.model_seconds is not None:
            lines.append(f"  model: {self.model_line()}")
        if self.model_busy is not None:
            lines.append(
                f"  model busy {self.model_busy:.2f} of its stage: {self.model_seconds:.1f} s in calls, "
                f"{self.model_input_wait_seconds:.1f} s waiting for input, {self.model_output_wait_seconds or 0.0:.1f} s for output"
            )
        if self.estimate:
            from vb_batch.models.hosted import describe_estimate

            lines.append(f"  estimate: {describe_estimate(self.estimate)}")
        if self.usage:
            u = self.usage
            lines.append(f"  billed: {u['input_tokens']} input + {u['output_tokens']} output + {u['thought_tokens']} "
                         f"thought tokens; cost {u['cost']:.4f} US$ (at model.token_prices)")
        if self.wall_seconds:
            spent = " + ".join(f"{name.replace('_', ' ')} {s:.2f}" for name, s in self.wall_seconds.items())
            lines.append(f"  wall: {spent} s; unexplained {self.unexplained_seconds:.2f} s")
        if self.phase_seconds:
            busy = ", ".join(f"{name.replace('_', '+')} {s:.2f}" for name, s in self.phase_seconds.items())
            lines.append(f"  busy (s, summed over threads and workers): {busy}")
        lines.append(f"  output: {self.output}")
        if self.report:
            lines.append(f"  report: {self.report}")
        if self.message:
            lines.append(f"  {self.message}")
        return "\n".join(lines)


