"""What must hold before a run touches its output: the output outside the input, ids that identify each row once."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from vb_batch.config import ConfigError, JobConfig
from vb_batch.io.filesystems import (
    canonical_location,
)
from vb_batch.io.sources import Source, repeated_ids

log = logging.getLogger(__name__)


def check_paths(cfg: JobConfig, source: Source) -> None:
    """Refuse an output that is, contains or sits inside the input (symlinks and URL spellings resolved)."""
    output = cfg.output.path
    if cfg.output.format == "iceberg":  # where its catalog keeps (or will create) the table
        from vb_batch.io.tables.iceberg import planned_location

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
    read; without either, the images are hashed (their ids) to find identical
    ones. Rows that share an id follow `input.duplicate_ids` (`_shared_ids`).
    """
    policy = source.cfg.duplicate_ids if source.cfg is not None else "error"
    if not source.has_id and policy == "position":
        return None  # derived ids carry each row's place: no two rows share one
    column = source.id_column if source.has_id else source.uri_column
    if column is None:
        _shared_ids(source, policy, "input.id_column")
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
    if len(repeated) and policy == "error":
        examples = [f"{v!r} x{n}" for v, n in zip(repeated.field("values").to_pylist()[:SHOWN_IDS],
                                                     repeated.field("counts").to_pylist()[:SHOWN_IDS])]
        extra = int(pc.sum(repeated.field("counts")).as_py()) - len(repeated)
        problems.append(f"{len(repeated)} id(s) repeated ({extra} extra rows), e.g. {', '.join(examples)}")
    if problems:
        raise ConfigError(
            f"{field_name}: column {column!r} must identify each row exactly once: {'; '.join(problems)}. "
            "Fix the input, filter those rows out (input.filter), pick another id column, or set "
            "input.duplicate_ids: first (label the first row of each id, skip the others)"
        )
    if len(repeated):
        _shared_ids(source, policy, field_name)
    return ids


def _shared_ids(source: Source, policy: str, field_name: str) -> None:
    """Apply `input.duplicate_ids` to rows that share an id: refuse, or hand the units the rows to skip."""
    found = repeated_ids(source)
    if not found:
        return
    extra = sum(len(places) - 1 for places in found.values())
    examples = ", ".join(
        f"{row_id!r} x{len(places)} ({', '.join(f'{source.place_name(url)}#{row}' for url, row in places[:3])})"
        for row_id, places in list(found.items())[:SHOWN_IDS]
    )
    shared = f"{len(found)} id(s) shared by more than one row ({extra} extra rows), e.g. {examples}"
    if policy == "first":
        skip: dict[str, list[int]] = {}
        for places in found.values():
            for url, row in places[1:]:
                skip.setdefault(url, []).append(row)
        source.skip_rows = skip
        log.warning("input.duplicate_ids=first: %s; the first row of each id is labelled, the %d other(s) are "
                    "skipped (duplicate_id)", shared, extra)
        return
    if policy == "position":
        raise ConfigError(f"input.duplicate_ids: position gives the ids vb_batch derives (URI or SHA-256) each row's "
                          f"place, but {field_name} {source.id_column!r} is the input's own and {shared}; fix the "
                          "input, or set input.duplicate_ids: first")
    raise ConfigError(
        f"{field_name}: the input has no id column, so each row's id is the SHA-256 of its image (or its URI), and "
        f"{shared}: identical images (a re-upload with another caption) would be labelled once. Add an id column "
        "(input.id_column), or set input.duplicate_ids: first (label the first row of each, skip the others) or "
        "position (ids carry each row's file and row, so every row is labelled)"
    )
