"""Every protocol against an independent implementation of the published definitions, and `vb-batch eval`
on KITTI-, NYU- and Cityscapes-encoded tables.

The reference functions below are written from Marigold's ``src/util/metric.py`` /
``script/depth/eval.py`` / dataset classes, DSINE's ``compute_normal_metrics`` and cityscapesScripts'
per-class IoU, in their own masked-sum style; they share no code with vb_batch.metrics.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vb_batch.cli import main
from vb_batch.evaluate import evaluate
from vb_batch.examples import CLASS_NAMES, example_table, scenes_of
from vb_batch.io.encodings import ColumnMeta, encode_array, storage_type
from vb_batch.protocols import PROTOCOLS
from vb_batch.scenes import SCENE_CLASSES

# ---------------------------------------------------------------------------- references


def ref_depth(pred, gt, valid, min_d, max_d, alignment):
    """Marigold's eval.py for one image: align, clip, then the metric.py formulas as masked sums."""
    pred = pred.astype(np.float64).copy()
    far = ~np.isfinite(pred)  # painted as far: not fitted, then counted as max_depth
    fit = valid & ~far
    if alignment == "scale-shift":
        a = np.stack([pred[fit], np.ones(fit.sum())], axis=1)
        (s, b), *_ = np.linalg.lstsq(a, gt[fit], rcond=None)
        pred = pred * s + b
    elif alignment == "scale-shift-disparity":
        ok = fit & (pred > 0)
        a = np.stack([pred[ok], np.ones(ok.sum())], axis=1)
        (s, b), *_ = np.linalg.lstsq(a, 1.0 / gt[ok], rcond=None)
        pred = 1.0 / np.clip(pred * s + b, 1e-3, None)
    elif alignment == "scale":
        s = (pred[fit] * gt[fit]).sum() / (pred[fit] ** 2).sum()
        pred = pred * s
    pred[far] = max_d if math.isfinite(max_d) else 1e4
    pred = np.clip(np.clip(pred, min_d, max_d), 1e-6, None)
    gt = np.where(valid, gt, 1.0)
    n = valid.sum()

    def masked_mean(x):
        return np.where(valid, x, 0.0).sum() / n

    log_d = np.log(pred) - np.log(gt)
    ratio = np.maximum(pred / gt, gt / pred)
    return {
        "abs_rel": masked_mean(np.abs(pred - gt) / gt), "sq_rel": masked_mean(np.abs(pred - gt) ** 2 / gt),
        "rmse": np.sqrt(masked_mean((pred - gt) ** 2)), "rmse_log": np.sqrt(masked_mean(log_d**2)),
        "log10": masked_mean(np.abs(np.log10(pred) - np.log10(gt))),
        "delta1": masked_mean(ratio < 1.25), "delta2": masked_mean(ratio < 1.25**2),
        "delta3": masked_mean(ratio < 1.25**3), "i_rmse": np.sqrt(masked_mean((1 / pred - 1 / gt) ** 2)),
        "silog": np.sqrt(masked_mean(log_d**2) - (np.where(valid, log_d, 0).sum() / n) ** 2) * 100,
    }


