"""The old home of Delta Lake in and out, kept so that old imports go on working.

Reading a Delta table is `vb_batch.io.tables.delta`; the Delta sink is `vb_batch.io.sinks.delta`.
"""

from __future__ import annotations

from vb_batch.io.sinks.delta import DELTA_APP, DeltaSink
from vb_batch.io.tables.delta import delta_job_metadata, delta_table, open_delta

__all__ = ["DELTA_APP", "DeltaSink", "delta_job_metadata", "delta_table", "open_delta"]
