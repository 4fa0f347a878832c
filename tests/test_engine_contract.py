"""The engine contract: what every engine (local, Ray, Spark) must do, one suite run once per engine.

The same input, the same checks: the output equals the stages run in one batch
(every column but the run id, field metadata included), resume finds the id
column by name wherever it sits, hostile rows each end as their own error,
the report works, a backend registered at run time reaches the workers, and
a second writer is refused while one holds the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from conftest import PAINTED_LEGEND, write_painted_input
from hostile import check_hostile_output, hostile_job, write_hostile_table
from hostile_uris import HostileServer

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import load_config
from vb_batch.io.images import decode_image
from vb_batch.io.lease import Lease, LeaseHeldError
from vb_batch.io.outputs import read_output
from vb_batch.io.sources import open_source
from vb_batch.models.base import BACKENDS, register_backend
from vb_batch.models.identity import IdentityBackend
from vb_batch.stages import Plan, annotate_batch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")]

LEGEND = PAINTED_LEGEND
ROWS = 12


def job(inp: Path, out: Path, engine: str, **sections) -> dict:
    cfg = {
        "input": {"path": str(inp)},
        "output": {"path": str(out), "mode": "overwrite", "rows_per_file": 4, "commit_every": 4, "report": False},
        "tasks": ["depth", "normals", "segmentation"],
        "segmentation": {"classes": list(LEGEND.names)},
        "model": {"backend": "identity", "batch_size": 2},
        "engine": {"kind": engine, "cpu_batch_rows": 4},
        "run": {"progress": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def stages_in_one_batch(cfg: dict) -> pa.Table:
    """What the engine-free stages give for the whole input in one batch: what every engine must write."""
    config = load_config(cfg)
    source = open_source(config.input)
    batch = pa.Table.from_batches(list(source.batches(10**6))).combine_chunks().to_batches()[0]
    plan = Plan.build(config, source.schema, source.image_column, source.uri_column)
    return pa.Table.from_batches([annotate_batch(batch, plan, IdentityBackend(config.model))])


def comparable(table: pa.Table) -> pa.Table:
    return table.sort_by("id").drop_columns(["vb_run_id"])


def test_output_equals_the_stages_in_one_batch(engine, tmp_path):
    write_painted_input(tmp_path / "in.parquet")
    cfg = job(tmp_path / "in.parquet", tmp_path / "out", engine)
    summary = vb_batch.annotate(cfg)
    expected = stages_in_one_batch(cfg)
    out = read_output(str(tmp_path / "out"))
    assert summary.success and summary.engine == engine
    assert (summary.rows_ok, summary.rows_failed) == (ROWS - 2, 2)
    assert summary.errors_by_code == {"empty": 1, "not_image": 1}
    for ours, theirs in zip(out.schema, expected.schema):
        assert ours.name == theirs.name and ours.type == theirs.type and ours.metadata == theirs.metadata
    assert out.schema.names == expected.schema.names
    assert comparable(out).equals(comparable(expected))
    # Committed through the sink: records name every part file, none over rows_per_file, staging gone.
    root = tmp_path / "out"
    records = [json.loads(p.read_text()) for p in sorted((root / "_vb" / "commits").glob("*.json"))]
    committed = [name for record in records for name in record["files"]]
    assert sorted(committed) == sorted(p.name for p in root.glob("part-*.parquet"))
    assert all(pq.read_metadata(root / name).num_rows <= 4 for name in committed)
    assert (root / "_SUCCESS").exists() and not (root / "_vb" / "staging").exists()
    assert not (root / "_vb" / "lease.json").exists()  # released
    record = json.loads((root / "_vb" / "runs" / f"{summary.run_id}.json").read_text())
    assert record["rows_ok"] == ROWS - 2 and record["model_seconds"] > 0 and record["engine"] == engine


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_resume_finds_the_id_column_wherever_it_sits(engine, tmp_path, position):
    ids = write_painted_input(tmp_path / "in.parquet", position)
    first = pq.read_table(tmp_path / "in.parquet").slice(0, 5)
    pq.write_table(first, tmp_path / "first.parquet")
    before = vb_batch.annotate(job(tmp_path / "first.parquet", tmp_path / "out", "local"))
    summary = vb_batch.annotate(job(tmp_path / "in.parquet", tmp_path / "out", engine, output={"mode": "resume"}))
    assert summary.success and (summary.rows_skipped, summary.rows_processed) == (5, ROWS - 5)
    out = read_output(str(tmp_path / "out"))
    assert sorted(out.column("id").to_pylist()) == sorted(ids)
    assert out.schema.names.index("id") == pq.read_schema(tmp_path / "in.parquet").names.index("id")
    run_of = dict(zip(out.column("id").to_pylist(), out.column("vb_run_id").to_pylist()))
    assert {run_of[i] for i in ids[:5]} == {before.run_id}  # not annotated again
    assert {run_of[i] for i in ids[5:]} == {summary.run_id}
    if position == "middle":
        again = vb_batch.annotate(job(tmp_path / "in.parquet", tmp_path / "out", engine, output={"mode": "resume"}))
        assert (again.rows_skipped, again.rows_processed) == (ROWS, 0)
        assert read_output(str(tmp_path / "out")).num_rows == ROWS


def test_hostile_rows_each_end_as_their_own_error(engine, tmp_path):
    with HostileServer() as server:
        table, expected = write_hostile_table(tmp_path, server)
        summary = vb_batch.annotate(hostile_job(table, tmp_path / "out", engine, server))
    assert summary.success
    check_hostile_output(read_output(str(tmp_path / "out")), expected)
    assert set(summary.errors_by_code) == {code for code in expected.values() if code}
    assert summary.rows_ok == sum(code is None for code in expected.values())
    assert summary.rows_skipped == 1  # the re-delivered id's second row (input.duplicate_ids: first)


def test_report_of_the_run_and_again_from_the_cli(engine, tmp_path):
    from vb_batch.cli import main
    from vb_batch.report import REPORT_NAME

    write_painted_input(tmp_path / "in.parquet")
    summary = vb_batch.annotate(job(tmp_path / "in.parquet", tmp_path / "out", engine, output={"report": True}))
    assert summary.report.endswith(REPORT_NAME)
    (tmp_path / "out" / REPORT_NAME).unlink()
    assert main(["report", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / REPORT_NAME).read_text()
    assert f">{engine}<" in text and "not_image" in text and text.count("<img") >= 4 * 4


class Negative(IdentityBackend):
    """Paints the negative of each image: a backend no worker knows unless the driver's registration reaches it."""

    def predict(self, images, prompts, task, seeds):
        return [255 - image for image in images]


