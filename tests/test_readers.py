"""Readers for training: a torch Dataset over the output, through DataLoader worker processes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import known_maps, png_bytes
from torch.utils.data import DataLoader

import vb_batch
from vb_batch.codecs import depth, segmentation
from vb_batch.readers import LabelDataset


@pytest.fixture
def labelled(tmp_path):
    """An identity-annotated output whose rows paint known depth maps; row 3 fails."""
    legend = segmentation.Legend.from_names(["a", "b", "c"])
    truth, cells = {}, []
    for i in range(7):
        maps = known_maps(i, 16 + 4 * (i % 2), 20, legend)
        truth[i] = maps["depth"]
        cells.append(png_bytes(depth.encode(maps["depth"])) if i != 3 else b"junk")
    pq.write_table(pa.table({"id": list(range(7)), "image": cells}), tmp_path / "in.parquet")
    cfg = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "rows_per_file": 3, "encoding": "array"},
        "tasks": ["depth", "segmentation"],
        "segmentation": {"classes": list(legend.names)},
        "model": {"backend": "identity"},
        "run": {"progress": False},
    }
    vb_batch.annotate(cfg)
    return tmp_path / "out", truth


def test_dataloader_with_workers_yields_the_known_maps(labelled):
    out, truth = labelled
    ds = LabelDataset(str(out), maps=["depth"])
    assert len(ds) == 6  # the failed row is left out
    seen = {}
    for item in DataLoader(ds, batch_size=None, num_workers=2):
        seen[int(item["id"])] = item
    assert sorted(seen) == [0, 1, 2, 4, 5, 6]
    for i, item in seen.items():
        assert item["depth"].dtype == torch.float32
        expected = torch.from_numpy(truth[i])
        step = 1 / (7 * 255) * 10 / (2 * (1 + expected / 10) ** -3)  # one codec step at that depth
        assert torch.all((item["depth"] - expected).abs() <= step + 1e-5)
        assert item["image"].shape == (3, *truth[i].shape) and item["image"].dtype == torch.uint8


def test_filters_by_error_and_confidence(labelled):
    out, _ = labelled
    assert len(LabelDataset(str(out), maps=["depth"], include_errors=True)) == 7
    # Depth paintings decode as depth with confidence ~1, but as segmentation they are mostly off-legend.
    strict = LabelDataset(str(out), maps=["segmentation"], min_confidence=0.99)
    assert len(strict) < 6
    item = LabelDataset(str(out), maps=["segmentation"], with_image=False)[0]
    assert set(item) == {"id", "segmentation"} and item["segmentation"].dtype == torch.int64


def test_hugging_face_datasets_loads_the_output(labelled):
    import datasets

    out, _ = labelled
    files = sorted(str(p) for p in out.glob("part-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == 7
    row = ds.sort("id")[0]
    cell = row["depth"]
    got = np.frombuffer(cell["data"], dtype=cell["dtype"]).reshape(cell["shape"])
    assert got.shape == (16, 20)
