"""Ground-truth adapters: read the field's own encodings of depth, normals and class maps.

A benchmark's truth is a table with plain columns (PNG bytes, arrays) and an id column; what the
numbers mean is declared, not guessed, with `vb-batch eval --truth-format`:

    --truth-format depth=kitti-png                      # column "depth", KITTI's uint16 / 256
    --truth-format "depth=nyu-png:gt_depth, segmentation=cityscapes-labelids:label"
    --truth-format "depth=metres:depth, depth.mask=depth_mask"          # DIODE: the dataset's mask
    --truth-format "segmentation=cityscapes-labelids:label, segmentation.instances=instance"
    --truth-format truth.yaml                           # everything, as below

    # truth.yaml
    id_column: id
    depth: {encoding: nyu-png, column: depth, mask: valid}   # mask: optional validity column
    normals: {encoding: normals-png, column: normal, frame: dsine}
    segmentation: {encoding: class-ids, column: label, classes: [road, car, sky], ignore: 255,
                   class_map: {street: road}}     # prediction class name -> truth class name

``task.option=value`` sets one more option of a task in the one-line form.

Companion columns: ``mask`` (depth) names a column with the dataset's own validity mask (DIODE's
``*_depth_mask.npy``: .npy bytes, a vb array, lists or a PNG; non-zero = valid). It replaces the
protocol's range test, as Marigold's DIODE loader does; the range then only clips predictions.
``instances`` (segmentation, Cityscapes encodings) names a column with ``*_instanceIds.png``
(uint16: ``labelId * 1000 + k`` for single instances, the plain labelId elsewhere), from which
`vb_batch.evaluation.metrics` computes cityscapesScripts' instance-weighted iIoU. Cityscapes
truth also reports the category IoU (``CITYSCAPES_CATEGORIES``).

Encodings (`ENCODINGS`):

=====================  ========  =====================================================================
encoding               task      cell and meaning
=====================  ========  =====================================================================
kitti-png              depth     uint16 PNG, metres = value / 256, 0 = no measurement (KITTI devkit)
nyu-png                depth     uint16 PNG, millimetres, 0 = invalid (NYUv2, ScanNet as Marigold reads)
metres                 depth     float array (vb array struct, .npy bytes or nested lists); non-finite
                                 or <= 0 = invalid
normals-png            normals   RGB8 PNG, ``n = rgb / 255 * 2 - 1`` in `frame`, black = invalid (DSINE)
normals-array          normals   float (H, W, 3) array in `frame`; zero or NaN = invalid
cityscapes-labelids    segm.     8-bit labelIds PNG -> the 19 trainIds (cityscapesScripts labels.py),
                                 everything else (void, license plate, ...) ignored (255)
cityscapes-trainids    segm.     8-bit trainIds PNG, 255 ignored
ade20k                 segm.     8-bit PNG 0..150 (ADEChallengeData2016): 0 = other (ignored), k ->
                                 class k - 1 of `ADE20K_CLASSES` (mmsegmentation reduce_zero_label)
class-ids              segm.     8/16-bit PNG or integer array of ids into `classes`; `ignore` ignored
=====================  ========  =====================================================================

Frames of normals: ``opengl`` (x right, y up, z toward the viewer; Marigold's), ``opencv`` (x
right, y down, z forward) and ``dsine``: DSINE's stored convention. DSINE's depth-to-normal code
(``data/d2n/plane_svd.py``) orients normals so that ``n . p > 0`` for camera points ``p`` in
x-right / y-down / z-forward axes, i.e. the vector stored is the inward normal in OpenCV axes,
which is the outward normal with x pointing left, y up and z toward the viewer: OpenGL with x
mirrored. Truth normals are returned in the OpenGL frame.

Classes are matched by *name* (case and surrounding spaces ignored) between the prediction's
legend and the truth's classes; a predicted class the truth does not have is an error naming
both lists, unless `class_map` maps it.

Example:
    >>> from vb_batch.evaluation.truth import parse_truth_format
    >>> spec = parse_truth_format("depth=kitti-png, segmentation=cityscapes-labelids:label")
    >>> spec.columns["segmentation"].column, spec.columns["segmentation"].class_names[:3]
    ('label', ['road', 'sidewalk', 'building'])
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vb_batch.io.encodings import decode_array

IGNORE_ID = 255
NORMAL_FRAMES = {
    "opengl": (1.0, 1.0, 1.0),
    "opencv": (1.0, -1.0, -1.0),
    "dsine": (-1.0, 1.0, 1.0),  # x left, y up, z toward the viewer (see the module docstring)
}

# cityscapesScripts helpers/labels.py: (labelId, name, trainId) of the 19 evaluated classes;
# every other labelId (0-6 void, 9 parking, 10 rail track, 14-16, 18, 29, 30, -1) has trainId 255.
CITYSCAPES_TRAIN_LABELS = (
    (7, "road"), (8, "sidewalk"), (11, "building"), (12, "wall"), (13, "fence"), (17, "pole"),
    (19, "traffic light"), (20, "traffic sign"), (21, "vegetation"), (22, "terrain"), (23, "sky"),
    (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"),
    (32, "motorcycle"), (33, "bicycle"),
)
CITYSCAPES_CLASSES = tuple(name for _, name in CITYSCAPES_TRAIN_LABELS)
# labels.py categories of the 19 classes (the category IoU).
CITYSCAPES_CATEGORIES = {
    "road": "flat", "sidewalk": "flat", "building": "construction", "wall": "construction", "fence": "construction",
    "pole": "object", "traffic light": "object", "traffic sign": "object", "vegetation": "nature",
    "terrain": "nature", "sky": "sky", "person": "human", "rider": "human", "car": "vehicle", "truck": "vehicle",
    "bus": "vehicle", "train": "vehicle", "motorcycle": "vehicle", "bicycle": "vehicle",
}
# evalPixelLevelSemanticLabeling.py avgClassSize (pixels) of the evaluated classes with instances:
# an instance's pixels weigh avg / its size in the iIoU (caravan and trailer are not evaluated).
CITYSCAPES_AVG_CLASS_SIZE = {
    "person": 3462.4756337644, "rider": 3930.4788056518, "car": 12794.0202738185, "truck": 27855.1264367816,
    "bus": 35732.1511111111, "train": 67583.7075812274, "motorcycle": 6298.7200839748,
    "bicycle": 4672.3249222261,
}
# instanceIds PNGs: ids above this are single instances (labelId * 1000 + k); at or below, no instance.
CITYSCAPES_INSTANCE_OFFSET = 1000
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, IGNORE_ID, dtype=np.uint8)
for _train_id, (_label_id, _) in enumerate(CITYSCAPES_TRAIN_LABELS):
    CITYSCAPES_LABEL_TO_TRAIN[_label_id] = _train_id
# cityscapesScripts' colours of the train classes (also a good legend for a job).
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# ADE20K SceneParsing (objectInfo150), in id order 1..150 (mmsegmentation ADE20KDataset.METAINFO).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150 and len(CITYSCAPES_CLASSES) == 19

# Legend names that mean "no class": never an error when the truth lacks them.
BACKGROUND_NAMES = {"anything else", "background", "other", "unlabelled", "unlabeled", "void"}


# ---------------------------------------------------------------------------- reading cells


def cell_array(cell: Any) -> np.ndarray:
    """A table cell as a numpy array: PNG / .npy bytes, a vb array struct, an image struct, or lists."""
    if isinstance(cell, dict):
        if "data" in cell and "shape" in cell and "dtype" in cell:
            return decode_array(cell)
        if cell.get("bytes") is not None:
            return cell_array(cell["bytes"])
        raise ValueError(f"a struct cell with fields {sorted(cell)} is neither an array nor an image")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        data = bytes(cell)
        if data.startswith(b"\x93NUMPY"):
            return np.load(io.BytesIO(data), allow_pickle=False)
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image)
    return np.asarray(cell)


def _depth_png(scale: float) -> Callable[[Any], np.ndarray]:
    def decode(cell: Any) -> np.ndarray:
        stored = cell_array(cell)
        if stored.ndim != 2 or stored.dtype.kind not in "ui":
            raise ValueError(f"expected a single-channel integer PNG, got {stored.dtype} {stored.shape}")
        depth = stored.astype(np.float64) / scale
        depth[stored == 0] = np.nan
        return depth

    return decode


def _depth_metres(cell: Any) -> np.ndarray:
    depth = np.asarray(cell_array(cell), dtype=np.float64).squeeze()
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)


def _normals(png: bool, frame: str) -> Callable[[Any], np.ndarray]:
    signs = np.asarray(NORMAL_FRAMES[frame])

    def decode(cell: Any) -> np.ndarray:
        stored = cell_array(cell)
        if png:
            if stored.ndim != 3 or stored.shape[2] < 3 or stored.dtype != np.uint8:
                raise ValueError(f"expected an RGB8 PNG, got {stored.dtype} {stored.shape}")
            stored = stored[..., :3]
            invalid = (stored == 0).all(axis=-1)  # DSINE: normal_mask = sum(rgb) > 0
            n = stored.astype(np.float64) / 255.0 * 2.0 - 1.0
        else:
            n = np.asarray(stored, dtype=np.float64)
            invalid = ~np.isfinite(n).all(axis=-1) | (np.abs(n).sum(axis=-1) == 0)
        n = n * signs  # to OpenGL
        n[invalid] = np.nan
        return n

    return decode


def decode_mask(cell: Any) -> np.ndarray:
    """A validity mask cell (DIODE's ``*_depth_mask.npy``, a PNG, lists): non-zero = valid."""
    stored = cell_array(cell)
    if stored.ndim == 3:
        stored = stored[..., 0]
    return np.asarray(stored).squeeze() != 0


def decode_cityscapes_instances(cell: Any) -> np.ndarray:
    """An ``*_instanceIds.png`` cell: the instance id of each pixel, 0 where no single instance."""
    stored = cell_array(cell)
    if stored.ndim != 2 or stored.dtype.kind not in "ui":
        raise ValueError(f"expected a single-channel integer instanceIds PNG, got {stored.dtype} {stored.shape}")
    ids = stored.astype(np.int64)
    return np.where(ids > CITYSCAPES_INSTANCE_OFFSET, ids, 0)


def _class_ids(lookup: np.ndarray | None, offset: int, ignore: int | None) -> Callable[[Any], np.ndarray]:
    def decode(cell: Any) -> np.ndarray:
        stored = cell_array(cell)
        if stored.ndim == 3:  # a grey PNG saved as RGB: the channels agree
            stored = stored[..., 0]
        if stored.dtype.kind not in "ui":
            raise ValueError(f"expected integer class ids, got {stored.dtype}")
        ids = stored.astype(np.int64)
        if lookup is not None:
            return lookup[np.clip(ids, 0, len(lookup) - 1)].astype(np.int64)
        ignored = ids == ignore if ignore is not None else np.zeros(ids.shape, bool)
        ids = ids - offset
        ids[ignored | (ids < 0)] = IGNORE_ID
        return ids

    return decode


# ---------------------------------------------------------------------------- declared formats


@dataclass(frozen=True)
class TruthColumn:
    """One task's truth: the table column, how a cell becomes values, the class names."""

    task: str
    column: str
    encoding: str
    decode: Callable[[Any], np.ndarray]
    class_names: list[str] | None = None
    frame: str = "opengl"  # of the decoded values
    class_map: dict[str, str] = field(default_factory=dict)
    # Companion column: the validity mask (depth, `decode_mask`) or instance ids (segmentation).
    companion: str | None = None
    decode_companion: Callable[[Any], np.ndarray] | None = None
    categories: dict[str, str] | None = None  # class name -> category (category IoU)
    instance_sizes: dict[str, float] | None = None  # class name -> average instance size (iIoU)


@dataclass(frozen=True)
class TruthFormat:
    id_column: str
    columns: dict[str, TruthColumn]


ENCODINGS = {
    "kitti-png": "depth", "nyu-png": "depth", "metres": "depth",
    "normals-png": "normals", "normals-array": "normals",
    "cityscapes-labelids": "segmentation", "cityscapes-trainids": "segmentation", "ade20k": "segmentation",
    "class-ids": "segmentation",
}
TASKS = ("depth", "normals", "segmentation")


def truth_column(task: str, options: dict[str, Any]) -> TruthColumn:
    """One task's declared truth (`options`: encoding, column, frame, classes, ignore, class_map)."""
    if task not in TASKS:
        raise ValueError(f"--truth-format: unknown task {task!r}; known: {', '.join(TASKS)}")
    encoding = str(options.get("encoding", ""))
    if encoding not in ENCODINGS:
        known = ", ".join(e for e, t in ENCODINGS.items() if t == task)
        raise ValueError(f"--truth-format: unknown encoding {encoding!r} for {task}; known for {task}: {known}")
    if ENCODINGS[encoding] != task:
        raise ValueError(f"--truth-format: encoding {encoding!r} is for {ENCODINGS[encoding]}, not {task}")
    column = str(options.get("column") or task)
    class_map = {str(k).strip().lower(): str(v) for k, v in (options.get("class_map") or {}).items()}
    unknown = set(options) - {"encoding", "column", "frame", "classes", "ignore", "class_map", "mask", "instances"}
    if unknown:
        raise ValueError(f"--truth-format: {task}: unknown keys {sorted(unknown)}; known: encoding, column, frame, "
                         "classes, ignore, class_map, mask (depth), instances (Cityscapes segmentation)")
    if options.get("mask") and task != "depth":
        raise ValueError(f"--truth-format: {task}: `mask` is a depth option (the dataset's validity mask column)")
    if options.get("instances") and encoding not in ("cityscapes-labelids", "cityscapes-trainids"):
        raise ValueError(f"--truth-format: {task}: `instances` (an instanceIds column) needs a Cityscapes encoding, "
                         f"not {encoding!r}")
    if task == "depth":
        decode = {"kitti-png": _depth_png(256.0), "nyu-png": _depth_png(1000.0), "metres": _depth_metres}[encoding]
        mask = options.get("mask")
        return TruthColumn(task, column, encoding, decode, companion=str(mask) if mask else None,
                           decode_companion=decode_mask if mask else None)
    if task == "normals":
        frame = str(options.get("frame", "opengl"))
        if frame not in NORMAL_FRAMES:
            raise ValueError(f"--truth-format: normals: unknown frame {frame!r}; known: {', '.join(NORMAL_FRAMES)}")
        return TruthColumn(task, column, encoding, _normals(encoding == "normals-png", frame))
    if encoding in ("cityscapes-labelids", "cityscapes-trainids"):
        decode = (_class_ids(CITYSCAPES_LABEL_TO_TRAIN, 0, None) if encoding == "cityscapes-labelids"
                  else _class_ids(None, 0, IGNORE_ID))
        instances = options.get("instances")
        return TruthColumn(task, column, encoding, decode, list(CITYSCAPES_CLASSES), class_map=class_map,
                           companion=str(instances) if instances else None,
                           decode_companion=decode_cityscapes_instances if instances else None,
                           categories=dict(CITYSCAPES_CATEGORIES),
                           instance_sizes=dict(CITYSCAPES_AVG_CLASS_SIZE) if instances else None)
    if encoding == "ade20k":
        return TruthColumn(task, column, encoding, _class_ids(None, 1, 0), list(ADE20K_CLASSES), class_map=class_map)
    classes = options.get("classes")
    if not classes:
        raise ValueError("--truth-format: segmentation: encoding class-ids needs `classes: [name, ...]` "
                         "(the name of id 0, 1, ...) in a truth-format YAML")
    ignore = options.get("ignore", IGNORE_ID)
    return TruthColumn(task, column, encoding, _class_ids(None, 0, None if ignore is None else int(ignore)),
                       [str(c) for c in classes], class_map=class_map)


def parse_truth_format(spec: str | dict[str, Any]) -> TruthFormat:
    """`--truth-format`: a YAML file, a dict of the same shape, or "task=encoding[:column], task.option=value, ..."."""
    if isinstance(spec, str) and (spec.endswith((".yaml", ".yml")) or os.path.isfile(spec)):
        import yaml

        try:
            with open(spec) as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"--truth-format: file {spec!r} not found") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--truth-format: {spec} must hold a mapping of task -> {{encoding, column, ...}}")
        spec = loaded
    if isinstance(spec, str):
        parsed: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"--truth-format: {part!r} is not task=encoding[:column] (e.g. depth=kitti-png) "
                                 "or task.option=value (e.g. depth.mask=depth_mask)")
            task, dot, option = key.strip().partition(".")
            if dot:
                parsed.setdefault(task, {})[option.strip()] = value.strip()
                continue
            encoding, _, column = value.strip().partition(":")
            parsed.setdefault(task, {}).update({"encoding": encoding.strip(), "column": column.strip() or None})
        spec = parsed
    spec = dict(spec)
    id_column = str(spec.pop("id_column", "id"))
    if not spec:
        raise ValueError("--truth-format: declares no task (e.g. depth=kitti-png)")
    columns = {}
    for task, options in spec.items():
        if isinstance(options, str):
            options = {"encoding": options}
        if not isinstance(options, dict):
            raise ValueError(f"--truth-format: {task}: expected {{encoding, column, ...}}, got {options!r}")  # noqa: TRY004 - a user's input, reported like every other format error
        columns[task] = truth_column(task, options)
    return TruthFormat(id_column, columns)


