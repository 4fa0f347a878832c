"""Small jobs over painted images and checks of their outputs, shared by the output-safety tests.

The output-safety tests (test_output_overlap, test_output_ownership, test_input_ids,
test_crash_recovery, test_full_disk, test_writer_lease, test_resume_compatibility) specify that a
job never harms anything but its own output and never loses or repeats a row. They share:

- inputs: `painting(i)` paints a constant depth of 1 + i metres, so every output row can be checked
  against the id it carries (`assert_each_id_once`);
- jobs: `job(...)` an identity job config, `cli(...)` runs it as `vb-batch run` and returns the exit
  code and the one line the operator sees, `run_child(...)` runs it in a child process
  (`crashing_job.py`) that can SIGKILL itself at a named point;
- outputs: `output_ids`, `digests` (to prove nothing else changed), `meta_dir`, `lake_output`.

The fixtures `catalog` (an Iceberg catalog on sqlite) and `s3` (a fresh bucket on the session's SeaweedFS, a real S3 server) are in
conftest.py.
"""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import png_bytes

from vb_batch.cli import main
from vb_batch.codecs import depth
from vb_batch.config import OutputConfig
from vb_batch.io import iceberg
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.outputs import open_output, read_output

TESTS = Path(__file__).resolve().parent


def painting(i: int, side: int = 16) -> bytes:
    """A PNG that paints a constant depth of 1 + i metres (row i's image)."""
    return png_bytes(depth.encode(np.full((side, side), 1.0 + i, np.float32)))


def images_table(ids: list, id_position: str = "first") -> pa.Table:
    """Rows of painted images, the id column first, in the middle or last."""
    columns = {"image": pa.array([painting(n) for n in range(len(ids))], pa.binary()),
               "note": [f"n{n}" for n in range(len(ids))]}
    names = {"first": ["id", "image", "note"], "middle": ["image", "id", "note"], "last": ["image", "note", "id"]}
    columns["id"] = ids
    return pa.table({name: columns[name] for name in names[id_position]})


def write_images(path, n: int, id_position: str = "first") -> list[str]:
    ids = [f"img-{i}" for i in range(n)]
    pq.write_table(images_table(ids, id_position), path)
    return ids


def job(input_path: str, output: dict, **sections) -> dict:
    """A small identity job (no report: it is not what these tests look at)."""
    return {
        "input": {"path": str(input_path)},
        "output": {"mode": "resume", "rows_per_file": 4, "commit_every": 8, "report": False, **output},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 4},
        "run": {"progress": False},
        **sections,
    }


def cli(cfg: dict, folder: Path, capsys) -> tuple[int, str]:
    """`vb-batch run` on `cfg` written as YAML: (exit code, its one line on stderr)."""
    path = folder / f"job-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    return code, lines[-1] if lines else ""


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (symlinks followed), by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def output_ids(output: str | dict) -> list:
    """The ids committed in an output (any format); [] when nothing was ever committed."""
    target = OutputConfig(**output) if isinstance(output, dict) else output
    try:
        dataset = open_output(target).dataset
    except FileNotFoundError:  # a lake table before its first commit
        return []
    if not dataset.schema.names:
        # A Parquet output without a visible file (killed before its first commit landed) is a dataset
        # without columns, from which read_output(columns=[...]) cannot select: no rows.
        return []
    return dataset.to_table(columns=["id"]).column("id").to_pylist()


def assert_each_id_once(output: str | dict, expected: list) -> pa.Table:
    """The output holds every expected id exactly once, none failed, each with the depth its image painted
    (ids end in the row's number n, whose image paints 1 + n metres)."""
    table = read_output(OutputConfig(**output) if isinstance(output, dict) else output)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), collections.Counter(ids).most_common(3)
    assert sorted(ids) == sorted(expected)
    assert table.column("vb_error").null_count == table.num_rows
    for row_id, median in zip(ids, table.column("depth_median_m").to_pylist()):
        assert median == pytest.approx(1.0 + int(str(row_id).split("-")[-1]), rel=0.01), row_id
    return table


def lake_output(fmt: str, tmp_path: Path, catalog: dict, name: str = "labels") -> dict:
    """`output` of a job for each format: a Parquet folder, a Delta table, an Iceberg table."""
    if fmt == "iceberg":
        return {"format": "iceberg", "table": f"vb.{name}", "catalog": catalog}
    return {"format": fmt, "path": str(tmp_path / name)}


def s3_objects(s3, prefix: str) -> dict[str, str]:
    return {key: hashlib.sha256(s3.get(key)).hexdigest() for key in s3.keys(prefix)}


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def child_env() -> dict[str, str]:
    """A child job's environment: this suite's modules (crashing_job, its backends) importable."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


def run_child(job_path: Path, kill: tuple[str, str, int] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`crashing_job.py` on a job file; with `kill`, it SIGKILLs itself at (point, phase, n)."""
    argv = [sys.executable, str(TESTS / "crashing_job.py"), str(job_path), *([str(k) for k in kill] if kill else [])]
    return subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=timeout, check=False)


def meta_dir(out: dict) -> Path:
    """An output's `_vb/` folder (an Iceberg table keeps it under its location)."""
    if out["format"] == "iceberg":
        table = iceberg.iceberg_catalog(out["catalog"]).load_table(out["table"])
        return Path(fsspec_filesystem(iceberg.iceberg_location(table))[1]) / "_vb"
    return Path(out["path"]) / "_vb"
