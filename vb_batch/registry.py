"""One registry shape for everything chosen by name: backends, profiles, depth presets, tasks, engines, formats.

Like fsspec's protocol registry: a name maps to a value, or to a lazy target
"package.module:attr" that is imported on first use, so heavy or optional
dependencies (torch, ray, pyspark, deltalake) load only when a job asks for
them. A target whose import fails because an optional extra is missing is a
`ConfigError` naming the config field and the install command.

>>> from vb_batch.registry import Registry
>>> colours = Registry("colour", field="style.colour", entries={"red": (255, 0, 0)})
>>> colours["red"]
(255, 0, 0)
>>> colours.register("blue", (0, 0, 255))
>>> sorted(colours)
['blue', 'red']
>>> colours.register("red", (250, 0, 0))
Traceback (most recent call last):
...
ValueError: a different colour is already registered as 'red'; pass replace=True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from vb_batch.errors import ConfigError

T = TypeVar("T")

# Every registry by the config field it serves, so that what a driver registered at run time can
# be replayed in worker processes (Ray actors, Spark executors): `added_entries` / `replay`.
REGISTRIES: dict[str, "Registry"] = {}


def is_target(value: Any) -> bool:
    """A lazy "package.module:attr" reference (rather than a value)."""
    return isinstance(value, str) and ":" in value


def import_target(target: str, field: str, hint: str | None = None) -> Any:
    """The object a "package.module:attr" target names; a `ConfigError` naming `field` when it cannot be imported."""
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        extra = f"; install it with: {hint}" if hint else ""
        raise ConfigError(f"{field}: cannot import {target!r} ({exc}){extra}") from None
    except AttributeError:
        raise ConfigError(f"{field}: module {module!r} has no {attr!r}") from None


class Registry(Generic[T]):
    """name -> value, or name -> "module:attr" resolved lazily; see the module docstring.

    `field` is the config key that picks an entry (named in every error);
    `hints` maps a name to the install command of the extra it needs;
    `check(value)` validates resolved values (e.g. "is a ModelBackend subclass").
    With `any_target=True`, a name that is itself a "module:attr" target
    resolves without being registered (a user's own class named in a config,
    which also reaches worker processes that never ran `register`).
    """

    def __init__(
        self,
        kind: str,
        field: str,
        entries: Mapping[str, T | str] | None = None,
        hints: Mapping[str, str] | None = None,
        check: Callable[[Any, str], None] | None = None,
        any_target: bool = False,
    ):
        self.kind = kind
        self.field = field
        self._entries: dict[str, T | str] = dict(entries or {})
        self._resolved: dict[str, T] = {}
        self._hints = dict(hints or {})
        self._check = check
        self._any_target = any_target
        self._added: dict[str, T | str] = {}  # registered after import: what workers must learn
        REGISTRIES[field] = self

    # ---------------------------------------------------------------- registering
    def register(self, name: str, value: T | str, *, replace: bool = False) -> None:
        """Make `value` (or a "module:attr" target) available as `name`."""
        existing = self._entries.get(name)
        if existing is not None and existing != value and not replace:
            raise ValueError(f"a different {self.kind} is already registered as {name!r}; pass replace=True")
        self._entries[name] = value
        self._resolved.pop(name, None)
        self._added[name] = value

    def unregister(self, name: str) -> None:
        """Forget `name` (e.g. a test's temporary entry); unknown names are ignored."""
        self._entries.pop(name, None)
        self._resolved.pop(name, None)
        self._added.pop(name, None)

    def added(self) -> dict[str, T | str]:
        """Entries registered at run time (to replay in worker processes with `update`)."""
        return dict(self._added)

    def update(self, entries: Mapping[str, T | str]) -> None:
        """Register entries a driver process added (`added()`), replacing same-named ones."""
        for name, value in entries.items():
            self.register(name, value, replace=True)

    # ---------------------------------------------------------------- looking up
    def __getitem__(self, name: str) -> T:
        if name in self._resolved:
            return self._resolved[name]
        if name in self._entries:
            value = self._entries[name]
        elif self._any_target and is_target(name):
            value = name
        else:
            extra = " or package.module:Class" if self._any_target else ""
            raise ConfigError(f"{self.field}: unknown {self.kind} {name!r}; known: {sorted(self._entries)}{extra}")
        if is_target(value):
            value = import_target(value, self.field, self._hints.get(name))
        if self._check is not None:
            self._check(value, name)
        self._resolved[name] = value
        return value

    def accepts(self, name: str) -> bool:
        """Whether `name` would resolve: registered, or a "module:attr" target where any is allowed."""
        return name in self._entries or (self._any_target and is_target(name))

    def get(self, name: str, default: T | None = None) -> T | None:
        return self[name] if name in self else default

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def entries(self) -> Mapping[str, T | str]:
        """A read-only view of the registered names and their values or targets."""
        return MappingProxyType(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def added_entries() -> dict[str, dict[str, Any]]:
    """What this process registered at run time, in every registry (picklable; for `replay` in workers)."""
    return {field: registry.added() for field, registry in REGISTRIES.items() if registry.added()}


def replay(entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Register in this process what `added_entries()` returned in another."""
    for field, added in entries.items():
        if field in REGISTRIES:
            REGISTRIES[field].update(added)


def check_name(field: str, name: str) -> None:
    """Raise `ValueError` when the registry serving config `field` does not know `name` (config validators).

    Looked up by field, so that the config imports no module that defines a registry;
    a registry not imported yet accepts every name (its own lookup refuses later).
    """
    registry = REGISTRIES.get(field)
    if registry is not None and not registry.accepts(name):
        extra = " or package.module:Class" if registry._any_target else ""
        raise ValueError(f"unknown {registry.kind} {name!r}; known: {registry.names()}{extra}")

