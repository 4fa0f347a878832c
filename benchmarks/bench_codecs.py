"""Decode throughput of the colour codecs, next to a numpy copy of the same bytes.

Each codec decodes a realistic painting (a smooth or blocky map, encoded,
plus Gaussian noise of 3 levels as a generator's output has) of one size.
Right before each codec, the same run times `np.copy` of the same uint8
bytes; the ratio codec / copy makes figures comparable across machines.
Depth and segmentation are timed warm (numpy's colour table already holds
the image's colours: the steady state of a batch job) and cold (fresh table:
the first image of a preset or legend). torch rows use the torch path on CPU (one thread by
default, like numpy) and on CUDA if present.

    python benchmarks/bench_codecs.py                  # 1024x1024, writes benchmarks/results/codecs.json
    python benchmarks/bench_codecs.py --size 512 --repeats 5 --no-write
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, machine_info, publish  # noqa: E402

from vb_batch.codecs import depth, normals, segmentation  # noqa: E402

NOISE_LEVELS = 3.0


def paintings(size: int) -> dict[str, tuple[np.ndarray, Any]]:
    """{case: (painted uint8 image, legend or None)}."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size

    def noisy(rgb: np.ndarray) -> np.ndarray:
        return np.clip(rgb + rng.normal(0, NOISE_LEVELS, rgb.shape), 0, 255).round().astype(np.uint8)

    depth_m = 0.5 + 40 * xx + 20 * yy**2
    n = np.stack([np.sin(xx * 3), np.cos(yy * 2), np.full_like(xx, 0.7)], axis=-1)
    cases = {
        "depth": (noisy(depth.encode(depth_m)), None),
        "normals": (noisy(normals.encode(n)), None),
    }
    for num_classes in (19, 150):
        legend = segmentation.Legend.from_names([f"class {i}" for i in range(num_classes)])
        blocks = rng.integers(0, num_classes, (size // 32 + 1, size // 32 + 1))
        ids = np.kron(blocks, np.ones((32, 32), np.int64))[:size, :size]
        cases[f"segmentation-{num_classes}"] = (noisy(segmentation.encode(ids, legend)), legend)
    return cases


def decoder(case: str, legend: Any) -> Callable[[Any], Any]:
    if case == "depth":
        return depth.decode
    if case == "normals":
        return normals.decode
    return lambda rgb: segmentation.decode(rgb, legend)


def seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def row(case: str, backend: str, times: list[float], copy_times: list[float], pixels: int, **extra: Any) -> dict:
    # The best of the repeats is the least disturbed by other processes on the
    # machine (the timeit convention); the median is kept for reference.
    best, copy_best = min(times), min(copy_times)
    return {
        "codec": case,
        "backend": backend,
        "mpix_per_s": pixels / best / 1e6,
        "mpix_per_s_median": pixels / statistics.median(times) / 1e6,
        "best_s": best,
        "median_s": statistics.median(times),
        "baseline_copy_mpix_per_s": pixels / copy_best / 1e6,
        "ratio_to_copy": copy_best / best,
        **extra,
    }


def measure(size: int = 1024, repeats: int = 10, torch_threads: int = 1) -> dict[str, Any]:
    pixels = size * size
    results = []
    try:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
    except ImportError:
        torch = None
    try:
        results = decode_rows(size, repeats, pixels, torch)
    finally:
        if torch is not None:  # the next benchmark in this process gets torch as it was
            torch.set_num_threads(threads_before)
    return {
        "benchmark": "benchmarks/bench_codecs.py",
        "machine": machine_info(),
        "image": {"height": size, "width": size, "pixels": pixels, "dtype": "uint8", "noise_levels": NOISE_LEVELS},
        "repeats": repeats,
        "torch_threads": torch_threads,
        "timing": "seconds per decode; mpix_per_s = pixels / best of the repeats (median also given)",
        "baseline": "np.copy of the same uint8 image (torch rows: tensor.clone()), timed in the same run",
        "results": results,
    }


# numpy decodes uint8 depth and segmentation through a per-preset / per-legend colour table.
COLOUR_TABLES = {"depth": depth._decode_table, "segmentation": segmentation._decode_table}


def decode_rows(size: int, repeats: int, pixels: int, torch: Any) -> list[dict[str, Any]]:
    results = []
    devices = [] if torch is None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    for case, (rgb, legend) in paintings(size).items():
        decode = decoder(case, legend)
        if legend is not None:
            legend.class_separations()  # per legend and per process (scipy import): not the table fill
        table = COLOUR_TABLES.get(case.split("-")[0])
        if table is not None:

            def decode_with_empty_table() -> None:
                table.cache_clear()
                decode(rgb)

            cold = seconds(decode_with_empty_table, min(repeats, 5))
        decode(rgb)  # warm-up (and, for segmentation, fill the table)
        copy_times = seconds(lambda: np.copy(rgb), repeats)
        times = seconds(lambda: decode(rgb), repeats)
        results.append(row(case, "numpy", times, copy_times, pixels))
        if table is not None:
            note = "first image of a colour set: the table is filled from empty each run"
            results.append(row(case, "numpy, cold table", cold, copy_times, pixels, note=note))
        for device in devices:
            tensor = torch.from_numpy(rgb).to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            decode(tensor)
            copy_times = seconds(lambda: tensor.clone(), repeats, sync)
            times = seconds(lambda: decode(tensor), repeats, sync)
            results.append(row(case, f"torch-{device}", times, copy_times, pixels, baseline="tensor.clone()"))
    return results


def print_table(report: dict[str, Any]) -> None:
    image = report["image"]
    header = f"{'codec':<18} {'backend':<18} {'MPix/s':>9} {'copy MPix/s':>12} {'ratio':>9}"
    print(f"{image['height']}x{image['width']} RGB uint8, best of {report['repeats']}")
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(
            f"{r['codec']:<18} {r['backend']:<18} {r['mpix_per_s']:>9.1f} "
            f"{r['baseline_copy_mpix_per_s']:>12.0f} {r['ratio_to_copy']:>9.4f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (square)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch CPU threads (default 1: like numpy, and robust to other load on the machine)",
    )
    args = parser.parse_args(argv)
    report = measure(args.size, args.repeats, args.torch_threads)
    return publish("codecs", report, print_table, write=not args.no_write)


if __name__ == "__main__":
    main()
