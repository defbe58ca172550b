"""One registry shape for every extension point: strategies, regularisers, filter banks.

In the spirit of timm's ``register_model`` / ``list_models``: each kind has one ``Registry`` that
maps a name to a subclass of the kind's ``Base*`` class, given either as the class itself or as a
``"module:Class"`` path imported on first use. The built-ins are registered by paths, one line
each, next to their ``Base*`` class: the strategy modules import torch-heavy code and import
``autotl.strategy`` themselves, so they cannot be imported when the registry is defined.

Members are listed by an explicit ``order`` (ties by name), never by when they were registered:
for strategies the listing order is the order they are applied in.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Members registered without an order come after the built-ins, which use 10, 20, ...
DEFAULT_ORDER = 100

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")  # no "+": "gabor+conv" combines filter banks


class UnknownNameError(ValueError):
    """A name that is not registered; the message lists the registered names."""


@dataclass(frozen=True)
class _Entry:
    target: str | type  # the class, or "module:Class" to import on first use
    order: int


def normalize_name(name: Any) -> str:
    """Registry names are case-insensitive and ignore surrounding blanks ("L2SP " is "l2sp")."""
    return str(name).strip().lower()


class Registry(MutableMapping, Generic[T]):
    """Names -> subclasses of ``base`` (or their ``"module:Class"`` paths), in explicit order.

    As a mapping, ``registry[name]`` is what was registered (class or path), iteration yields the
    names in order, and ``registry[name] = target`` registers a new name at ``DEFAULT_ORDER`` or
    replaces the target of an existing one while keeping its order (so ``monkeypatch.setitem``
    restores a member exactly).
    """

    def __init__(self, kind: str, base: type[T]):
        self.kind = kind  # in messages: "unknown {kind} 'x'"
        self.base = base
        self._entries: dict[str, _Entry] = {}

    # -- registering ---------------------------------------------------------------------------
    def register(self, name: str, target: str | type[T], *, order: int = DEFAULT_ORDER) -> str | type[T]:
        """Add ``name`` -> ``target`` (a ``base`` subclass or ``"module:Class"``) at ``order``."""
        key = self._checked_name(name)
        if key in self._entries:
            raise ValueError(f"{self.kind} {key!r} is already registered ({self._entries[key].target!r}); "
                             "unregister it first")
        self._entries[key] = _Entry(self._checked_target(target), int(order))
        return target

    def unregister(self, name: str) -> None:
        del self[name]

    # -- looking up ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered names in order (``order``, then name)."""
        return list(self)

    def key(self, name: str) -> str:
        """``name`` as registered (normalised); ``UnknownNameError`` listing the known names if absent."""
        key = normalize_name(name)
        if key not in self._entries:
            known = ", ".join(self) or "none registered"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {known}")
        return key

    def get_class(self, name: str) -> type[T]:
        """The class registered as ``name`` (importing its module on first use)."""
        key = self.key(name)
        entry = self._entries[key]
        cls = entry.target
        if isinstance(cls, str):
            module, _, attr = cls.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{self.kind} {key!r}: {entry.target!r} is not a {self.base.__name__} subclass")
        return cls

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """An instance of the class registered as ``name``, built with ``args`` / ``kwargs``."""
        return self.get_class(name)(*args, **kwargs)

    # -- mapping protocol ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> str | type[T]:
        return self._entries[normalize_name(name)].target

    def __setitem__(self, name: str, target: str | type[T]) -> None:
        key = self._checked_name(name)
        old = self._entries.get(key)
        order = old.order if old is not None else DEFAULT_ORDER
        self._entries[key] = _Entry(self._checked_target(target), order)

    def __delitem__(self, name: str) -> None:
        del self._entries[normalize_name(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries, key=lambda k: (self._entries[k].order, k)))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return normalize_name(name) in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    # -- checks --------------------------------------------------------------------------------
    def _checked_name(self, name: str) -> str:
        key = normalize_name(name)
        if not _NAME.match(key):
            raise ValueError(f"{self.kind} name {name!r}: use lowercase letters, digits, '_', '-' or '.'")
        return key

    def _checked_target(self, target: str | type[T]) -> str | type[T]:
        if isinstance(target, str):
            module, sep, attr = target.partition(":")
            if not (module and sep and attr):
                raise ValueError(f"{self.kind} target {target!r}: give a class or 'module:Class'")
        elif not (isinstance(target, type) and issubclass(target, self.base)):
            raise TypeError(f"{self.kind} target {target!r} is not a {self.base.__name__} subclass")
        return target
