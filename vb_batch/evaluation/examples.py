"""Small benchmark-shaped truth tables built from synthetic scenes, in each benchmark's own encoding.

No download: the procedural rooms of `vb_batch.evaluation.scenes` are written the way KITTI, NYUv2,
Cityscapes, ADE20K, DSINE's normals and plain metre arrays store their ground truth, with the
`--truth-format` that reads them (`vb_batch.evaluation.truth`). Tests and the README use them to show that
`vb-batch eval` reads the field's encodings and applies its protocols.

=============  ==========================  ================================================================
example        --truth-format              what is in it
=============  ==========================  ================================================================
kitti          depth=kitti-png             sparse "LiDAR" depth (40% of pixels), uint16 metres*256, 0 = none
nyuv2          depth=nyu-png               uint16 millimetres, 0 = invalid; a wrong 0.5 m outside the Eigen
                                           crop (as NYU's unreliable borders), which the nyuv2 protocol drops
metres         depth=metres                float32 .npy cells; sky = NaN
dsine-normals  normals=normals-png, frame   RGB8 ``(n + 1) / 2 * 255`` in DSINE's frame, black = invalid
               dsine (YAML)
cityscapes     segmentation=cityscapes-    labelIds (road 7, building 11, pole 17, sky 23, person 24, car 26);
               labelids                    the bottom rows are "ego vehicle" (1), ignored
ade20k         segmentation=ade20k         ADE20K ids 1..150 (floor 4, wall 1, box 42, ball 120, column 43,
                                           sky 3); 0 = "other" in a corner, ignored
=============  ==========================  ================================================================

Scene classes become the benchmark's class *names* (`CLASS_NAMES`), so a job labels them with
the benchmark's legend and `vb-batch eval` matches them by name.

Example:
    >>> from vb_batch.evaluation.examples import example_table, EXAMPLES
    >>> table = example_table("kitti", count=2)
    >>> table.column_names, EXAMPLES["kitti"]
    (['id', 'image', 'depth'], 'depth=kitti-png')
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from vb_batch.evaluation.protocols import nyu_eigen_crop
from vb_batch.evaluation.scenes import (
    HELD_OUT_SEED_START,
    SCENE_CLASSES,
    Scene,
    render_scene,
    scene_id,
)
from vb_batch.evaluation.truth import (
    ADE20K_CLASSES,
    CITYSCAPES_TRAIN_LABELS,
    NORMAL_FRAMES,
)
from vb_batch.io.encodings import png_bytes

EXAMPLES = {
    "kitti": "depth=kitti-png",
    "nyuv2": "depth=nyu-png",
    "metres": "depth=metres",
    "dsine-normals": {"normals": {"encoding": "normals-png", "column": "normals", "frame": "dsine"}},
    "cityscapes": "segmentation=cityscapes-labelids",
    "ade20k": "segmentation=ade20k",
}
# Each scene class as a class of the benchmark (by name).
CLASS_NAMES = {
    "cityscapes": {"floor": "road", "wall": "building", "box": "car", "sphere": "person", "cylinder": "pole",
                   "sky": "sky"},
    "ade20k": {"floor": "floor", "wall": "wall", "box": "box", "sphere": "ball", "cylinder": "column", "sky": "sky"},
}
KITTI_KEEP = 0.4
NYU_BORDER_DEPTH_M = 0.5
EGO_VEHICLE_LABEL_ID = 1
EGO_ROWS = 4


def _cityscapes_ids(class_ids: np.ndarray) -> np.ndarray:
    label_id = {name: label for label, name in CITYSCAPES_TRAIN_LABELS}
    lookup = np.array([label_id[CLASS_NAMES["cityscapes"][name]] for name in SCENE_CLASSES], dtype=np.uint8)
    ids = lookup[class_ids]
    ids[-EGO_ROWS:] = EGO_VEHICLE_LABEL_ID
    return ids


def _ade20k_ids(class_ids: np.ndarray) -> np.ndarray:
    lookup = np.array([ADE20K_CLASSES.index(CLASS_NAMES["ade20k"][name]) + 1 for name in SCENE_CLASSES], dtype=np.uint8)
    ids = lookup[class_ids]
    ids[:3, :3] = 0
    return ids


def encode_truth(kind: str, scene: Scene, rng: np.random.Generator) -> tuple[str, bytes]:
    """(column, cell) of one scene's truth in the example `kind`'s encoding."""
    depth = scene.depth_m.astype(np.float64)
    finite = np.isfinite(depth)
    if kind == "kitti":
        measured = finite & (rng.random(depth.shape) < KITTI_KEEP)
        stored = np.where(measured, np.clip(np.rint(np.where(finite, depth, 0) * 256.0), 1, 65535), 0)
        return "depth", png_bytes(Image.fromarray(stored.astype(np.uint16)))
    if kind == "nyuv2":
        stored = np.where(finite, np.clip(np.rint(np.where(finite, depth, 0) * 1000.0), 1, 65535), 0)
        stored[~nyu_eigen_crop(depth.shape)] = NYU_BORDER_DEPTH_M * 1000.0
        return "depth", png_bytes(Image.fromarray(stored.astype(np.uint16)))
    if kind == "metres":
        buf = io.BytesIO()
        np.save(buf, np.where(finite, depth, np.nan).astype(np.float32))
        return "depth", buf.getvalue()
    if kind == "dsine-normals":
        n = scene.normals.astype(np.float64) * np.asarray(NORMAL_FRAMES["dsine"])  # OpenGL -> DSINE
        invalid = ~np.isfinite(n).all(axis=-1)
        rgb = np.rint((np.nan_to_num(n) + 1.0) / 2.0 * 255.0)
        rgb[invalid] = 0
        return "normals", png_bytes(Image.fromarray(rgb.astype(np.uint8), mode="RGB"))
    if kind == "cityscapes":
        return "segmentation", png_bytes(Image.fromarray(_cityscapes_ids(scene.class_ids)))
    if kind == "ade20k":
        return "segmentation", png_bytes(Image.fromarray(_ade20k_ids(scene.class_ids)))
    raise ValueError(f"unknown example {kind!r}; known: {', '.join(EXAMPLES)}")


def example_table(kind: str, count: int = 3, start_seed: int = HELD_OUT_SEED_START, size: tuple[int, int] = (64, 96),
                  seed: int = 0) -> pa.Table:
    """A truth table of `count` scenes: id, image (PNG), and the truth column in `kind`'s encoding."""
    if kind not in EXAMPLES:
        raise ValueError(f"unknown example {kind!r}; known: {', '.join(EXAMPLES)}")
    rng = np.random.default_rng(seed)
    ids, images, cells, column = [], [], [], ""
    for s in range(start_seed, start_seed + count):
        scene = render_scene(s, *size)
        column, cell = encode_truth(kind, scene, rng)
        ids.append(scene_id(s))
        images.append(png_bytes(Image.fromarray(scene.rgb)))
        cells.append(cell)
    return pa.table({"id": ids, "image": pa.array(images, pa.binary()), column: pa.array(cells, pa.binary())})


def scenes_of(count: int = 3, start_seed: int = HELD_OUT_SEED_START, size: tuple[int, int] = (64, 96)) -> Sequence[Scene]:
    """The scenes behind `example_table` (same seeds and size): their exact truth."""
    return [render_scene(s, *size) for s in range(start_seed, start_seed + count)]
