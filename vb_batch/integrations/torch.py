"""Reading labels back for training: a `torch.utils.data.Dataset` over a vb_batch output.

(`vb_batch.readers` is its old import path: `from vb_batch.readers import LabelDataset` still works.)

>>> from functools import partial
>>> from torch.utils.data import DataLoader
>>> from vb_batch.integrations.torch import LabelDataset, collate_labels
>>> ds = LabelDataset("out/", maps=["depth", "normals"], min_confidence=0.5)   # doctest: +SKIP
>>> sample = ds[0]                                                             # doctest: +SKIP
>>> sample["image"].shape, sample["depth"].shape                               # doctest: +SKIP
(torch.Size([3, 480, 640]), torch.Size([480, 640]))
>>> loader = DataLoader(ds, batch_size=4, num_workers=4,                       # doctest: +SKIP
...                     collate_fn=partial(collate_labels, pad=True))
>>> batch = next(iter(loader))                                                 # doctest: +SKIP
>>> batch["depth"].shape, batch["size"].tolist()                               # doctest: +SKIP
(torch.Size([4, 480, 720]), [[480, 640], [480, 720], [360, 480], [480, 640]])

`path` is a Parquet output, a Delta table or an Iceberg table's location, or
an `OutputConfig` (an Iceberg table by its catalog name). Each item is a
dict: `id`, `image` (uint8 CHW, when the output kept the image bytes or its
URI is readable), and one tensor per map column in real units
(depth float32 metres (H, W), normals float32 (3, H, W), class ids int64
(H, W), masks uint8 (H, W)). Rows that failed are left out by default; a
confidence floor drops rows whose `<map>_confidence` is below it. Only small
columns are read up front; maps are read per row group, lazily, in each
worker process, so the dataset pickles cheaply into DataLoader workers.

`include_errors=True` keeps failed rows: every item then has `error` (None,
or the row's `{code, message}`), and a failed row's maps are None (and its
`image` is absent when its picture cannot be decoded). `transform` is called
on each item dict and returns what the dataset yields (augmentation, resizing,
a tuple for a training loop).

Pictures differ in size, so torch's default collate (which stacks) fails on a
batch of them: `collate_labels` stacks what has one shape and, per key, pads
the rest (`pad=True`) or keeps them as a list (`pad=False`, the default).
"""

from __future__ import annotations

from collections.abc import Callable
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
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ):
        self.path, self.storage = path, storage
        self.include_errors, self.transform = include_errors, transform
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
            if self.include_errors and "vb_error" in view.schema.names:
                columns.append("vb_error")
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
        if self.include_errors:
            item["error"] = record.get("vb_error")
        if self.with_image:
            image = view.input_image(record)
            if image is not None:
                item["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        for name in self.maps:
            meta = view.maps[name]
            if record[name] is None:  # a failed row (kept by include_errors): no map to decode
                item[name] = None
                continue
            try:
                values = decode_map(record[name], meta)
            except Exception as exc:
                raise ValueError(f"{self.path}: column {name!r}, row {self.ids[i]!r}: cannot decode the cell: "
                                 f"{type(exc).__name__}: {exc}") from exc
            if meta.kind == "normals":
                values = values.transpose(2, 0, 1)
            elif meta.kind == "classes":
                values = values.astype(np.int64)
            values = np.ascontiguousarray(values)
            # Array cells view the read buffer (read-only): a training loop may write into its tensors.
            item[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
        return self.transform(item) if self.transform is not None else item


def _pad_value(dtype) -> float | int:
    """What fills the padding: NaN for floats (depth and normals already say invalid with it), -1 for
    class ids (the usual `ignore_index`; never a class), 0 for images and masks."""
    import torch

    if dtype.is_floating_point:
        return float("nan")
    return -1 if dtype == torch.int64 else 0


def collate_labels(items: list[dict[str, Any]], pad: bool = False) -> dict[str, Any]:
    """A DataLoader `collate_fn` for items of unequal sizes: one dict of batched values per key.

    Per key: tensors of one shape are stacked (B, ...); tensors of different shapes are padded at
    the bottom and right to the batch's largest size and stacked when `pad` is true (NaN for float
    maps, -1 for class ids, 0 for images and masks), else kept as a list. Ids become a list (a
    tensor when numeric); everything else (`error`, None maps of failed rows, whatever a
    transform adds) a list; so is a key that some items lack or hold None for (a failed row's map).
    With `pad`, `size` holds each item's own (H, W), a (B, 2) tensor ((0, 0): an item with no map).

    >>> import torch
    >>> from vb_batch.integrations.torch import collate_labels
    >>> items = [{"id": "a", "depth": torch.ones(2, 3)}, {"id": "b", "depth": torch.ones(3, 2)}]
    >>> batch = collate_labels(items, pad=True)
    >>> batch["depth"].shape, batch["size"].tolist(), batch["id"]
    (torch.Size([2, 3, 3]), [[2, 3], [3, 2]], ['a', 'b'])
    >>> [t.shape for t in collate_labels(items)["depth"]]
    [torch.Size([2, 3]), torch.Size([3, 2])]
    """
    import torch

    keys = list(dict.fromkeys(k for item in items for k in item))
    batch: dict[str, Any] = {}
    sizes: list[tuple[int, int] | None] = [None] * len(items)
    for key in keys:
        values = [item.get(key) for item in items]
        tensors = all(isinstance(v, torch.Tensor) for v in values)
        if tensors and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        elif tensors and pad and len({v.dim() for v in values}) == 1 and values[0].dim() >= 2:
            height = max(v.shape[-2] for v in values)
            width = max(v.shape[-1] for v in values)
            out = torch.full((len(values), *values[0].shape[:-2], height, width), _pad_value(values[0].dtype),
                             dtype=values[0].dtype)
            for j, v in enumerate(values):
                out[j, ..., : v.shape[-2], : v.shape[-1]] = v
            batch[key] = out
        else:
            batch[key] = values
        for j, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.dim() >= 2:
                sizes[j] = sizes[j] or (int(v.shape[-2]), int(v.shape[-1]))
    ids = batch.get("id")
    if ids and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        batch["id"] = torch.tensor([int(i) for i in ids])  # as torch's default collate does
    if pad:
        batch["size"] = torch.tensor([s or (0, 0) for s in sizes], dtype=torch.int64).reshape(len(items), 2)
    return batch


def _mask(fragment: pads.Fragment, keep: pc.Expression, schema) -> np.ndarray:
    """Which rows of one row group pass `keep`, in file order."""
    marker = fragment.to_table(columns={"keep": keep})
    return np.asarray(marker.column("keep").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
