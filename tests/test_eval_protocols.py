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
import torch
from PIL import Image

from vb_batch.cli import main
from vb_batch.evaluation.examples import CLASS_NAMES, example_table, scenes_of
from vb_batch.evaluation.metrics import alignment_columns
from vb_batch.evaluation.protocols import PROTOCOLS
from vb_batch.evaluation.scenes import SCENE_CLASSES
from vb_batch.evaluation.scoring import evaluate
from vb_batch.evaluation.truth import parse_truth_format
from vb_batch.io.encodings import ColumnMeta, encode_array, png_bytes, storage_type

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


# ---------------------------------------------------------------------------- ETH3D's alignment resolution, DIODE's mask


def marigold_least_square(gt, pred, valid, max_resolution):
    """Marigold ``src/util/alignment.py`` ``align_depth_least_square``, step by step: scale factor from
    both sides, ``torch.nn.Upsample(mode="nearest")`` on the (1, H, W) tensors, lstsq on the masked pixels,
    the fitted scale and shift applied to the full-resolution prediction."""
    ori_shape = pred.shape
    gt_fit, pred_fit, valid_fit = gt, pred, valid
    if max_resolution is not None:
        scale_factor = np.min(max_resolution / np.array(ori_shape[-2:]))
        if scale_factor < 1:
            downscaler = torch.nn.Upsample(scale_factor=scale_factor, mode="nearest")
            gt_fit = downscaler(torch.as_tensor(gt).unsqueeze(0)).numpy()
            pred_fit = downscaler(torch.as_tensor(pred).unsqueeze(0)).numpy()
            valid_fit = downscaler(torch.as_tensor(valid).unsqueeze(0).float()).bool().numpy()
    a = np.concatenate([pred_fit[valid_fit].reshape(-1, 1), np.ones((int(valid_fit.sum()), 1))], axis=-1)
    (scale, shift), *_ = np.linalg.lstsq(a, gt_fit[valid_fit].reshape(-1, 1), rcond=None)
    return pred * scale + shift


@pytest.mark.slow  # ~5 s: a full-size frame
def test_eth3d_fits_the_alignment_at_1024_as_marigold_on_a_2016x3024_frame():
    rng = np.random.default_rng(35)
    shape = (2016, 3024)
    gt = rng.uniform(0.5, 30.0, shape)
    gt[rng.random(shape) < 0.3] = np.nan  # ETH3D: no laser return (inf in the file, invalid)
    columns = np.arange(shape[1]) / shape[1]
    pred = (0.4 * np.nan_to_num(gt, nan=5.0) + 1.0) * (1 + 0.2 * np.sin(40 * columns)) + rng.normal(0, 0.3, shape)
    pred = np.abs(pred) + 0.01
    truth = array_truth(["eth"], "gt", [gt.astype(np.float32)])
    table = prediction_table(["eth"], "depth", [pred.astype(np.float32)], unit="relative (affine-invariant)")
    got = model_metrics(evaluate(table, truth, baselines=False, protocol="eth3d", truth_format="depth=metres:gt"),
                        "depth")
    gt64 = gt.astype(np.float32).astype(np.float64)
    pred64 = pred.astype(np.float32).astype(np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt64) & (gt64 > 1e-5) & (gt64 < np.inf)
    aligned = marigold_least_square(np.nan_to_num(gt64), pred64, valid, 1024)
    expected = ref_depth(aligned, gt64, valid, 1e-5, math.inf, "none")
    for key, value in expected.items():
        assert got[key + "_aligned"] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    # Full resolution is another number (the one vb_batch gave before): the option matters.
    full = model_metrics(evaluate(table, truth, baselines=False, protocol="eth3d", truth_format="depth=metres:gt",
                                  alignment_max_res=0), "depth")
    full_expected = ref_depth(marigold_least_square(np.nan_to_num(gt64), pred64, valid, None), gt64, valid, 1e-5,
                              math.inf, "none")
    assert full["sq_rel_aligned"] == pytest.approx(full_expected["sq_rel"], rel=1e-6)
    assert abs(full["sq_rel_aligned"] - got["sq_rel_aligned"]) > 1e-5 * got["sq_rel_aligned"]


