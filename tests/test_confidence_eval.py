"""Sparsification curves, AUSE and AURG on the uncertainty papers' 50-step grid (against mono-uncertainty's
``compute_aucs``), threshold tables; `vb-batch eval --confidence`; the demo model's paintings carry its
uncertainty off the colour walk while decoding to the same values."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_eval_protocols import array_truth, prediction_table
from vb_batch.cli import main
from vb_batch.codecs import depth as depth_codec
from vb_batch.evaluation.confidence import FRACTIONS, sparsification, threshold_table
from vb_batch.models.demo_generalist import unsure_depth_colours


def trapezoid(y, x):
    """numpy's trapezoid rule (``np.trapz`` before numpy 2, as mono-uncertainty calls it)."""
    return float((np.trapezoid if hasattr(np, "trapezoid") else np.trapz)(y, x))


def poggi_aucs(errors, uncertainty, intervals=50):
    """mono-uncertainty ``evaluate.py`` ``compute_aucs`` for one per-item error, written out as there:
    percentile thresholds of the negated uncertainty, subsets ``>=`` each, curves closed with a 0,
    ``np.trapz`` over x = 0, 1/50, ..., 1."""
    uncert = -uncertainty  # revert order (high uncertainty first)
    true_uncert = -errors
    quants = [100.0 / intervals * t for t in range(intervals)]
    plotx = [1.0 / intervals * t for t in range(intervals + 1)]
    subs = [uncert >= np.percentile(uncert, q) for q in quants]
    sparse_curve = [errors[sub].mean() for sub in subs] + [0]
    opt_subs = [true_uncert >= np.percentile(true_uncert, q) for q in quants]
    opt_curve = [errors[sub].mean() for sub in opt_subs] + [0]
    ause = trapezoid(sparse_curve, plotx) - trapezoid(opt_curve, plotx)
    aurg = errors.mean() - trapezoid(sparse_curve, plotx)
    return {"curve": sparse_curve, "oracle": opt_curve, "ause": ause, "aurg": aurg, "fractions": plotx}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.sampled_from([0.1, 0.5, 0.9, 1.0])), min_size=1, max_size=120))
