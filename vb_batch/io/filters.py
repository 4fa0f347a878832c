"""Row filters (`input.filter`): pyiceberg's row-filter syntax, parsed once, for every input format.

"day = '2026-11-01' and camera in ('a', 'b') and n > 3" selects rows of a
Parquet dataset, an image listing, a Delta or an Iceberg table alike: the
same text prunes Iceberg files by their statistics (pyiceberg's own scan) and
becomes a pyarrow expression everywhere else (partitions, row groups, rows).
Needs the `lake` extra (pyiceberg); without it, a filter is a `ConfigError`.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from vb_batch.errors import ConfigError

EXAMPLE = "day = '2026-11-01' and camera in ('a', 'b')"


def parse_filter(text: str, field: str = "input.filter"):
    """The parsed (unbound) pyiceberg expression; a `ConfigError` naming `field` on bad syntax."""
    try:
        from pyiceberg.expressions.parser import parse
    except ImportError as exc:
        raise ConfigError(f"{field}: needs the lake extra (pip install 'vb_batch[lake]'): {exc}") from None
    try:
        return parse(text)
    except Exception as exc:  # noqa: BLE001 - the parser's errors (pyparsing's) list whole grammars: keep the position
        where = f" at character {exc.loc + 1}" if isinstance(getattr(exc, "loc", None), int) else ""
        raise ConfigError(f"{field}: cannot parse {text!r}{where}; write e.g. \"{EXAMPLE}\"") from None


def filter_expression(text: str, schema: pa.Schema, field: str = "input.filter") -> pc.Expression:
    """`text` as a pyarrow expression over `schema`, literals typed by the columns ('2026-11-01' as a date, ...)."""
    from pyiceberg.expressions.visitors import bind
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids, expression_to_pyarrow
    from pyiceberg.schema import assign_fresh_schema_ids

    expression = parse_filter(text, field)
    names = sorted(set(referenced_columns(expression)))
    nested = [name for name in names if "." in name and name not in schema.names]
    if nested:
        raise ConfigError(f"{field}: filters compare top-level columns only, not {nested}")
    missing = [name for name in names if name not in schema.names]
    if missing:
        raise ConfigError(f"{field}: no column(s) {missing} in the input; columns: {schema.names}")
    try:
        columns = assign_fresh_schema_ids(_pyarrow_to_schema_without_ids(pa.schema([schema.field(n) for n in names])))
        return expression_to_pyarrow(bind(columns, expression, case_sensitive=True))
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc} in {text!r}") from None


def referenced_columns(expression) -> list[str]:
    """Column names a parsed (unbound) pyiceberg expression refers to."""
    names = [expression.term.name] if hasattr(expression, "term") else []
    for part in ("left", "right", "child"):
        if hasattr(expression, part):
            names += referenced_columns(getattr(expression, part))
    return names
