"""The resume filter: committed ids dropped from batches by the id column's name, in any worker."""

from __future__ import annotations

import threading
import uuid

import pyarrow as pa

from vb_batch.config import ConfigError



# ---------------------------------------------------------------------------- resume


class ResumeFilter:
    """The ids already committed, dropped from batches by the id column's name (never its position).

    Ships cheaply to workers (one Arrow array). Each process builds its lookup
    set once per run (`key`), however many tasks deserialise the filter, so a
    batch costs one lookup per row whatever the number of committed ids.
    """

    _LOOKUPS: dict[str, frozenset] = {}  # per process: run key -> committed ids
    _LOCK = threading.Lock()

    def __init__(self, done: pa.Array | None, id_column: str, key: str | None = None):
        self.done = done if done is not None else pa.array([], pa.string())
        self.id_column = id_column
        self.key = key or uuid.uuid4().hex

    def __len__(self) -> int:
        return len(self.done)

    def _ids(self) -> frozenset:
        lookups = ResumeFilter._LOOKUPS
        with ResumeFilter._LOCK:
            if self.key not in lookups:
                lookups.clear()  # one run at a time per worker process: drop the previous run's set
                lookups[self.key] = frozenset(self.done.to_pylist())
            return lookups[self.key]

    def apply(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, int]:
        """(the batch without committed rows, how many were dropped)."""
        if not len(self.done) or batch.num_rows == 0:
            return batch, 0
        index = batch.schema.get_field_index(self.id_column)
        if index < 0:
            raise ConfigError(f"input.id_column: {self.id_column!r} is not a column of the batch {batch.schema.names}")
        done = self._ids()
        keep = pa.array([i not in done for i in batch.column(index).to_pylist()], pa.bool_())
        kept = batch.filter(keep)
        return kept, batch.num_rows - kept.num_rows


