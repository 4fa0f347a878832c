"""Iceberg catalogs, and an Iceberg table as a pyarrow dataset (`pyiceberg`).

Iceberg has no field metadata: the Iceberg sink (`vb_batch.io.sinks.iceberg`)
keeps every map column's metadata as the table property `vb.column.<name>`
(JSON) and the job-level keys as table properties; `iceberg_schema` puts both
back on the Arrow schema.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from vb_batch.config import ConfigError, StorageOptions
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem, iceberg_io_properties, split_scheme
from vb_batch.io.tables.arrow import JOB_KEYS, file_dataset, with_metadata

COLUMN_PROPERTY = "vb.column."


def iceberg_catalog(properties: dict[str, Any], storage: StorageOptions | None = None):
    """pyiceberg `load_catalog` with `properties` (`name` picks a configured catalog), FileIO from `storage`."""
    from pyiceberg.catalog import load_catalog

    props = {k: str(v) for k, v in properties.items()}
    name = props.pop("name", "default")
    return load_catalog(name, **{**iceberg_io_properties(storage), **props})


def iceberg_table(catalog, name: str):
    from pyiceberg.exceptions import NoSuchTableError

    try:
        return catalog.load_table(name)
    except NoSuchTableError:
        return None


def iceberg_schema(table) -> pa.Schema:
    """The table's Arrow schema with vb_batch's field and job metadata restored from table properties."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    props = table.properties
    columns = {k[len(COLUMN_PROPERTY):]: json.loads(v) for k, v in props.items() if k.startswith(COLUMN_PROPERTY)}
    job = {k: props[k] for k in JOB_KEYS if k in props}
    return with_metadata(schema_to_pyarrow(table.schema(), include_field_ids=False), columns, job)


def open_iceberg(table, storage: StorageOptions | None = None, row_filter: str | None = None,
                 snapshot_id: int | None = None) -> pads.Dataset:
    """An Iceberg table's current snapshot (or `snapshot_id`) as a pyarrow dataset of its data files.

    `row_filter` (pyiceberg syntax) prunes files by partition and column
    statistics; filter rows with `row_filter_expression` on top. Tables with
    delete files (row-level deletes) cannot be read file by file: compact them
    first.
    """
    schema = iceberg_schema(table)
    tasks = list(table.scan(row_filter=row_filter or "true", snapshot_id=snapshot_id).plan_files())
    if any(task.delete_files for task in tasks):
        raise ConfigError(
            f"iceberg table {table.name()}: it has row-level delete files, which vb_batch cannot read "
            "file by file; rewrite its data files first (e.g. Spark's rewrite_data_files)"
        )
    fs, _ = arrow_filesystem(table.location(), storage)
    files = [(arrow_filesystem(task.file.file_path, storage)[1], None) for task in tasks]
    return file_dataset(files, schema, fs)


def iceberg_location(table) -> str:
    """An Iceberg table's location: where vb_batch stages its part files (`data/`) and reads the table from."""
    return table.location().rstrip("/")


def planned_location(cfg) -> str | None:
    """Where the Iceberg table `cfg.table` (an OutputConfig or InputConfig) lives, or will be created by its
    catalog (`<warehouse>/<namespace>.db/<name>`); None when neither is known."""
    table = iceberg_table(iceberg_catalog(cfg.catalog, cfg.storage), cfg.table)
    if table is not None:
        return iceberg_location(table)
    warehouse = str(cfg.catalog.get("warehouse") or "").rstrip("/")
    namespace, _, name = cfg.table.rpartition(".")
    return f"{warehouse}/{namespace}.db/{name}" if warehouse and namespace else None


def open_iceberg_path(location: str, storage: StorageOptions | None = None):
    """A read-only Iceberg table from its location alone (the newest `metadata/*.metadata.json`)."""
    from pyiceberg.table import StaticTable

    fs, root = fsspec_filesystem(location, storage)
    found = fs.glob(posixpath.join(root, "metadata", "*.metadata.json"))
    if not found:
        raise FileNotFoundError(f"no Iceberg metadata under {location!r}")

    def version(path: str) -> int:
        head = posixpath.basename(path).split("-")[0].removeprefix("v").split(".")[0]
        return int(head) if head.isdigit() else -1

    newest = max(found, key=version)
    scheme = split_scheme(location)[0]
    url = newest if scheme == "file" else f"{scheme}://{newest}"
    return StaticTable.from_metadata(url, properties=iceberg_io_properties(storage))