def test_a_backend_registered_at_run_time_reaches_the_workers(engine, tmp_path):
    write_painted_input(tmp_path / "in.parquet")
    register_backend("contract-negative", Negative)
    try:
        cfg = job(tmp_path / "in.parquet", tmp_path / "out", engine, model={"backend": "contract-negative"})
        cfg["tasks"] = ["depth"]
        summary = vb_batch.annotate(cfg)
    finally:
        BACKENDS.unregister("contract-negative")
    assert summary.success and summary.rows_ok == ROWS - 2
    out = read_output(str(tmp_path / "out")).sort_by("id")
    assert set(out.column("vb_model").to_pylist()) == {"contract-negative"}
    good = out.filter(pa.compute.is_null(out.column("vb_error"))).slice(0, 1)
    painted = vb_batch.load_arrays(good, "depth")[0]
    negative = depth.decode(255 - decode_image(good.column("image")[0].as_py(), 10**8)).values
    np.testing.assert_allclose(painted, negative, rtol=1e-2)


def test_a_second_writer_is_refused_while_one_holds_the_output(engine, tmp_path):
    write_painted_input(tmp_path / "in.parquet")
    out = tmp_path / "out"
    (out / "_vb").mkdir(parents=True)
    import fsspec

    holder = Lease(fsspec.filesystem("file"), str(out / "_vb"), str(out), run_id="the-first-run", seconds=60)
    with holder, pytest.raises(LeaseHeldError, match="the-first-run"):
        vb_batch.annotate(job(tmp_path / "in.parquet", out, engine, output={"mode": "append"}))
    assert not list(out.glob("part-*.parquet"))
    assert vb_batch.annotate(job(tmp_path / "in.parquet", out, engine, output={"mode": "append"})).success


def test_part_files_hold_rows_per_file_the_last_fewer(engine, tmp_path):
    write_painted_input(tmp_path / "in.parquet")
    # Units of 3 rows and batches of 2: every worker's own files are short, the output's are not.
    cfg = job(tmp_path / "in.parquet", tmp_path / "out", engine, output={"rows_per_file": 5, "commit_every": 0})
    cfg["engine"]["unit_rows"] = 3
    summary = vb_batch.annotate(cfg)
    root = tmp_path / "out"
    sizes = sorted(pq.read_metadata(p).num_rows for p in root.glob("part-*.parquet"))
    assert summary.success and sizes == [2, 5, 5]
    ids = read_output(str(root)).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == ROWS
    assert not (root / "_vb" / "staging").exists()


