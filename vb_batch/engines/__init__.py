"""Engines: where the stages run (in-process threads, Ray, Spark), around one shared run core.

`ENGINES` maps `engine.kind` to an `Engine` class ("module:Class", imported
only when a job picks it); `register_engine` adds your own. Module map:

    core.py      the run every engine shares (source, plan, sink, lease, resume, commit) and the
                 `Engine` protocol an engine implements (check, session, execute)
    summary.py   the run summary (counts, errors by code, where the time went)
    checks.py    what must hold before the output is touched (paths, ids)
    resume.py    the resume filter (committed ids dropped by the id column's name)
    local.py ray.py spark.py   each engine: only what is specific to it (threads, Ray Data, Spark)
    base.py      the old import path of the run core (re-exports)

Part reports and staged part files are the sinks' worker half
(`vb_batch.io.sinks.staging`); the per-process model cache, rebatching and
read-ahead are `vb_batch.pipeline.stream`; the stages themselves `vb_batch.pipeline`.

>>> from vb_batch.engines import ENGINES
>>> sorted(ENGINES)
['local', 'ray', 'spark']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vb_batch.errors import ConfigError
from vb_batch.registry import Registry

if TYPE_CHECKING:
    from vb_batch.engines.core import Engine


def _check_engine(found, name: str) -> None:
    from vb_batch.engines.core import Engine

    if not (isinstance(found, type) and issubclass(found, Engine)):
        raise ConfigError(f"engine.kind: {name!r} is not a vb_batch Engine")


ENGINES: "Registry[type[Engine]]" = Registry(
    "engine",
    field="engine.kind",
    entries={
        "local": "vb_batch.engines.local:LocalEngine",
        "ray": "vb_batch.engines.ray:RayEngine",
        "spark": "vb_batch.engines.spark:SparkEngine",
    },
    hints={"ray": "pip install 'vb_batch[ray]'", "spark": "pip install 'vb_batch[spark]'"},
    check=_check_engine,
    any_target=True,
)


def register_engine(name: str, target: "str | type[Engine]", *, replace: bool = False) -> None:
    """Make an engine available as `engine.kind: <name>`; `target` is "package.module:Class" or the class."""
    ENGINES.register(name, target, replace=replace)


def get_engine(name: str) -> "Engine":
    """An instance of the engine registered as `name` (a `ConfigError` naming `engine.kind` otherwise)."""
    return ENGINES[name]()
