"""vb_batch: run one generalist image generator over image tables and write depth, normals and masks as columns.

>>> import vb_batch
>>> summary = vb_batch.annotate({"input": {"path": "images/"}, "tasks": ["depth"]})   # doctest: +SKIP
>>> depths = vb_batch.load_arrays(summary.output, "depth")                            # doctest: +SKIP
"""

from vb_batch._version import __version__  # noqa: E402
from vb_batch.engines.summary import RunSummary  # noqa: E402
from vb_batch.io.describe import describe  # noqa: E402
from vb_batch.io.outputs import decode_cell, load_arrays  # noqa: E402
from vb_batch.job import annotate  # noqa: E402
from vb_batch.planning import plan, validate  # noqa: E402

__all__ = ["__version__", "annotate", "decode_cell", "describe", "load_arrays", "plan", "report", "RunSummary", "show",
           "validate"]


def __getattr__(name: str):
    # `report` and `show` load matplotlib: only when asked for. `vb_batch.report` is the module
    # vb_batch/report.py, callable as `vb_batch.report(OUTPUT)` (see its docstring).
    if name == "report":
        import vb_batch.report as report  # noqa: PLR0402 - `from vb_batch import` would call this again

        return report
    if name == "show":
        from vb_batch.report import show_row

        return show_row
    raise AttributeError(f"module 'vb_batch' has no attribute {name!r}")
