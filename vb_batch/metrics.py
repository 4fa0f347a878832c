"""Quality metrics of depth, normals and segmentation against ground truth (pure numpy).

Each task has an accumulator: `add` one image's prediction and truth at a time, `result` the
dataset's numbers. Conventions (the common ones of the NYUv2 / KITTI / Marigold evaluations):

Depth (metres). A pixel counts where the truth is finite and in ``[min_depth, max_depth]``.
Predictions are clipped to that range first; a prediction of "far" (+inf) or NaN on a surface
counts as ``max_depth``, so painting a wall as sky is an error, not a skipped pixel. Per image:

    abs_rel = mean(|p - t| / t)     rmse = sqrt(mean((p - t)**2))     delta1 = mean(max(p/t, t/p) < 1.25)

averaged over images. The ``_aligned`` variants first fit a scale and shift per image by least
squares (``s p + b ~ t`` over the valid pixels), as done for relative (affine-invariant) models;
for a relative prediction only the aligned numbers mean anything.

Normals (unit vectors, one frame for both). Angle between prediction and truth in degrees, over
pixels with a finite truth; a prediction with no direction (NaN) counts as 90 degrees (no
information). Pooled over all pixels of all images: mean, median, and the percentage within
11.25, 22.5 and 30 degrees. The median comes from a 0.01-degree histogram, so memory does not
grow with the number of pixels.

Segmentation (class ids of the truth's classes). A confusion matrix over all pixels whose truth
is a class (unlabelled truth is ignored); a predicted id outside the classes (unlabelled, or a
class the truth does not have) is wrong for every class. ``IoU_c = TP / (TP + FP + FN)``; mIoU
averages the classes that occur (in truth or prediction); pixel accuracy is ``trace / total``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_MIN_DEPTH_M = 1e-3
DEFAULT_MAX_DEPTH_M = 80.0
NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
NO_DIRECTION_DEG = 90.0
HISTOGRAM_STEP_DEG = 0.01


def depth_errors(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """abs_rel, rmse and delta1 of already-clipped predictions over `valid` pixels of one image."""
    p, t = pred[valid].astype(np.float64), truth[valid].astype(np.float64)
    ratio = np.maximum(p / t, t / p)
    return {
        "abs_rel": float(np.mean(np.abs(p - t) / t)),
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "delta1": float(np.mean(ratio < 1.25)),
    }


def align_scale_shift(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`s * pred + b` with (s, b) the least-squares fit to `truth` over `valid` finite predictions."""
    fit = valid & np.isfinite(pred)
    if fit.sum() < 2:
        return pred
    design = np.stack([pred[fit].astype(np.float64), np.ones(int(fit.sum()))], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, truth[fit].astype(np.float64), rcond=None)
    return scale * pred.astype(np.float64) + shift


class DepthAccumulator:
    """Per-image depth errors (metric and scale-and-shift aligned), averaged over images."""

    def __init__(self, min_depth: float = DEFAULT_MIN_DEPTH_M, max_depth: float = DEFAULT_MAX_DEPTH_M,
                 metric: bool = True):
        self.min_depth, self.max_depth, self.metric = min_depth, max_depth, metric
        self.per_image: list[dict[str, float]] = []

    def _clip(self, pred: np.ndarray) -> np.ndarray:
        pred = np.nan_to_num(np.asarray(pred, dtype=np.float64), nan=self.max_depth, posinf=self.max_depth,
                             neginf=self.min_depth)
        return np.clip(pred, self.min_depth, self.max_depth)

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        truth = np.asarray(truth, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(truth) & (truth >= self.min_depth) & (truth <= self.max_depth)
        if not valid.any():
            return
        pred = np.asarray(pred, dtype=np.float64)
        errors = {}
        if self.metric:
            errors.update(depth_errors(self._clip(pred), truth, valid))
        # Far / NaN predictions do not enter the fit (they have no value to scale), then count as max_depth.
        aligned = align_scale_shift(np.where(np.isfinite(pred), pred, np.nan), truth, valid)
        errors.update({f"{k}_aligned": v for k, v in depth_errors(self._clip(aligned), truth, valid).items()})
        self.per_image.append(errors)

    def result(self) -> dict[str, float]:
        if not self.per_image:
            return {}
        return {key: float(np.mean([e[key] for e in self.per_image])) for key in self.per_image[0]}


def normal_angles(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Angles in degrees between (H, W, 3) predictions and truth, at pixels with a finite truth."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 3)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 3)
    valid = np.isfinite(truth).all(axis=1)
    pred, truth = pred[valid], truth[valid]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
        t = truth / np.linalg.norm(truth, axis=1, keepdims=True)
        cosine = np.clip(np.sum(p * t, axis=1), -1.0, 1.0)
    angles = np.degrees(np.arccos(cosine))
    return np.where(np.isfinite(angles), angles, NO_DIRECTION_DEG)


class NormalsAccumulator:
    """Angular errors pooled over all pixels of all images."""

    def __init__(self) -> None:
        self.histogram = np.zeros(round(180.0 / HISTOGRAM_STEP_DEG) + 1, dtype=np.int64)
        self.total = 0.0
        self.count = 0
        self.within = dict.fromkeys(NORMAL_THRESHOLDS_DEG, 0)

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        angles = normal_angles(pred, truth)
        if angles.size == 0:
            return
        self.total += float(angles.sum())
        self.count += angles.size
        for threshold in NORMAL_THRESHOLDS_DEG:
            self.within[threshold] += int((angles < threshold).sum())
        bins = np.minimum(np.floor(angles / HISTOGRAM_STEP_DEG).astype(np.int64), len(self.histogram) - 1)
        self.histogram += np.bincount(bins, minlength=len(self.histogram))

    def result(self) -> dict[str, float]:
        if not self.count:
            return {}
        cumulative = np.cumsum(self.histogram)
        median_bin = int(np.searchsorted(cumulative, self.count / 2.0))
        out = {"mean_deg": self.total / self.count, "median_deg": (median_bin + 0.5) * HISTOGRAM_STEP_DEG}
        for threshold in NORMAL_THRESHOLDS_DEG:
            out[f"within_{threshold:g}_pct"] = 100.0 * self.within[threshold] / self.count
        return out


class SegmentationAccumulator:
    """A confusion matrix over the truth's classes; predicted ids outside them count as wrong."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        k = len(self.class_names)
        # Rows: truth class; columns: predicted class, the last one "none of them".
        self.confusion = np.zeros((k, k + 1), dtype=np.int64)

    def add(self, pred_ids: np.ndarray, truth_ids: np.ndarray) -> None:
        k = len(self.class_names)
        truth = np.asarray(truth_ids).astype(np.int64).ravel()
        pred = np.asarray(pred_ids).astype(np.int64).ravel()
        labelled = (truth >= 0) & (truth < k)
        pred = np.where((pred >= 0) & (pred < k), pred, k)[labelled]
        self.confusion += np.bincount(truth[labelled] * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)

    def result(self) -> dict[str, float]:
        k = len(self.class_names)
        total = self.confusion.sum()
        if not total:
            return {}
        hits = np.diag(self.confusion[:, :k]).astype(np.float64)
        union = self.confusion.sum(axis=1) + self.confusion[:, :k].sum(axis=0) - hits
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, hits / union, np.nan)
        out = {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
               "pixel_accuracy": float(hits.sum() / total)}
        out.update({f"iou/{name}": float(v) for name, v in zip(self.class_names, iou)})
        return out
