"""Ground-truth adapters read each benchmark's own encoding, and say clearly what they cannot read."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from PIL import Image

from vb_batch.evaluation.examples import CLASS_NAMES, EXAMPLES, example_table, scenes_of
from vb_batch.evaluation.scenes import SCENE_CLASSES
from vb_batch.evaluation.scoring import evaluate
from vb_batch.evaluation.truth import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    class_lookup,
    parse_truth_format,
    truth_column,
)
from vb_batch.io.encodings import encode_array, png_bytes

# cityscapesScripts helpers/labels.py, copied by hand as (labelId, trainId) for every labelId 0..33.
OFFICIAL_TRAIN_IDS = {0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2,
                      12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                      24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18}


def decode(spec, cell):
    fmt = parse_truth_format(spec)
    return next(iter(fmt.columns.values())).decode(cell)


def test_cityscapes_label_ids_become_the_official_train_ids():
    label_ids = np.array([list(OFFICIAL_TRAIN_IDS)], dtype=np.uint8)
    train_ids = decode("segmentation=cityscapes-labelids", png_bytes(Image.fromarray(label_ids)))
    assert train_ids.ravel().tolist() == list(OFFICIAL_TRAIN_IDS.values())
    assert CITYSCAPES_CLASSES[:3] == ("road", "sidewalk", "building") and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert decode("segmentation=cityscapes-trainids", png_bytes(Image.fromarray(np.array([[0, 18, 255]], np.uint8)))
                  ).tolist() == [[0, 18, 255]]


def test_ade20k_drops_other_and_shifts_ids():
    ids = decode("segmentation=ade20k", png_bytes(Image.fromarray(np.array([[0, 1, 150, 120]], np.uint8))))
    assert ids.tolist() == [[255, 0, 149, 119]]
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[119] == "ball" and ADE20K_CLASSES[149] == "flag"


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint16, (4, 5)))
def test_depth_pngs_decode_as_kitti_and_nyu_define_them(stored):
    cell = png_bytes(Image.fromarray(stored))
    for spec, scale in (("depth=kitti-png", 256.0), ("depth=nyu-png", 1000.0)):
        depth = decode(spec, cell)
        np.testing.assert_array_equal(np.isnan(depth), stored == 0)
        np.testing.assert_allclose(depth[stored > 0], stored[stored > 0] / scale, rtol=1e-12)


def test_metres_cells_of_every_shape():
    depth = np.array([[1.5, 0.0], [np.inf, 2.0]], np.float32)
    buf = io.BytesIO()
    np.save(buf, depth)
    for cell in (buf.getvalue(), encode_array(depth), depth.tolist()):
        out = decode("depth=metres", cell)
        assert out[0, 0] == 1.5 and out[1, 1] == 2.0 and np.isnan(out[0, 1]) and np.isnan(out[1, 0])


def test_dsine_normals_png_reads_back_the_scene_normals_in_opengl():
    table = example_table("dsine-normals", count=1)
    scene = scenes_of(1)[0]
    normals = decode(EXAMPLES["dsine-normals"], table.column("normals")[0].as_py())
    sky = ~np.isfinite(scene.normals).all(-1)
    assert np.isnan(normals[sky]).all()
    cos = np.sum(normals[~sky] * scene.normals[~sky], -1) / np.linalg.norm(normals[~sky], axis=-1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 0.5
    # DSINE's convention is OpenGL with x mirrored: a surface facing right (+x) is stored with red low.
    rgb = np.asarray(Image.open(io.BytesIO(table.column("normals")[0].as_py())))
    facing_right = (scene.normals[..., 0] > 0.9) & ~sky
    if facing_right.any():
        assert rgb[facing_right][:, 0].max() < 40


def test_yaml_format_with_classes_ignore_and_id_column(tmp_path):
    path = tmp_path / "truth.yaml"
    path.write_text("id_column: name\nsegmentation: {encoding: class-ids, column: mask, classes: [a, b], ignore: 9}\n"
                    "normals: {encoding: normals-png, frame: opencv}\n")
    fmt = parse_truth_format(str(path))
    assert fmt.id_column == "name" and fmt.columns["normals"].column == "normals"
    ids = fmt.columns["segmentation"].decode(np.array([[0, 1, 9, 7]]))
    assert ids.tolist() == [[0, 1, 255, 7]]  # 7 is no class of [a, b]: scored as never predicted right
    n = fmt.columns["normals"].decode(png_bytes(Image.fromarray(np.array([[[128, 255, 128]]], np.uint8))))
    np.testing.assert_allclose(n[0, 0], [0.0039, -1.0, -0.0039], atol=1e-3)  # +y in OpenCV axes points down: -y in OpenGL


@pytest.mark.parametrize("spec, message", [
    ("depth=kiti-png", "unknown encoding 'kiti-png' for depth; known for depth: kitti-png, nyu-png, metres"),
    ("depht=kitti-png", "unknown task 'depht'"),
    ("depth=ade20k", "encoding 'ade20k' is for segmentation, not depth"),
    ("segmentation=class-ids", "needs `classes"),
    ("depth", "is not task=encoding"),
    ({"normals": {"encoding": "normals-png", "frame": "directx"}}, "unknown frame 'directx'"),
    ({"depth": {"encoding": "metres", "colum": "d"}}, "unknown keys ['colum']"),
])
def test_bad_formats_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=None) as info:
        parse_truth_format(spec)
    assert message in str(info.value)


def test_class_names_match_by_name_with_map_and_background():
    truth = ["road", "car", "sky"]
    mapping = class_lookup(["Sky ", "anything else", "road", "auto"], truth, {"auto": "car"})
    assert mapping[:4].tolist() == [2, -1, 0, 1]
    with pytest.raises(ValueError, match=r"predicted classes \['boat'\] are not classes of the truth \(road, car, sky\)"):
        class_lookup(["road", "boat"], truth)


def test_missing_truth_column_and_unreadable_cell_name_the_column_and_row():
    from tests.test_eval_protocols import prediction_table

    ids = ["a", "b"]
    pred = prediction_table(ids, "depth", [np.ones((4, 4)), np.ones((4, 4))])
    truth = pa.table({"id": ids, "depth": [png_bytes(Image.fromarray(np.ones((4, 4), np.uint16))), b"not a png"]})
    with pytest.raises(ValueError, match=r"truth columns \['gt'\].*not in the truth table"):
        evaluate(pred, truth, truth_format="depth=kitti-png:gt")
    with pytest.raises(ValueError, match=r"truth row 'b', column 'depth': cannot read it as kitti-png"):
        evaluate(pred, truth, truth_format="depth=kitti-png")


def test_every_example_is_readable_by_its_format():
    for kind, spec in EXAMPLES.items():
        table = example_table(kind, count=1, size=(16, 24))
        column = next(iter(parse_truth_format(spec).columns.values()))
        values = column.decode(table.column(column.column)[0].as_py())
        assert values.shape[:2] == (16, 24), kind
    assert set(CLASS_NAMES["cityscapes"]) == set(SCENE_CLASSES)
    assert set(CLASS_NAMES["cityscapes"].values()) <= set(CITYSCAPES_CLASSES)
    assert set(CLASS_NAMES["ade20k"].values()) <= set(ADE20K_CLASSES)
    with pytest.raises(ValueError, match="unknown example"):
        example_table("coco")
    assert truth_column("depth", {"encoding": "metres"}).column == "depth"