def normalise_name(name: str) -> str:
    return name.strip().lower()


def class_lookup(pred_names: list[str], truth_names: list[str], class_map: dict[str, str] | None = None,
                 column: str = "segmentation") -> np.ndarray:
    """Lookup table predicted id -> truth id of the class of the same name (-1: none).

    A predicted class the truth does not have (after `class_map`) is an error, unless it names
    the background; a prediction that shares no class with the truth is one too.
    """
    class_map = {normalise_name(k): normalise_name(v) for k, v in (class_map or {}).items()}
    index = {normalise_name(n): i for i, n in enumerate(truth_names)}
    mapping = np.full(65536, -1, dtype=np.int64)
    unknown = []
    for pred_id, name in enumerate(pred_names):
        key = class_map.get(normalise_name(name), normalise_name(name))
        if key in index:
            mapping[pred_id] = index[key]
        elif key not in BACKGROUND_NAMES:
            unknown.append(name)
    shown = ", ".join(truth_names[:25]) + (f", ... ({len(truth_names)} classes)" if len(truth_names) > 25 else "")
    if unknown:
        raise ValueError(
            f"eval: {column}: predicted classes {unknown} are not classes of the truth ({shown}); rename them in "
            "the job's segmentation.legend / classes, or map them with class_map: {predicted: truth} in a "
            "--truth-format YAML"
        )
    if not (mapping >= 0).any():
        raise ValueError(f"eval: {column}: no predicted class is a class of the truth ({shown})")
    return mapping
