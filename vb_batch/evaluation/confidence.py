"""Does filtering by confidence remove the bad labels? Sparsification curves, AUSE, threshold tables.

Auto-labelling keeps what the model is sure of. These measure whether its confidence ranks its
errors (pure numpy; `vb-batch eval --confidence` and ``benchmarks/bench_confidence.py`` use them):

* **Sparsification curve** (Ilg et al., "Uncertainty Estimates and Multi-Hypotheses Networks for
  Optical Flow", ECCV 2018): the mean error of what is kept after removing the least confident
  fraction ``x`` of the pixels or rows. The **oracle** removes the largest errors first (the best
  any confidence can do); **random** removal keeps the mean error.
* **AUSE** (area under the sparsification error) on the grid of the uncertainty-in-depth papers
  (Poggi et al., "On the uncertainty of self-supervised monocular depth estimation", CVPR 2020,
  github.com/mattpoggi/mono-uncertainty ``evaluate.py`` ``compute_aucs``): 50 steps, x = 0, 0.02,
  ..., 0.98, keeping the items whose confidence is at least the ``100 x``-th percentile of the
  confidences (numpy's linear interpolation), then a last point x = 1 with error 0; AUSE is the
  trapezoid area under the curve minus the oracle's (0 is perfect), **AURG** the random error
  minus the area under the curve (higher is better). Ties at the threshold are kept together, so
  a constant confidence keeps everything until the last point; `ause_random` is the AUSE of such
  a confidence, the one that ranks nothing.
* **Threshold table**: for ``min_confidence`` t, the fraction of rows (or pixels) kept and their
  mean error: what `vb_batch.readers.LabelDataset(min_confidence=t)` would train on.

Errors are per pixel (depth ``|p - t| / t``, normals angle in degrees, segmentation 1 when the
class is wrong) or per row (the image's abs_rel, mean angle, pixel error).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Poggi et al.'s grid: 50 intervals; the curve is sampled at x = 0 .. 0.98 and ends at (1, 0).
INTERVALS = 50
FRACTIONS = tuple(round(t / INTERVALS, 2) for t in range(INTERVALS + 1))
THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (numpy renamed `trapz`; this works on every version)."""
    return float(np.sum((y[1:] + y[:-1]) / 2.0 * np.diff(x)))


def _kept_means(errors: np.ndarray, keys: np.ndarray, intervals: int) -> np.ndarray:
    """Mean error of the items whose key is at least each percentile 0, 100/intervals, ..., then 0."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    # Error sums of the items from position i on (keys ascending): what a threshold there keeps.
    from_here = np.concatenate([np.cumsum(errors[order][::-1])[::-1], [0.0]])
    thresholds = np.percentile(keys, [100.0 / intervals * t for t in range(intervals)])
    start = np.searchsorted(sorted_keys, thresholds, side="left")
    kept = keys.size - start
    return np.concatenate([from_here[start] / kept, [0.0]])


def sparsification(errors: Any, confidence: Any, intervals: int = INTERVALS) -> dict[str, Any]:
    """Sparsification and oracle curves of `errors` ranked by `confidence`, with AUSE and AURG."""
    errors = np.asarray(errors, dtype=np.float64).ravel()
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    if errors.shape != confidence.shape:
        raise ValueError(f"sparsification: {errors.size} errors but {confidence.size} confidences")
    keep = np.isfinite(errors) & np.isfinite(confidence)
    errors, confidence = errors[keep], confidence[keep]
    x = np.arange(intervals + 1, dtype=np.float64) / intervals
    if not errors.size:
        return {"fractions": list(x), "curve": [], "oracle": [], "random": None, "ause": None, "aurg": None,
                "ause_random": None, "count": 0}
    curve = _kept_means(errors, confidence, intervals)
    oracle = _kept_means(errors, -errors, intervals)
    mean = float(errors.mean())
    oracle_area = _area(oracle, x)
    return {
        "fractions": [float(v) for v in x],
        "curve": [float(v) for v in curve],
        "oracle": [float(v) for v in oracle],
        "random": mean,
        "ause": _area(curve, x) - oracle_area,
        "aurg": mean - _area(curve, x),
        "ause_random": _area(_kept_means(errors, np.zeros_like(errors), intervals), x) - oracle_area,
        "count": int(errors.size),
    }


def threshold_table(errors: Any, confidence: Any, thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict[str, Any]]:
    """For each ``min_confidence`` t: how many items have confidence >= t and their mean error."""
    errors = np.asarray(errors, dtype=np.float64).ravel()
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    keep = np.isfinite(errors) & np.isfinite(confidence)
    errors, confidence = errors[keep], confidence[keep]
    rows = []
    for t in thresholds:
        kept = confidence >= t
        rows.append({
            "min_confidence": float(t),
            "kept": int(kept.sum()),
            "kept_fraction": float(kept.mean()) if errors.size else 0.0,
            "mean_error": float(errors[kept].mean()) if kept.any() else None,
        })
    return rows


def render_confidence(report: dict[str, Any]) -> str:
    """Per task: AUSE against random, then the threshold table, as text."""
    lines = []
    for task, entry in report.items():
        curve = entry["sparsification"]
        if not curve["count"]:
            lines.append(f"{task}: no row has a confidence")
            continue
        lines.append(f"{task} ({entry['error']} per {entry['unit']}, {curve['count']} {entry['unit']}s): "
                     f"AUSE {curve['ause']:.4f} (a constant confidence {curve['ause_random']:.4f}; 0 = oracle), "
                     f"AURG {curve['aurg']:.4f}")
        lines.append("  min_confidence  kept  mean error")
        for row in entry["thresholds"]:
            error = "-" if row["mean_error"] is None else f"{row['mean_error']:.4f}"
            lines.append(f"  {row['min_confidence']:>14.2f}  {row['kept_fraction']:>4.0%}  {error:>10}")
    return "\n".join(lines)
