"""vb_batch: run one generalist image generator over image tables and write depth, normals and masks as columns.

>>> import vb_batch
>>> summary = vb_batch.annotate({"input": {"path": "images/"}, "tasks": ["depth"]})   # doctest: +SKIP
>>> depths = vb_batch.load_arrays(summary.output, "depth")                            # doctest: +SKIP
"""

__version__ = "0.1.0"

from vb_batch.io.encodings import load_arrays  # noqa: E402
from vb_batch.engines.base import RunSummary  # noqa: E402
from vb_batch.job import annotate  # noqa: E402

__all__ = ["__version__", "annotate", "load_arrays", "RunSummary"]
