"""The old import path of the Ray Data integration: see `vb_batch.integrations.ray_data`."""

from __future__ import annotations

from vb_batch.integrations.ray_data import Annotator as Annotator

__all__ = ["Annotator"]
