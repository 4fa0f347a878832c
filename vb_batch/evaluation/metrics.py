"""Quality metrics of depth, normals and segmentation against ground truth (pure numpy).

Each task has an accumulator: `add` one image's prediction and truth at a time, `result` the
dataset's numbers, averaged per image or pooled over all pixels. The formulas are those of the
evaluation code the field reports with; `vb_batch.evaluation.protocols` binds them to each
benchmark's crops, depth ranges and alignment. (Some 470 lines: the three tasks' formulas sit side
by side, each stated once with its source, so a reviewer checks them against the papers in one file.)

Depth (metres), as Marigold's ``src/util/metric.py`` (github.com/prs-eth/Marigold, Apache-2.0)
computes them over the valid pixels of an image, with ``p`` the prediction, ``t`` the truth and
``g = ln p - ln t``:

    abs_rel  = mean(|p - t| / t)              sq_rel  = mean((p - t)**2 / t)
    rmse     = sqrt(mean((p - t)**2))         rmse_log = sqrt(mean(g**2))
    log10    = mean(|log10 p - log10 t|)      i_rmse  = sqrt(mean((1/p - 1/t)**2))
    delta_k  = mean(max(p/t, t/p) < 1.25**k)  for k = 1, 2, 3
    silog    = 100 * sqrt(mean(g**2) - mean(g)**2)

A pixel is valid where the truth is finite and ``min_depth < t < max_depth`` (both exclusive, as
Marigold's ``BaseDepthDataset._get_valid_mask``), inside the protocol's crop. Predictions are
clipped to ``[min_depth, max_depth]`` (then to at least 1e-6) after any alignment, as Marigold's
``script/depth/eval.py`` does; a prediction of "far" (+inf) or NaN on a surface counts as
``max_depth`` (`FAR_FALLBACK_M` when the range is open), so painting a wall as sky is an error,
not a skipped pixel.

Alignment (`align_depth`), least squares over the valid pixels with a finite prediction, as
Marigold's ``src/util/alignment.py``: ``none``; ``scale`` (``s p ~ t``); ``scale-shift``
(``s p + b ~ t``, Marigold's ``least_square``); ``scale-shift-disparity`` (``s p + b ~ 1/t`` over
positive predictions, the disparity clipped to at least 1e-3 and inverted: Marigold's
``least_square_disparity``, for models that predict affine-invariant disparity such as MiDaS or
Depth Anything). `DepthAccumulator` reports the plain metrics of a metric prediction and the
``_aligned`` ones under its alignment. With a maximum resolution (Marigold's
``--alignment_max_res``, 1024 for ETH3D) the fit sees the pixels Marigold's downsampling keeps
(`alignment_columns`); the aligned prediction is scored at full resolution.

A dataset that ships its own validity mask (DIODE) declares it (`vb_batch.evaluation.truth`): the
mask then replaces the range test, as Marigold's DIODE loader does (truth below ``min_depth``
inside the mask is scored), and the range only clips the prediction.

Normals (unit vectors, one frame for both), as DSINE's ``utils/utils.py``
(github.com/baegwangbin/DSINE, MIT) ``compute_normal_error`` / ``compute_normal_metrics``: the
angle ``acos(clip(cos, -1, 1))`` in degrees over pixels with a finite, non-zero truth; a
prediction with no direction (NaN or zero) counts as 90 degrees (DSINE's cosine similarity of a
zero vector is 0). mean, median, rmse of the angles and the percentage under 5, 7.5, 11.25, 22.5
and 30 degrees; pooled over all pixels (DSINE: every angle is kept, 8 bytes per pixel) or
averaged per image (Marigold's normals evaluation).

Segmentation (class ids of the truth's classes). A confusion matrix over all pixels whose truth
is a class (ignored truth such as 255 is left out); a predicted id outside the classes
(unlabelled, or a class the truth does not have) is wrong for every class. ``IoU_c = TP / (TP +
FP + FN)``; mIoU averages the classes that occur (in truth or prediction), as cityscapesScripts'
``evalPixelLevelSemanticLabeling.py`` and mmsegmentation's ``mean_iou`` do; pixel accuracy is
``trace / total``; mean class accuracy (``macc``) averages ``TP / (TP + FN)`` over the classes in
the truth.

Given each class's category (Cityscapes), the category IoU treats a category as one class:
``TP`` = truth and prediction both in the category, ``FN`` = the rest of the category's truth
rows, ``FP`` = the category predicted on truth of other classes (``category_iou/<name>``, mean
``category_miou``). Given instance ids and each instance class's average size (Cityscapes'
``avgClassSize``), the instance-weighted IoU (``iiou``) weights each instance's true positive
and false negative pixels by ``avg_size / instance_size``, so large instances do not dominate;
its false positives are the class's unweighted pixel FP: ``iIoU = TP_w / (TP_w + FP + FN_w)``,
per class (``iiou/<name>``) and per category whose classes all have instances
(``category_iiou/<name>``), each mean over the entries that are not NaN, as
``evalPixelLevelSemanticLabeling.py`` computes them. An instance's class is the truth class of
its pixels (in Cityscapes' files the same as ``instanceId // 1000``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

DEFAULT_MIN_DEPTH_M = 1e-3
DEFAULT_MAX_DEPTH_M = 80.0
# What "far" counts as when the depth range is open above (ETH3D's max_depth is inf).
FAR_FALLBACK_M = 1e4
# Marigold clips predictions to at least this after the range clip (depth) ...
MIN_PREDICTED_DEPTH_M = 1e-6
# ... and aligned disparities to at least this before inverting them.
MIN_ALIGNED_DISPARITY = 1e-3
DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog")
ALIGNMENTS = ("none", "scale", "scale-shift", "scale-shift-disparity")
NORMAL_THRESHOLDS_DEG = (5.0, 7.5, 11.25, 22.5, 30.0)
NO_DIRECTION_DEG = 90.0

# Sums over pixels from which every depth metric follows: additive over images, so pooling is exact.
_SUMS = ("n", "abs_rel", "sq_rel", "sq", "log_sq", "log10", "delta1", "delta2", "delta3", "inv_sq", "log")


def mean_per_image(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over images (Marigold's ``MetricTracker``)."""
    return {key: float(np.mean([e[key] for e in per_image])) for key in per_image[0]}


