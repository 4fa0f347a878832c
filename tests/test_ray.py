"""The Ray engine: the same output as the local engine, resume, S3, a two-node cluster, and `vb_batch.ray.Annotator`."""

from __future__ import annotations

import doctest
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import png_bytes
from s3_server import CREDENTIALS, SECRET, s3_server

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import ConfigError, StorageOptions, load_config
from vb_batch.io.outputs import read_output
from vb_batch.models.identity import IdentityBackend

# Ray Data warns about its own deprecated settings whenever it copies its context.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers


def scene(seed: int, height: int, width: int) -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes(depth.encode(rng.uniform(0.5, 40, (height, width)).astype(np.float32)))


def write_inputs(folder: Path, n: int, files: int = 2, bad: bool = True) -> Path:
    """A Parquet dataset of `n` painted images over `files` files, sizes varying; a few broken rows."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [scene(i, 16 + 8 * (i % 3), 24) for i in range(n)]
    if bad:
        images[3], images[7] = b"not an image", None
    ids = [f"row-{i:03d}" for i in range(n)]
    per_file = -(-n // files)
    for f in range(files):
        part = slice(f * per_file, (f + 1) * per_file)
        table = pa.table({"id": ids[part], "image": pa.array(images[part], pa.binary()), "note": list(range(n))[part]})
        pq.write_table(table, folder / f"images-{f}.parquet")
    return folder


def job(input_path, output_path, kind="local", **sections):
    cfg = {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": "overwrite", "report": False, "rows_per_file": 5, "commit_every": 10},
        "tasks": ["depth", "normals", "segmentation"],
        "segmentation": {"classes": ["road", "car", "sky"]},
        "model": {"backend": "identity", "batch_size": 4},
        "engine": {"kind": kind, "cpu_batch_rows": 8},
        "run": {"progress": False},
    }
    for section, values in sections.items():
        if values is None:
            del cfg[section]
        else:
            cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def sorted_output(path, storage=None) -> pa.Table:
    return read_output(str(path), storage=storage).sort_by("id")


def assert_same_output(local: pa.Table, other: pa.Table, exact: bool = True) -> None:
    """Same columns, types, field metadata and (but run ids) values; `exact=False`: maps within one storage step."""
    assert local.schema.names == other.schema.names
    for a, b in zip(local.schema, other.schema):
        assert a.equals(b, check_metadata=True), (a, b)
    local, other = local.drop_columns(["vb_run_id"]), other.drop_columns(["vb_run_id"])
    if exact:
        assert local.equals(other)
        return
    for name in local.column_names:
        if name in ("depth", "normals"):
            for x, y in zip(vb_batch.load_arrays(local, name), vb_batch.load_arrays(other, name)):
                np.testing.assert_allclose(x, y, atol=1e-3 if name == "depth" else 1e-2)
        elif pa.types.is_floating(local.schema.field(name).type):
            np.testing.assert_allclose(local[name].to_numpy(), other[name].to_numpy(), rtol=1e-3, atol=1e-4)
        else:
            assert local[name].equals(other[name]), name


def run_record(output: Path, run_id: str) -> dict:
    return json.loads((output / "_vb" / "runs" / f"{run_id}.json").read_text())


# ---------------------------------------------------------------------------- config (no Ray needed)


def test_engine_config_names_the_field():
    base = {"input": {"path": "x"}, "model": {"backend": "identity"}}
    assert load_config(base, ["engine.kind=ray", "engine.actors=[1, 4]"]).engine.actors == (1, 4)
    for override, field in [
        ("engine.actors=[3, 1]", "engine.actors"),
        ("engine.actors=0", "engine.actors"),
        ("engine.gpus_per_actor=-1", "engine.gpus_per_actor"),
        ("engine.cpu_batch_rows=0", "engine.cpu_batch_rows"),
        ("engine.kind=dask", "engine.kind"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_config(base, [override])
    example = load_config(REPO / "conf" / "ray-s3.yaml")
    assert example.engine.kind == "ray" and example.input.path.startswith("s3://")


def test_ray_engine_refuses_what_workers_cannot_reach(tmp_path):
    cfg = job("memory://bucket/in.parquet", tmp_path / "out", "ray")
    with pytest.raises(ConfigError, match="input.path"):
        vb_batch.annotate(cfg)
    with pytest.raises(ValueError, match="engine.kind"):
        vb_batch.annotate(job(tmp_path, tmp_path / "out", "ray"), backend=IdentityBackend(None))


def test_ray_data_memory_limits_follow_the_engine_settings():
    """Blocks of at most `engine.block_bytes`, an object-store budget of a few such blocks, other limits kept."""
    from ray.data import DataContext

    from vb_batch.config import EngineConfig
    from vb_batch.engines.ray import OBJECT_STORE_BLOCKS, bound_memory

    context = DataContext()
    before = context.execution_options.resource_limits
    bound_memory(context, EngineConfig(kind="ray", block_bytes=32 * 2**20))
    assert context.target_max_block_size == 32 * 2**20
    limits = context.execution_options.resource_limits
    assert limits.object_store_memory == OBJECT_STORE_BLOCKS * 32 * 2**20 and limits.cpu == before.cpu


def test_finish_writes_a_block_as_one_part_file_one_model_batch_at_a_time(tmp_path, monkeypatch):
    """A finish task: one staged file per block, decoded and encoded in model batches on one row thread."""
    from vb_batch.engines import ray as ray_engine
    from vb_batch.io.sources import with_ids
    from vb_batch.pipeline import rows
    from vb_batch.pipeline.inputs import fetch_decode
    from vb_batch.pipeline.model import run_model
    from vb_batch.pipeline.resolved import ResolvedJob
    from vb_batch.pipeline.stream import cached_backend

    table = pq.read_table(write_inputs(tmp_path / "in", 40, files=1, bad=False) / "images-0.parquet")
    cfg = load_config(job(tmp_path / "in", tmp_path / "out", "ray", model={"backend": "identity", "batch_size": 16},
                          output={"rows_per_file": 1024}))
    plan = ResolvedJob.build(cfg, table.schema, image_column="image")
    batch = with_ids(table.combine_chunks().to_batches()[0], "id", "image", None)
    block = ray_engine.shapes_only(run_model(fetch_decode(batch, plan), plan, cached_backend(plan)))
    for name, value in ((ray_engine.NODE_COLUMN, "node-a"), (ray_engine.MODEL_SECONDS_COLUMN, 0.5),
                        (ray_engine.MODEL_WAIT_COLUMN, 0.25)):
        block = block.append_column(name, pa.array([value] * 40))
    calls, real = [], ray_engine.decode_encode
    monkeypatch.setattr(ray_engine, "decode_encode",
                        lambda part, plan: calls.append((part.num_rows, rows.ROW_THREADS)) or real(part, plan))
    threads = rows.ROW_THREADS
    (tmp_path / "staging").mkdir()

    reports = ray_engine.finish(pa.Table.from_batches([block]), plan, str(tmp_path / "staging")).to_pylist()

    assert calls == [(16, 1), (16, 1), (8, 1)] and rows.ROW_THREADS == threads
    files = [r for r in reports if r["file"]]
    assert len(files) == 1 and files[0]["rows"] == 40 and files[0]["model_nodes"] == [{"node": "node-a", "rows": 40}]
    assert pq.read_table(tmp_path / "staging" / files[0]["file"]).num_rows == 40
    assert sum(r["model_seconds"] for r in reports) == pytest.approx(20.0)
    assert reports[0]["model_input_wait_seconds"] == pytest.approx(10.0)


# ---------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_row_filter_and_delta_output_on_ray(ray_local, tmp_path):
    """The Ray engine reads the rows the source selects (`input.filter`) and commits through any sink."""
    inputs = write_inputs(tmp_path / "in", 16, files=2, bad=False)
    sections = {"input": {"filter": "note >= 5 and note < 13"}, "output": {"format": "delta"}}
    vb_batch.annotate(job(inputs, tmp_path / "local", **sections))
    summary = vb_batch.annotate(job(inputs, tmp_path / "ray", "ray", **sections))
    assert summary.success and summary.rows_read == 8 and summary.rows_ok == 8
    on_ray = sorted_output(tmp_path / "ray")
    assert on_ray.column("note").to_pylist() == list(range(5, 13))
    assert_same_output(sorted_output(tmp_path / "local"), on_ray)


@pytest.mark.slow
def test_decode_on_device_in_the_model_actor(ray_local, tmp_path):
    """`model.decode_on_device`: the actor decodes, the finishing tasks only encode; the output is the local one."""
    inputs = write_inputs(tmp_path / "in", 12, files=1)
    model = {"decode_on_device": True}
    vb_batch.annotate(job(inputs, tmp_path / "local", model=model))
    summary = vb_batch.annotate(job(inputs, tmp_path / "ray", "ray", model=model))
    assert summary.success and summary.rows_ok == 10 and summary.errors_by_code == {"not_image": 1, "null_image": 1}
    assert_same_output(sorted_output(tmp_path / "local"), sorted_output(tmp_path / "ray"))


@pytest.mark.slow
def test_tiny_marigold_on_ray_matches_local(ray_local, tiny_marigold, tmp_path):
    inputs = write_inputs(tmp_path / "in", 8, files=1, bad=False)
    model = {"backend": "marigold", "path": tiny_marigold, "batch_size": 4}
    local = job(inputs, tmp_path / "local", model=model)
    local["tasks"] = ["depth", "normals"]
    vb_batch.annotate(local)
    on_ray = job(inputs, tmp_path / "ray", "ray", model=model, engine={"cpu_batch_rows": 4})
    on_ray["tasks"] = ["depth", "normals"]
    summary = vb_batch.annotate(on_ray)
    assert summary.success and summary.rows_ok == 8
    # Same model, same per-row seeds; only float rounding may differ (torch runs one thread per actor).
    assert_same_output(sorted_output(tmp_path / "local"), sorted_output(tmp_path / "ray"), exact=False)


@pytest.mark.slow
def test_s3_in_and_out_on_ray_leaks_no_secret(ray_local, tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="vb_batch")
    inputs = write_inputs(tmp_path / "in", 12, bad=False)
    with s3_server() as s3:
        for path in sorted(inputs.glob("*.parquet")):
            s3.put(f"archive/{path.name}", path.read_bytes())
        storage = {"storage": s3.storage}
        cfg = job(s3.url("archive/"), s3.url("labels/ray"), "ray", input=storage, output={**storage, "report": True})
        summary = vb_batch.annotate(cfg)
        assert summary.success and summary.rows_ok == 12
        local = job(s3.url("archive/"), s3.url("labels/local"), input=storage, output=storage)
        vb_batch.annotate(local)
        options = StorageOptions(**s3.storage)
        assert_same_output(sorted_output(s3.url("labels/local"), options), sorted_output(s3.url("labels/ray"), options))
        keys = s3.keys("labels/ray/")
        assert "labels/ray/_SUCCESS" in keys and "labels/ray/_report.html" in keys
        assert not any("/_vb/staging/" in k for k in keys)
        captured = capfd.readouterr()
        texts = [captured.out, captured.err, caplog.text]
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        texts += [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
        for text in texts:
            assert SECRET not in text
        for key in keys:
            data = s3.get(key)
            assert SECRET.encode() not in data and CREDENTIALS["AWS_ACCESS_KEY_ID"].encode() not in data, key


@pytest.mark.slow
def test_job_entrypoint_on_an_image_folder(ray_local, tmp_path):
    """`jobs/ray_job.py` (what `ray job submit` runs) on a folder of images: ids are paths, images fetched by URI."""
    folder = tmp_path / "photos"
    for i in range(5):
        (folder / f"set-{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"set-{i % 2}" / f"p{i}.png").write_bytes(scene(i, 16, 16 + 8 * i))
    (folder / "set-0" / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(job(folder, tmp_path / "local", tasks=None)))
    entrypoint = runpy.run_path(str(REPO / "jobs" / "ray_job.py"))
    assert entrypoint["main"]([str(config), f"output.path={tmp_path / 'ray'}"]) == 0
    assert vb_batch.annotate(str(config)).rows_failed == 1
    on_ray = sorted_output(tmp_path / "ray")
    assert on_ray.column("id").to_pylist() == ["set-0/broken.png", "set-0/p0.png", "set-0/p2.png", "set-0/p4.png",
                                               "set-1/p1.png", "set-1/p3.png"]
    assert_same_output(sorted_output(tmp_path / "local"), on_ray)
    assert entrypoint["main"]([]) == 2


@pytest.mark.slow
def test_annotator_docstring_example_runs(ray_local):
    import vb_batch.integrations.ray_data

    result = doctest.testmod(vb_batch.integrations.ray_data, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.slow
def test_annotator_derives_ids_like_a_job(ray_local):
    from ray.data import ActorPoolStrategy

    from vb_batch.io.sources import content_id
    from vb_batch.ray import Annotator

    images = [scene(i, 16, 16) for i in range(3)]
    ds = ray.data.from_arrow(pa.table({"image": pa.array(images, pa.binary()), "label": ["a", "b", "c"]}))
    config = {"input": {"image_column": "image"}, "tasks": ["depth"], "model": {"backend": "identity"}}
    labelled = ds.map_batches(
        Annotator, fn_constructor_kwargs={"config": config, "run_id": "run-1"}, batch_format="pyarrow",
        batch_size=2, compute=ActorPoolStrategy(size=1),
    )
    out = pa.concat_tables(labelled.iter_batches(batch_format="pyarrow", batch_size=None))
    assert sorted(out.column("id").to_pylist()) == sorted(content_id(b) for b in images)
    assert set(out.column("vb_run_id").to_pylist()) == {"run-1"}
    assert out.schema.field("depth").metadata[b"vb.unit"] == b"m"


@pytest.mark.slow
def test_two_nodes_model_actors_run_on_the_gpu_node(worker_env, tiny_marigold, tmp_path):
    """Model actors ask for engine.gpus_per_actor GPUs: they land on the node that has one, and run on CPU there."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        inputs = write_inputs(tmp_path / "in", 10, files=2, bad=False)
        cfg = job(inputs, tmp_path / "out", "ray", engine={"address": cluster.address, "gpus_per_actor": 1})
        cfg["tasks"] = ["depth"]
        cfg["model"] = {"backend": "marigold", "path": tiny_marigold["depth"], "batch_size": 4, "device": "auto"}
        summary = vb_batch.annotate(cfg)
        assert summary.success and summary.rows_ok == 10
        assert sorted(sorted_output(tmp_path / "out").column("id").to_pylist()) == [f"row-{i:03d}" for i in range(10)]
        assert run_record(tmp_path / "out", summary.run_id)["model_nodes"] == {gpu_node.node_id: 10}
        assert not ray.is_initialized()  # the engine disconnects from a cluster it joined itself
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # ~12 s: a Ray cluster and a killed actor
def test_killed_model_actor_is_restarted_and_nothing_duplicated(worker_env, tmp_path):
    """A model actor dies mid-batch: Ray restarts it, retries the batch, and every id comes out once."""
    tests = str(Path(__file__).resolve().parent)
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests, *sys.path])}})
    try:
        cells = [scene(i, 16, 24) for i in range(24)]
        pq.write_table(pa.table({"id": list(range(24)), "image": cells}), tmp_path / "in.parquet")
        marker = tmp_path / "died"
        cfg = {
            "input": {"path": str(tmp_path / "in.parquet")},
            "output": {"path": str(tmp_path / "out"), "rows_per_file": 4},
            "model": {"backend": "worker_backends:DiesOnceBackend", "batch_size": 4, "options": {"marker": str(marker)}},
            "engine": {"kind": "ray", "cpu_batch_rows": 4},
            "run": {"progress": False},
        }
        summary = vb_batch.annotate(cfg)
        assert marker.exists(), "the actor never died: the test proves nothing"
        assert summary.success and summary.rows_ok == 24
        ids = read_output(str(tmp_path / "out")).column("id").to_pylist()
        assert sorted(ids) == list(range(24))
    finally:
        ray.shutdown()