def test_alignment_resolution_keeps_the_columns_torch_keeps():
    for shape, max_res in [((2016, 3024), 1024), ((4032, 6048), 1024), ((480, 640), 300), ((1000, 700), 512)]:
        columns = alignment_columns(shape, max_res)
        factor = np.min(max_res / np.array(shape))
        index = torch.arange(shape[1], dtype=torch.float32).expand(1, 2, -1)  # (1, H', W): what Marigold passes
        kept = torch.nn.Upsample(scale_factor=factor, mode="nearest")(index)[0, 0].numpy().astype(int)
        assert np.flatnonzero(columns).tolist() == sorted(kept.tolist()), shape
    assert alignment_columns((768, 1024), 1024) is None  # nothing to downsample
    assert PROTOCOLS["eth3d"].alignment_max_res == 1024 and PROTOCOLS["diode"].alignment_max_res is None
    assert PROTOCOLS["eth3d"].with_options(alignment_max_res=0).alignment_max_res is None  # 0: full resolution
    assert PROTOCOLS["nyuv2"].with_options(alignment_max_res=512).alignment_max_res == 512
    with pytest.raises(ValueError, match="--alignment-max-res"):
        PROTOCOLS["eth3d"].with_options(alignment_max_res=-1)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


@pytest.mark.parametrize("form", ["string", "yaml"])
def test_diode_uses_the_datasets_mask_and_scores_truth_below_the_range(tmp_path, form):
    rng = np.random.default_rng(6)
    shape = (48, 64)
    ids, preds, depths, masks, plain = [], [], [], [], []
    for i in range(3):
        gt = rng.uniform(0.6, 60.0, shape)
        near = rng.random(shape) < 0.05
        gt[near] = rng.uniform(0.1, 0.59, near.sum())  # inside the mask, below DIODE's 0.6 m
        mask = rng.random(shape) > 0.15
        gt_file = np.where(mask, gt, rng.choice([0.0, 400.0], shape))  # outside: no return or junk
        pred = 2.0 * gt + rng.normal(0, 0.5, shape) + 0.3
        pred = np.abs(pred) + 0.05
        ids.append(f"d{i}")
        preds.append(pred.astype(np.float32))
        depths.append(_npy(gt_file.astype(np.float32)[..., None]))  # DIODE stores (H, W, 1)
        masks.append(_npy(mask.astype(np.float32)))
        plain.append((pred.astype(np.float32).astype(np.float64), gt_file.astype(np.float32).astype(np.float64), mask))
    pq.write_table(prediction_table(ids, "depth", preds, unit="relative (affine-invariant)"), tmp_path / "p.parquet")
    pq.write_table(pa.table({"id": ids, "depth": pa.array(depths, pa.binary()),
                             "depth_mask": pa.array(masks, pa.binary())}), tmp_path / "t.parquet")
    if form == "string":
        truth_format = "depth=metres:depth, depth.mask=depth_mask"
    else:
        (tmp_path / "fmt.yaml").write_text("depth: {encoding: metres, column: depth, mask: depth_mask}\n")
        truth_format = str(tmp_path / "fmt.yaml")
    code = main(["eval", str(tmp_path / "p.parquet"), "--truth", str(tmp_path / "t.parquet"), "--no-baselines",
                 "--protocol", "diode", "--truth-format", truth_format, "--out", str(tmp_path / "m.parquet")])
    assert code == 0
    got = {r["metric"]: r["value"] for r in pq.read_table(tmp_path / "m.parquet").to_pylist() if r["task"] == "depth"}
    # Marigold: valid = the dataset's mask alone; least squares over it; prediction clipped to (0.6, 350).
    per_image = [ref_depth(pred, gt, mask, 0.6, 350.0, "scale-shift") for pred, gt, mask in plain]
    for key in per_image[0]:
        assert got[key + "_aligned"] == pytest.approx(np.mean([m[key] for m in per_image]), rel=1e-6, abs=1e-6), key
    # Without the mask the range test drops the near truth and keeps the junk: far from Marigold's number.
    no_mask = evaluate(str(tmp_path / "p.parquet"), str(tmp_path / "t.parquet"), baselines=False, protocol="diode",
                       truth_format="depth=metres:depth")
    assert abs(model_metrics(no_mask, "depth")["abs_rel_aligned"] - got["abs_rel_aligned"]) > 0.1 * got["abs_rel_aligned"]


