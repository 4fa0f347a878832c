"""An Airflow DAG that runs a vb_batch job every night, resuming where it stopped (NOT tested here).

Airflow is not installed in vb_batch's test environment (it would add some 60 packages), so this
file is checked only for syntax by the suite; run it once yourself with

    cp jobs/airflow_dag.py $AIRFLOW_HOME/dags/ && VB_BATCH_JOB=/srv/vb/conf/nightly.yaml \\
        airflow dags test vb_batch_nightly

The task runs the job in the Airflow worker (`vb_batch.annotate`, `output.mode=resume`) and maps
vb_batch's outcomes (the exit codes of `vb-batch run` in brackets, docs/operations.md) to Airflow's:

    success, failed rows within run.max_error_fraction (0)   success; the summary as the task's return value
    more failed rows than the budget, a failed job (1)       AirflowFailException: failed, not retried
    invalid config (2)                                       AirflowFailException
    another run holds the output's writer lease (3)          an ordinary error: retried (retries, retry_delay)
    a hosted model's quota is exhausted (4)                  AirflowSkipException: skipped; tomorrow resumes

To run it as a command instead (another venv, a container): a BashOperator with
`bash_command="jobs/cron_job.sh /srv/vb/conf/nightly.yaml"`, `skip_on_exit_code=4` and retries
(the wrapper retries a held lease itself).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task
from airflow.exceptions import AirflowFailException, AirflowSkipException

JOB = os.environ.get("VB_BATCH_JOB", "/srv/vb/conf/nightly.yaml")


@dag(dag_id="vb_batch_nightly", schedule="15 2 * * *", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, tags=["vb_batch"])
def vb_batch_nightly():
    @task(retries=3, retry_delay=timedelta(minutes=10))
    def image_labels() -> dict:
        import vb_batch
        from vb_batch.config import ConfigError
        from vb_batch.errors import QuotaExhaustedError

        try:
            summary = vb_batch.annotate(JOB, ["output.mode=resume"])
        except ConfigError as exc:
            raise AirflowFailException(f"invalid config: {exc}") from exc
        except QuotaExhaustedError as exc:
            raise AirflowSkipException(f"quota exhausted: {exc}; the rows answered are committed") from exc
        # LeaseHeldError (another run writes the output) propagates: Airflow retries after retry_delay.
        if not summary.success:
            raise AirflowFailException(summary.render())
        print(summary.render())
        return {"run_id": summary.run_id, "rows_ok": summary.rows_ok, "rows_failed": summary.rows_failed,
                "output": summary.output}

    image_labels()


vb_batch_nightly()
