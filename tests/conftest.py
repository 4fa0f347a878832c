"""Shared fixtures: tiny Marigold checkpoints (built once, loaded by path) and painted image tables."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vb_batch.codecs import depth, normals, segmentation
from vb_batch.models.identity import IdentityBackend


@pytest.fixture(scope="session")
def tiny_marigold(tmp_path_factory):
    """{task: path} of tiny random Marigold pipelines saved with save_pretrained."""
    from vb_batch.models.tiny import build_tiny_marigold

    root = tmp_path_factory.mktemp("tiny-marigold")
    return {task: str(build_tiny_marigold(root / task, task=task)) for task in ("depth", "normals")}


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def known_maps(seed: int, height: int, width: int, legend: segmentation.Legend) -> dict[str, np.ndarray]:
    """Smooth depth in metres, unit normals (OpenGL), and blocky class ids of one synthetic scene."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    depth_m = (0.5 + rng.uniform(0, 30) * (xx / width) + rng.uniform(0, 20) * (yy / height) ** 2).astype(np.float32)
    n = np.stack([np.sin(xx / width * 3 + seed), np.cos(yy / height * 2), np.ones_like(xx)], axis=-1)
    n = (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)
    blocks = rng.integers(0, len(legend), size=(height // 8 + 1, width // 8 + 1))
    ids = np.kron(blocks, np.ones((8, 8), dtype=np.int64))[:height, :width].astype(legend.dtype)
    return {"depth": depth_m, "normals": n, "segmentation": ids}


# The legend of `write_painted_input`'s segmentation rows.
PAINTED_LEGEND = segmentation.Legend.from_names(["road", "car", "sky"])


def write_painted_input(path, id_position: str = "first", rows: int = 12) -> list[str]:
    """Paintings for every task and two broken rows (`bad-empty`, `bad-junk`), in row groups of 3.

    Columns id, image, k, note, with the id column first, in the "middle" or "last". Returns the ids.
    """
    ids, images = [], []
    for i in range(rows - 2):
        maps = known_maps(i, 16 + 8 * (i % 3), 24, PAINTED_LEGEND)
        painting = [depth.encode(maps["depth"]), normals.encode(maps["normals"]),
                    segmentation.encode(maps["segmentation"], PAINTED_LEGEND)][i % 3]
        ids.append(f"row-{i:02d}")
        images.append(png_bytes(painting))
    ids += ["bad-empty", "bad-junk"]
    images += [b"", b"junk"]
    columns = {"image": pa.array(images, pa.binary()), "k": list(range(rows)), "note": [f"n{i}" for i in range(rows)]}
    order = {"first": ["id", "image", "k", "note"], "middle": ["image", "k", "id", "note"],
             "last": ["image", "k", "note", "id"]}[id_position]
    pq.write_table(pa.table({name: ids if name == "id" else columns[name] for name in order}), path, row_group_size=3)
    return ids


class CountingIdentity(IdentityBackend):
    """The identity model, counting the images it was asked to paint."""

    def __init__(self):
        self.images = 0

    def predict(self, images, prompts, task, seeds):
        self.images += len(images)
        return list(images)


@pytest.fixture
def legend():
    return segmentation.Legend.from_names(["road", "car", "person", "sky", "tree"])


@pytest.fixture
def painted_table(tmp_path, legend):
    """Parquet tables whose images are codec paintings of known maps, one table per task."""
    sizes = [(32, 48), (48, 32), (40, 40), (32, 48), (24, 64)]
    truth: dict[str, dict[str, np.ndarray]] = {"depth": {}, "normals": {}, "segmentation": {}}
    paths = {}
    for task in truth:
        ids, images = [], []
        for i, (h, w) in enumerate(sizes):
            maps = known_maps(i, h, w, legend)
            rgb = {
                "depth": lambda: depth.encode(maps["depth"]),
                "normals": lambda: normals.encode(maps["normals"]),
                "segmentation": lambda: segmentation.encode(maps["segmentation"], legend),
            }[task]()
            row_id = f"{task}-{i}"
            ids.append(row_id)
            images.append(png_bytes(rgb))
            truth[task][row_id] = maps[task]
        table = pa.table({"id": ids, "image": pa.array(images, pa.binary()), "note": [f"n{i}" for i in range(len(ids))]})
        paths[task] = tmp_path / f"{task}.parquet"
        pq.write_table(table, paths[task])
    return paths, truth


# ---------------------------------------------------------------------------- engines: real Ray and Spark


@pytest.fixture(scope="session")
def worker_env():
    """What Ray and Spark workers inherit: fake AWS credentials, no usage stats, the tests' modules importable."""
    import os
    import sys
    from pathlib import Path

    from s3_server import CREDENTIALS

    tests = str(Path(__file__).resolve().parent)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Workers import test backends (worker_backends, this suite's own modules) from here.
        mp.setenv("PYTHONPATH", os.pathsep.join([tests, *sys.path]))
        yield
        import ray

        ray.shutdown()


@pytest.fixture
def ray_local(worker_env):
    """A local Ray of 2 CPUs, started once and shared by the tests that ask for it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield


@pytest.fixture(scope="session")
def spark(worker_env):
    """A Spark session on real executor processes (`local-cluster[2,1,1024]`), shared by the session."""
    import os

    from s3_server import CREDENTIALS

    from vb_batch.config import EngineConfig
    from vb_batch.engines.spark import spark_session

    engine = EngineConfig(
        kind="spark",
        master="local-cluster[2,1,1024]",
        spark_conf={
            "spark.executorEnv.PYTHONPATH": os.environ["PYTHONPATH"],
            # Executors find S3 credentials in their own environment, as on a real cluster.
            **{f"spark.executorEnv.{k}": v for k, v in CREDENTIALS.items()},
            "spark.executor.memory": "1g",
            "spark.sql.shuffle.partitions": "4",
        },
    )
    session = spark_session(engine, "vb-batch tests")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(params=["local", "ray", "spark"])
def engine(request):
    """Each engine in turn, with what it needs running: the contract suite runs once per engine."""
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    elif request.param == "spark":
        request.getfixturevalue("spark")
    return request.param


@pytest.fixture(params=["compiled", "numpy"])
def codec_kernels(request):
    """Each of the codecs' table kernels in turn (`vb_batch.codecs.kernels`): they must give the same bits."""
    from vb_batch.codecs import kernels

    with kernels.forced(request.param):
        yield request.param


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{diffusers edit pipeline class name: a saved tiny random checkpoint}, built on first use, once per session.

    Tests must not change a checkpoint in place (copy it first).
    """
    from vb_batch.models.tiny import build_tiny_edit_pipeline

    root = tmp_path_factory.mktemp("tiny-edit")
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = str(build_tiny_edit_pipeline(name, root / name))
        return built[name]

    return get


@pytest.fixture
def catalog(tmp_path):
    """An Iceberg SQL catalog on sqlite, its warehouse under tmp_path (the `catalog` section of a job)."""
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/warehouse"}


@pytest.fixture(scope="module")
def moto_s3():
    """One moto S3 server on loopback for a module's tests (each test uses its own prefix), fake credentials set.

    Only where a test compares a real server's answers with moto's (the lease's conditional writes);
    `s3` below is the suite's S3.
    """
    from s3_server import s3_server, use_fake_credentials

    with pytest.MonkeyPatch.context() as mp:
        use_fake_credentials(mp)
        with s3_server() as server:
            yield server


# ---------------------------------------------------------------------------- object storage: a real S3 and REST catalog


@pytest.fixture(scope="session")
def seaweed():
    """One SeaweedFS for the session: S3 and an Iceberg REST catalog over a table bucket (`seaweed_server.py`)."""
    from seaweed_server import seaweed_server

    with seaweed_server() as server:
        yield server


@pytest.fixture
def s3(seaweed, monkeypatch):
    """The suite's S3: a fresh bucket on the session's SeaweedFS, the fake credentials in the environment.

    moto (`s3_server.s3_server()`) only where a test needs a fault SeaweedFS cannot produce.
    """
    from s3_server import use_fake_credentials

    use_fake_credentials(monkeypatch)
    return seaweed.new_bucket()