def test_truth_mask_and_instances_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`mask` is a depth option"):
        parse_truth_format("segmentation=class-ids, segmentation.mask=m")
    with pytest.raises(ValueError, match="needs a Cityscapes encoding"):
        parse_truth_format({"segmentation": {"encoding": "ade20k", "instances": "inst"}})
    truth = pa.table({"id": ["a"], "depth": pa.array([_npy(np.ones((4, 4), np.float32))], pa.binary())})
    pred = prediction_table(["a"], "depth", [np.ones((4, 4), np.float32)])
    with pytest.raises(ValueError, match=r"\['valid'\]"):
        evaluate(pred, truth, truth_format="depth=metres:depth, depth.mask=valid")
    truth = truth.append_column("valid", pa.array([_npy(np.ones((3, 4), np.float32))], pa.binary()))
    with pytest.raises(ValueError, match="same pixels"):
        evaluate(pred, truth, truth_format="depth=metres:depth, depth.mask=valid")


# ---------------------------------------------------------------------------- Cityscapes iIoU and category IoU

# cityscapesScripts helpers/labels.py, by hand: (name, id, category, hasInstances, ignoreInEval).
CS_LABELS = [
    ("unlabeled", 0, "void", False, True), ("ego vehicle", 1, "void", False, True),
    ("rectification border", 2, "void", False, True), ("out of roi", 3, "void", False, True),
    ("static", 4, "void", False, True), ("dynamic", 5, "void", False, True), ("ground", 6, "void", False, True),
    ("road", 7, "flat", False, False), ("sidewalk", 8, "flat", False, False), ("parking", 9, "flat", False, True),
    ("rail track", 10, "flat", False, True), ("building", 11, "construction", False, False),
    ("wall", 12, "construction", False, False), ("fence", 13, "construction", False, False),
    ("guard rail", 14, "construction", False, True), ("bridge", 15, "construction", False, True),
    ("tunnel", 16, "construction", False, True), ("pole", 17, "object", False, False),
    ("polegroup", 18, "object", False, True), ("traffic light", 19, "object", False, False),
    ("traffic sign", 20, "object", False, False), ("vegetation", 21, "nature", False, False),
    ("terrain", 22, "nature", False, False), ("sky", 23, "sky", False, False), ("person", 24, "human", True, False),
    ("rider", 25, "human", True, False), ("car", 26, "vehicle", True, False), ("truck", 27, "vehicle", True, False),
    ("bus", 28, "vehicle", True, False), ("caravan", 29, "vehicle", True, True),
    ("trailer", 30, "vehicle", True, True), ("train", 31, "vehicle", True, False),
    ("motorcycle", 32, "vehicle", True, False), ("bicycle", 33, "vehicle", True, False),
    ("license plate", -1, "vehicle", False, True),
]
# evalPixelLevelSemanticLabeling.py args.avgClassSize.
AVG_CLASS_SIZE = {"bicycle": 4672.3249222261, "caravan": 36771.8241758242, "motorcycle": 6298.7200839748,
                  "rider": 3930.4788056518, "bus": 35732.1511111111, "train": 67583.7075812274,
                  "car": 12794.0202738185, "person": 3462.4756337644, "truck": 27855.1264367816,
                  "trailer": 16926.9763313609}


