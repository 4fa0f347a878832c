"""vb_batch: run one generalist image generator over image tables and write depth, normals and masks as columns.

>>> import vb_batch
>>> summary = vb_batch.annotate({"input": {"path": "images/"}, "tasks": ["depth"]})   # doctest: +SKIP
>>> depths = vb_batch.load_arrays(summary.output, "depth")                            # doctest: +SKIP
"""

from vb_batch._version import __version__  # noqa: E402

from vb_batch.io.outputs import load_arrays  # noqa: E402
from vb_batch.engines.base import RunSummary  # noqa: E402
from vb_batch.job import annotate  # noqa: E402

__all__ = ["__version__", "annotate", "load_arrays", "RunSummary"]
