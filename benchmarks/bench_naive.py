"""vb_batch (local and Ray engines) against the per-image loop a user would write, same model and data.

The model is a tiny random Marigold pair (depth + normals) built here with
`vb_batch.models.tiny.build_tiny_marigold`; the data, `--rows` PNG images in
Parquet. The naive loop is what one writes with diffusers and pyarrow alone:

    pipes = {task: DiffusionPipeline.from_pretrained(path) for task, path in checkpoints.items()}
    for row in pq.read_table(input).to_pylist():
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        for task, pipe in pipes.items():
            row[task] = pipe(image, generator=..., output_type="np").prediction[0]   # one image per call
    pq.write_table(pa.Table.from_pylist(rows), output)

Both sides are timed from loading the checkpoints to the written output, in
the same process, alternating, best of `--repeats`. The run also times the model alone on
images in memory, at batch 1 and at vb_batch's batch size: where the model is
the whole cost (a CPU), that ratio is what batching alone can gain. (vb_batch
also encodes each batch once for both tasks: the two checkpoints share their VAE.) The loop seeds each image's generator
as vb_batch does (one extra line), so both sides compute the same maps; the
run checks they agree (float rounding of batched convolutions aside). Ray is
started before the timed runs; its start-up is reported apart.

    python benchmarks/bench_naive.py                  # writes benchmarks/results/naive.json
    python benchmarks/bench_naive.py --rows 16 --repeats 1 --no-write
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, best_of, clear_dir, machine_info, publish, write_input  # noqa: E402

TASKS = ("depth", "normals")


def naive_loop(input_dir: Path, output_file: Path, checkpoints: dict[str, str]) -> None:
    """The per-image loop: PIL decode, one pipeline call per image and task, one Parquet write."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from vb_batch.pipeline.resolved import row_seed

    pipes = {}
    for task, path in checkpoints.items():
        pipes[task] = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
        pipes[task].set_progress_bar_config(disable=True)
    rows = []
    for row in pq.read_table(input_dir).to_pylist():
        image = Image.open(io.BytesIO(row.pop("image"))).convert("RGB")
        for task, pipe in pipes.items():
            generator = torch.Generator().manual_seed(row_seed(0, row["id"]))
            prediction = pipe(image, generator=generator, output_type="np").prediction[0]
            row[task] = np.ascontiguousarray(prediction[..., 0] if task == "depth" else prediction, np.float32).tobytes()
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), output_file)


def batching_gain(input_dir: Path, checkpoints: dict[str, str], batch_size: int, images: int = 16) -> dict:
    """The model alone, images in memory: ms per image at batch 1 and at `batch_size`, best of 3.

    Their ratio is what batching alone gains over the loop when the model is the
    whole cost (a compute-bound CPU).
    """
    import pyarrow.parquet as pq
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    cells = pq.read_table(input_dir).column("image").to_pylist()[:images]
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in cells]))
    pixels = pixels.permute(0, 3, 1, 2).contiguous()
    ms_per_image = {1: 0.0, batch_size: 0.0}
    for path in checkpoints.values():
        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for size in ms_per_image:
            def run() -> None:
                for start in range(0, len(pixels), size):
                    pipe(pixels[start : start + size], batch_size=size, output_type="np")
            run()  # warm-up
            ms_per_image[size] += best_of(3, run)[0] / len(pixels) * 1000
    return {
        "ms_per_image_all_tasks": {str(k): round(v, 2) for k, v in ms_per_image.items()},
        "batching_speedup": round(ms_per_image[1] / ms_per_image[batch_size], 2),
    }


def job_config(input_dir: Path, output_dir: Path, engine: str, checkpoints: dict[str, str], batch_size: int) -> dict:
    return {
        "input": {"path": str(input_dir)},
        "output": {"path": str(output_dir), "mode": "overwrite", "report": False, "encoding": "array"},
        "run": {"progress": False},
        "engine": {"kind": engine, "cpu_batch_rows": 2 * batch_size},
        "tasks": list(TASKS),
        "model": {"backend": "marigold", "path": checkpoints, "batch_size": batch_size, "device": "cpu"},
    }


def max_difference(naive_file: Path, output_dir: Path, shape: tuple[int, int]) -> dict[str, float]:
    """Largest absolute difference per task between the loop's maps and vb_batch's."""
    import pyarrow.parquet as pq

    import vb_batch
    from vb_batch.io.outputs import read_output

    naive = pq.read_table(naive_file).sort_by("id")
    ours = read_output(str(output_dir)).sort_by("id")
    assert naive.column("id").equals(ours.column("id")), "the two sides hold different rows"
    worst = {}
    for task in TASKS:
        channels = (3,) if task == "normals" else ()
        theirs = [np.frombuffer(b, np.float32).reshape(*shape, *channels) for b in naive.column(task).to_pylist()]
        worst[task] = max(float(np.max(np.abs(a - b))) for a, b in zip(theirs, vb_batch.load_arrays(ours, task)))
    return worst


