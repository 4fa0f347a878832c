"""Does filtering by confidence remove the bad labels? Sparsification curves, AUSE, threshold tables.

Auto-labelling keeps what the model is sure of. These measure whether its confidence ranks its
errors (pure numpy; `vb-batch eval --confidence` and ``benchmarks/bench_confidence.py`` use them):

* **Sparsification curve** (Ilg et al., "Uncertainty Estimates and Multi-Hypotheses Networks for
  Optical Flow", ECCV 2018): the mean error of what is kept after removing the least confident
  fraction ``x`` of the pixels or rows, for x = 0, 0.05, ..., 0.95. The **oracle** removes the
  largest errors first (the best any confidence can do); **random** removal keeps the mean error.
  **AUSE** is the area between the curve and the oracle (trapezoids over x; 0 is perfect, and a
  confidence that ranks nothing scores the area between random and the oracle, `ause_random`).
  Ties in confidence are removed together at their mean error, so a constant confidence gives
  exactly the random curve, not an order that happens to help.
* **Threshold table**: for ``min_confidence`` t, the fraction of rows (or pixels) kept and their
  mean error: what `vb_batch.readers.LabelDataset(min_confidence=t)` would train on.

Errors are per pixel (depth ``|p - t| / t``, normals angle in degrees, segmentation 1 when the
class is wrong) or per row (the image's abs_rel, mean angle, pixel error).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FRACTIONS = tuple(np.round(np.arange(0.0, 1.0, 0.05), 2))
THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (numpy renamed `trapz`; this works on every version)."""
    return float(np.sum((y[1:] + y[:-1]) / 2.0 * np.diff(x)))


def _kept_means(errors: np.ndarray, keys: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Mean error of the ``(1 - x) n`` items with the largest `keys`, ties taken at their group mean."""
    order = np.argsort(-keys, kind="stable")
    e, k = errors[order], keys[order]
    n = e.size
    cumulative = np.concatenate([[0.0], np.cumsum(e)])
    # Group boundaries of equal keys: item i belongs to [starts[g], ends[g]).
    new_group = np.concatenate([[True], k[1:] != k[:-1]])
    starts = np.flatnonzero(new_group)
    ends = np.concatenate([starts[1:], [n]])
    kept = np.maximum(np.rint((1.0 - fractions) * n).astype(np.int64), 1)
    group = np.searchsorted(starts, kept - 1, side="right") - 1
    group_mean = (cumulative[ends[group]] - cumulative[starts[group]]) / (ends[group] - starts[group])
    total = cumulative[starts[group]] + (kept - starts[group]) * group_mean
    return total / kept


def sparsification(errors: Any, confidence: Any, fractions: tuple[float, ...] = FRACTIONS) -> dict[str, Any]:
    """Sparsification and oracle curves of `errors` ranked by `confidence`, with AUSE."""
    errors = np.asarray(errors, dtype=np.float64).ravel()
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    if errors.shape != confidence.shape:
        raise ValueError(f"sparsification: {errors.size} errors but {confidence.size} confidences")
    keep = np.isfinite(errors) & np.isfinite(confidence)
    errors, confidence = errors[keep], confidence[keep]
    x = np.asarray(fractions, dtype=np.float64)
    if not errors.size:
        return {"fractions": list(x), "curve": [], "oracle": [], "random": None, "ause": None, "ause_random": None,
                "count": 0}
    curve = _kept_means(errors, confidence, x)
    oracle = _kept_means(errors, -errors, x)
    mean = float(errors.mean())
    return {
        "fractions": [float(v) for v in x],
        "curve": [float(v) for v in curve],
        "oracle": [float(v) for v in oracle],
        "random": mean,
        "ause": _area(curve - oracle, x),
        "ause_random": _area(mean - oracle, x),
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
                     f"AUSE {curve['ause']:.4f} (random {curve['ause_random']:.4f}; 0 = oracle)")
        lines.append("  min_confidence  kept  mean error")
        for row in entry["thresholds"]:
            error = "-" if row["mean_error"] is None else f"{row['mean_error']:.4f}"
            lines.append(f"  {row['min_confidence']:>14.2f}  {row['kept_fraction']:>4.0%}  {error:>10}")
    return "\n".join(lines)
