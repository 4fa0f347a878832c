"""What must hold before a run touches its output: the output outside the input, ids that identify each row once."""

from __future__ import annotations

import logging
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from vb_batch.config import ConfigError, JobConfig
from vb_batch.io.filesystems import (
    canonical_location,
)
from vb_batch.io.sources import Source

log = logging.getLogger(__name__)

T = TypeVar("T")

def check_paths(cfg: JobConfig, source: Source) -> None:
    """Refuse an output that is, contains or sits inside the input (symlinks and URL spellings resolved)."""
    output = cfg.output.path
    if cfg.output.format == "iceberg":  # where its catalog keeps (or will create) the table
        from vb_batch.io.iceberg import planned_location

        output = planned_location(cfg.output)
    if not output:
        return
    field_name = "output.path" if cfg.output.format != "iceberg" else "output.table"
    inputs = {cfg.input.path or "", source.location or ""} - {""}
    out = canonical_location(output, cfg.output.storage)
    for path in inputs:
        inp = canonical_location(path, cfg.input.storage)
        if out == inp or out.startswith(inp.rstrip("/") + "/") or inp.startswith(out.rstrip("/") + "/"):
            relation = "is" if out == inp else ("sits inside" if out.startswith(inp) else "contains")
            raise ConfigError(
                f"{field_name}: the output {output!r} {relation} the input {path!r}; vb_batch never writes where it "
                "reads, choose an output outside the input"
            )


# Ids to show when refusing an input.
SHOWN_IDS = 5


def check_ids(source: Source) -> pa.Array | None:
    """Refuse null, NaN or duplicate ids before any row is processed (they would break exactly-once); the ids.

    Only an id column of the input (or the URI column its ids come from) is
    read; content-hash ids of images without an id are computed as rows are
    processed (identical images share one id: give such inputs an id column).
    """
    column = source.id_column if source.has_id else source.uri_column
    if column is None:
        return None
    ids = source.dataset.to_table(columns=[column], filter=source.filter).column(column).combine_chunks()
    field_name = "input.id_column" if source.has_id else "input.uri_column"
    problems = []
    if ids.null_count:
        problems.append(f"{ids.null_count} null id(s)")
    if pa.types.is_floating(ids.type):
        nans = pc.sum(pc.is_nan(ids.drop_null())).as_py() or 0
        if nans:
            problems.append(f"{nans} NaN id(s)")
    counts = pc.value_counts(ids.drop_null())
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        examples = [f"{v!r} x{n}" for v, n in zip(repeated.field("values").to_pylist()[:SHOWN_IDS],
                                                     repeated.field("counts").to_pylist()[:SHOWN_IDS])]
        extra = int(pc.sum(repeated.field("counts")).as_py()) - len(repeated)
        problems.append(f"{len(repeated)} id(s) repeated ({extra} extra rows), e.g. {', '.join(examples)}")
    if problems:
        raise ConfigError(
            f"{field_name}: column {column!r} must identify each row exactly once: {'; '.join(problems)}. "
            "Fix the input, filter those rows out (input.filter), or pick another id column"
        )
    return ids