def measure(rows: int = 64, height: int = 96, width: int = 128, batch_size: int = 8, repeats: int = 3,
            ray_engine: bool = True) -> dict[str, Any]:
    import torch

    import vb_batch
    from vb_batch.models.loading import quiet_loading
    from vb_batch.models.tiny import build_tiny_marigold

    quiet_loading()  # no loading bars, for either side
    with tempfile.TemporaryDirectory(prefix="vb-bench-naive-") as tmp:
        root = Path(tmp)
        checkpoints = {task: str(build_tiny_marigold(root / "model" / task, task=task)) for task in TASKS}
        input_dir = write_input(root / "input", rows, height, width)
        naive_file = root / "naive.parquet"
        engines = ["local", "ray"] if ray_engine else ["local"]
        outputs = {engine: root / f"out-{engine}" for engine in engines}
        configs = {engine: job_config(input_dir, outputs[engine], engine, checkpoints, batch_size) for engine in engines}

        last: dict[str, Any] = {}  # engine -> its last run summary

        def annotate(engine: str) -> float:
            def run() -> None:
                last[engine] = vb_batch.annotate(configs[engine])

            return best_of(1, run, before=lambda: clear_dir(outputs[engine]))[0]

        runs: dict[str, list[float]] = {"naive loop": [], "vb_batch local": []}
        for _ in range(repeats):  # alternating, so that a machine slowing down or speeding up hits both sides
            runs["naive loop"].append(best_of(1, lambda: naive_loop(input_dir, naive_file, checkpoints))[0])
            runs["vb_batch local"].append(annotate("local"))
        ray_start_s = None
        if ray_engine:
            import ray

            # Only now: Ray's own processes starting up would slow the runs above.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            started = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
            ray_start_s = time.perf_counter() - started
            try:
                runs["vb_batch ray"] = [annotate("ray") for _ in range(repeats)]
            finally:
                ray.shutdown()
        timings = {side: (min(times), times) for side, times in runs.items()}
        differences = {engine: max_difference(naive_file, outputs[engine], (height, width)) for engine in engines}
        model_alone = batching_gain(input_dir, checkpoints, batch_size)
        local = last["local"]
        model_thread = {  # the last local run: how much of it the model worked, and waited
            "seconds": round(local.seconds, 3), "model_seconds": round(local.model_seconds, 3),
            "model_load_seconds": round(local.model_load_seconds, 3),
            "input_wait_seconds": round(local.model_input_wait_seconds, 3),
            "writer_wait_seconds": round(local.model_output_wait_seconds, 3),
        }

    baseline = timings["naive loop"][0]
    results = [
        {
            "side": side,
            "seconds": round(best, 3),
            "seconds_all_runs": [round(t, 3) for t in runs],
            "images_per_second": round(rows / best, 2),
            "speedup_vs_naive": round(baseline / best, 2),
        }
        for side, (best, runs) in timings.items()
    ]
    return {
        "benchmark": "benchmarks/bench_naive.py",
        "machine": machine_info(),
        "settings": {
            "rows": rows, "height": height, "width": width, "tasks": list(TASKS), "model": "tiny random Marigold",
            "vb_batch_batch_size": batch_size, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "timing": "load checkpoints -> written output, best of repeats; Ray start-up excluded",
        },
        "ray_start_seconds": None if ray_start_s is None else round(ray_start_s, 2),
        "max_abs_difference_vs_naive": differences,
        "model_alone": model_alone,
        "vb_batch_local_model_thread": model_thread,
        "results": results,
        "target": "vb_batch >= 2x the naive loop",
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"tiny Marigold, {s['tasks']}, {s['rows']} images {s['height']}x{s['width']}, best of {s['repeats']}")
    print(f"{'side':<16} {'seconds':>8} {'images/s':>9} {'vs naive':>9}")
    for r in report["results"]:
        print(f"{r['side']:<16} {r['seconds']:>8.2f} {r['images_per_second']:>9.2f} {r['speedup_vs_naive']:>8.2f}x")
    print(f"max |vb_batch - naive| per task: {report['max_abs_difference_vs_naive']}")
    m = report["vb_batch_local_model_thread"]
    print(f"last local run: {m['seconds']:.2f} s, of which the model {m['model_seconds']:.2f} s, loading it "
          f"{m['model_load_seconds']:.2f} s; the model waited {m['input_wait_seconds']:.2f} s for input and "
          f"{m['writer_wait_seconds']:.2f} s for the writer")
    ceiling = report["model_alone"]
    print(f"the model alone, ms per image (all tasks) by batch size: {ceiling['ms_per_image_all_tasks']}: "
          f"batching alone gains {ceiling['batching_speedup']}x here")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args(argv)
    report = measure(args.rows, args.height, args.width, args.batch_size, args.repeats, not args.no_ray)
    return publish("naive", report, print_table, write=not args.no_write)


if __name__ == "__main__":
    main()