def cityscapes_scripts(preds, gts, instance_maps):
    """evalPixelLevelSemanticLabeling.py on labelIds: class / category IoU and their instance-weighted iIoU."""
    id2label = {label[1]: label for label in CS_LABELS if label[1] >= 0}
    eval_labels = sorted(id2label)
    category2labels: dict[str, list] = {}
    for label in CS_LABELS:
        category2labels.setdefault(label[2], []).append(label)
    conf = np.zeros((max(eval_labels) + 1, max(eval_labels) + 1), dtype=np.int64)
    stats = {"classes": {l[0]: {"tpw": 0.0, "fnw": 0.0} for l in CS_LABELS if l[3] and not l[4]}, "categories": {}}
    for category, labels in category2labels.items():
        ids = [l[1] for l in labels if l[1] >= 0]
        if all(l[3] for l in labels if l[1] >= 0):
            stats["categories"][category] = {"tpw": 0.0, "fnw": 0.0, "ids": ids}
    for pred, gt, inst in zip(preds, gts, instance_maps):
        np.add.at(conf, (gt.ravel(), pred.ravel()), 1)
        category_masks = {c: np.isin(pred, s["ids"]) for c, s in stats["categories"].items()}
        for inst_id in np.unique(inst[inst > 1000]):
            label = id2label[int(inst_id / 1000)]
            if label[4]:
                continue
            mask = inst == inst_id
            size = np.count_nonzero(mask)
            tp = np.count_nonzero(pred[mask] == label[1])
            weight = AVG_CLASS_SIZE[label[0]] / float(size)
            stats["classes"][label[0]]["tpw"] += tp * weight
            stats["classes"][label[0]]["fnw"] += (size - tp) * weight
            if label[2] in stats["categories"]:
                cat_tp = np.count_nonzero(mask & category_masks[label[2]])
                stats["categories"][label[2]]["tpw"] += cat_tp * weight
                stats["categories"][label[2]]["fnw"] += (size - cat_tp) * weight

    def ratio(tp, fp, fn):
        return float("nan") if tp + fp + fn == 0 else float(tp) / (tp + fp + fn)

    out = {}
    for lid in eval_labels:
        name, _, category, _, ignored = id2label[lid]
        if ignored:
            continue
        not_ignored = [l for l in eval_labels if not id2label[l][4] and l != lid]
        tp, fp = conf[lid, lid], conf[not_ignored, lid].sum()
        out[f"iou/{name}"] = ratio(tp, fp, conf[lid, :].sum() - tp)
        if name in stats["classes"]:
            s = stats["classes"][name]
            out[f"iiou/{name}"] = ratio(s["tpw"], fp, s["fnw"])
    for category, labels in category2labels.items():
        ids = [l[1] for l in labels if not l[4] and l[1] in eval_labels]
        if not ids:
            continue
        outside = [l for l in eval_labels if not id2label[l][4] and id2label[l][2] != category]
        tp = conf[ids, :][:, ids].sum()
        fp = conf[outside, :][:, ids].sum()
        out[f"category_iou/{category}"] = ratio(tp, fp, conf[ids, :].sum() - tp)
        if category in stats["categories"]:
            s = stats["categories"][category]
            out[f"category_iiou/{category}"] = ratio(s["tpw"], fp, s["fnw"])
    for prefix, mean in (("iou/", "miou"), ("iiou/", "iiou"), ("category_iou/", "category_miou"),
                         ("category_iiou/", "category_iiou")):
        scores = [v for k, v in out.items() if k.startswith(prefix) and not math.isnan(v)]
        out[mean] = sum(scores) / len(scores) if scores else float("nan")
    return out


