"""Real clusters: the contract suite's basic job sent with `spark-submit` and with `ray job submit`.

A standalone Spark (master and worker processes started with `spark-class`) and a multi-process
Ray (`ray start --head` and `ray start --address`), both on this host (tests/clusters.py). The job
is the engine contract's basic one (tests/test_engine_contract.py: painted PNGs, an empty and a
junk row, the identity model, every task); each is launched as docs/clusters.md says, from a shell
with no venv activated, must exit 0, and its output must equal the stages run in one batch.
Spark's executors run a venv shipped with `--archives` (`PYSPARK_PYTHON=./environment/bin/python`);
Ray's job ships its project folder as the runtime env's working_dir, and its model runs on the
node that is not the head. A config error's exit code (2) reaches the scheduler through each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from clusters import BIN, ray_cluster, run, spark_standalone, venv_env
from conftest import write_painted_input
from test_engine_contract import ROWS, comparable, job, stages_in_one_batch

from vb_batch.io.outputs import read_output

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def write_job(folder: Path, out: Path) -> tuple[Path, dict]:
    """The engine contract's basic job (its input, its config) as a YAML file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_painted_input(folder / "in.parquet")
    cfg = job(folder / "in.parquet", out, "local")  # each entrypoint sets engine.kind itself
    (folder / "job.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    return folder / "job.yaml", cfg


def check_output(out: Path, cfg: dict, engine: str) -> dict:
    """What the contract asks of every engine: the output equals the stages run in one batch; returns the run record."""
    table = read_output(str(out))
    assert table.num_rows == ROWS and len(set(table.column("id").to_pylist())) == ROWS
    assert comparable(table).equals(comparable(stages_in_one_batch(cfg)))
    (path,) = (out / "_vb" / "runs").glob("*.json")
    record = {**json.loads(path.read_text()), "run_id": path.stem}
    assert record["engine"] == engine and (record["rows_ok"], record["rows_failed"]) == (ROWS - 2, 2)
    assert (out / "_SUCCESS").exists() and not (out / "_vb" / "staging").exists()
    return record


def packed_venv(folder: Path) -> Path:
    """A venv archived as venv-pack archives one, small: its site-packages reach this venv's by a .pth file.

    `bin/python` is a link to the base interpreter and `pyvenv.cfg` makes it this venv's Python,
    exactly as in a venv-pack archive; only the packages are not copied (the suite's venv is ~3 GB,
    and has vb_batch installed editable, which venv-pack refuses).
    """
    env = folder / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(BIN.parent))
    (site,) = (env / "lib").glob("python3*/site-packages")
    (site / "_packed.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    archive = folder / "env.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(env, arcname=".")
    return archive


def test_spark_submit_runs_the_job_on_a_standalone_cluster(tmp_path):
    config, cfg = write_job(tmp_path / "job", tmp_path / "out")
    archive = packed_venv(tmp_path)
    with spark_standalone(tmp_path / "spark", cores=1) as cluster:
        # As docs/clusters.md says: the venv's spark-submit, not activated; the driver on the venv's
        # Python, the executors on the shipped venv, unpacked by Spark into their own folder.
        env = venv_env(PYSPARK_DRIVER_PYTHON=str(BIN / "python"), PYSPARK_PYTHON="./environment/bin/python")
        result = run([str(BIN / "spark-submit"), "--master", cluster.master_url,
                      "--archives", f"{archive}#environment",
                      "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
                      "--conf", "spark.ui.enabled=false", "--conf", "spark.log.level=WARN",
                      "--executor-memory", "1g", "jobs/spark_job.py", str(config)],
                     timeout=300, env=env, cwd=REPO)
        unpacked = list((cluster.root / "work").glob("app-*/*/environment/pyvenv.cfg"))
    assert not cluster.processes.ours()  # master, worker, executor and Python workers all ended
    assert result.returncode == 0, result.stdout[-5000:]
    assert unpacked, "the executor did not unpack the shipped venv"
    record = check_output(tmp_path / "out", cfg, "spark")
    assert record["run_id"] in result.stdout  # the summary, as spark-submit's output


def test_spark_submit_from_the_venv_unactivated_passes_the_exit_code_on(tmp_path):
    """The README's line (PYSPARK_PYTHON, nothing activated) reaches the job, and a scheduler sees its exit code."""
    config, _ = write_job(tmp_path, tmp_path / "out")
    env = venv_env(PYSPARK_PYTHON=str(BIN / "python"))
    result = run([str(BIN / "spark-submit"), "--master", "local[1]", "--conf", "spark.ui.enabled=false",
                  "jobs/spark_job.py", str(config), "model.batch_size=0"], timeout=120, env=env, cwd=REPO)
    assert result.returncode == 2, result.stdout[-3000:]  # EXIT_CONFIG, through spark-submit
    assert "model.batch_size: Input should be greater than 0" in result.stdout
    assert not (tmp_path / "out").exists()


def test_ray_job_submit_runs_the_job_on_a_multi_process_cluster(tmp_path):
    # The project folder a user submits (`--working-dir .`): the entrypoint and the job config.
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "jobs" / "ray_job.py").write_text((REPO / "jobs" / "ray_job.py").read_text())
    config, cfg = write_job(project / "conf", tmp_path / "out")
    with ray_cluster(head_cpus=0, worker_cpus=2) as cluster:
        worker = [node["node_id"] for node in cluster.nodes() if not node["is_head_node"]]
        submit = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(project),
                  "--", "python", "jobs/ray_job.py", str(config.relative_to(project))]
        result = run(submit, timeout=300, env=cluster.env, cwd=tmp_path)
        # A failed job: `ray job submit` exits 1 whatever the code, and says which it was.
        refused = run([*submit, "model.batch_size=0"], timeout=300, env=cluster.env, cwd=tmp_path)
    assert not cluster.processes.ours()  # both nodes' daemons, the job's driver and the workers all ended
    assert result.returncode == 0, result.stdout[-5000:]
    assert "succeeded" in result.stdout
    record = check_output(tmp_path / "out", cfg, "ray")
    assert record["run_id"] in result.stdout  # the summary, in the job's logs
    # The head has no CPU for tasks or actors: the model ran on the second node.
    assert list(record["model_nodes"]) == worker
    assert refused.returncode == 1, refused.stdout[-3000:]
    assert "model.batch_size: Input should be greater than 0" in refused.stdout
    assert "failed with exit code 2" in refused.stdout
