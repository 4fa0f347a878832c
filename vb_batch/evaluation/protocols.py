"""Named evaluation protocols: the crops, depth ranges, alignment and averaging of each benchmark.

A paper's number is only comparable under the protocol it was measured with. `vb-batch eval
--protocol NAME` applies one of these to every task it scores (formulas: `vb_batch.evaluation.metrics`).

=============  ===============  =====================  ==================  =========================
protocol       depth range (m)  crop                   depth alignment     source
=============  ===============  =====================  ==================  =========================
generic        (1e-3, 80)       none                   metric + scale-sh.  vb_batch's own default
nyuv2          (1e-3, 10)       Eigen [45:471,41:601]  scale-shift         Marigold nyu_dataset.py
kitti-eigen    (1e-5, 80)       KB crop + Eigen        scale-shift         Marigold kitti_dataset.py
kitti-garg     (1e-5, 80)       KB crop + Garg         scale-shift         Marigold kitti_dataset.py
eth3d          (1e-5, inf)      none                   scale-shift @1024   Marigold eth3d_dataset.py
scannet        (1e-3, 10)       none                   scale-shift         Marigold scannet_dataset.py
diode          (0.6, 350)       the truth's mask       scale-shift         Marigold diode_dataset.py
cityscapes     -                -                      -                   cityscapesScripts (+ iIoU)
ade20k         -                -                      -                   mmsegmentation ADE20K
=============  ===============  =====================  ==================  =========================

Both ends of a depth range are exclusive (Marigold's ``_get_valid_mask``). Depth metrics are
averaged per image (Marigold's ``MetricTracker``); normals per image for the Marigold protocols
and pooled over pixels for ``generic`` (DSINE's ``compute_normal_metrics``); segmentation always
from one confusion matrix over the whole set (cityscapesScripts, mmsegmentation). A metric
prediction is scored as it is *and* under the protocol's alignment (the ``_aligned`` metrics);
`alignment` overrides it (``none`` for zero-shot metric numbers, ``scale-shift-disparity`` for
models that predict affine-invariant disparity). ``@1024``: the alignment is fitted at a maximum
resolution of 1024 (Marigold's ``--alignment_max_res 1024`` in ``script/eval/32_eval_eth3d.sh``;
`vb_batch.evaluation.metrics.alignment_columns` says which pixels that keeps); the metrics are
computed at full resolution. DIODE's range only clips predictions when the truth declares its
validity mask (``mask:`` in ``--truth-format``), as Marigold's DIODE loader uses that mask alone.

Sources (read for the constants, no code copied):
- Marigold (Ke et al., CVPR 2024), github.com/prs-eth/Marigold, Apache-2.0: ``src/dataset/*``
  (ranges, ``kitti_benchmark_crop``, Garg and Eigen ``valid_mask_crop``, NYU ``eigen_valid_mask``),
  ``script/depth/eval.py`` (alignment, clipping), ``src/util/metric.py`` (formulas).
- Garg et al., ECCV 2016 and Eigen et al., NIPS 2014 crops as in BTS's ``bts_eval.py``.
- DSINE (Bae and Davison, CVPR 2024), github.com/baegwangbin/DSINE, MIT: normals metrics.
- cityscapesScripts ``helpers/labels.py`` and ``evaluation/evalPixelLevelSemanticLabeling.py``:
  19 train classes, ignore 255, categories, ``avgClassSize`` (the iIoU weights); ADE20K
  SceneParsing 150 classes, 0 = "other" ignored
  (mmsegmentation ``reduce_zero_label``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from vb_batch.evaluation.metrics import (
    ALIGNMENTS,
    DEFAULT_MAX_DEPTH_M,
    DEFAULT_MIN_DEPTH_M,
)

# KITTI benchmark crop (Marigold's kitti_benchmark_crop): bottom 352 rows, centred 1216 columns.
KB_CROP_HEIGHT, KB_CROP_WIDTH = 352, 1216
# NYUv2 Eigen crop on the 480 x 640 frame (Marigold's eigen_valid_mask).
NYU_SIZE = (480, 640)
NYU_EIGEN_ROWS, NYU_EIGEN_COLS = (45, 471), (41, 601)
# Crops as fractions of the (benchmark-cropped) KITTI frame, as in BTS's bts_eval.py and Marigold.
GARG_CROP = ((0.40810811, 0.99189189), (0.03594771, 0.96405229))
EIGEN_CROP = ((0.3324324, 0.91351351), (0.0359477, 0.96405229))
AVERAGING = ("per-image", "pooled")
# Marigold's ETH3D evaluation fits scale and shift at this resolution (--alignment_max_res 1024).
ETH3D_ALIGNMENT_MAX_RES = 1024


def fraction_crop(rows: tuple[float, float], cols: tuple[float, float]) -> Callable[[tuple[int, int]], np.ndarray]:
    """A crop given as fractions of the frame, rounded down as ``int(f * size)`` (BTS, Marigold)."""

    def mask(shape: tuple[int, int]) -> np.ndarray:
        h, w = shape[:2]
        out = np.zeros((h, w), dtype=bool)
        out[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)] = True
        return out

    return mask


def nyu_eigen_crop(shape: tuple[int, int]) -> np.ndarray:
    """Marigold's NYU ``eigen_valid_mask``: rows 45:471, columns 41:601 of 480 x 640, scaled to other sizes."""
    h, w = shape[:2]
    out = np.zeros((h, w), dtype=bool)
    out[NYU_EIGEN_ROWS[0] * h // NYU_SIZE[0] : NYU_EIGEN_ROWS[1] * h // NYU_SIZE[0],
        NYU_EIGEN_COLS[0] * w // NYU_SIZE[1] : NYU_EIGEN_COLS[1] * w // NYU_SIZE[1]] = True
    return out


def kitti_benchmark_crop(array: np.ndarray) -> np.ndarray:
    """Marigold's ``kitti_benchmark_crop`` (352 x 1216, bottom, centred); smaller frames stay as they are."""
    h, w = array.shape[:2]
    if h < KB_CROP_HEIGHT or w < KB_CROP_WIDTH:
        return array
    top, left = h - KB_CROP_HEIGHT, (w - KB_CROP_WIDTH) // 2
    return array[top : top + KB_CROP_HEIGHT, left : left + KB_CROP_WIDTH]


@dataclass(frozen=True)
class Protocol:
    """How one benchmark scores: what counts, how predictions are aligned, how images are averaged."""

    name: str
    source: str
    min_depth: float = DEFAULT_MIN_DEPTH_M
    max_depth: float = DEFAULT_MAX_DEPTH_M
    # Crop as a mask of the (pre-cropped) frame: True = scored.
    eval_mask: Callable[[tuple[int, int]], np.ndarray] | None = None
    # Applied to prediction and truth alike before anything else (KITTI's benchmark crop).
    pre_crop: Callable[[np.ndarray], np.ndarray] | None = None
    alignment: str = "scale-shift"
    depth_averaging: str = "per-image"
    normals_averaging: str = "per-image"
    # Fit the alignment at this resolution (Marigold's --alignment_max_res); None: full resolution.
    alignment_max_res: int | None = None

    def with_options(self, alignment: str | None = None, averaging: str | None = None,
                     min_depth: float | None = None, max_depth: float | None = None,
                     alignment_max_res: int | None = None) -> Protocol:
        """This protocol with the user's overrides (None keeps the protocol's own; max res 0 = full)."""
        if alignment_max_res is not None and alignment_max_res < 0:
            raise ValueError(f"--alignment-max-res: {alignment_max_res} is negative; give pixels, or 0 for full resolution")
        if alignment is not None and alignment not in ALIGNMENTS:
            raise ValueError(f"--alignment: unknown alignment {alignment!r}; known: {', '.join(ALIGNMENTS)}")
        if averaging is not None and averaging not in AVERAGING:
            raise ValueError(f"--averaging: unknown averaging {averaging!r}; known: {', '.join(AVERAGING)}")
        changes: dict = {}
        if alignment is not None:
            changes["alignment"] = alignment
        if averaging is not None:
            changes["depth_averaging"] = changes["normals_averaging"] = averaging
        if min_depth is not None:
            changes["min_depth"] = min_depth
        if max_depth is not None:
            changes["max_depth"] = max_depth
        if alignment_max_res is not None:
            changes["alignment_max_res"] = alignment_max_res or None
        return replace(self, **changes) if changes else self


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("generic", "vb_batch default: no crop, Marigold's formulas; normals pooled as DSINE",
                 normals_averaging="pooled"),
        Protocol("nyuv2", "Marigold src/dataset/nyu_dataset.py (eigen_valid_mask), script/depth/eval.py",
                 min_depth=1e-3, max_depth=10.0, eval_mask=nyu_eigen_crop),
        Protocol("kitti-eigen", "Marigold src/dataset/kitti_dataset.py (kitti_bm_crop, valid_mask_crop=eigen)",
                 min_depth=1e-5, max_depth=80.0, eval_mask=fraction_crop(*EIGEN_CROP), pre_crop=kitti_benchmark_crop),
        Protocol("kitti-garg", "Marigold src/dataset/kitti_dataset.py (kitti_bm_crop, valid_mask_crop=garg)",
                 min_depth=1e-5, max_depth=80.0, eval_mask=fraction_crop(*GARG_CROP), pre_crop=kitti_benchmark_crop),
        Protocol("eth3d", "Marigold src/dataset/eth3d_dataset.py, script/eval/32_eval_eth3d.sh (alignment_max_res 1024)",
                 min_depth=1e-5, max_depth=math.inf, alignment_max_res=ETH3D_ALIGNMENT_MAX_RES),
        Protocol("scannet", "Marigold src/dataset/scannet_dataset.py", min_depth=1e-3, max_depth=10.0),
        Protocol("diode", "Marigold src/dataset/diode_dataset.py (validity: the dataset's mask, declared as mask:)",
                 min_depth=0.6, max_depth=350.0),
        Protocol("cityscapes", "cityscapesScripts evalPixelLevelSemanticLabeling.py: 19 train ids, ignore 255; "
                 "category IoU; iIoU from instanceIds"),
        Protocol("ade20k", "ADE20K SceneParsing / mmsegmentation: 150 classes, 0 = other (ignored)"),
    )
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"--protocol: unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None
