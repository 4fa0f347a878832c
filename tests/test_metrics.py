"""Metrics against cases computed by hand, and `vb-batch eval` on tables whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vb_batch.cli import main
from vb_batch.evaluation import scenes
from vb_batch.evaluation.metrics import (
    DepthAccumulator,
    NormalsAccumulator,
    SegmentationAccumulator,
)
from vb_batch.evaluation.scoring import evaluate, metrics_json
from vb_batch.io.encodings import ColumnMeta, encode_map, storage_type


def test_depth_by_hand():
    acc = DepthAccumulator()
    acc.add(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 1.0], [3.0, 8.0]]))
    out = acc.result()
    assert out["abs_rel"] == pytest.approx((0 + 1 + 0 + 0.5) / 4)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 1 + 0 + 16) / 4))
    assert out["delta1"] == pytest.approx(0.5)  # ratios 1, 2, 1, 2


def test_depth_far_prediction_is_an_error_and_far_truth_is_skipped():
    acc = DepthAccumulator(max_depth=10.0)
    acc.add(np.array([np.inf, 2.0, 5.0]), np.array([2.0, 2.0, np.inf]))
    out = acc.result()
    assert out["abs_rel"] == pytest.approx((8 / 2 + 0) / 2)  # inf counts as max_depth, truth inf is not scored
    assert out["delta1"] == pytest.approx(0.5)


def test_depth_is_averaged_per_image_and_aligned_by_scale_and_shift():
    truth = np.array([1.0, 2.0, 4.0, 8.0])
    acc = DepthAccumulator()
    acc.add(0.5 * truth - 0.25, truth)  # affine in the truth: perfect once aligned
    acc.add(truth, truth)
    out = acc.result()
    assert out["abs_rel_aligned"] == pytest.approx(0.0, abs=1e-9)
    assert out["delta1_aligned"] == 1.0
    assert out["delta1"] == pytest.approx((0.0 + 1.0) / 2)  # image 1: every ratio beyond 1.25 (0.25/1 ... )
    relative = DepthAccumulator(metric=False)
    relative.add(truth * 3, truth)
    # A relative prediction has only aligned numbers (the full Marigold set of them).
    assert {"abs_rel_aligned", "rmse_aligned", "delta1_aligned", "silog_aligned"} <= set(relative.result())
    assert not any(not key.endswith("_aligned") for key in relative.result())


def test_normals_by_hand():
    truth = np.array([[0.0, 0.0, 1.0]] * 5)
    tilt = np.radians([0.0, 10.0, 20.0, 45.0])
    pred = np.stack([np.sin(tilt), np.zeros(4), np.cos(tilt)], axis=1)
    pred = np.vstack([pred, [[np.nan, np.nan, np.nan]]])  # no direction: 90 degrees
    acc = NormalsAccumulator()
    acc.add(pred * 3.0, truth)  # length does not matter
    acc.add(np.array([[1.0, 0, 0]]), np.array([[np.nan, np.nan, np.nan]]))  # truth missing: skipped
    out = acc.result()
    assert out["mean_deg"] == pytest.approx((0 + 10 + 20 + 45 + 90) / 5, abs=1e-6)
    assert out["median_deg"] == pytest.approx(20.0, abs=0.01)
    assert out["within_11.25_pct"] == pytest.approx(40.0)
    assert out["within_22.5_pct"] == pytest.approx(60.0)
    assert out["within_30_pct"] == pytest.approx(60.0)


def test_segmentation_by_hand():
    acc = SegmentationAccumulator(["a", "b", "c"])
    truth = np.array([[0, 0, 1, 1], [1, 255, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [-1, 0, 2, 255]])
    acc.add(pred, truth)
    out = acc.result()
    # a: TP 1 (0,0), FN 2 ((0,1) -> b, (1,3) -> none), FP 0 -> 1/3
    # b: TP 2, FN 1 ((1,0) -> none), FP 1 ((0,1)) -> 2/4; c: never in truth or (scored) prediction -> NaN
    assert out["iou/a"] == pytest.approx(1 / 3)
    assert out["iou/b"] == pytest.approx(0.5)
    assert math.isnan(out["iou/c"])
    assert out["miou"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert out["pixel_accuracy"] == pytest.approx(3 / 6)


# ---------------------------------------------------------------------------- vb-batch eval


def with_predictions(table: pa.Table, shuffle_legend: bool = False) -> pa.Table:
    """The truth table plus prediction columns that repeat the truth (as a perfect model would)."""
    legend = scenes.scene_legend()
    if shuffle_legend:  # the job listed the classes in another order: ids differ, names match
        order = [5, 3, 1, 0, 2, 4]
        legend_pairs = [legend.to_pairs()[i] for i in order]
        remap = np.argsort(order)
    else:
        legend_pairs, remap = legend.to_pairs(), np.arange(len(legend))
    metas = {
        "depth": ColumnMeta(kind="depth", encoding="array", unit="m", task="depth"),
        "normals": ColumnMeta(kind="normals", encoding="array", unit="unit vector", task="normals", frame="opencv"),
        "segmentation": ColumnMeta(kind="classes", encoding="array", unit="class id", task="segmentation",
                                   legend=legend_pairs, unlabelled=255),
    }
    from vb_batch.codecs import normals as normals_codec
    from vb_batch.io.outputs import load_arrays

    values = {
        "depth": load_arrays(table, "gt_depth"),
        "normals": [normals_codec.convert(n, "opengl", "opencv") for n in load_arrays(table, "gt_normals")],
        "segmentation": [remap[c].astype(np.uint8) for c in load_arrays(table, "gt_segmentation")],
    }
    for name, meta in metas.items():
        cells = [encode_map(v, meta) for v in values[name]]
        table = table.append_column(pa.field(name, storage_type("array"), metadata=meta.to_metadata()),
                                    pa.array(cells, storage_type("array")))
    return table


@pytest.fixture(scope="module")
def truth_table():
    return scenes.scene_table([scenes.HELD_OUT_SEED_START + i for i in range(3)])


def score(metrics: pa.Table) -> dict:
    return metrics_json(metrics)["methods"]


def test_perfect_predictions_score_perfectly_and_beat_the_baselines(truth_table):
    methods = score(evaluate(with_predictions(truth_table, shuffle_legend=True)))
    model = methods["model"]
    assert model["depth"]["abs_rel"] == 0 and model["depth"]["delta1"] == 1
    assert model["normals"]["mean_deg"] < 0.01 and model["normals"]["within_11.25_pct"] == 100
    assert model["segmentation"]["miou"] == 1 and model["segmentation"]["images"] == 3
    assert methods["const median depth"]["depth"]["delta1"] < 0.7
    assert methods["const mean normal"]["normals"]["mean_deg"] > 30
    assert methods["majority class"]["segmentation"]["miou"] < 0.2


def test_truth_in_another_table_joins_on_id(truth_table, tmp_path, capsys):
    predictions = with_predictions(truth_table).drop_columns(["gt_depth", "gt_normals", "gt_segmentation", "gt_instances"])
    # A wrong depth on one row and a reversed row order: the join is by id, not by position.
    depth = predictions.column("depth").to_pylist()
    depth[0] = encode_map(np.full((96, 128), 100.0, np.float32), ColumnMeta("depth", "array", "m", "depth"))
    predictions = predictions.set_column(
        predictions.schema.get_field_index("depth"), predictions.schema.field("depth"), pa.array(depth, storage_type("array"))
    ).take([2, 1, 0])
    pq.write_table(predictions, tmp_path / "pred.parquet")
    pq.write_table(truth_table, tmp_path / "truth.parquet")
    code = main(["eval", str(tmp_path / "pred.parquet"), "--truth", str(tmp_path / "truth.parquet"),
                 "--json", str(tmp_path / "m.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "const median depth" in printed and "segmentation miou" in printed
    result = json.loads((tmp_path / "m.json").read_text())["methods"]["model"]
    assert result["depth"]["delta1"] == pytest.approx(2 / 3, abs=1e-3)  # one image in three is all wrong
    assert result["segmentation"]["miou"] == 1
    written = pq.read_table(tmp_path / "pred_metrics.parquet")
    assert set(written.column_names) == {"method", "task", "metric", "value", "images"}


def test_eval_without_truth_is_an_error(truth_table, tmp_path, capsys):
    pq.write_table(with_predictions(truth_table).drop_columns(["gt_depth", "gt_normals", "gt_segmentation"]),
                   tmp_path / "p.parquet")
    assert main(["eval", str(tmp_path / "p.parquet")]) == 2
    assert "truth" in capsys.readouterr().err


def test_the_old_import_paths_re_export_the_evaluation_package():
    import importlib

    moved = {"evaluate": "scoring", "metrics": "metrics", "protocols": "protocols", "truth": "truth",
             "confidence_eval": "confidence", "examples": "examples", "scenes": "scenes"}
    for old_name, new_name in moved.items():
        old = importlib.import_module(f"vb_batch.{old_name}")
        new = importlib.import_module(f"vb_batch.evaluation.{new_name}")
        assert old.__all__, old_name
        for name in old.__all__:
            assert getattr(old, name) is getattr(new, name), (old_name, name)
    from vb_batch.evaluate import evaluate as old_evaluate

    assert old_evaluate is evaluate and callable(old_evaluate)
