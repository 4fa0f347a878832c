"""The benchmark runner on a clean checkout: every comparison runs end to end at smoke sizes.

The GPU figures are to be taken on a machine CI never has, with scarce time on it: this keeps
the scripts that take them (bench_gpu.py at reduced size runs the same code as at full size)
from breaking unseen.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_runner_runs_every_comparison_and_writes_nothing_in_quick_mode(tmp_path):
    results = REPO / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("OUT", None)  # bench_gpu copies its results to $OUT when set
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "naive", "overhead", "codecs", "engines", "gpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in (
        "tiny Marigold, vb_batch local vs naive loop",
        "tiny Marigold alone, batched vs batch 1",
        "identity job vs the same decoding by hand",
        "depth decode, numpy",
        "segmentation-150 decode, numpy",
        "identity job, ray vs local",
        "marigold (reduced, cpu, 128 px) vs bare model loop",
        "flux2-klein (reduced, cpu, 128 px) vs bare model loop",
        "flux2-klein: vb_batch CPU side (zero-cost model) vs bare model loop",
    ):
        assert row in out, row
    # The side-by-side checks inside the benchmarks held: both sides computed the same thing.
    assert "same depth maps: True" in out
    assert "True" in out.split("same output")[1].splitlines()[1]  # engines: local and Ray wrote the same rows
    assert "the model waited" in out  # the local run's model-thread accounting
    after = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    assert after == before, "a quick run must not overwrite the committed results"
