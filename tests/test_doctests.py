"""The examples in docstrings run: every vb_batch module's doctests, except those that need a cluster or a service.

New modules are picked up by themselves; a module whose examples cannot run here is
listed below with the reason (its examples then carry `# doctest: +SKIP` or are left out).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vb_batch

NOT_HERE = {
    "vb_batch.ray": "starts a Ray cluster (tests/test_ray.py runs the same code)",
    "vb_batch.integrations.ray_data": "starts a Ray cluster (tests/test_ray.py runs the same code)",
    "vb_batch.io.lease": "its example names a lease of a live output without building one",
}
MODULES = ["vb_batch"] + sorted(
    m.name for m in pkgutil.walk_packages(vb_batch.__path__, "vb_batch.")
    if m.name not in NOT_HERE and not m.name.startswith("vb_batch.engines.")  # engines: Ray / Spark imports
)


def test_the_public_python_api_is_documented_with_examples():
    for name in ("annotate", "validate", "plan", "report"):
        assert ">>>" in (getattr(vb_batch, name).__doc__ or ""), f"vb_batch.{name} has no example"
    assert callable(vb_batch.report) and callable(vb_batch.show)
    assert ">>> [p.name for p in vb_batch.show(" in vb_batch.report.__doc__  # show's example: with report's


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}: python -m doctest -v"
