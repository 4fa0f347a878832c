"""A job YAML reads the same from any working directory: `${VAR}` substitution, paths against the YAML's folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

from vb_batch.cli import main
from vb_batch.config import ConfigError, load_config, redacted
from vb_batch.io.outputs import read_output


def write_images(path: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(count)]
    pq.write_table(pa.table({"id": [f"img{i}" for i in range(count)], "image": images}), path)
    return path


@pytest.fixture
def jobs_and_home(tmp_path, monkeypatch):
    """A folder holding a job's YAML and input, and another folder as the working directory (cron's $HOME)."""
    jobs, home = tmp_path / "jobs", tmp_path / "home"
    jobs.mkdir()
    home.mkdir()
    monkeypatch.chdir(home)
    return jobs, home


def test_a_job_yaml_with_relative_paths_and_variables_runs_from_another_directory(jobs_and_home, monkeypatch, capsys):
    jobs, home = jobs_and_home
    write_images(jobs / "in.parquet", 3)
    (jobs / "job.yaml").write_text(
        "input:\n  path: in.parquet\n"
        "output:\n  path: ${LABELS_DIR:-labels}/v1\n  report: false\n"
        "model:\n  backend: identity\n  batch_size: ${BATCH}\n"
        "run:\n  progress: false\n"
    )
    monkeypatch.setenv("BATCH", "2")
    monkeypatch.delenv("LABELS_DIR", raising=False)
    assert main(["run", "../jobs/job.yaml"]) == 0  # the YAML named relative to the working directory, too
    assert read_output(str(jobs / "labels" / "v1")).num_rows == 3
    assert list(home.iterdir()) == []  # nothing resolved against the working directory
    [record] = (jobs / "labels" / "v1" / "_vb" / "runs").glob("*.json")
    config = json.loads(record.read_text())["config"]
    assert config["input"]["path"] == str(jobs / "in.parquet") and config["model"]["batch_size"] == 2

    # Overrides on the command line are the working directory's, as a user typing them expects.
    capsys.readouterr()
    assert main(["run", str(jobs / "job.yaml"), "output.path=mine", "output.mode=overwrite"]) == 0
    assert read_output(str(home / "mine")).num_rows == 3


def load_job_file(folder: Path, text: str, overrides: tuple[str, ...] = ()):
    (folder / "job.yaml").write_text(text)
    return load_config(folder / "job.yaml", list(overrides))


def test_paths_resolve_against_the_yaml_folder_and_urls_hub_ids_and_absolute_paths_never_change(jobs_and_home):
    jobs, _ = jobs_and_home
    cfg = load_job_file(jobs, "input: {path: 's3://bucket/images/'}\noutput: {path: labels/}\n"
                              "model: {backend: diffusers, path: black-forest-labs/FLUX.2-klein-base-4B, "
                              "transformer_path: ./banana}\n")
    assert cfg.input.path == "s3://bucket/images/"
    assert cfg.output.path == f"{jobs}/labels/"  # the trailing / of a folder is kept
    assert cfg.model.path == "black-forest-labs/FLUX.2-klein-base-4B"  # a hub id
    assert cfg.model.transformer_path == str(jobs / "banana")  # ./: a folder, even before it exists
    # A checkpoint that exists next to the YAML is a folder; one per task resolves each.
    (jobs / "ckpt").mkdir()
    cfg = load_job_file(jobs, "input: {path: /data/in.parquet}\ntasks: [depth, normals]\n"
                              "model: {backend: marigold, path: {depth: ckpt, normals: prs-eth/marigold-normals-v1-1}}\n")
    assert cfg.input.path == "/data/in.parquet"
    assert cfg.model.path == {"depth": str(jobs / "ckpt"), "normals": "prs-eth/marigold-normals-v1-1"}
    # Iceberg catalogs: a SQLite database and a local warehouse are files next to the YAML; a REST
    # catalog's URL and an absolute SQLite path stay as written.
    iceberg = ("input: {format: iceberg, table: raw.images,\n"
               "        catalog: {type: sql, uri: 'sqlite:///lake/catalog.db', warehouse: lake/warehouse}}\n"
               "output: {format: iceberg, table: labels.v1, catalog: {type: rest, uri: 'http://catalog:8181'}}\n"
               "model: {backend: identity}\n")
    cfg = load_job_file(jobs, iceberg)
    assert cfg.input.catalog == {"type": "sql", "uri": f"sqlite:///{jobs}/lake/catalog.db",
                                 "warehouse": str(jobs / "lake" / "warehouse")}
    assert cfg.output.catalog["uri"] == "http://catalog:8181"
    absolute = load_job_file(jobs, iceberg.replace("sqlite:///lake", "sqlite:////srv/lake"))
    assert absolute.input.catalog["uri"] == "sqlite:////srv/lake/catalog.db"
    # A dict config is taken as given: relative paths stay the working directory's.
    assert load_config({"input": {"path": "in.parquet"}, "model": {"backend": "identity"}}).input.path == "in.parquet"


def test_variables_defaults_literals_and_an_unset_variable_named_with_its_key(jobs_and_home, monkeypatch, capsys):
    jobs, _ = jobs_and_home
    (jobs / "job.yaml").write_text(
        "input:\n  path: ${INPUT_URL}\n"
        "model:\n  backend: http\n  endpoint: https://${PAINTER_HOST}/v1\n"
        "  prompts: {depth: 'a literal $${NAME} and ${EMPTY:-the default}'}\n"
        "output:\n  path: ${LABELS:-labels}\n"
    )
    for name in ("INPUT_URL", "PAINTER_HOST", "LABELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMPTY", "")  # empty counts as unset for ${VAR:-default}, as in the shell
    assert main(["validate", str(jobs / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "input.path: ${INPUT_URL} is not set in the environment" in err
    assert "model.endpoint: ${PAINTER_HOST} is not set in the environment" in err
    assert "LABELS" not in err and "Traceback" not in err
    monkeypatch.setenv("INPUT_URL", "s3://archive/images.parquet")
    monkeypatch.setenv("PAINTER_HOST", "painter.example.com")
    cfg = load_config(jobs / "job.yaml")
    assert cfg.input.path == "s3://archive/images.parquet"  # a URL from a variable: never a path
    assert cfg.model.endpoint == "https://painter.example.com/v1"
    assert cfg.model.prompts["depth"] == "a literal ${NAME} and the default"
    assert cfg.output.path == str(jobs / "labels")
    with pytest.raises(ConfigError, match=r"model\.batch_size: Input should be a valid integer"):
        load_config(jobs / "job.yaml", ["model.batch_size=${NOT_SUBSTITUTED}"])  # overrides: the shell's job


def test_an_unknown_key_gets_a_did_you_mean(jobs_and_home, capsys):
    jobs, _ = jobs_and_home
    (jobs / "job.yaml").write_text(
        "input: {pth: in.parquet, path: in.parquet, storage: {endpoint: 'http://127.0.0.1:9000'}}\n"
        "outptu: {mode: resume}\n"
        "model: {backend: http, endpont: 'https://painter.example.com/v1'}\n"
    )
    assert main(["validate", str(jobs / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "input.pth: unknown key (check the spelling; see `vb-batch run --help`); did you mean 'path'?" in err
    assert "input.storage.endpoint: unknown key" in err and "did you mean 'endpoint_url'?" in err
    assert "outptu: unknown key" in err and "did you mean 'output'?" in err
    assert "model.endpont: unknown key" in err and "did you mean 'endpoint'?" in err  # a backend's own key


def test_a_secret_from_the_environment_stays_masked_wherever_the_config_is_shown_or_stored(jobs_and_home, monkeypatch,
                                                                                          capfd):
    jobs, _ = jobs_and_home
    secret = "tok-3f9a1c77e2"
    monkeypatch.setenv("NIGHTLY_TOKEN", secret)  # a secret-looking name: its value is masked by value
    monkeypatch.setenv("JOB_TAG", "nightly")  # an innocent one: shown as it is
    write_images(jobs / "in.parquet", 2)
    (jobs / "job.yaml").write_text(
        "input: {path: in.parquet}\n"
        "output: {path: labels}\n"
        "model: {backend: identity}\n"
        "run: {progress: false, name: '${JOB_TAG}-${NIGHTLY_TOKEN}'}\n"  # a key whose name says nothing
    )
    assert main(["validate", str(jobs / "job.yaml")]) == 0
    shown = capfd.readouterr()
    assert json.loads(shown.out)["run"]["name"] == "nightly-***"
    assert main(["-v", "run", str(jobs / "job.yaml")]) == 0
    shown = capfd.readouterr()
    stored = [path for path in (jobs / "labels").rglob("*") if path.is_file()]
    assert any(path.name == "_report.html" for path in stored) and any(path.suffix == ".parquet" for path in stored)
    assert secret.encode() not in b"".join(path.read_bytes() for path in stored)  # records, vb.job, the report
    assert secret not in shown.out + shown.err and "nightly-***" in shown.err  # the -v log line of the config
    assert load_config(jobs / "job.yaml").run.name == f"nightly-{secret}"  # in memory the job has it
    assert redacted(load_config(jobs / "job.yaml"))["run"]["name"] == "nightly-***"
