"""vb_batch on Ray vs the Ray Data pipeline a competent user writes, and vs the same job in Daft.

    python benchmarks/bench_raydata.py                      # 2,000 rows of 256 px, 3 rounds
    python benchmarks/bench_raydata.py --rows 500 --rounds 1 --no-write

One job, three ways, on the same Parquet input (painted depth maps, PNG):
read the images, decode them, run the model (`identity`: it costs nothing, so
the plumbing is measured), decode the painting into metric depth with
vb_batch's public codec, store depth as a 16-bit PNG (millimetres) with the
id, write Parquet.

    vb_batch     `engine.kind: ray`: prepare tasks, a model actor pool, finish tasks,
                 compacted part files, the atomic commit, resume bookkeeping
    ray_data     `ray.data.read_parquet` -> `map_batches` (decode) -> actor pool
                 (model) -> `map_batches` (codec + PNG) -> `write_parquet`
    daft         `daft.read_parquet` -> a row-wise UDF (decode) -> a class UDF
                 (model) -> a UDF (codec + PNG) -> `write_parquet`

Rounds alternate the three so that the machine's load falls on each alike;
the fastest round of each counts (all times are kept). The outputs are
checked: every id once, and the same depth (within the two PNG encodings' steps, 5 mm).
Ray is started once for both Ray pipelines (its start-up is not timed); Daft
runs on its own native runner.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, machine_info, write_input, write_result  # noqa: E402

BATCH = 16


def depth_png(painting: np.ndarray) -> bytes:
    """What the user's pipelines store: vb_batch's depth codec, millimetres in a 16-bit PNG."""
    from PIL import Image

    from vb_batch.codecs import depth

    metres = depth.decode(painting).values
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(metres * 1000), 0, 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------- vb_batch


def run_vb_batch(inp: Path, out: Path) -> None:
    import vb_batch

    summary = vb_batch.annotate({
        "input": {"path": str(inp)},
        "output": {"path": str(out), "mode": "overwrite", "report": False},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": BATCH},
        "engine": {"kind": "ray"},
        "run": {"progress": False},
    })
    assert summary.success, summary.message


# ---------------------------------------------------------------------------- Ray Data


class RayModel:
    def __init__(self):
        from vb_batch.config import ModelConfig
        from vb_batch.models.identity import IdentityBackend

        self.backend = IdentityBackend(ModelConfig(backend="identity"))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [np.asarray(image) for image in batch["rgb"]]
        paintings = self.backend.predict(images, ["depth"] * len(images), "depth", [0] * len(images))
        return {"id": batch["id"], "painting": np.stack(paintings) if len({p.shape for p in paintings}) == 1
                else np.array(paintings, dtype=object)}


def run_ray_data(inp: Path, out: Path) -> None:
    import ray.data
    from ray.data import ActorPoolStrategy

    def decode(batch: dict[str, Any]) -> dict[str, Any]:
        images = [decode_rgb(data) for data in batch["image"]]
        return {"id": batch["id"], "rgb": np.stack(images)}

    def encode(batch: dict[str, Any]) -> dict[str, Any]:
        return {"id": batch["id"], "depth_png": np.array([depth_png(p) for p in batch["painting"]], dtype=object)}

    ds = ray.data.read_parquet(str(inp))
    ds = ds.map_batches(decode, batch_size=BATCH)
    ds = ds.map_batches(RayModel, batch_size=BATCH, compute=ActorPoolStrategy(size=1))
    ds = ds.map_batches(encode, batch_size=BATCH)
    ds.write_parquet(str(out))


# ---------------------------------------------------------------------------- Daft


def run_daft(inp: Path, out: Path) -> None:
    import daft
    from daft import DataType, col

    @daft.udf(return_dtype=DataType.python())
    def decode(images):
        return [decode_rgb(data) for data in images.to_pylist()]

    @daft.udf(return_dtype=DataType.python(), batch_size=BATCH, concurrency=1)
    class Model:
        def __init__(self):
            from vb_batch.config import ModelConfig
            from vb_batch.models.identity import IdentityBackend

            self.backend = IdentityBackend(ModelConfig(backend="identity"))

        def __call__(self, rgb):
            images = rgb.to_pylist()
            return self.backend.predict(images, ["depth"] * len(images), "depth", [0] * len(images))

    @daft.udf(return_dtype=DataType.binary())
    def encode(paintings):
        return [depth_png(p) for p in paintings.to_pylist()]

    df = daft.read_parquet(str(inp))
    df = df.with_column("rgb", decode(col("image")))
    df = df.with_column("painting", Model(col("rgb")))
    df = df.select(col("id"), encode(col("painting")).alias("depth_png"))
    df.write_parquet(str(out))


# ---------------------------------------------------------------------------- checks


def depths(out: Path, column: str) -> dict[str, np.ndarray]:
    import pyarrow.dataset as pads

    from vb_batch.io.outputs import read_output

    if column == "depth":
        from vb_batch import load_arrays

        table = read_output(str(out))
        return dict(zip(table.column("id").to_pylist(), load_arrays(table, "depth")))
    table = pads.dataset(str(out), format="parquet").to_table()
    return {i: _png16(b) for i, b in zip(table.column("id").to_pylist(), table.column(column).to_pylist())}


def _png16(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.float32) / 1000


def check(outputs: dict[str, Path], rows: int) -> dict[str, Any]:
    reference = depths(outputs["vb_batch"], "depth")
    assert len(reference) == rows
    worst = {}
    for name in ("ray_data", "daft"):
        theirs = depths(outputs[name], "depth_png")
        assert sorted(theirs) == sorted(reference), f"{name}: ids differ"
        worst[name] = max(float(np.max(np.abs(theirs[i] - reference[i]))) for i in reference)
        assert worst[name] <= 0.005, f"{name}: depth differs by {worst[name]} m"
    return {"rows": rows, "max_depth_difference_m": worst}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import ray

    runs = {"vb_batch": run_vb_batch, "ray_data": run_ray_data, "daft": run_daft}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(prefix="vb-bench-raydata-") as root:
        inp = write_input(Path(root) / "in", args.rows, args.side, files=8)
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        outputs = {name: Path(root) / f"out-{name}" for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                shutil.rmtree(outputs[name], ignore_errors=True)
                start = time.perf_counter()
                run(inp, outputs[name])
                times[name].append(round(time.perf_counter() - start, 3))
                print(f"  {name:9s} {times[name][-1]:7.2f} s", flush=True)
        checked = check(outputs, args.rows)
        ray.shutdown()
    best = {name: min(t) for name, t in times.items()}
    result = {
        "benchmark": "bench_raydata", "machine": machine_info(), "time": time.time(),
        "settings": {"rows": args.rows, "side": args.side, "batch_size": BATCH, "tasks": ["depth"],
                     "model": "identity", "ray_cpus": 2, "rounds": args.rounds},
        "ray_start_seconds": round(ray_start, 2),
        "seconds": times, "best_seconds": best,
        "rows_per_second": {name: round(args.rows / s, 1) for name, s in best.items()},
        # > 1: vb_batch is faster.
        "vb_batch_vs_ray_data": round(best["ray_data"] / best["vb_batch"], 3),
        "vb_batch_vs_daft": round(best["daft"] / best["vb_batch"], 3),
        "check": checked,
        "note": "2-core machine shared with other work while measured; the best round of each counts",
    }
    print(f"  vb_batch vs Ray Data {result['vb_batch_vs_ray_data']:.2f}x, vs Daft {result['vb_batch_vs_daft']:.2f}x")
    if not args.no_write:
        write_result("raydata", result)
    return result


if __name__ == "__main__":
    main()
