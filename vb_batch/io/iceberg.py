"""The old home of Iceberg in and out, kept so that old imports go on working.

Catalogs and reading an Iceberg table are `vb_batch.io.tables.iceberg`; the
Iceberg sink is `vb_batch.io.sinks.iceberg`.
"""

from __future__ import annotations

from vb_batch.io.sinks.iceberg import IcebergSink
from vb_batch.io.tables.iceberg import (
    COLUMN_PROPERTY,
    iceberg_catalog,
    iceberg_location,
    iceberg_schema,
    iceberg_table,
    open_iceberg,
    open_iceberg_path,
    planned_location,
)

__all__ = [
    "COLUMN_PROPERTY", "IcebergSink", "iceberg_catalog", "iceberg_location", "iceberg_schema", "iceberg_table",
    "open_iceberg", "open_iceberg_path", "planned_location",
]
