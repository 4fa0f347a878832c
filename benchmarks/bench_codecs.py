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

`--before-after` instead times the numpy uint8 decode against the codecs as they
were at `--before` (a git revision, loaded from `git show` into this process) on a
stream of distinct paintings per codec and size, old and new interleaved, each
starting from empty colour tables as a worker process does: per-pixel ns of the
first image, of the images after it, and of one image decoded again (warm); the stream
runs `--rounds` times from empty tables and each image keeps its best time. It checks that
both return the same bits, and writes benchmarks/results/codecs_decode.json.

    python benchmarks/bench_codecs.py --before-after --images 12
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, argument_parser, machine_info, publish  # noqa: E402

from vb_batch.codecs import depth, kernels, normals, segmentation  # noqa: E402

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
        # uint8 numpy input: what the compiled kernels decode where they are built (codecs.kernels).
        label = "numpy uint8" + (", compiled kernels" if kernels.active() is not None else ", numpy kernels")
        results.append(row(case, label, times, copy_times, pixels))
        if table is not None:
            note = "first image of a colour set: the table is filled from empty each run"
            results.append(row(case, f"{label}, cold table", cold, copy_times, pixels, note=note))
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
    header = f"{'codec':<18} {'backend':<40} {'MPix/s':>9} {'copy MPix/s':>12} {'ratio':>9}"
    print(f"{image['height']}x{image['width']} RGB uint8, best of {report['repeats']}")
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(
            f"{r['codec']:<18} {r['backend']:<40} {r['mpix_per_s']:>9.1f} "
            f"{r['baseline_copy_mpix_per_s']:>12.0f} {r['ratio_to_copy']:>9.4f}"
        )


# The codecs before the block-filled colour tables (the last commit that changed them).
BEFORE_REVISION = "2acf763"


def codecs_at(revision: str | None) -> types.SimpleNamespace:
    """depth, normals and segmentation as they were at a git revision (None: as the files are now), as fresh
    modules of this process, with colour tables of their own."""
    loaded: dict[str, types.ModuleType] = {}
    revision_name = revision or "worktree"
    for name in ("base", "depth", "normals", "segmentation"):
        path = f"vb_batch/codecs/{name}.py"
        if revision is None:
            source = (REPO / path).read_text()
        else:
            source = subprocess.run(
                ["git", "show", f"{revision}:{path}"], cwd=REPO, check=True, capture_output=True, text=True
            ).stdout
        module = types.ModuleType(f"codecs_at_{revision_name}.{name}")
        module.__file__ = f"{revision_name}:{path}"
        sys.modules[module.__name__] = module  # dataclasses look their module up
        source = source.replace("vb_batch.codecs.base", f"codecs_at_{revision_name}.base")
        exec(compile(source, path, "exec"), module.__dict__)
        loaded[name] = module
    return types.SimpleNamespace(**loaded)


