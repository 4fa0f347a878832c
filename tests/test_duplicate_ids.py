"""Rows that share an id (issue 31): identical images without an id column, a re-delivered id.

Without an id column a row's id is the SHA-256 of its image, so a re-upload with another caption
shares the first one's id. `input.duplicate_ids` says what happens, before any row runs:

- `error` (default): the run is refused with counts and examples (each row's file and row);
- `first`: the first row of each id (input order) is labelled, the others are skipped, counted in
  the summary: every input row is in the output or the summary, also across a kill -9 and resume;
- `position`: ids vb_batch derives also carry the row's place, "<sha256>@<file>#<row>": every
  row is labelled, each once, also across a kill -9 and resume. An input's own id column is
  never rewritten (`position` with repeated ids in it is refused).

The same on S3 (SeaweedFS), input and output both there.
"""

from __future__ import annotations

import logging
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from output_safety import job, output_ids, painting, parquet_bytes, run_child

import vb_batch
from vb_batch.config import ConfigError, OutputConfig, StorageOptions
from vb_batch.io.outputs import read_output
from vb_batch.io.sources import content_id

# Six rows, the sixth the first one's photo re-uploaded with another caption (the case).
PAINTED = [0, 1, 2, 3, 4, 0]


def uploads(paintings: list[int] = PAINTED) -> pa.Table:
    return pa.table({"image": pa.array([painting(i) for i in paintings], pa.binary()),
                     "caption": [f"upload {n}" for n in range(len(paintings))]})


def write_uploads(path, paintings: list[int] = PAINTED, row_group_size: int | None = None) -> None:
    pq.write_table(uploads(paintings), path, row_group_size=row_group_size)


def captions(out) -> list[str]:
    return sorted(read_output(str(out), columns=["caption"]).column("caption").to_pylist())


def test_identical_images_without_an_id_are_refused_before_any_row_runs(tmp_path):
    write_uploads(tmp_path / "in.parquet")
    with pytest.raises(ConfigError) as refused:
        vb_batch.annotate(job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")}))
    message = str(refused.value)
    assert "1 id(s) shared by more than one row (1 extra rows)" in message
    assert f"'{content_id(painting(0))}' x2 (in.parquet#0, in.parquet#5)" in message
    assert "input.duplicate_ids" in message and "input.id_column" in message
    assert not (tmp_path / "out").exists()  # nothing was written


def test_first_labels_the_first_of_each_and_counts_the_others(tmp_path, caplog):
    write_uploads(tmp_path / "in.parquet", [0, 1, 0, 2, 1, 0, 3], row_group_size=3)
    cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")})
    cfg["input"]["duplicate_ids"] = "first"
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        summary = vb_batch.annotate(cfg)
    assert "input.duplicate_ids=first: 2 id(s) shared by more than one row (3 extra rows)" in caplog.text
    assert "duplicate_id" in caplog.text
    assert summary.rows_ok == 4 and summary.rows_skipped == 3 and summary.rows_ok + summary.rows_skipped == 7
    assert summary.skipped_by_code == {"duplicate_id": 3}
    assert "skipped duplicate_id: 3 row(s)" in summary.render()
    assert captions(tmp_path / "out") == ["upload 0", "upload 1", "upload 3", "upload 6"]  # the first of each
    ids = output_ids(str(tmp_path / "out"))
    assert len(ids) == len(set(ids)) == 4


def test_position_keeps_every_row_with_an_id_of_its_own(tmp_path):
    write_uploads(tmp_path / "in.parquet")
    cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")})
    cfg["input"]["duplicate_ids"] = "position"
    summary = vb_batch.annotate(cfg)
    assert summary.rows_ok == 6
    table = read_output(str(tmp_path / "out"), columns=["id", "caption"])
    by_caption = dict(zip(table.column("caption").to_pylist(), table.column("id").to_pylist()))
    assert by_caption["upload 0"] == f"{content_id(painting(0))}@in.parquet#0"
    assert by_caption["upload 5"] == f"{content_id(painting(0))}@in.parquet#5"
    assert len(set(by_caption.values())) == 6
    assert vb_batch.annotate(cfg).rows_skipped == 6  # the same ids on a resume: nothing is done twice


@pytest.mark.parametrize("policy, labelled", [("first", 14), ("position", 16)])
def test_every_row_is_accounted_for_across_a_kill_9_and_resume(policy, labelled, tmp_path):
    # 16 rows; rows 10 and 11 repeat the photos of rows 0 and 3.
    write_uploads(tmp_path / "in.parquet", list(range(10)) + [0, 3] + list(range(10, 14)), row_group_size=4)
    cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")})  # commits every 8 rows
    cfg["input"]["duplicate_ids"] = policy
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    killed = run_child(path, ("ParquetSink._apply", "after", 1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    committed = len(output_ids(str(tmp_path / "out")))
    assert 0 < committed < labelled
    summary = vb_batch.annotate(cfg)
    ids = output_ids(str(tmp_path / "out"))
    assert len(ids) == len(set(ids)) == labelled  # each labelled row once
    assert summary.rows_ok == labelled - committed
    assert summary.rows_processed + summary.rows_skipped == 16  # every input row: labelled now, before, or skipped
    assert summary.rows_skipped == committed + 16 - labelled
    assert len(set(captions(tmp_path / "out"))) == labelled


def test_an_id_column_repeated_follows_the_same_policy(tmp_path):
    table = uploads([0, 1, 2, 3]).append_column("id", pa.array(["a", "b", "a", "c"]))
    pq.write_table(table, tmp_path / "in.parquet")
    cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=r"1 id\(s\) repeated \(1 extra rows\), e.g. 'a' x2.*duplicate_ids: first"):
        vb_batch.annotate(cfg)
    cfg["input"]["duplicate_ids"] = "position"
    with pytest.raises(ConfigError, match="never|input's own"):
        vb_batch.annotate(cfg)
    cfg["input"]["duplicate_ids"] = "first"
    summary = vb_batch.annotate(cfg)
    assert summary.rows_ok == 3 and summary.rows_skipped == 1
    assert captions(tmp_path / "out") == ["upload 0", "upload 1", "upload 3"]


@pytest.mark.slow  # ~2 s
def test_on_s3_identical_images_are_refused_or_kept_by_policy(s3):
    s3.put("dup/in.parquet", parquet_bytes(uploads()))
    out = {"path": s3.url("dup/labels"), "storage": s3.storage}
    cfg = job(s3.url("dup/in.parquet"), out)
    cfg["input"]["storage"] = s3.storage
    with pytest.raises(ConfigError, match=r"1 extra rows.*in.parquet#0, in.parquet#5"):
        vb_batch.annotate(cfg)
    assert not s3.keys("dup/labels")
    cfg["input"]["duplicate_ids"] = "first"
    summary = vb_batch.annotate(cfg)
    assert summary.rows_ok == 5 and summary.rows_skipped == 1
    ids = read_output(OutputConfig(**out), columns=["id"], storage=StorageOptions(**s3.storage)).column("id")
    assert len(set(ids.to_pylist())) == 5