class Unloadable(IdentityBackend):
    """Identity, but refuses to be built once the file `model.options.refuse` exists (in any process)."""

    def __init__(self, cfg):
        if Path(cfg.options["refuse"]).exists():
            raise RuntimeError("the model was loaded")
        super().__init__(cfg)


def test_a_resume_with_nothing_to_do_returns_without_the_model(engine, tmp_path):
    from vb_batch.report import REPORT_NAME

    write_painted_input(tmp_path / "in.parquet")
    refuse = tmp_path / "refuse"
    model = {"backend": "contract-unloadable", "options": {"refuse": str(refuse)}}
    register_backend("contract-unloadable", Unloadable)
    try:
        first = vb_batch.annotate(job(tmp_path / "in.parquet", tmp_path / "out", "local", output={"report": True},
                                      model=model))
        report = tmp_path / "out" / REPORT_NAME
        written = report.stat().st_mtime_ns
        refuse.touch()
        cfg = job(tmp_path / "in.parquet", tmp_path / "out", engine, output={"mode": "resume", "report": True},
                  model=model)
        summary = vb_batch.annotate(cfg)
    finally:
        BACKENDS.unregister("contract-unloadable")
    assert summary.success and (summary.rows_skipped, summary.rows_processed) == (ROWS, 0)
    assert "nothing to do" in summary.message and summary.model_load_seconds is None
    assert report.stat().st_mtime_ns == written and summary.report.endswith(REPORT_NAME)
    out = read_output(str(tmp_path / "out"))
    assert out.num_rows == ROWS and set(out.column("vb_run_id").to_pylist()) == {first.run_id}
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_the_summary_says_where_the_time_went(engine, tmp_path):
    write_painted_input(tmp_path / "in.parquet")
    summary = vb_batch.annotate(job(tmp_path / "in.parquet", tmp_path / "out", engine, output={"report": True}))
    phases = summary.phase_seconds
    assert {"read", "fetch_decode", "model", "codec_decode", "encode", "write", "commit", "report"} <= set(phases)
    assert all(seconds >= 0 for seconds in phases.values())
    wall = summary.wall_seconds
    assert {"start", "processing", "closing", "after"} <= set(wall) <= {"start", "model_load", "processing", "closing", "after"}
    # The driver's wall time is accounted for, but for a sliver.
    assert summary.unexplained_seconds <= 0.05 * summary.seconds + 0.05
    assert abs(sum(wall.values()) + summary.unexplained_seconds - summary.seconds) < 0.05
    record = json.loads((tmp_path / "out" / "_vb" / "runs" / f"{summary.run_id}.json").read_text())
    assert record["phase_seconds"]["report"] == phases["report"] and record["wall_seconds"] == wall
    assert record["seconds"] == pytest.approx(summary.seconds) and "wall:" in summary.render()


def test_maps_stored_off_the_image_grid_equal_the_stages(engine, tmp_path):
    """`output.max_side`: every engine stores the same reduced maps, grid metadata and image sizes."""
    write_painted_input(tmp_path / "in.parquet")
    cfg = job(tmp_path / "in.parquet", tmp_path / "out", engine, output={"max_side": 8})
    summary = vb_batch.annotate(cfg)
    expected = stages_in_one_batch(cfg)
    out = read_output(str(tmp_path / "out"))
    assert summary.success and out.schema.names == expected.schema.names
    assert all(ours.type == theirs.type and ours.metadata == theirs.metadata
               for ours, theirs in zip(out.schema, expected.schema))
    assert b"vb.grid_to_image" in out.schema.field("depth").metadata
    assert comparable(out).equals(comparable(expected))
    good = out.filter(pa.compute.is_null(out.column("vb_error")))
    shapes = [m.shape[:2] for m in vb_batch.load_arrays(good, "depth")]
    assert shapes and all(max(shape) == 8 for shape in shapes)
    assert all(h > 8 or w > 8 for h, w in zip(good.column("image_height").to_pylist(), good.column("image_width").to_pylist()))


# Three sizes, 24 rows: one of size 2 first (it waits for its others until the last batch), then sizes
# 0 and 1 alternating, then the other three of size 2. Counts are multiples of 4: grouped, every call is full.
MIXED_LAYOUT = [2] + [0, 1] * 8 + [0] * 4 + [2] * 3
MIXED_SIZES = [(12, 16), (16, 12), (10, 10)]


def write_mixed_sizes(path: Path) -> None:
    """Random RGB PNGs in `MIXED_SIZES`, laid out as `MIXED_LAYOUT` (one row group)."""
    from conftest import png_bytes

    rng = np.random.default_rng(3)
    images = [png_bytes(rng.integers(0, 256, (*MIXED_SIZES[k], 3), dtype=np.uint8)) for k in MIXED_LAYOUT]
    ids = [f"r{i:02d}" for i in range(len(images))]
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}), path)


