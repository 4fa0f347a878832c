"""Dagster definitions: a vb_batch job as an asset, materialised nightly, resuming where it stopped.

    pip install dagster dagster-webserver        # or: pip install -e '.[schedulers]' (dagster only)
    VB_BATCH_JOB=conf/nightly.yaml dagster dev -f jobs/dagster_assets.py   # UI on 127.0.0.1:3000
    VB_BATCH_JOB=conf/nightly.yaml dagster asset materialize -f jobs/dagster_assets.py --select image_labels

The asset runs the job in the Dagster process (`vb_batch.annotate`) with `output.mode=resume`, so
each materialisation labels only the rows the output does not hold yet. vb_batch's outcomes map to
Dagster's own (the exit codes of `vb-batch run` in brackets, docs/operations.md):

    success, failed rows within run.max_error_fraction (0)   materialised; counts and the run id as metadata
    more failed rows than the budget, a failed job (1)       `Failure` with the summary; committed rows stay
    invalid config (2)                                       the config error, not retried
    another run holds the output's writer lease (3)          `RetryRequested`: tried again after retry_after_s
    a hosted model's quota is exhausted (4)                  `Failure`, not retried: the next scheduled run
                                                             resumes once the quota is back

Build your own with `vb_batch_asset(name, config, overrides)`; engines are chosen by the config as
usual (`engine.kind: ray` joins a cluster from the Dagster worker, `spark` starts a session).
"""

# No `from __future__ import annotations`: Dagster reads the context parameter's annotation as a type.
import os
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

import vb_batch
from vb_batch.errors import QuotaExhaustedError
from vb_batch.io.lease import LeaseHeldError


def vb_batch_asset(name: str, config: str | Path | dict, overrides: Sequence[str] = ("output.mode=resume",),
                   retry_after_s: float = 600, lease_retries: int = 3) -> dg.AssetsDefinition:
    """An asset that runs the vb_batch job `config` (a YAML path or a dict) with `overrides` when materialised."""

    @dg.asset(name=name, description=f"vb_batch labels written by the job {config if not isinstance(config, dict) else name}")
    def labels(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        try:
            summary = vb_batch.annotate(config, list(overrides))
        except LeaseHeldError as exc:  # another run writes this output: nothing was changed, try later
            context.log.warning(str(exc))
            raise dg.RetryRequested(max_retries=lease_retries, seconds_to_wait=retry_after_s) from exc
        except QuotaExhaustedError as exc:
            raise dg.Failure(description=f"quota exhausted: {exc}; the rows answered are committed, the next "
                             "scheduled run resumes", allow_retries=False) from exc
        metadata = {
            "run_id": summary.run_id, "output": summary.output, "rows_read": summary.rows_read,
            "rows_ok": summary.rows_ok, "rows_failed": summary.rows_failed, "rows_skipped": summary.rows_skipped,
            "errors_by_code": summary.errors_by_code, "seconds": round(summary.seconds, 3),
        }
        if not summary.success:
            raise dg.Failure(description=summary.render(), metadata=metadata, allow_retries=False)
        context.log.info(summary.render())
        return dg.MaterializeResult(metadata=metadata)

    return labels


image_labels = vb_batch_asset("image_labels", os.environ.get("VB_BATCH_JOB", "conf/demo.yaml"))
nightly = dg.define_asset_job("vb_batch_nightly", selection=[image_labels])
defs = dg.Definitions(
    assets=[image_labels],
    jobs=[nightly],
    schedules=[dg.ScheduleDefinition(job=nightly, cron_schedule="15 2 * * *")],  # 02:15 every night
)
