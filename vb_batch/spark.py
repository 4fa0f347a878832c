"""The old import path of the Spark DataFrame integration: see `vb_batch.integrations.spark`."""

from __future__ import annotations

from vb_batch.integrations.spark import annotate as annotate
from vb_batch.integrations.spark import check_worker_python as check_worker_python
from vb_batch.integrations.spark import worker_python as worker_python

__all__ = ["annotate", "check_worker_python", "worker_python"]
