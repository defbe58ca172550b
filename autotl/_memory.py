"""Memory of a run: a bounded in-memory cache owned by a ``Run`` (what several trials or steps share,
never past the run), and ``trim_heap``, which gives freed memory back to the operating system
between the steps of a run.

glibc's allocator keeps much of the memory a process frees in its heap for reuse, where it still
counts as the process's resident memory: the activations of an eager forward, the arena of a closed
onnxruntime session. A run that does many such steps one after the other would otherwise peak at
the sum of their leftovers. ``trim_heap`` asks glibc to return its free heap pages
(``malloc_trim``, about a millisecond); without glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections import Counter, OrderedDict
from typing import Any, Callable, Hashable

__all__ = ["BoundedMemory", "trim_heap", "peak_rss_mb"]


class BoundedMemory:
    """Least-recently-used values by key, at most ``max_items`` and ``max_bytes`` (values that report an
    ``nbytes``); ``get(key, make)`` computes on a miss. The newest value always stays.

    ``part(name, max_items)``: a memory of its own inside this one, for one kind of value with its own
    bound (a strategy's influence outcomes, a pool's descriptors), so kinds never evict each other;
    ``counts`` tallies what its owner computed (head fits, described images, ...) for reports and tests."""

    def __init__(self, max_items: int = 16, max_bytes: int = 512 << 20):
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, Any]" = OrderedDict()
        self._parts: dict[str, BoundedMemory] = {}
        self.counts: Counter[str] = Counter()
        self.hits = 0
        self.misses = 0

    def nbytes(self) -> int:
        return sum(int(getattr(v, "nbytes", 0) or 0) for v in self._items.values())

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = make()
        self._items[key] = value
        while len(self._items) > 1 and (len(self._items) > self.max_items or self.nbytes() > self.max_bytes):
            self._items.popitem(last=False)
        return value

    def part(self, name: str, max_items: int) -> "BoundedMemory":
        """The part ``name`` (created on first use with at most ``max_items`` values and this memory's byte bound)."""
        if name not in self._parts:
            self._parts[name] = BoundedMemory(max_items, self.max_bytes)
        return self._parts[name]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()
        self._parts.clear()


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the running process's libc
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Return glibc's free heap pages to the system."""
    if _TRIM is not None:
        _TRIM(0)


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark so far, in MB (0 where the platform has no
    ``resource`` module)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
