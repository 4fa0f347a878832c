"""Running a job: the engine named by `engine.kind` runs it through the shared run core, then the report.

>>> from vb_batch.job import run_job                                 # doctest: +SKIP
>>> summary = run_job(load_config("job.yaml"))                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import Any

from vb_batch.config import JobConfig, load_config
from vb_batch.engines import get_engine
from vb_batch.engines.core import execute_run
from vb_batch.engines.summary import RunSummary
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.models.base import ModelBackend
from vb_batch.timing import phase

log = logging.getLogger(__name__)


def run_job(cfg: JobConfig, backend: ModelBackend | None = None) -> RunSummary:
    """Run a validated job on its configured engine, then write its HTML report (timed as part of the run)."""
    return execute_run(get_engine(cfg.engine.kind), cfg, backend, after=lambda summary: write_run_report(cfg, summary))


def write_run_report(cfg: JobConfig, summary: RunSummary) -> None:
    """The output's HTML report, unless disabled, or a resume found nothing to do (the report stands)."""
    if not cfg.output.report:
        return
    from vb_batch.io.outputs import output_location
    from vb_batch.report import REPORT_NAME, write_report

    # Every step may be refused (a catalog-managed Iceberg table accepts no file but data files in
    # its location): the labels are committed, so a report fault is a warning, never a failed job.
    try:
        location = output_location(cfg.output)
        if summary.rows_processed == 0 and cfg.output.mode == "resume":
            fs, root = fsspec_filesystem(location, cfg.output.storage)
            if fs.exists(posixpath.join(root, REPORT_NAME)):
                summary.report = posixpath.join(location, REPORT_NAME)
                return
        with phase("report"):
            summary.report = write_report(location, cfg.output.storage, cfg.output.report_samples, input_config=cfg.input)
    except Exception as exc:  # noqa: BLE001 - the labels are committed; a report fault must not fail the job
        log.warning("could not write the run report (vb-batch report OUTPUT writes it elsewhere later): %s", exc)


def annotate(config: str | Path | dict[str, Any] | JobConfig, overrides: list[str] | None = None, backend=None) -> RunSummary:
    """Annotate an image table; the Python twin of `vb-batch run CONFIG key=value ...`.

    >>> summary = annotate({"input": {"path": "images/"}, "output": {"path": "out/"},
    ...                     "tasks": ["depth", "normals"],
    ...                     "model": {"backend": "marigold", "path": "prs-eth/marigold-depth-v1-1"}})  # doctest: +SKIP
    >>> print(summary.render())                                                                      # doctest: +SKIP
    """
    cfg = config if isinstance(config, JobConfig) else load_config(config, overrides)
    return run_job(cfg, backend=backend)