def scene_paintings(case: str, size: int, count: int, seed: int = 1) -> tuple[list[np.ndarray], Any]:
    """`count` distinct noisy paintings of one codec (different scenes, as a job's rows), and the legend."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size

    def noisy(rgb: np.ndarray) -> np.ndarray:
        return np.clip(rgb + rng.normal(0, NOISE_LEVELS, rgb.shape), 0, 255).round().astype(np.uint8)

    legend = None
    if case.startswith("segmentation"):
        legend = segmentation.Legend.from_names([f"class {i}" for i in range(int(case.split("-")[2]))])
    images = []
    for _ in range(count):
        a, b, c, phase = rng.uniform(0.5, 3.0, 4)
        if "photo" in case:  # what the identity and zero-cost models hand back: colours all over the cube
            colours = rng.uniform(-128, 383, (4, 1, 1, 3))
            waves = [np.ones_like(xx), xx, yy, np.sin(3 * a * xx + 2 * b * yy + phase)]
            images.append(noisy(sum(colour * wave[..., None] for colour, wave in zip(colours, waves))))
        elif case.startswith("depth"):
            images.append(noisy(depth.encode(0.3 + 10 * a * xx + 20 * b * yy**2 + c * np.sin(7 * xx + phase))))
        elif case.startswith("normals"):
            n = np.stack([np.sin(a * xx + phase), np.cos(b * yy), np.full_like(xx, 0.3 + c / 3)], axis=-1)
            images.append(noisy(normals.encode(n)))
        else:
            block = int(8 * a)
            ids = np.kron(rng.integers(0, len(legend), (size // block + 1,) * 2), np.ones((block, block), np.int64))
            images.append(noisy(segmentation.encode(ids[:size, :size], legend)))
    return images, legend


# codec-painting: generated paintings of that codec (segmentation with 19 or 150 classes); codec-photo:
# photo-like colour fields decoded as that codec's paintings.
BEFORE_AFTER_CASES = (
    "depth-painting",
    "normals-painting",
    "segmentation-painting-19",
    "segmentation-painting-150",
    "depth-photo",
    "segmentation-photo-150",
)


def numpy_kernels(decode: Callable[..., Any]) -> Callable[..., Any]:
    """`decode` run with the numpy kernels (what an install without the compiled kernels runs)."""

    def run(rgb: np.ndarray) -> Any:
        with kernels.forced("numpy"):
            return decode(rgb)

    return run


def load_kernels() -> dict[str, Any]:
    """Load the compiled kernels before any timing and say which ran and how long loading took (the first decode of
    each codec included)."""
    start = time.perf_counter()
    kernels.active()
    tiny = np.zeros((2, 2, 3), np.uint8)
    depth.decode(tiny)
    segmentation.decode(tiny, segmentation.Legend.cityscapes())
    seconds_taken = time.perf_counter() - start
    depth._decode_table.cache_clear()
    segmentation._decode_table.cache_clear()
    return {"kernels": "compiled" if kernels.active() is not None else "numpy", "load_s": seconds_taken}


def before_after(sizes: tuple[int, ...], count: int, repeats: int, revision: str, rounds: int = 3) -> dict[str, Any]:
    before = codecs_at(revision)
    now = codecs_at(None)  # today's code again, with tables of its own, decoding with the numpy kernels
    loaded = load_kernels()
    results = []
    for size in sizes:
        for case in BEFORE_AFTER_CASES:
            images, legend = scene_paintings(case, size, count)
            codec = case.split("-")[0]
            decoders, tables = {}, []
            for label, codecs in (("before", before), ("after", sys.modules[__name__]), ("after_numpy", now)):
                module = getattr(codecs, codec)
                if legend is not None:
                    theirs = module.Legend(legend.names, legend.colors)
                    theirs.class_separations()
                    decode = lambda rgb, module=module, theirs=theirs: module.decode(rgb, theirs)  # noqa: E731
                else:
                    decode = module.decode
                decoders[label] = numpy_kernels(decode) if label == "after_numpy" else decode
                if hasattr(module, "_decode_table"):
                    tables.append(module._decode_table)
            # Per image, the best of `rounds` passes over the stream, each from empty tables (the timeit convention:
            # the least disturbed by other processes on the machine).
            labels = tuple(decoders)
            per_image = {label: [math.inf] * count for label in labels}
            for _ in range(rounds):
                for table in tables:
                    table.cache_clear()
                for i, rgb in enumerate(images):
                    order = labels[i % 3 :] + labels[: i % 3]
                    got = {}
                    for label in order:
                        start = time.perf_counter()
                        got[label] = decoders[label](rgb)
                        per_image[label][i] = min(per_image[label][i], time.perf_counter() - start)
                    for label in ("after", "after_numpy"):
                        for field in ("values", "confidence"):
                            old, new = getattr(got["before"], field), getattr(got[label], field)
                            if old.dtype != new.dtype or old.tobytes() != new.tobytes():
                                raise AssertionError(f"{case} {size}px image {i}: {field} differ, before and {label}")
            last = images[-1]
            warm = {label: min(seconds(lambda d=decode: d(last), repeats)) for label, decode in decoders.items()}
            pixels = size * size
            ns = {
                label: {
                    "first_image": per_image[label][0] / pixels * 1e9,
                    "later_images": statistics.mean(per_image[label][1:]) / pixels * 1e9,
                    "all_images": sum(per_image[label]) / (pixels * count) * 1e9,
                    "warm": warm[label] / pixels * 1e9,
                }
                for label in decoders
            }
            results.append({
                "codec": case,
                "size": size,
                "images": count,
                "rounds": rounds,
                "ns_per_pixel": ns,
                "speedup": {k: ns["before"][k] / ns["after"][k] for k in ns["before"]},
                "speedup_numpy_kernels": {k: ns["before"][k] / ns["after_numpy"][k] for k in ns["before"]},
                "identical": True,
            })
    return {
        "benchmark": "benchmarks/bench_codecs.py --before-after",
        "machine": machine_info(),
        "before": f"vb_batch/codecs at {revision} (git show), in this process",
        "after_kernels": loaded,
        "method": (
            "per codec and size, a stream of distinct noisy paintings (noise 3 levels), each decoded once by "
            "before, after (the compiled kernels, see after_kernels) and after_numpy (today's code with the numpy "
            "kernels, as an install without a C compiler decodes), rotating which goes first, all from empty colour "
            "tables; the stream is run "
            f"{rounds} times (tables emptied each time) and each image's best time kept; ns per pixel of the "
            "first image, the mean of the later ones, all of them, and warm = best of repeats of the last image "
            "again. Every decode's values and confidence are compared bit for bit."
        ),
        "results": results,
    }


def print_before_after(report: dict[str, Any]) -> None:
    columns = ("first_image", "later_images", "all_images", "warm")
    print(f"ns per pixel, before -> after (speedup) / after with numpy kernels (speedup); {report['before']}")
    print(f"{'codec':<26} {'size':>5} " + " ".join(f"{c:>34}" for c in columns))
    for r in report["results"]:
        ns = r["ns_per_pixel"]
        cells = [
            f"{ns['before'][c]:.1f} -> {ns['after'][c]:.1f} ({r['speedup'][c]:.1f}x) / "
            f"{ns['after_numpy'][c]:.1f} ({r['speedup_numpy_kernels'][c]:.1f}x)"
            for c in columns
        ]
        print(f"{r['codec']:<26} {r['size']:>5} " + " ".join(f"{cell:>34}" for cell in cells))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (square)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch CPU threads (default 1: like numpy, and robust to other load on the machine)",
    )
    parser.add_argument("--before-after", action="store_true", help="old vs new numpy decode (codecs_decode.json)")
    parser.add_argument("--before", default=BEFORE_REVISION, help="git revision of the codecs to compare with")
    parser.add_argument("--images", type=int, default=12, help="--before-after: distinct paintings per case")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="--before-after: image sides")
    parser.add_argument("--rounds", type=int, default=3, help="--before-after: passes over each stream (best kept)")
    args = parser.parse_args(argv)
    if args.before_after:
        report = before_after(tuple(args.sizes), args.images, args.repeats, args.before, args.rounds)
        return publish("codecs_decode", report, print_before_after, write=not args.no_write)
    report = measure(args.size, args.repeats, args.torch_threads)
    return publish("codecs", report, print_table, write=not args.no_write)


if __name__ == "__main__":
    main()
