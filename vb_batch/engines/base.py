"""The old home of the run core, kept so that `from vb_batch.engines.base import ...` goes on working.

The run core now lives in `vb_batch.engines.core` (the run, the `Engine`
protocol); beside it `summary` (the run summary), `checks` (what must hold
before the output is touched) and `resume` (the resume filter). Part reports,
staged part files and compaction are the sinks' worker half
(`vb_batch.io.sinks.staging`); the per-process model cache, rebatching and
read-ahead are `vb_batch.pipeline.stream`.
"""

from __future__ import annotations

from vb_batch.engines.checks import SHOWN_IDS, check_ids, check_paths
from vb_batch.engines.core import (
    Engine,
    Run,
    all_committed,
    estimate_cost,
    execute_run,
    finish_times,
    start_run,
    tracked_run,
)
from vb_batch.engines.resume import ResumeFilter
from vb_batch.engines.summary import RunSummary
from vb_batch.errors import cpu_count
from vb_batch.io.sinks.staging import (
    PART_SCHEMA,
    Compactor,
    StagedParts,
    compact,
    part_report,
    stage_parts,
)
from vb_batch.pipeline.stream import cached_backend, read_ahead, rebatch

__all__ = [
    "PART_SCHEMA", "SHOWN_IDS", "Compactor", "Engine", "ResumeFilter", "Run", "RunSummary", "StagedParts",
    "all_committed", "cached_backend", "check_ids", "check_paths", "compact", "cpu_count", "estimate_cost",
    "execute_run", "finish_times", "part_report", "read_ahead", "rebatch", "stage_parts", "start_run",
    "tracked_run",
]
