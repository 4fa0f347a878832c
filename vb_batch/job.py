"""Running a job: the engine named by `engine.kind` runs it through the shared run core, then the report.

>>> from vb_batch.job import run_job                                 # doctest: +SKIP
>>> summary = run_job(load_config("job.yaml"))                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vb_batch.config import JobConfig, load_config
from vb_batch.engines import get_engine
from vb_batch.engines.base import RunSummary, execute_run
from vb_batch.models.base import ModelBackend

log = logging.getLogger(__name__)


def run_job(cfg: JobConfig, backend: ModelBackend | None = None) -> RunSummary:
    """Run a validated job on its configured engine, then write its HTML report."""
    summary = execute_run(get_engine(cfg.engine.kind), cfg, backend)
    if cfg.output.report:
        from vb_batch.io.outputs import output_location
        from vb_batch.report import write_report

        try:
            summary.report = write_report(
                output_location(cfg.output), cfg.output.storage, cfg.output.report_samples, input_config=cfg.input
            )
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