def test_ause_matches_the_papers_50_step_grid_with_ties(items):
    errors = np.array([e for e, _ in items])
    confidence = np.array([c for _, c in items])
    result = sparsification(errors, confidence)
    expected = poggi_aucs(errors, -confidence)  # confidence is the negated uncertainty
    assert len(result["fractions"]) == 51 and result["fractions"][-1] == 1.0 and FRACTIONS == tuple(result["fractions"])
    np.testing.assert_allclose(result["curve"], expected["curve"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result["oracle"], expected["oracle"], rtol=1e-9, atol=1e-12)
    assert result["ause"] == pytest.approx(expected["ause"], rel=1e-6, abs=1e-9)
    assert result["aurg"] == pytest.approx(expected["aurg"], rel=1e-6, abs=1e-9)
    assert result["random"] == pytest.approx(errors.mean())


def test_ause_on_the_papers_grid_differs_from_a_0_to_095_grid():
    """The issue's point: the grid changes the number, so the 50-step one is the one reported."""
    rng = np.random.default_rng(4)
    errors = rng.exponential(0.05, 20_000)
    confidence = -errors + rng.normal(0, 0.05, errors.size)
    result = sparsification(errors, confidence)
    expected = poggi_aucs(errors, -confidence)
    assert result["ause"] == pytest.approx(expected["ause"], rel=1e-6)
    # The former grid: x = 0, 0.05, ..., 0.95 with no closing point.
    old_x = np.arange(0.0, 1.0, 0.05)
    order, oracle_order = np.argsort(-confidence, kind="stable"), np.argsort(errors, kind="stable")
    kept = np.maximum(np.rint((1 - old_x) * errors.size).astype(int), 1)
    old_curve = np.array([errors[order[:k]].mean() for k in kept])
    old_oracle = np.array([errors[oracle_order[:k]].mean() for k in kept])
    old_ause = trapezoid(old_curve - old_oracle, old_x)
    assert abs(result["ause"] - old_ause) > 0.02 * old_ause


def test_perfect_constant_and_inverted_confidence():
    rng = np.random.default_rng(0)
    errors = rng.exponential(size=1000)
    perfect = sparsification(errors, -errors)
    constant = sparsification(errors, np.ones_like(errors))
    inverted = sparsification(errors, errors)
    assert perfect["ause"] == pytest.approx(0.0, abs=1e-12)
    # Ties at the threshold are kept together: a constant confidence keeps everything until the closing 0.
    np.testing.assert_allclose(constant["curve"][:-1], errors.mean())
    assert constant["curve"][-1] == 0.0
    assert constant["ause"] == pytest.approx(constant["ause_random"])
    assert constant["aurg"] == pytest.approx(errors.mean() / 100)  # the closing half-interval: mean * 0.02 / 2
    assert inverted["ause"] > constant["ause"] > perfect["ause"]


def test_threshold_table_counts_and_means():
    errors = np.array([0.1, 0.2, 0.5, 0.9])
    confidence = np.array([0.95, 0.8, 0.6, 0.2])
    rows = {r["min_confidence"]: r for r in threshold_table(errors, confidence, (0.0, 0.7, 0.9, 0.99))}
    assert rows[0.0]["kept"] == 4 and rows[0.0]["mean_error"] == pytest.approx(0.425)
    assert rows[0.7]["kept"] == 2 and rows[0.7]["mean_error"] == pytest.approx(0.15)
    assert rows[0.9]["kept_fraction"] == 0.25
    assert rows[0.99]["kept"] == 0 and rows[0.99]["mean_error"] is None


def test_eval_confidence_reports_rows_by_their_stored_confidence(tmp_path, capsys):
    rng = np.random.default_rng(1)
    ids = [f"r{i}" for i in range(8)]
    truths = [rng.uniform(1, 5, (6, 8)) for _ in ids]
    noise = np.linspace(0.0, 0.7, len(ids))  # row i is wrong by noise[i]; confidence says so
    preds = [t * (1 + n) for t, n in zip(truths, noise)]
    confidences = list(1.0 - noise)
    pq.write_table(prediction_table(ids, "depth", preds, confidences=confidences), tmp_path / "p.parquet")
    pq.write_table(array_truth(ids, "gt", truths), tmp_path / "t.parquet")
    code = main(["eval", str(tmp_path / "p.parquet"), "--truth", str(tmp_path / "t.parquet"), "--truth-format",
                 "depth=metres:gt", "--confidence", "--json", str(tmp_path / "m.json"), "--no-baselines"])
    assert code == 0
    assert "AUSE" in capsys.readouterr().out
    report = json.loads((tmp_path / "m.json").read_text())["confidence"]["depth"]
    assert report["sparsification"]["ause"] == pytest.approx(0.0, abs=1e-9)  # confidence orders rows as the oracle
    kept = {r["min_confidence"]: r for r in report["thresholds"]}
    abs_rel = noise / (1.0)  # |t (1 + n) - t| / t
    assert kept[0.5]["kept"] == int((1 - noise >= 0.5).sum())
    assert kept[0.5]["mean_error"] == pytest.approx(abs_rel[1 - noise >= 0.5].mean())


def test_unsure_depth_colours_decode_to_the_same_depth_with_lower_confidence():
    depth = np.array([[0.3, 1.0, 2.5, 4.0, 9.0, 30.0, np.inf]])
    sure = depth_codec.decode(depth_codec.encode(depth))
    finite = np.isfinite(depth)
    previous = sure.confidence
    for push in (5.0, 20.0, 60.0):
        unsure = depth_codec.decode(unsure_depth_colours(depth, np.full(depth.shape, push)))
        np.testing.assert_allclose(unsure.values[finite], sure.values[finite], rtol=0.02)
        # The more unsure, the lower (near a corner of the walk the push is capped: no lower than there).
        assert (unsure.confidence[finite] <= previous[finite]).all()
        assert (unsure.confidence[finite] < sure.confidence[finite]).all()
        previous = unsure.confidence
    # Away from a corner of the walk the confidence is the codec's exp(-push^2 / (2 sigma^2)).
    middle = depth_codec.decode(unsure_depth_colours(np.array([[2.5]]), np.array([20.0])))
    assert middle.confidence[0, 0] == pytest.approx(np.exp(-(20.0**2) / (2 * 8.0**2)), abs=0.03)
