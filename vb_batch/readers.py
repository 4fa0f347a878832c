"""The old import path of the training-data reader: see `vb_batch.integrations.torch`."""

from __future__ import annotations

from vb_batch.integrations.torch import LabelDataset as LabelDataset
from vb_batch.integrations.torch import collate_labels as collate_labels

__all__ = ["LabelDataset", "collate_labels"]
