"""`vb-batch run`'s exit codes, each through the command line: what a scheduler branches on."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

from vb_batch.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_LEASE_HELD, EXIT_OK, main
from vb_batch.io.lease import Lease
from vb_batch.io.outputs import read_output


@pytest.fixture
def job(tmp_path):
    """A job over 4 rows of which one is not an image (a failed row, 25%)."""
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)] + [b"junk"]
    pq.write_table(pa.table({"id": ["a", "b", "c", "bad"], "image": images}), tmp_path / "in.parquet")
    path = tmp_path / "job.yaml"
    path.write_text("input: {path: in.parquet}\noutput: {path: out, report: false}\n"
                    "model: {backend: identity}\nrun: {progress: false}\n")
    return path


def test_the_exit_codes_are_distinct_and_documented():
    import vb_batch.cli

    assert len({EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LEASE_HELD}) == 4
    for code, meaning in ((0, "success"), (1, "max_error_fraction"), (2, "config is invalid"), (3, "lease")):
        assert f"{code} " in vb_batch.cli.__doc__ and meaning in vb_batch.cli.__doc__


def test_failed_rows_within_the_error_budget_exit_0_over_it_1(job, capsys):
    assert main(["run", str(job)]) == EXIT_OK  # 1 of 4 failed: within the default 0.5
    assert "rows: 3 ok, 1 failed" in capsys.readouterr().out
    assert read_output(str(job.parent / "out")).num_rows == 4  # the failed row is committed with its vb_error
    assert main(["run", str(job), "output.mode=overwrite", "run.max_error_fraction=0.1"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "FAILED" in out and "max_error_fraction" in out
    assert read_output(str(job.parent / "out")).num_rows == 4  # committed all the same


def test_an_invalid_config_exits_2_naming_the_field(job, capsys):
    assert main(["run", str(job), "model.batch_size=0"]) == EXIT_CONFIG
    assert "model.batch_size: Input should be greater than 0" in capsys.readouterr().err
    assert not (job.parent / "out").exists()


def test_a_lease_held_by_another_run_exits_3_and_changes_nothing(job, capsys):
    assert main(["run", str(job)]) == EXIT_OK
    out = job.parent / "out"
    parts = sorted(p.name for p in out.glob("*.parquet"))
    holder = Lease(fsspec.filesystem("file"), str(out / "_vb"), str(out), run_id="the-other-run", seconds=60)
    with holder:
        assert main(["run", str(job), "output.mode=append"]) == EXIT_LEASE_HELD
        assert "the-other-run" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.parquet")) == parts
    assert main(["run", str(job), "output.mode=resume"]) == EXIT_OK  # once it is free, the job goes on
