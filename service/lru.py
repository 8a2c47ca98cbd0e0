"""The one bounded cache of the service's per-process memories (key cache aside: it expires by time)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Lru"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A thread-safe map that forgets its least recently used entries once it holds more than ``max_entries``,
    or once the ``cost`` of its values adds up to more than ``max_cost`` (e.g. their size in bytes)."""

    def __init__(self, max_entries: int | None = None, *, max_cost: int | None = None,
                 cost: Callable[[V], int] | None = None):
        if max_entries is None and max_cost is None:
            raise ValueError("give max_entries or max_cost: an unbounded cache is not one")
        if (max_cost is None) != (cost is None):
            raise ValueError("max_cost and cost go together")
        self.max_entries = max_entries
        self.max_cost = max_cost
        self._cost = cost
        self._total = 0
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            value = self._items.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._items.move_to_end(key)
            return value  # type: ignore[return-value]

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._set(key, value)
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            value = self._items.pop(key, _MISSING)
            if value is _MISSING:
                return default
            if self._cost is not None:
                self._total -= self._cost(value)  # type: ignore[arg-type]
            return value  # type: ignore[return-value]

    def update(self, key: K, change: Callable[[V | None], V]) -> V:
        """Store ``change(current value or None)`` in one step (no other thread in between); returns it."""
        with self._lock:
            value = change(self._items.get(key))
            self._set(key, value)
        return value

    def _set(self, key: K, value: V) -> None:
        old = self._items.pop(key, _MISSING)
        if self._cost is not None:
            if old is not _MISSING:
                self._total -= self._cost(old)  # type: ignore[arg-type]
            self._total += self._cost(value)
        self._items[key] = value
        while self._items and ((self.max_entries is not None and len(self._items) > self.max_entries)
                               or (self.max_cost is not None and self._total > self.max_cost)):
            _, gone = self._items.popitem(last=False)
            if self._cost is not None:
                self._total -= self._cost(gone)


_MISSING = object()