# ---------------------------------------------------------------------------- depth


def depth_sums(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The additive sums (`_SUMS`) of already-valid, already-clipped pixel values (1-D, metres)."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    diff = p - t
    log_diff = np.log(p) - np.log(t)
    ratio = np.maximum(p / t, t / p)
    return np.array([
        p.size, np.sum(np.abs(diff) / t), np.sum(diff**2 / t), np.sum(diff**2), np.sum(log_diff**2),
        np.sum(np.abs(np.log10(p) - np.log10(t))), np.sum(ratio < 1.25), np.sum(ratio < 1.25**2),
        np.sum(ratio < 1.25**3), np.sum((1.0 / p - 1.0 / t) ** 2), np.sum(log_diff),
    ], dtype=np.float64)


def depth_metrics_from_sums(sums: np.ndarray) -> dict[str, float]:
    s = dict(zip(_SUMS, sums))
    n = s["n"]
    if n == 0:
        return {}
    return {
        "abs_rel": s["abs_rel"] / n, "sq_rel": s["sq_rel"] / n, "rmse": math.sqrt(s["sq"] / n),
        "rmse_log": math.sqrt(s["log_sq"] / n), "log10": s["log10"] / n,
        "delta1": s["delta1"] / n, "delta2": s["delta2"] / n, "delta3": s["delta3"] / n,
        "i_rmse": math.sqrt(s["inv_sq"] / n),
        # Rounding can take the variance a hair below zero for a perfect prediction.
        "silog": 100.0 * math.sqrt(max(s["log_sq"] / n - (s["log"] / n) ** 2, 0.0)),
    }


def depth_metrics(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Every depth metric (`DEPTH_METRICS`) of clipped predictions over `valid` pixels of one image."""
    return depth_metrics_from_sums(depth_sums(pred[valid], truth[valid]))


def _least_squares(x: np.ndarray, y: np.ndarray, shift: bool) -> tuple[float, float]:
    if not shift:
        return float(np.dot(x, y) / np.dot(x, x)), 0.0
    design = np.stack([x, np.ones_like(x)], axis=1)
    (scale, offset), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(scale), float(offset)


def alignment_columns(shape: tuple[int, ...], max_resolution: int | None) -> np.ndarray | None:
    """The pixels Marigold's least-squares fit sees at `max_resolution`, as a column mask (None: all).

    Marigold's ``align_depth_least_square(max_resolution=...)`` takes ``f = min(max_resolution /
    H, max_resolution / W)`` and, when ``f < 1``, resamples a (1, H, W) tensor with
    ``torch.nn.Upsample(scale_factor=f, mode="nearest")``. That layer reads a 3-D tensor as
    (batch, channels, length), so only the columns are resampled and every row is kept: the
    fit uses ``floor(W * f)`` columns, column ``j`` of the result being input column
    ``min(floor(j * float32(1 / f)), W - 1)`` (PyTorch's nearest index, in float32). Those
    columns are distinct, so fitting on them equals fitting on the masked full frame.
    """
    if max_resolution is None:
        return None
    height, width = shape[:2]
    factor = min(max_resolution / height, max_resolution / width)
    if factor >= 1:
        return None
    kept = math.floor(width * factor)
    step = np.float32(1.0 / factor)
    source = np.floor(np.arange(kept, dtype=np.float32) * step).astype(np.int64)
    columns = np.zeros(width, dtype=bool)
    columns[np.minimum(source, width - 1)] = True
    return columns


def align_depth(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray, alignment: str,
                max_resolution: int | None = None) -> np.ndarray:
    """`pred` aligned to `truth` over `valid` pixels with a finite prediction (see the module docstring).

    `max_resolution` fits on the pixels Marigold's downsampling to it keeps (`alignment_columns`).
    Returns float64 depth; far or NaN predictions come back as +inf (far). Too few pixels to fit
    (under 2) leaves the prediction as it is.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown depth alignment {alignment!r}; known: {', '.join(ALIGNMENTS)}")
    pred = np.asarray(pred, dtype=np.float64)
    if alignment == "none":
        return pred
    truth = np.asarray(truth, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        fit = valid & np.isfinite(pred)
        if alignment == "scale-shift-disparity":
            fit &= pred > 0
    columns = alignment_columns(truth.shape, max_resolution)
    if columns is not None:
        fit &= columns
    if fit.sum() < 2:
        return pred
    finite = np.isfinite(pred)
    values = np.where(finite, pred, 0.0)
    if alignment == "scale-shift-disparity":
        scale, offset = _least_squares(pred[fit], 1.0 / truth[fit], shift=True)
        aligned = 1.0 / np.maximum(scale * values + offset, MIN_ALIGNED_DISPARITY)
    else:
        scale, offset = _least_squares(pred[fit], truth[fit], shift=alignment == "scale-shift")
        aligned = scale * values + offset
    # Far / NaN predictions stay far: they have no value to scale (`clip_depth` then counts them as max_depth).
    return np.where(finite, aligned, np.inf)


def clip_depth(pred: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    """Far / NaN predictions to `max_depth`, then Marigold's clip to the range and to at least 1e-6."""
    far = max_depth if math.isfinite(max_depth) else FAR_FALLBACK_M
    pred = np.nan_to_num(np.asarray(pred, dtype=np.float64), nan=far, posinf=far, neginf=min_depth)
    return np.maximum(np.clip(pred, min_depth, max_depth), MIN_PREDICTED_DEPTH_M)


def valid_depth(truth: np.ndarray, min_depth: float, max_depth: float, mask: np.ndarray | None = None,
                truth_mask: np.ndarray | None = None) -> np.ndarray:
    """Pixels that count: finite truth strictly inside (min_depth, max_depth), and in `mask`.

    `truth_mask`, the dataset's own validity (DIODE's), replaces the range test: finite truth in it counts.
    """
    truth = np.asarray(truth, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        if truth_mask is None:
            valid = np.isfinite(truth) & (truth > min_depth) & (truth < max_depth)
        else:
            valid = np.isfinite(truth) & np.asarray(truth_mask, dtype=bool)
    return valid if mask is None else valid & mask


class DepthAccumulator:
    """Depth metrics of each image (plain for metric predictions, ``_aligned`` after `alignment`).

    `per_image=True` averages each metric over images (Marigold); False pools all pixels.
    `eval_mask(shape)` gives the protocol's crop (True = scored) for a truth of that shape;
    `alignment_max_res` the resolution the alignment is fitted at (`alignment_columns`).
    """

    def __init__(self, min_depth: float = DEFAULT_MIN_DEPTH_M, max_depth: float = DEFAULT_MAX_DEPTH_M,
                 metric: bool = True, alignment: str = "scale-shift", per_image: bool = True,
                 eval_mask: Callable[[tuple[int, int]], np.ndarray] | None = None,
                 alignment_max_res: int | None = None):
        if alignment not in ALIGNMENTS:
            raise ValueError(f"unknown depth alignment {alignment!r}; known: {', '.join(ALIGNMENTS)}")
        self.min_depth, self.max_depth, self.metric = min_depth, max_depth, metric
        self.alignment, self.per_image_mean, self.eval_mask = alignment, per_image, eval_mask
        self.alignment_max_res = alignment_max_res
        self.per_image: list[dict[str, float]] = []
        self.sums: dict[str, np.ndarray] = {}

    def add(self, pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None,
            truth_mask: np.ndarray | None = None) -> dict[str, float] | None:
        """Score one image; returns its metrics (None when it has no valid pixel).

        `truth_mask` is the dataset's own validity mask (DIODE's): it replaces the range test.
        """
        truth = np.asarray(truth, dtype=np.float64)
        if self.eval_mask is not None:
            mask = self.eval_mask(truth.shape) if mask is None else mask & self.eval_mask(truth.shape)
        valid = valid_depth(truth, self.min_depth, self.max_depth, mask, truth_mask)
        if not valid.any():
            return None
        pred = np.asarray(pred, dtype=np.float64)
        variants = {}
        if self.metric:
            variants[""] = pred
        if self.alignment != "none":
            variants["_aligned"] = align_depth(pred, truth, valid, self.alignment, self.alignment_max_res)
        errors: dict[str, float] = {}
        for suffix, values in variants.items():
            sums = depth_sums(clip_depth(values, self.min_depth, self.max_depth)[valid], truth[valid])
            self.sums[suffix] = self.sums.get(suffix, 0) + sums
            errors.update({f"{k}{suffix}": v for k, v in depth_metrics_from_sums(sums).items()})
        self.per_image.append(errors)
        return errors

    def result(self) -> dict[str, float]:
        if not self.per_image:
            return {}
        if self.per_image_mean:
            return mean_per_image(self.per_image)
        out = {}
        for suffix, sums in self.sums.items():
            out.update({f"{k}{suffix}": v for k, v in depth_metrics_from_sums(sums).items()})
        return out


# ---------------------------------------------------------------------------- normals


def normal_angles(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Angles in degrees between (H, W, 3) predictions and truth, at pixels with a finite, non-zero truth."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 3)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 3)
    valid = np.isfinite(truth).all(axis=1) & (np.abs(truth).sum(axis=1) > 0)
    if mask is not None:
        valid &= np.asarray(mask).reshape(-1)
    pred, truth = pred[valid], truth[valid]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
        t = truth / np.linalg.norm(truth, axis=1, keepdims=True)
        cosine = np.clip(np.sum(p * t, axis=1), -1.0, 1.0)
    angles = np.degrees(np.arccos(cosine))
    return np.where(np.isfinite(angles), angles, NO_DIRECTION_DEG)


def normal_metrics(angles: np.ndarray) -> dict[str, float]:
    """DSINE's normals metrics of a set of angular errors (degrees)."""
    angles = np.asarray(angles, dtype=np.float64)
    if angles.size == 0:
        return {}
    out = {"mean_deg": float(np.mean(angles)), "median_deg": float(np.median(angles)),
           "rmse_deg": float(np.sqrt(np.mean(angles**2)))}
    for threshold in NORMAL_THRESHOLDS_DEG:
        out[f"within_{threshold:g}_pct"] = 100.0 * float(np.mean(angles < threshold))
    return out


class NormalsAccumulator:
    """Angular errors pooled over all pixels of all images (DSINE), or averaged per image (Marigold)."""

    def __init__(self, per_image: bool = False) -> None:
        self.per_image_mean = per_image
        self.per_image: list[dict[str, float]] = []
        self.angles: list[np.ndarray] = []

    def add(self, pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float] | None:
        angles = normal_angles(pred, truth, mask)
        if angles.size == 0:
            return None
        if not self.per_image_mean:
            self.angles.append(angles)
        errors = normal_metrics(angles)
        self.per_image.append(errors)
        return errors

    def result(self) -> dict[str, float]:
        if not self.per_image:
            return {}
        if self.per_image_mean:
            return mean_per_image(self.per_image)
        return normal_metrics(np.concatenate(self.angles))


# ---------------------------------------------------------------------------- segmentation


class SegmentationAccumulator:
    """A confusion matrix over the truth's classes; predicted ids outside them count as wrong.

    `categories` ({class name: category}) adds the category IoU; `instance_sizes` ({class name:
    average instance size in pixels}) the instance-weighted iIoU of those classes, from the
    instance ids given to `add` (see the module docstring).
    """

    def __init__(self, class_names: Sequence[str], categories: Mapping[str, str] | None = None,
                 instance_sizes: Mapping[str, float] | None = None):
        self.class_names = list(class_names)
        k = len(self.class_names)
        # Rows: truth class; columns: predicted class, the last one "none of them".
        self.confusion = np.zeros((k, k + 1), dtype=np.int64)
        self.per_image: list[dict[str, float]] = []
        categories = dict(categories or {})
        self.category_names = list(dict.fromkeys(categories[c] for c in self.class_names if c in categories))
        # Category index of each class id, and of "none of them" (the last entry): -1 = no category.
        self.category_of = np.array([self.category_names.index(categories[c]) if c in categories else -1
                                     for c in self.class_names] + [-1], dtype=np.int64)
        sizes = dict(instance_sizes or {})
        self.instance_size = np.array([sizes.get(c, np.nan) for c in self.class_names], dtype=np.float64)
        self.weighted = np.isfinite(self.instance_size)
        # Categories whose classes all have instances get a category iIoU (cityscapesScripts: human, vehicle).
        self.weighted_category = np.array([
            bool(self.weighted[self.category_of[:k] == c].all()) for c in range(len(self.category_names))], dtype=bool)
        self.instance_tp = np.zeros(k)
        self.instance_fn = np.zeros(k)
        self.category_instance_tp = np.zeros(len(self.category_names))
        self.category_instance_fn = np.zeros(len(self.category_names))
        self.instance_images = 0

    def add(self, pred_ids: np.ndarray, truth_ids: np.ndarray, mask: np.ndarray | None = None,
            instances: np.ndarray | None = None) -> dict[str, float] | None:
        """Score one image. `instances`: per pixel instance id, 0 = not one instance (stuff, crowds)."""
        k = len(self.class_names)
        truth = np.asarray(truth_ids).astype(np.int64).ravel()
        pred = np.asarray(pred_ids).astype(np.int64).ravel()
        labelled = (truth >= 0) & (truth < k)
        if mask is not None:
            labelled &= np.asarray(mask).ravel()
        pred = np.where((pred >= 0) & (pred < k), pred, k)[labelled]
        truth = truth[labelled]
        self.confusion += np.bincount(truth * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)
        if instances is not None and self.weighted.any():
            self._add_instances(pred, truth, np.asarray(instances).astype(np.int64).ravel()[labelled])
        if not truth.size:
            return None
        errors = {"pixel_accuracy": float(np.mean(pred == truth))}
        self.per_image.append(errors)
        return errors

    def _add_instances(self, pred: np.ndarray, truth: np.ndarray, instances: np.ndarray) -> None:
        """Weighted TP / FN of each instance of a class with an average size (labelled pixels only)."""
        self.instance_images += 1
        k = len(self.class_names)
        chosen = (instances != 0) & self.weighted[truth]
        if not chosen.any():
            return
        pred, truth = pred[chosen], truth[chosen]
        _, first, which = np.unique(instances[chosen] * k + truth, return_index=True, return_inverse=True)
        which = which.ravel()
        cls = truth[first]
        size = np.bincount(which).astype(np.float64)
        hits = np.bincount(which, weights=(pred == truth).astype(np.float64), minlength=size.size)
        category = self.category_of[cls]
        same_category = (self.category_of[pred] == self.category_of[truth]) & (self.category_of[truth] >= 0)
        category_hits = np.bincount(which, weights=same_category.astype(np.float64), minlength=size.size)
        weight = self.instance_size[cls] / size
        np.add.at(self.instance_tp, cls, hits * weight)
        np.add.at(self.instance_fn, cls, (size - hits) * weight)
        in_category = (category >= 0) & self.weighted_category[np.maximum(category, 0)]
        np.add.at(self.category_instance_tp, category[in_category], (category_hits * weight)[in_category])
        np.add.at(self.category_instance_fn, category[in_category], ((size - category_hits) * weight)[in_category])

    def result(self) -> dict[str, float]:
        k = len(self.class_names)
        total = self.confusion.sum()
        if not total:
            return {}
        hits = np.diag(self.confusion[:, :k]).astype(np.float64)
        in_truth = self.confusion.sum(axis=1)
        false_pos = self.confusion[:, :k].sum(axis=0) - hits
        union = in_truth + false_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, hits / union, np.nan)
            accuracy = np.where(in_truth > 0, hits / in_truth, np.nan)
        out = {"miou": _nanmean(iou), "pixel_accuracy": float(hits.sum() / total), "macc": _nanmean(accuracy)}
        out.update({f"iou/{name}": float(v) for name, v in zip(self.class_names, iou)})
        if self.instance_images:
            iiou = _ratio(self.instance_tp, self.instance_tp + false_pos + self.instance_fn)[self.weighted]
            out["iiou"] = _nanmean(iiou)
            out.update({f"iiou/{name}": float(v) for name, v in zip(np.array(self.class_names)[self.weighted], iiou)})
        if self.category_names:
            out.update(self._category_scores())
        return out

    def _category_scores(self) -> dict[str, float]:
        k = len(self.class_names)
        member = self.category_of[:k][None, :] == np.arange(len(self.category_names))[:, None]
        counts = self.confusion[:, :k]
        hits = np.array([counts[m][:, m].sum() for m in member], dtype=np.float64)
        false_neg = np.array([self.confusion[m].sum() for m in member], dtype=np.float64) - hits
        false_pos = np.array([counts[~m][:, m].sum() for m in member], dtype=np.float64)
        iou = _ratio(hits, hits + false_pos + false_neg)
        out = {"category_miou": _nanmean(iou)}
        out.update({f"category_iou/{name}": float(v) for name, v in zip(self.category_names, iou)})
        if self.instance_images and self.weighted_category.any():
            tp, fn = self.category_instance_tp, self.category_instance_fn
            iiou = _ratio(tp, tp + false_pos + fn)[self.weighted_category]
            out["category_iiou"] = _nanmean(iiou)
            names = np.array(self.category_names)[self.weighted_category]
            out.update({f"category_iiou/{name}": float(v) for name, v in zip(names, iiou)})
        return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (cityscapesScripts' "no score")."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def _nanmean(values: np.ndarray) -> float:
    """Mean of the entries that are not NaN (cityscapesScripts' ``getScoreAverage``); NaN if none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