def _cityscapes_case():
    """Two 40 x 60 frames: stuff, person / rider / car / truck / bicycle instances, a car crowd, a caravan
    (ignored), ego vehicle rows; predictions that confuse within and across categories."""
    rng = np.random.default_rng(35)
    labels, instances, preds = [], [], []
    for frame in range(2):
        lab = np.full((40, 60), 7, np.uint8)  # road
        lab[:10] = 23  # sky
        lab[10:20] = 11 if frame == 0 else 21  # building / vegetation
        lab[20:24, :4] = 22  # terrain
        inst = lab.astype(np.uint16).copy()
        objects = [(24000, (15, 30, 5, 10)), (24001, (22, 26, 12, 14)), (25000, (20, 30, 20, 25)),
                   (26000, (25, 35, 30, 45)), (26001, (30, 34, 47, 51)), (29000, (20, 25, 52, 58))]
        if frame == 1:
            objects += [(27000, (12, 28, 34, 56)), (33000, (30, 37, 8, 16)), (24002, (26, 38, 17, 19))]
        for inst_id, (r0, r1, c0, c1) in objects:
            lab[r0:r1, c0:c1] = inst_id // 1000
            inst[r0:r1, c0:c1] = inst_id
        lab[35:38, 30:41] = 26  # a crowd of cars: labelled car, no instance id
        inst[35:38, 30:41] = 26
        lab[38:] = 1  # ego vehicle
        inst[38:] = 1
        pred = lab.copy()
        pred[pred == 29] = 26  # caravan (ignored truth) called car
        pred[pred == 1] = 7  # ego vehicle called road (ignored truth)
        person = (lab == 24) & (rng.random(lab.shape) < 0.4)
        pred[person] = rng.choice([25, 7], person.sum())  # a rider (same category) or road
        rider = (lab == 25) & (rng.random(lab.shape) < 0.3)
        pred[rider] = 24
        car = (lab == 26) & (rng.random(lab.shape) < 0.3)
        pred[car] = rng.choice([27, 7, 0], car.sum())  # a truck (same category), road, unlabelled
        pred[5:8, 40:50] = 28  # a bus in the sky: no bus instance anywhere, so its iIoU is 0
        pred[12:14, 0:6] = 0  # unlabelled
        labels.append(lab)
        instances.append(inst)
        preds.append(pred)
    return labels, instances, preds


def test_cityscapes_iiou_and_category_iou_match_cityscapes_scripts():
    labels, instances, preds = _cityscapes_case()
    expected = cityscapes_scripts(preds, labels, instances)
    train_names = [l[0] for l in CS_LABELS if l[1] >= 0 and not l[4]]
    rng = np.random.default_rng(1)
    legend_names = list(rng.permutation(train_names))  # the job lists the classes in its own order
    legend = [(str(n), (i, 2 * i, 3 * i)) for i, n in enumerate(legend_names)]
    to_job = np.full(256, 255, np.uint8)  # labelIds the job has no class for: unlabelled
    for label_name, label_id, *_ in CS_LABELS:
        if label_name in legend_names:
            to_job[label_id] = legend_names.index(label_name)
    ids = ["f0", "f1"]
    truth = pa.table({"id": ids,
                      "label": pa.array([png_bytes(Image.fromarray(l)) for l in labels], pa.binary()),
                      "instance": pa.array([png_bytes(Image.fromarray(i)) for i in instances], pa.binary())})
    table = prediction_table(ids, "segmentation", [to_job[p] for p in preds], unit="class id", legend=legend)
    metrics = evaluate(table, truth, protocol="cityscapes",
                       truth_format="segmentation=cityscapes-labelids:label, segmentation.instances=instance")
    got = model_metrics(metrics, "segmentation")
    assert expected.keys() <= got.keys()
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    # The case exercises what the weighting changes: small instances count, a class never present scores 0.
    assert abs(got["iiou/person"] - got["iou/person"]) > 0.01
    assert got["iiou/bus"] == 0.0 and math.isnan(got["iiou/train"])
    assert got["category_iou/human"] > got["iou/person"]  # rider called person is right at category level
    # Without instance ids there is no iIoU, and the category IoU stays.
    plain = model_metrics(evaluate(table, truth, protocol="cityscapes", baselines=False,
                                   truth_format="segmentation=cityscapes-labelids:label"), "segmentation")
    assert "iiou" not in plain and plain["category_miou"] == pytest.approx(expected["category_miou"], rel=1e-9)