def ref_crop(name, shape):
    h, w = shape
    m = np.zeros((h, w), bool)
    if name == "nyuv2":  # Marigold eigen_valid_mask [45:471, 41:601] on 480 x 640, in proportion elsewhere
        m[45 * h // 480 : 471 * h // 480, 41 * w // 640 : 601 * w // 640] = True
    elif name == "kitti-eigen":
        m[int(0.3324324 * h) : int(0.91351351 * h), int(0.0359477 * w) : int(0.96405229 * w)] = True
    elif name == "kitti-garg":
        m[int(0.40810811 * h) : int(0.99189189 * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
    else:
        m[:] = True
    return m


RANGES = {"generic": (1e-3, 80.0), "nyuv2": (1e-3, 10.0), "kitti-eigen": (1e-5, 80.0), "kitti-garg": (1e-5, 80.0),
          "eth3d": (1e-5, math.inf), "scannet": (1e-3, 10.0), "diode": (0.6, 350.0),
          "cityscapes": (1e-3, 80.0), "ade20k": (1e-3, 80.0)}
SHAPES = {"nyuv2": (480, 640), "kitti-eigen": (375, 1242), "kitti-garg": (375, 1242)}
PER_IMAGE_NORMALS = {name: name != "generic" for name in PROTOCOLS}


def ref_normals(pred_list, gt_list, per_image):
    """DSINE: acos(clip(cosine similarity)) in degrees; metrics pooled, or their per-image mean (Marigold)."""
    def errors(p, g):
        ok = np.isfinite(g).all(-1) & (np.abs(g).sum(-1) > 0)
        p, g = p[ok], g[ok]
        cos = (p * g).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(g, axis=-1), 1e-300)
        return np.degrees(np.arccos(np.clip(cos, -1, 1)))

    def metrics(e):
        out = {"mean_deg": e.mean(), "median_deg": np.median(e), "rmse_deg": np.sqrt((e * e).sum() / e.size)}
        for t in (5, 7.5, 11.25, 22.5, 30):
            out[f"within_{t:g}_pct"] = 100.0 * (e < t).sum() / e.size
        return out

    all_errors = [errors(p, g) for p, g in zip(pred_list, gt_list)]
    if per_image:
        per = [metrics(e) for e in all_errors]
        return {k: np.mean([m[k] for m in per]) for k in per[0]}
    return metrics(np.concatenate(all_errors))


def ref_miou(pred_list, gt_list, k, ignore=255):
    """cityscapesScripts: per class TP / (TP + FP + FN) over non-ignored pixels; mean over classes seen."""
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    for p, g in zip(pred_list, gt_list):
        keep = g != ignore
        p, g = p[keep], g[keep]
        for c in range(k):
            tp[c] += np.sum((p == c) & (g == c))
            fp[c] += np.sum((p == c) & (g != c))
            fn[c] += np.sum((p != c) & (g == c))
    seen = (tp + fp + fn) > 0
    return float(np.mean(tp[seen] / (tp + fp + fn)[seen])), float(tp.sum() / sum((g != ignore).sum() for g in gt_list))


# ---------------------------------------------------------------------------- tables


def prediction_table(ids, task, values, unit="m", frame=None, legend=None, confidences=None) -> pa.Table:
    kind = {"depth": "depth", "normals": "normals", "segmentation": "classes"}[task]
    meta = ColumnMeta(kind=kind, encoding="array", unit=unit, task=task, frame=frame, legend=legend,
                      unlabelled=255 if legend else None)
    columns = {"id": pa.array(ids, pa.string()),
               task: pa.array([encode_array(np.asarray(v)) for v in values], storage_type("array"))}
    table = pa.table(columns)
    table = table.set_column(1, pa.field(task, storage_type("array"), metadata=meta.to_metadata()), table.column(1))
    if confidences is not None:
        table = table.append_column(f"{task}_confidence", pa.array(confidences, pa.float32()))
    return table


def array_truth(ids, column, values) -> pa.Table:
    return pa.table({"id": ids, column: pa.array([encode_array(np.asarray(v)) for v in values], storage_type("array"))})


def model_metrics(metrics: pa.Table, task: str) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in metrics.to_pylist() if r["method"] == "model" and r["task"] == task}


# ---------------------------------------------------------------------------- every protocol


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("seed", [0, 1])
def test_depth_matches_marigold_definitions(protocol, seed):
    rng = np.random.default_rng(seed)
    shape = SHAPES.get(protocol, (24, 32))
    ids, preds, truths = [], [], []
    for i in range(3):
        gt = rng.uniform(0.3, 120.0, shape)
        gt[rng.random(shape) < 0.2] = np.nan  # no measurement
        gt[rng.random(shape) < 0.05] = 0.0
        pred = gt * rng.uniform(0.7, 1.4, shape) + rng.normal(0, 0.3, shape)
        pred = np.where(np.isfinite(pred), np.abs(pred) + 0.05, rng.uniform(1, 50, shape))
        pred[rng.random(shape) < 0.02] = np.inf  # painted as far
        ids.append(f"r{i}")
        preds.append(pred.astype(np.float32))
        truths.append(gt.astype(np.float32))
    protocol_def = PROTOCOLS[protocol]
    metrics = evaluate(prediction_table(ids, "depth", preds), array_truth(ids, "gt", truths), baselines=False,
                       protocol=protocol, truth_format="depth=metres:gt")
    got = model_metrics(metrics, "depth")
    min_d, max_d = RANGES[protocol]
    per_image = {"": [], "_aligned": []}
    for pred, gt in zip(preds, truths):
        pred, gt = pred.astype(np.float64), gt.astype(np.float64)
        if protocol.startswith("kitti") and shape == (375, 1242):  # KITTI benchmark crop: bottom 352, centred 1216
            top, left = 375 - 352, (1242 - 1216) // 2
            pred, gt = pred[top : top + 352, left : left + 1216], gt[top : top + 352, left : left + 1216]
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(gt) & (gt > min_d) & (gt < max_d) & ref_crop(protocol, gt.shape)
        per_image[""].append(ref_depth(pred, gt, valid, min_d, max_d, "none"))
        per_image["_aligned"].append(ref_depth(pred, gt, valid, min_d, max_d, protocol_def.alignment))
    for suffix, images in per_image.items():
        for key in images[0]:
            expected = np.mean([m[key] for m in images])
            assert got[key + suffix] == pytest.approx(expected, rel=1e-6, abs=1e-6), (key + suffix, protocol)


@pytest.mark.parametrize("alignment", ["scale", "scale-shift-disparity"])
def test_depth_alignments_in_depth_and_disparity_space(alignment):
    rng = np.random.default_rng(3)
    gt = rng.uniform(1.0, 9.0, (20, 30))
    pred = 1.0 / gt * 0.3 + 0.02 if alignment == "scale-shift-disparity" else gt * 2.5
    pred = pred * rng.uniform(0.95, 1.05, gt.shape)
    metrics = evaluate(prediction_table(["a"], "depth", [pred], unit="relative (affine-invariant)"),
                       array_truth(["a"], "gt", [gt]), baselines=False, protocol="nyuv2", alignment=alignment,
                       truth_format="depth=metres:gt")
    got = model_metrics(metrics, "depth")
    expected = ref_depth(pred, gt, ref_crop("nyuv2", gt.shape) & (gt < 10), 1e-3, 10.0, alignment)
    assert "abs_rel" not in got  # a relative prediction has only aligned numbers
    for key, value in expected.items():
        assert got[key + "_aligned"] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert got["abs_rel_aligned"] < 0.05  # the right space makes an affine-invariant prediction good


def test_pooled_depth_averaging_sums_pixels_of_all_images():
    rng = np.random.default_rng(5)
    preds = [rng.uniform(1, 5, (8, 8)), rng.uniform(1, 5, (16, 16))]
    truths = [rng.uniform(1, 5, (8, 8)), rng.uniform(1, 5, (16, 16))]
    metrics = evaluate(prediction_table(["a", "b"], "depth", preds), array_truth(["a", "b"], "gt", truths),
                       baselines=False, averaging="pooled", alignment="none", truth_format="depth=metres:gt")
    got = model_metrics(metrics, "depth")
    p, t = np.concatenate([x.ravel() for x in preds]), np.concatenate([x.ravel() for x in truths])
    expected = ref_depth(p, t, np.ones(p.shape, bool), 1e-3, 80.0, "none")
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_normals_match_dsine_definitions(protocol):
    rng = np.random.default_rng(7)
    ids, preds, truths_cv = [], [], []
    for i in range(3):
        gt = rng.normal(size=(12, 16, 3))
        gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
        gt[rng.random((12, 16)) < 0.2] = np.nan
        pred = gt + rng.normal(0, 0.3, gt.shape)
        pred[rng.random((12, 16)) < 0.05] = np.nan  # no direction: 90 degrees
        ids.append(f"r{i}")
        preds.append(pred)
        truths_cv.append(gt)
    # Predictions in OpenGL, truth in OpenCV: the same surfaces once converted.
    preds_gl = [p * np.array([1, -1, -1]) for p in preds]
    metrics = evaluate(prediction_table(ids, "normals", preds_gl, unit="unit vector", frame="opengl"),
                       array_truth(ids, "n", truths_cv), baselines=False, protocol=protocol,
                       truth_format={"normals": {"encoding": "normals-array", "column": "n", "frame": "opencv"}})
    got = model_metrics(metrics, "normals")
    expected = ref_normals([np.nan_to_num(p) for p in preds], truths_cv, PER_IMAGE_NORMALS[protocol])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_segmentation_matches_cityscapes_scripts(protocol):
    rng = np.random.default_rng(11)
    names = ["road", "car", "sky", "person"]
    legend = [(n, (10 * i, 20, 30)) for i, n in enumerate(reversed(names))]  # job order differs from truth's
    truths = [rng.integers(0, 4, (10, 12)) for _ in range(3)]
    for t in truths:
        t[rng.random(t.shape) < 0.15] = 255
    preds_truth_ids = [np.where(rng.random(t.shape) < 0.3, rng.integers(0, 5, t.shape), t) for t in truths]
    preds_truth_ids = [np.where(p == 255, 4, p) for p in preds_truth_ids]  # 4: unlabelled in the prediction
    to_job = np.array([3, 2, 1, 0, 255])
    preds = [to_job[np.clip(p, 0, 4)].astype(np.uint8) for p in preds_truth_ids]
    truth = pa.table({"id": ["a", "b", "c"],
                      "label": [encode_array(t.astype(np.uint8)) for t in truths]})
    fmt = {"segmentation": {"encoding": "class-ids", "column": "label", "classes": names}}
    metrics = evaluate(prediction_table(["a", "b", "c"], "segmentation", preds, unit="class id", legend=legend),
                       truth, baselines=False, protocol=protocol, truth_format=fmt)
    got = model_metrics(metrics, "segmentation")
    miou, accuracy = ref_miou([np.where(p > 3, 255, p) for p in preds_truth_ids], truths, 4)
    assert got["miou"] == pytest.approx(miou, abs=1e-9)
    assert got["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-9)


# ---------------------------------------------------------------------------- vb-batch eval on benchmark encodings


def _png(cell: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(cell)))


def _run_eval(tmp_path, pred, truth, *args) -> dict[str, float]:
    pq.write_table(pred, tmp_path / "pred.parquet")
    pq.write_table(truth, tmp_path / "truth.parquet")
    code = main(["eval", str(tmp_path / "pred.parquet"), "--truth", str(tmp_path / "truth.parquet"),
                 "--out", str(tmp_path / "m.parquet"), "--no-baselines", *args])
    assert code == 0
    return {(r["task"], r["metric"]): r["value"] for r in pq.read_table(tmp_path / "m.parquet").to_pylist()}


def test_eval_on_a_kitti_encoded_table(tmp_path):
    truth = example_table("kitti", count=3)
    rng = np.random.default_rng(0)
    scenes = scenes_of(3)
    preds = [np.where(np.isfinite(s.depth_m), s.depth_m * rng.uniform(0.8, 1.25, s.depth_m.shape), np.inf)
             for s in scenes]
    got = _run_eval(tmp_path, prediction_table(truth.column("id").to_pylist(), "depth", preds), truth,
                    "--truth-format", "depth=kitti-png", "--protocol", "kitti-eigen")
    per_image = []
    for pred, cell in zip(preds, truth.column("depth").to_pylist()):
        stored = _png(cell)
        gt = stored / 256.0  # KITTI devkit: depth = png / 256, 0 = no measurement
        valid = (stored > 0) & (gt > 1e-5) & (gt < 80) & ref_crop("kitti-eigen", gt.shape)
        per_image.append(ref_depth(pred.astype(np.float64), gt, valid, 1e-5, 80.0, "none"))
    for key in ("abs_rel", "rmse", "delta1", "silog", "sq_rel"):
        assert got["depth", key] == pytest.approx(np.mean([m[key] for m in per_image]), rel=1e-6, abs=1e-7), key
    assert 0.05 < got["depth", "abs_rel"] < 0.2


def test_eval_on_an_nyu_encoded_table_and_the_eigen_crop_matters(tmp_path):
    truth = example_table("nyuv2", count=3)
    scenes = scenes_of(3)
    preds = [np.where(np.isfinite(s.depth_m), s.depth_m * 1.05, np.inf) for s in scenes]
    pred_table = prediction_table(truth.column("id").to_pylist(), "depth", preds)
    got = _run_eval(tmp_path, pred_table, truth, "--truth-format", "depth=nyu-png", "--protocol", "nyuv2")
    per_image = []
    for pred, cell in zip(preds, truth.column("depth").to_pylist()):
        stored = _png(cell)
        gt = stored / 1000.0
        valid = (stored > 0) & (gt > 1e-3) & (gt < 10) & ref_crop("nyuv2", gt.shape)
        per_image.append(ref_depth(pred.astype(np.float64), gt, valid, 1e-3, 10.0, "none"))
    assert got["depth", "abs_rel"] == pytest.approx(np.mean([m["abs_rel"] for m in per_image]), rel=1e-6)
    assert got["depth", "abs_rel"] == pytest.approx(0.05, abs=0.002)  # 5% everywhere the crop keeps
    generic = _run_eval(tmp_path, pred_table, truth, "--truth-format", "depth=nyu-png")
    assert generic["depth", "abs_rel"] > 2 * got["depth", "abs_rel"]  # the wrong border counts without the crop


def test_eval_on_cityscapes_label_ids_matches_by_name(tmp_path):
    truth = example_table("cityscapes", count=3)
    scenes = scenes_of(3)
    names = [CLASS_NAMES["cityscapes"][n] for n in SCENE_CLASSES]  # road, building, car, person, pole, sky
    legend = [(n, (i * 40, 255 - i * 40, 90)) for i, n in enumerate(reversed(names))]
    to_job = np.array([len(names) - 1 - i for i in range(len(names))])
    rng = np.random.default_rng(2)
    wrong = [rng.random(s.class_ids.shape) < 0.1 for s in scenes]
    preds = [np.where(w, to_job[0], to_job[s.class_ids]).astype(np.uint8) for s, w in zip(scenes, wrong)]
    got = _run_eval(tmp_path, prediction_table(truth.column("id").to_pylist(), "segmentation", preds,
                                               unit="class id", legend=legend), truth,
                    "--truth-format", "segmentation=cityscapes-labelids", "--protocol", "cityscapes")
    # Independently: labelIds -> trainIds by the official table; everything else ignored.
    label_to_train = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                      26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    train_name = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                  "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                  "bicycle"]
    gts = []
    for cell in truth.column("segmentation").to_pylist():
        ids = _png(cell)
        gts.append(np.vectorize(lambda v: label_to_train.get(int(v), 255))(ids))
    job_names = [n for n, _ in legend]
    preds_train = [np.array([train_name.index(job_names[v]) for v in p.ravel()]).reshape(p.shape) for p in preds]
    miou, accuracy = ref_miou(preds_train, gts, 19)
    assert got["segmentation", "miou"] == pytest.approx(miou, abs=1e-9)
    assert got["segmentation", "pixel_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert 0.6 < miou < 1.0


def test_unknown_encoding_and_unknown_class_name_are_clear_errors(tmp_path, capsys):
    truth = example_table("cityscapes", count=1)
    ids = truth.column("id").to_pylist()
    pred = prediction_table(ids, "segmentation", [np.zeros((64, 96), np.uint8)], unit="class id",
                            legend=[("road", (1, 2, 3)), ("street", (4, 5, 6))])
    pq.write_table(pred, tmp_path / "p.parquet")
    pq.write_table(truth, tmp_path / "t.parquet")
    args = ["eval", str(tmp_path / "p.parquet"), "--truth", str(tmp_path / "t.parquet")]
    assert main(args + ["--truth-format", "segmentation=cityscapes-labelid"]) == 2
    err = capsys.readouterr().err
    assert "unknown encoding 'cityscapes-labelid'" in err and "cityscapes-labelids" in err
    assert main(args + ["--truth-format", "segmentation=cityscapes-labelids"]) == 2
    err = capsys.readouterr().err
    assert "['street']" in err and "class_map" in err and "road, sidewalk" in err
    yaml_path = tmp_path / "fmt.yaml"
    yaml_path.write_text("segmentation: {encoding: cityscapes-labelids, class_map: {street: sidewalk}}\n")
    assert main(args + ["--truth-format", str(yaml_path), "--out", str(tmp_path / "m.parquet")]) == 0
