"""Is the demo model's confidence worth filtering by? Sparsification (AUSE) and threshold tables on held-out scenes.

Runs the shipped demo generalist on held-out procedural scenes (never trained on), decodes its
paintings with the codecs exactly as the pipeline does (per-pixel confidence; the stored row
confidence is their mean, as `vb_batch.pipeline.outputs.decode_encode` writes it) and scores:

* per pixel and per row: AUSE of the model's confidence, next to the baseline of a confidence
  that ranks nothing (what the demo model painted before it carried its uncertainty: every
  confidence 1.0), whose AUSE is ``ause_random``; ratio = ause / ause_random (lower is better,
  0 = oracle);
* per row: mean error of the rows kept at each ``min_confidence``.

    python benchmarks/bench_confidence.py --scenes 48
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, argument_parser, machine_info

from vb_batch.codecs import depth as depth_codec
from vb_batch.codecs import normals as normals_codec
from vb_batch.codecs import segmentation as seg_codec
from vb_batch.evaluation.confidence import sparsification, threshold_table
from vb_batch.metrics import DEFAULT_MAX_DEPTH_M, DEFAULT_MIN_DEPTH_M, normal_angles
from vb_batch.models.demo_generalist import SHIPPED_MODEL, load_demo_pipeline
from vb_batch.scenes import HELD_OUT_SEED_START, render_scene, scene_legend
from vb_batch.tasks import get_task, legend_text

# Far from the seeds the demo and README evaluation use, still held out.
FIRST_SEED = HELD_OUT_SEED_START + 50_000
ERRORS = {"depth": "abs_rel", "normals": "angle_deg", "segmentation": "wrong_class"}


def pixel_errors(task: str, decoded, scene) -> tuple[np.ndarray, np.ndarray]:
    """(errors, confidences) of the pixels with truth, in the row's own metric."""
    if task == "depth":
        truth = scene.depth_m.astype(np.float64)
        valid = np.isfinite(truth) & (truth > DEFAULT_MIN_DEPTH_M) & (truth < DEFAULT_MAX_DEPTH_M)
        pred = np.clip(np.nan_to_num(decoded.values.astype(np.float64), posinf=DEFAULT_MAX_DEPTH_M),
                       DEFAULT_MIN_DEPTH_M, DEFAULT_MAX_DEPTH_M)
        return (np.abs(pred - truth) / truth)[valid], decoded.confidence[valid]
    if task == "normals":
        valid = np.isfinite(scene.normals).all(-1)
        return normal_angles(decoded.values, scene.normals), decoded.confidence[valid]
    return (decoded.values != scene.class_ids).astype(np.float64).ravel(), decoded.confidence.ravel()


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--scenes", type=int, default=48)
    args = parser.parse_args()
    started = time.perf_counter()
    pipe = load_demo_pipeline(str(SHIPPED_MODEL))
    legend = scene_legend()
    prompts = {"depth": get_task("depth").default_template, "normals": get_task("normals").default_template,
               "segmentation": get_task("segmentation").default_template.format(legend=legend_text(legend))}
    decoders = {"depth": lambda rgb: depth_codec.decode(rgb, preset="vision-banana"),
                "normals": lambda rgb: normals_codec.decode(rgb, frame="opengl"),
                "segmentation": lambda rgb: seg_codec.decode(rgb, legend)}
    pixels = {t: ([], []) for t in prompts}
    rows = {t: ([], []) for t in prompts}
    for seed in range(FIRST_SEED, FIRST_SEED + args.scenes):
        scene = render_scene(seed)
        paintings = pipe(image=[scene.rgb] * 3, prompt=list(prompts.values()), output_type="uint8").images
        for task, painting in zip(prompts, paintings):
            decoded = decoders[task](painting)
            errors, confidence = pixel_errors(task, decoded, scene)
            pixels[task][0].append(errors)
            pixels[task][1].append(confidence)
            rows[task][0].append(float(errors.mean()))
            rows[task][1].append(float(np.mean(decoded.confidence)))  # the stored <task>_confidence
    result = {}
    for task in prompts:
        errors, confidence = (np.concatenate(x) for x in pixels[task])
        per_pixel = sparsification(errors, confidence)
        per_row = sparsification(*rows[task])
        result[task] = {
            "error": ERRORS[task],
            "pixel": {"count": per_pixel["count"], "ause": per_pixel["ause"],
                      "ause_constant_confidence": per_pixel["ause_random"],
                      "ratio": per_pixel["ause"] / per_pixel["ause_random"],
                      "mean_error": per_pixel["random"],
                      "error_after_removing": dict(zip(["0%", "24%", "50%"], [per_pixel["curve"][i] for i in (0, 12, 25)])),
                      "oracle_after_removing": dict(zip(["0%", "24%", "50%"], [per_pixel["oracle"][i] for i in (0, 12, 25)])),
                      "confidence_quantiles": dict(zip(["p10", "p50", "p90"],
                                                       np.quantile(confidence, [0.1, 0.5, 0.9]).round(4).tolist()))},
            "row": {"count": per_row["count"], "ause": per_row["ause"], "ause_constant_confidence": per_row["ause_random"],
                    "ratio": per_row["ause"] / per_row["ause_random"],
                    "thresholds": threshold_table(*rows[task], thresholds=(0.0, 0.5, 0.7, 0.8, 0.9, 0.95))},
        }
    out = {
        "what": f"demo generalist confidence on {args.scenes} held-out scenes (seeds {FIRST_SEED}..{FIRST_SEED + args.scenes - 1}, "
                "96x128), paintings decoded by the codecs; baseline: constant confidence (the demo model before it painted "
                "its uncertainty), whose AUSE is ause_constant_confidence; row confidence = mean pixel confidence as stored",
        "command": f"python benchmarks/bench_confidence.py --scenes {args.scenes}",
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
        "note": "shared, loaded machine (2 cores, several jobs): the seconds are not a speed figure",
        "tasks": result,
    }
    target = RESULTS_DIR / "confidence.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(target)


if __name__ == "__main__":
    main()
