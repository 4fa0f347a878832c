"""Sparsification curves, AUSE and threshold tables; `vb-batch eval --confidence`; the demo model's
paintings carry its uncertainty off the colour walk while decoding to the same values."""

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
from vb_batch.confidence_eval import FRACTIONS, sparsification, threshold_table
from vb_batch.models.demo_generalist import unsure_depth_colours


def brute_curve(errors, keys, fractions):
    """Mean error kept after dropping the lowest-key fraction; ties averaged over every order of the tied items."""
    out = []
    n = len(errors)
    for x in fractions:
        k = max(int(np.rint((1 - x) * n)), 1)
        threshold = np.sort(keys)[::-1][k - 1]
        above = keys > threshold
        tied = keys == threshold
        from_ties = k - above.sum()
        total = errors[above].sum() + from_ties * errors[tied].mean()
        out.append(total / k)
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.sampled_from([0.1, 0.5, 0.9, 1.0])), min_size=1, max_size=40))
def test_curve_matches_its_definition_with_ties(items):
    errors = np.array([e for e, _ in items])
    confidence = np.array([c for _, c in items])
    result = sparsification(errors, confidence)
    np.testing.assert_allclose(result["curve"], brute_curve(errors, confidence, FRACTIONS), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result["oracle"], brute_curve(errors, -errors, FRACTIONS), rtol=1e-9, atol=1e-12)
    assert result["ause"] >= -1e-12  # nothing beats the oracle
    assert result["random"] == pytest.approx(errors.mean())


def test_perfect_constant_and_inverted_confidence():
    rng = np.random.default_rng(0)
    errors = rng.exponential(size=1000)
    perfect = sparsification(errors, -errors)
    constant = sparsification(errors, np.ones_like(errors))
    inverted = sparsification(errors, errors)
    assert perfect["ause"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(constant["curve"], errors.mean())  # ties removed together: the random curve
    assert constant["ause"] == pytest.approx(constant["ause_random"])
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
