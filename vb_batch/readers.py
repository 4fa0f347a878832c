"""Reading labels back for training: a `torch.utils.data.Dataset` over a vb_batch output.

>>> from torch.utils.data import DataLoader
>>> from vb_batch.readers import LabelDataset
>>> ds = LabelDataset("out/", maps=["depth", "normals"], min_confidence=0.5)   # doctest: +SKIP
>>> loader = DataLoader(ds, batch_size=None, num_workers=4)                     # doctest: +SKIP
>>> sample = ds[0]                                                             # doctest: +SKIP
>>> sample["image"].shape, sample["depth"].shape                               # doctest: +SKIP
(torch.Size([3, 480, 640]), torch.Size([480, 640]))

`path` is a Parquet output, a Delta table or an Iceberg table's location, or
an `OutputConfig` (an Iceberg table by its catalog name). Each item is a
dict: `id`, `image` (uint8 CHW, when the output kept the image bytes or its
URI is readable), and one tensor per map column in real units
(depth float32 metres (H, W), normals float32 (3, H, W), class ids int64
(H, W), masks uint8 (H, W)). Rows that failed are left out by default; a
confidence floor drops rows whose `<map>_confidence` is below it. Only small
columns are read up front; maps are read per row group, lazily, in each
worker process, so the dataset pickles cheaply into DataLoader workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from vb_batch.config import OutputConfig, StorageOptions
from vb_batch.io.encodings import decode_map
from vb_batch.io.outputs import OutputView


class LabelDataset:
    """Map-style dataset over the rows of an output (see the module docstring)."""

    def __init__(
        self,
        path: str | OutputConfig,
        maps: list[str] | None = None,
        with_image: bool = True,
        min_confidence: float | dict[str, float] | None = None,
        include_errors: bool = False,
        storage: StorageOptions | None = None,
    ):
        self.path, self.storage = path, storage
        view = OutputView(path, storage)
        self.maps = maps if maps is not None else list(view.maps)
        unknown = [m for m in self.maps if m not in view.maps]
        if unknown:
            raise KeyError(f"map column(s) {unknown} not in {path}; it has {list(view.maps)}")
        self.with_image = with_image and bool(view.image_column or view.uri_column)
        floors = min_confidence if isinstance(min_confidence, dict) else {m: min_confidence for m in self.maps}
        keep = None if include_errors else pc.field("vb_error").is_null()
        for name, floor in floors.items():
            column = f"{name}_confidence"
            if floor is not None and column in view.schema.names:
                cond = pc.field(column) >= floor
                keep = cond if keep is None else keep & cond
        # Index: (file, row group, row within group) of every kept row, from small columns only.
        self.index: list[tuple[str, int, int]] = []
        self.ids: list[Any] = []
        for fragment in view.dataset.get_fragments():
            for group in fragment.split_by_row_group():
                table = group.to_table(columns=[view.id_column], filter=None)
                mask = np.ones(table.num_rows, bool) if keep is None else _mask(group, keep, view.schema)
                rows = np.flatnonzero(mask)
                self.index += [(group.path, group.row_groups[0].id, int(r)) for r in rows]
                self.ids += [table.column(0)[int(r)].as_py() for r in rows]
        self._view: OutputView | None = view
        self._cache: tuple[tuple[str, int], dict[str, list]] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        # Workers take the view (the output's file list and metadata, no rows) from the parent: a
        # forked worker cannot open a Delta table (deltalake's runtime does not survive fork).
        return {**self.__dict__, "_cache": None}

    def _group(self, file: str, group: int) -> dict[str, list]:
        if self._cache is None or self._cache[0] != (file, group):
            view = self._view or OutputView(self.path, self.storage)
            self._view = view
            columns = [view.id_column, *self.maps]
            if self.with_image:
                columns += [c for c in (view.image_column, view.uri_column) if c]
            fragment = next(f for f in view.dataset.get_fragments() if f.path == file)
            piece = fragment.subset(row_group_ids=[group]).to_table(columns=columns)
            self._cache = ((file, group), piece.to_pydict())
        return self._cache[1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        file, group, row = self.index[i]
        cells = self._group(file, group)
        view = self._view
        record = {name: values[row] for name, values in cells.items()}
        item: dict[str, Any] = {"id": self.ids[i]}
        if self.with_image:
            image = view.input_image(record)
            if image is not None:
                item["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        for name in self.maps:
            meta = view.maps[name]
            values = decode_map(record[name], meta)
            if meta.kind == "normals":
                values = values.transpose(2, 0, 1)
            elif meta.kind == "classes":
                values = values.astype(np.int64)
            item[name] = torch.from_numpy(np.ascontiguousarray(values))
        return item


def _mask(fragment: pads.Fragment, keep: pc.Expression, schema) -> np.ndarray:
    """Which rows of one row group pass `keep`, in file order."""
    marker = fragment.to_table(columns={"keep": keep})
    return np.asarray(marker.column("keep").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
