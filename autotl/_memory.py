"""A bounded in-memory cache owned by a ``Run``: what several trials (or steps) share, never past the run."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Callable, Hashable


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
