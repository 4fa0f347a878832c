"""Links inside an output are refused, never followed (issue 31): nothing outside the output is touched.

A symbolic link where vb_batch keeps its own files (`_vb`, `_vb/staging`, a
part file) or a part file with a second hard link would let a run delete, move
or write files elsewhere. Every run refuses such an output before it touches
anything, with a message naming the path. Local files only: object stores
have no links.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from output_safety import cli, digests, job, write_images

from vb_batch.config import ConfigError, OutputConfig
from vb_batch.io.formats import open_sink

FORMATS = ["parquet", "delta"]


@pytest.fixture(params=FORMATS)
def written(request, tmp_path, capsys) -> tuple[dict, Path]:
    """(job, output folder) of an output one run has written (4 rows), and an `elsewhere` folder beside it."""
    write_images(tmp_path / "in.parquet", 4)
    cfg = job(tmp_path / "in.parquet", {"format": request.param, "path": str(tmp_path / "labels")})
    assert cli(cfg, tmp_path, capsys)[0] == 0
    (tmp_path / "elsewhere").mkdir()
    return cfg, tmp_path / "labels"


def plant(folder: Path) -> None:
    """Files a run would delete if it followed a link to `folder`: dead staging and temporary files."""
    staged = folder / "staging" / "deadrun" / "part-deadrun-00000.parquet"
    staged.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["theirs"]}), staged)
    (folder / "output.json.0123abcd.tmp").write_bytes(b"theirs")
    (folder / "runs").mkdir(exist_ok=True)
    (folder / "runs" / "r.json.4567cdef.tmp").write_bytes(b"theirs")


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_a_symlinked_vb_folder_is_refused_and_nothing_outside_is_touched(written, mode, tmp_path, capsys):
    cfg, out = written
    elsewhere = tmp_path / "elsewhere" / "vb"
    shutil.move(out / "_vb", elsewhere)  # the output's own records, now outside it: everything else looks right
    plant(elsewhere)
    os.symlink(elsewhere, out / "_vb", target_is_directory=True)
    before, outputs = digests(elsewhere), digests(out)
    code, line = cli({**cfg, "output": {**cfg["output"], "mode": mode}}, tmp_path, capsys)
    assert code == 2 and "_vb is a symbolic link" in line and str(elsewhere) in line, line
    assert digests(elsewhere) == before  # nothing deleted, written or replaced there: no marker, lease or record
    assert not (elsewhere / "lease.json").exists()
    assert digests(out) == outputs


def test_a_symlinked_staging_folder_is_refused(written, tmp_path, capsys):
    cfg, out = written
    elsewhere = tmp_path / "elsewhere"
    plant(elsewhere)
    os.symlink(elsewhere / "staging", out / "_vb" / "staging", target_is_directory=True)
    before = digests(elsewhere)
    code, line = cli(cfg, tmp_path, capsys)
    assert code == 2 and "_vb/staging is a symbolic link" in line, line
    assert digests(elsewhere) == before


def test_a_symlinked_part_file_is_refused(written, tmp_path, capsys):
    cfg, out = written
    part = sorted(out.glob("part-*.parquet"))[0]
    outside = tmp_path / "elsewhere" / "precious.parquet"
    shutil.move(part, outside)
    os.symlink(outside, part)
    before = digests(tmp_path / "elsewhere")
    for mode in ("resume", "overwrite"):  # an overwrite would delete it, a resume trust its rows
        code, line = cli({**cfg, "output": {**cfg["output"], "mode": mode}}, tmp_path, capsys)
        assert code == 2 and f"{part.name} is a symbolic link" in line, line
    assert digests(tmp_path / "elsewhere") == before and part.is_symlink()

    os.unlink(part)
    shutil.copy(outside, part)  # the same file, real: the output is the run's again
    assert cli(cfg, tmp_path, capsys)[0] == 0


def test_a_hard_linked_part_file_is_refused(written, tmp_path, capsys):
    cfg, out = written
    part = sorted(out.glob("part-*.parquet"))[0]
    os.link(part, tmp_path / "elsewhere" / "precious.parquet")
    code, line = cli({**cfg, "output": {**cfg["output"], "mode": "overwrite"}}, tmp_path, capsys)
    assert code == 2 and f"{part.name} is a file with 2 hard links" in line, line
    assert (tmp_path / "elsewhere" / "precious.parquet").exists()


def test_a_vb_folder_turned_into_a_link_after_the_check_is_refused_before_the_lease(tmp_path):
    """The lease is written under `_vb/`: its folder is checked again when the lease is taken."""
    out = tmp_path / "labels"
    schema = pa.schema([pa.field("id", pa.string())])
    sink = open_sink(OutputConfig(path=str(out)), "run1", schema)
    sink.check()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "_vb", target_is_directory=True)
    with pytest.raises(ConfigError, match="_vb is a symbolic link"):
        with sink.lease_held():
            pass
    assert list(elsewhere.iterdir()) == []