SLOW_RAY_DRIVER = """
import sys
import vb_batch
vb_batch.annotate(sys.argv[1])
"""


@pytest.mark.slow  # ~12 s: a Ray driver killed and resumed
def test_kill_9_of_the_ray_driver_then_resume(worker_env, tmp_path, monkeypatch):
    """The driver of a Ray job is killed -9 mid-run; a resumed run gives every id exactly once."""
    from ray.cluster_utils import Cluster

    tests = str(Path(__file__).resolve().parent)
    # The cluster's workers import the test backend from here.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, *sys.path]))
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cells = [scene(i, 16, 24) for i in range(60)]
        pq.write_table(pa.table({"id": list(range(60)), "image": cells}), tmp_path / "in.parquet", row_group_size=4)
        cfg = {
            "input": {"path": str(tmp_path / "in.parquet")},
            "output": {"path": str(tmp_path / "out"), "rows_per_file": 4, "commit_every": 4},
            "model": {"backend": "worker_backends:SlowBackend", "batch_size": 4, "options": {"seconds": 0.3}},
            "engine": {"kind": "ray", "address": cluster.address, "cpu_batch_rows": 4},
            "run": {"progress": False},
        }
        (tmp_path / "job.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([sys.executable, "-c", SLOW_RAY_DRIVER, str(tmp_path / "job.json")])
        commits = tmp_path / "out" / "_vb" / "commits"
        deadline = time.time() + 120
        while time.time() < deadline and len(list(commits.glob("*.json"))) < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = read_output(str(tmp_path / "out")).num_rows
        assert 0 < before < 60 and not (tmp_path / "out" / "_SUCCESS").exists()
        cfg["output"]["mode"] = "resume"
        cfg["model"]["options"]["seconds"] = 0
        summary = vb_batch.annotate(cfg)
        # The resume's recovery may roll forward a commit the killed driver had recorded but not finished
        # (readers do not show it until its files are in place): those rows count as done too.
        assert summary.success and summary.rows_skipped >= before and summary.rows_processed == 60 - summary.rows_skipped
        ids = read_output(str(tmp_path / "out")).column("id").to_pylist()
        assert sorted(ids) == list(range(60))
    finally:
        ray.shutdown()
        cluster.shutdown()