def test_mixed_sizes_share_model_calls_across_batches(engine, tmp_path):
    """Batches of 4 of mixed sizes: one batch at a time, a call per size in each batch; grouped, full calls."""
    write_mixed_sizes(tmp_path / "in.parquet")
    calls = {}
    for window in (0, 100):
        log = tmp_path / f"calls-{window}.log"
        cfg = job(tmp_path / "in.parquet", tmp_path / f"out-{window}", engine,
                  model={"backend": "worker_backends:KeyedCountingBackend", "batch_size": 4, "group_window": window,
                         "options": {"log": str(log), "seconds": 0.05}})
        cfg["tasks"] = ["depth"]
        summary = vb_batch.annotate(cfg)
        assert summary.success and summary.rows_ok == 24
        calls[window] = [line.split()[1:] for line in log.read_text().splitlines()]
        # The summary counts the calls wherever they ran (Ray actors, Spark executors).
        assert (summary.model_calls, summary.model_images) == (len(calls[window]), 24)
        assert f"{len(calls[window])} calls of" in summary.render()
        # Every call's time is booked, also that of calls made while their batches waited for the first row.
        assert summary.model_seconds >= 0.05 * len(calls[window])
    per_batch = sum(len(set(MIXED_LAYOUT[start:start + 4])) for start in range(0, 24, 4))
    assert len(calls[0]) == per_batch == 13
    assert len(calls[100]) == 6 and all(len(call) == 4 and len(set(call)) == 1 for call in calls[100])
    assert sorted(s for call in calls[100] for s in call) == sorted(s for call in calls[0] for s in call)
    grouped, alone = (comparable(read_output(str(tmp_path / f"out-{w}"))) for w in (100, 0))
    assert grouped.equals(alone)


def test_the_summary_says_how_busy_the_model_was(engine, tmp_path):
    """Calls, input wait and output wait of the model, summed over its workers, and the calls' share."""
    write_painted_input(tmp_path / "in.parquet")
    summary = vb_batch.annotate(job(tmp_path / "in.parquet", tmp_path / "out", engine,
                                    model={"backend": "worker_backends:SlowBackend", "options": {"seconds": 0.05}}))
    assert summary.success
    calls = ROWS // 2  # batch_size 2: at least one sleeping call per two rows
    assert summary.model_seconds >= 0.05 * calls
    assert summary.model_input_wait_seconds >= 0 and summary.model_output_wait_seconds >= 0
    stage = summary.model_seconds + summary.model_input_wait_seconds + summary.model_output_wait_seconds
    assert 0 < summary.model_busy <= 1 and summary.model_busy == pytest.approx(summary.model_seconds / stage)
    record = json.loads((tmp_path / "out" / "_vb" / "runs" / f"{summary.run_id}.json").read_text())
    for key in ("model_seconds", "model_input_wait_seconds", "model_output_wait_seconds"):
        assert record[key] == pytest.approx(getattr(summary, key))
    assert record["model_busy"] == pytest.approx(summary.model_busy, abs=1e-4)
    assert f"model busy {summary.model_busy:.2f} of its stage" in summary.render()


@pytest.mark.parametrize("policy, ok, skipped", [("first", 4, 1), ("position", 5, 0)])
def test_identical_images_without_an_id_follow_the_policy(engine, tmp_path, policy, ok, skipped):
    """Content ids (no id column) on every engine: a re-uploaded photo is skipped once (`first`) or kept
    with an id of its own (`position`); every input row is in the output or the summary, and a resume
    does nothing twice."""
    from conftest import png_bytes

    photos = [png_bytes(depth.encode(np.full((8, 12), 1.0 + n, np.float32))) for n in (0, 1, 2, 3, 0)]
    pq.write_table(pa.table({"image": pa.array(photos, pa.binary()), "caption": [f"upload {i}" for i in range(5)]}),
                   tmp_path / "in.parquet", row_group_size=2)
    cfg = job(tmp_path / "in.parquet", tmp_path / "out", engine, input={"duplicate_ids": policy},
              output={"mode": "resume"})
    summary = vb_batch.annotate(cfg)
    assert summary.success and (summary.rows_ok, summary.rows_skipped) == (ok, skipped)
    out = read_output(str(tmp_path / "out"), columns=["id", "caption"])
    captions = sorted(out.column("caption").to_pylist())
    assert captions == [f"upload {i}" for i in range(ok)]  # `first` keeps upload 0, skips its re-upload (4)
    assert len(set(out.column("id").to_pylist())) == ok
    again = vb_batch.annotate(cfg)
    assert again.rows_processed == 0 and again.rows_skipped == 5
