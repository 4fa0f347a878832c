"""Mixed-size photos through the local engine: per-image sizes, aspect-ratio buckets, and rows grouped across batches.

A photo-like set (smooth gradients, edges and sensor noise) of `--images` images
in 12 aspect ratios (portrait, landscape, square, panoramas; weighted as in a phone
archive), sizes and crops jittered as real archives are, in random order, goes
through the whole local engine (read, decode, model, codecs, encode, write) with
the tiny random FLUX.2 [klein] pipeline (vb_batch.models.tiny) and the `diffusers`
backend, at each of `--batch-sizes`. The same input, one loaded model per sizing,
four sides interleaved in one process:

    before    model.sizing: exact,   group_window: 0   (each image its own working size, batches in
                                                         row order: vb_batch before this work)
    buckets   model.sizing: buckets, group_window: 0   (the nearest of the pipeline's fixed sizes)
    grouped   model.sizing: buckets, group_window: default (4 batches: rows of one bucket share calls
                                                         across batches; output order unchanged)
    exact+grouped  model.sizing: exact, group_window: default

Reported per side: pipeline calls (counted at the transformer: one step without
guidance is one forward per call), calls per image, single-image calls, images
per call, images/s end to end (best and median of `--repeats`) and model seconds.
The tiny model makes the per-call overhead a larger share than a full-size model
on a GPU does, where batching pays through occupancy instead.

    python benchmarks/bench_buckets.py                  # writes benchmarks/results/buckets.json
    python benchmarks/bench_buckets.py --images 24 --repeats 1 --batch-sizes 8 --no-write
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, machine_info, publish, write_images

# Width:height of the set and how often each occurs (phones both ways up dominate real archives, then
# DSLR 3:2, 16:9 video, square, 4:5 social, panoramas).
ASPECTS = {
    (4, 3): 0.25, (3, 4): 0.2, (3, 2): 0.1, (2, 3): 0.06, (16, 9): 0.1, (9, 16): 0.06, (1, 1): 0.07,
    (5, 4): 0.03, (4, 5): 0.04, (2, 1): 0.03, (1, 2): 0.02, (21, 9): 0.04,
}


def photo_like_set(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` uint8 RGB images over the 12 aspects (every one present), short sides 72-160 px, in random order.

    Half of them are cropped a little (aspect within about +-4%), as edited photos are: the sizes that
    make exact working sizes differ within one aspect.
    """
    rng = np.random.default_rng(seed)
    shapes = list(ASPECTS)
    picks = list(range(len(shapes))) + list(rng.choice(len(shapes), count - len(shapes), p=list(ASPECTS.values())))
    rng.shuffle(picks)
    images = []
    for pick in picks:
        aw, ah = shapes[pick]
        aspect = aw / ah * (math.exp(rng.normal(0, 0.02)) if rng.random() < 0.5 else 1.0)
        short = int(rng.integers(72, 161))
        height, width = (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)
        yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
        base = np.stack([rng.uniform(60, 200) + rng.uniform(-80, 80) * xx + rng.uniform(-80, 80) * yy for _ in range(3)], -1)
        edge = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) > rng.uniform(-0.3, 0.3)  # an object boundary
        image = base + edge[..., None] * rng.uniform(-60, 60, 3) + rng.normal(0, 6, (height, width, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


SIDES = {  # name: (model.sizing, model.group_window)
    "before": ("exact", 0),
    "buckets": ("buckets", 0),
    "grouped": ("buckets", None),
    "exact+grouped": ("exact", None),
}


def run_side(backend, input_dir: Path, out_dir: Path, model: dict, batch_size: int, window: int | None) -> dict:
    """One local-engine run of the whole set; pipeline calls counted at the transformer."""
    import vb_batch

    calls: list[int] = []
    hook = backend.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    cfg = {
        "input": {"path": str(input_dir)},
        "output": {"path": str(out_dir), "mode": "overwrite", "report": False},
        "tasks": ["depth"],
        "model": {**model, "batch_size": batch_size, "group_window": window},
        "engine": {"kind": "local"},
        "run": {"progress": False},
    }
    start = time.perf_counter()
    summary = vb_batch.annotate(cfg, backend=backend)
    seconds = time.perf_counter() - start
    hook.remove()
    assert summary.success and summary.rows_ok == summary.rows_read, summary.render()
    return {"seconds": seconds, "model_seconds": summary.model_seconds, "calls": calls}


def batching_headroom(backend, images, batch_size: int, repeats: int) -> dict:
    """The model alone on images of one working size: seconds per image in calls of 1 vs calls of `batch_size`.

    The most that fewer calls can gain on this machine and model: on a CPU the tiny pipeline's cost is
    nearly all per image; on a GPU a call of one image leaves most of the device idle.
    """
    same = [im for im in images if backend.size_for(im) == backend.size_for(images[0])][:batch_size]
    same = (same * batch_size)[:batch_size]
    prompts, seeds = ["paint the depth"] * len(same), list(range(len(same)))
    single, batched = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(same)):
            backend.predict(same[i : i + 1], prompts[i : i + 1], "depth", seeds[i : i + 1])
        single.append((time.perf_counter() - start) / len(same))
        start = time.perf_counter()
        backend.predict(same, prompts, "depth", seeds)
        batched.append((time.perf_counter() - start) / len(same))
    return {
        "images": len(same),
        "seconds_per_image_calls_of_1": round(min(single), 4),
        f"seconds_per_image_calls_of_{batch_size}": round(min(batched), 4),
        "speedup_of_full_calls": round(min(single) / min(batched), 3),
    }


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--resolution", type=int, default=384, help="model.processing_resolution (working area side)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from vb_batch.config import ModelConfig
    from vb_batch.models.base import create_backend
    from vb_batch.models.tiny import build_tiny_flux2_klein

    images = photo_like_set(args.images)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        input_dir = write_images(tmp / "in", images)
        checkpoint = build_tiny_flux2_klein(tmp / "klein")
        model = {
            "backend": "diffusers", "path": str(checkpoint), "device": "cpu", "processing_resolution": args.resolution,
            "num_inference_steps": 1, "guidance_scale": 1.0, "options": {"max_sequence_length": 32},
        }
        backends = {sizing: create_backend(ModelConfig(**model, sizing=sizing)) for sizing in ("exact", "buckets")}
        for sizing, backend in backends.items():  # warm up: the prompt cache and every working size's kernels
            run_side(backend, input_dir, tmp / "out", {**model, "sizing": sizing}, max(args.batch_sizes), None)
        for batch_size in args.batch_sizes:
            runs: dict[str, list[dict]] = {name: [] for name in SIDES}
            for repeat in range(args.repeats):  # interleaved, the order rotating: every side sees the same load
                order = list(SIDES)[repeat % len(SIDES):] + list(SIDES)[: repeat % len(SIDES)]
                for name in order:
                    sizing, window = SIDES[name]
                    runs[name].append(run_side(backends[sizing], input_dir, tmp / "out",
                                               {**model, "sizing": sizing}, batch_size, window))
            sides = {}
            for name, (sizing, window) in SIDES.items():
                calls = runs[name][0]["calls"]
                assert all(r["calls"] == calls for r in runs[name]), "call pattern changed between repeats"
                times = [r["seconds"] for r in runs[name]]
                working = [backends[sizing].size_for(im) for im in images]
                stretch = [abs(math.log((w / h) / (im.shape[1] / im.shape[0]))) for (h, w), im in zip(working, images)]
                sides[name] = {
                    "sizing": sizing,
                    "group_window": 4 * batch_size if window is None else window,
                    "pipeline_calls": len(calls),
                    "calls_per_image": round(len(calls) / len(images), 3),
                    "single_image_calls": sum(1 for n in calls if n == 1),
                    "mean_images_per_call": round(len(images) / len(calls), 2),
                    "distinct_working_sizes": len(set(working)),
                    "seconds_best": round(min(times), 3),
                    "seconds_median": round(float(np.median(times)), 3),
                    "seconds_all": [round(t, 3) for t in times],
                    "model_seconds_median": round(float(np.median([r["model_seconds"] for r in runs[name]])), 3),
                    "images_per_s": round(len(images) / min(times), 2),
                    "images_per_s_median": round(len(images) / float(np.median(times)), 2),
                    # How far an image's aspect is changed for the model (labels are stretched back exactly).
                    "aspect_stretch_max_pct": round(100 * (math.exp(max(stretch)) - 1), 2),
                }
            before = sides["before"]
            results[f"batch_{batch_size}"] = {
                "batch_size": batch_size,
                "model_alone_one_size": batching_headroom(backends["buckets"], images, batch_size, args.repeats),
                **sides,
                "ratio_vs_before": {
                    name: {
                        "pipeline_calls": round(side["pipeline_calls"] / before["pipeline_calls"], 3),
                        "images_per_s_best": round(side["images_per_s"] / before["images_per_s"], 3),
                        "images_per_s_median": round(side["images_per_s_median"] / before["images_per_s_median"], 3),
                    }
                    for name, side in sides.items() if name != "before"
                },
            }

    report = {
        "benchmark": "bench_buckets",
        "what": "local engine on mixed-size photo-like images: exact sizes in row order (before) vs buckets vs "
                "buckets with rows grouped across batches (model.group_window)",
        "model": "tiny random Flux2KleinPipeline (vb_batch.models.tiny), 1 step, guidance 1, CPU",
        "images": len(images),
        "aspect_ratios": len(ASPECTS),
        "aspect_weights": {f"{w}:{h}": p for (w, h), p in ASPECTS.items()},
        "distinct_input_sizes": len({im.shape[:2] for im in images}),
        "processing_resolution": args.resolution,
        "repeats": args.repeats,
        "by_batch_size": results,
        "note": (
            "2-core machine, possibly shared (see machine.load_average_1m): absolute images/s are noisy (see "
            "seconds_all); the ratios from interleaved runs are the figures. Call counts do not depend on load. "
            "images/s is end to end (read, decode, model, codecs, encode, write), so the model's share bounds "
            "what fewer calls can gain; model_alone_one_size says how much full calls gain over single-image "
            "calls for this model on this machine."
        ),
        "machine": machine_info(),
    }

    def print_table(r: dict) -> None:
        print(f"{r['images']} images, {r['aspect_ratios']} aspects, {r['distinct_input_sizes']} sizes, "
              f"resolution {r['processing_resolution']}")
        print(f"{'batch':>5} {'side':<14} {'calls':>6} {'calls/img':>9} {'single':>6} {'img/call':>8} {'img/s':>7} "
              f"{'median':>7} {'model s':>8}")
        for row in r["by_batch_size"].values():
            for name in SIDES:
                s = row[name]
                print(f"{row['batch_size']:>5} {name:<14} {s['pipeline_calls']:>6} {s['calls_per_image']:>9} "
                      f"{s['single_image_calls']:>6} {s['mean_images_per_call']:>8} {s['images_per_s']:>7} "
                      f"{s['images_per_s_median']:>7} {s['model_seconds_median']:>8}")
            headroom = row["model_alone_one_size"]
            print(f"batch {row['batch_size']}: the model alone, one size: {headroom['speedup_of_full_calls']}x "
                  "per image in full calls vs calls of 1 (the most fewer calls can gain here)")
            for name, ratio in row["ratio_vs_before"].items():
                print(f"batch {row['batch_size']}: {name} vs before: {ratio['pipeline_calls']}x the calls, "
                      f"{ratio['images_per_s_best']}x the images/s (best), {ratio['images_per_s_median']}x (median)")

    publish("buckets", report, print_table, write=not args.no_write)


if __name__ == "__main__":
    main()
