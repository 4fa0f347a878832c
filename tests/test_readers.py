"""Readers for training: a torch Dataset over the output, through DataLoader worker processes."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import known_maps, png_bytes
from torch.utils.data import DataLoader

import vb_batch
from vb_batch.codecs import depth, segmentation
from vb_batch.readers import LabelDataset, collate_labels


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


def test_failed_rows_come_with_their_error_and_no_maps(labelled):
    out, truth = labelled
    ds = LabelDataset(str(out), maps=["depth", "segmentation"], include_errors=True)
    items = {int(item["id"]): item for item in (ds[i] for i in range(len(ds)))}
    assert sorted(items) == list(range(7))
    failed = items[3]
    assert failed["error"]["code"] and failed["depth"] is None and failed["segmentation"] is None
    assert "image" not in failed  # its bytes are junk: no picture to show
    assert all(items[i]["error"] is None and items[i]["depth"].shape == truth[i].shape for i in items if i != 3)


def test_dataloader_batches_of_4_on_unequal_sizes_with_a_transform(labelled):
    out, truth = labelled

    def add_valid(item):  # a user's transform: any function of the item dict
        item["valid"] = torch.isfinite(item["depth"]) if item["depth"] is not None else None
        return item

    ds = LabelDataset(str(out), maps=["depth", "segmentation"], transform=add_valid, include_errors=True)
    sizes = {tuple(t.shape) for t in truth.values()}
    assert len(sizes) == 2  # heights 16 and 20: torch's default collate cannot stack them
    padded = list(DataLoader(ds, batch_size=4, collate_fn=partial(collate_labels, pad=True)))
    assert [len(b["id"]) for b in padded] == [4, 3]
    seen = 0
    for batch in padded:
        # A batch holding the failed row keeps its maps as a list (one is None); the other is one tensor.
        assert isinstance(batch["depth"], list) == (3 in batch["id"].tolist())
        for j, row_id in enumerate(batch["id"].tolist()):
            if row_id == 3:
                assert batch["depth"][j] is None and batch["error"][j]["code"] and batch["size"][j].tolist() == [0, 0]
                continue
            height, width = truth[row_id].shape
            assert batch["size"][j].tolist() == [height, width] and batch["error"][j] is None
            np.testing.assert_allclose(batch["depth"][j][:height, :width].numpy(), truth[row_id], rtol=0.01)
            seen += 1
    assert seen == 6
    # A batch of complete rows is padded into one tensor: NaN for depth, -1 for class ids, 0 for images.
    complete = collate_labels([ds[i] for i in range(4) if ds.ids[i] != 3][:3] + [ds[5]], pad=True)
    assert complete["depth"].shape == (4, 20, 20) and complete["segmentation"].dtype == torch.int64
    short = [j for j, (h, _) in enumerate(complete["size"].tolist()) if h == 16]
    assert short and torch.isnan(complete["depth"][short[0], 16:]).all()
    assert (complete["segmentation"][short[0], 16:] == -1).all() and (complete["image"][short[0], :, 16:] == 0).all()
    assert complete["valid"].shape == (4, 20, 20)
    listed = collate_labels([ds[0], ds[1]])  # pad=False: unequal maps as lists
    assert isinstance(listed["depth"], list) and [tuple(t.shape) for t in listed["depth"]] == [
        truth[ds.ids[0]].shape, truth[ds.ids[1]].shape]


def test_the_old_import_paths_name_the_integrations_and_the_pipeline():
    import vb_batch.integrations.ray_data
    import vb_batch.integrations.spark
    import vb_batch.integrations.torch
    import vb_batch.ray
    import vb_batch.spark
    import vb_batch.stages
    from vb_batch.pipeline.resolved import ResolvedJob

    assert (LabelDataset, collate_labels) == (vb_batch.integrations.torch.LabelDataset,
                                             vb_batch.integrations.torch.collate_labels)
    assert vb_batch.ray.Annotator is vb_batch.integrations.ray_data.Annotator
    assert vb_batch.spark.annotate is vb_batch.integrations.spark.annotate
    assert vb_batch.stages.Plan is vb_batch.stages.ResolvedJob is ResolvedJob
