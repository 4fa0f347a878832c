"""Moved to `vb_batch.evaluation.confidence` (issue 35); this old import path re-exports its names."""

from vb_batch.evaluation.confidence import (
    FRACTIONS,
    INTERVALS,
    THRESHOLDS,
    render_confidence,
    sparsification,
    threshold_table,
)

__all__ = [
    "FRACTIONS",
    "INTERVALS",
    "THRESHOLDS",
    "render_confidence",
    "sparsification",
    "threshold_table",
]
