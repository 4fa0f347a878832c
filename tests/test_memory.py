"""Memory follows the job's queues, not its input; units bound what a task holds whatever the row-group size."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import run_job, write_table  # noqa: E402

from vb_batch.config import load_config  # noqa: E402
from vb_batch.io.sources import open_source, read_unit  # noqa: E402


@pytest.mark.slow
def test_peak_memory_of_the_local_engine_does_not_grow_with_the_input(tmp_path):
    """1k and 8k rows of 128 px images, each in a fresh process: peak RSS within 25% (it was 1.8x at 2k -> 20k)."""
    peaks = {}
    for rows in (1000, 8000):
        table = write_table(tmp_path / f"in-{rows}.parquet", rows, 128)
        measured = run_job(table, tmp_path / f"out-{rows}", "local")
        assert measured["success"] and measured["rows_ok"] == rows
        peaks[rows] = measured["peak_rss_mb"]
    assert peaks[8000] <= 1.25 * peaks[1000], peaks


def test_a_huge_row_group_becomes_bounded_units_that_read_every_row_once(tmp_path):
    ids = [f"id-{i:05d}" for i in range(1000)]
    pq.write_table(pa.table({"id": ids, "image": [b"x"] * 1000, "k": list(range(1000))}), tmp_path / "in.parquet",
                   row_group_size=1000)
    cfg = load_config({"input": {"path": str(tmp_path / "in.parquet"), "filter": "k != 500"},
                       "model": {"backend": "identity"}})
    source = open_source(cfg.input)
    units = source.units(max_rows=256)
    assert [u.get("rows") for u in units] == [256, 256, 256, 232]
    read = [row for unit in units for b in read_unit(unit, cfg.input, source.dataset.schema, 100) for row in b["id"].to_pylist()]
    assert read == [i for n, i in enumerate(ids) if n != 500]  # each row once, in order, the filter applied
    sizes = [b.num_rows for b in source.batches(100)]
    assert max(sizes) <= 100 and sum(sizes) == 999
