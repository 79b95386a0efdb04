"""The one bounded cache type: a dict that keeps at most `maxsize` entries, least recently used out.

Every cache the proxy keeps per statement text (analyses, decisions, masking plans) or per caller
(login back-off, token reviews, open trace spans) is bounded: an agent that sends endless distinct
texts or sources must not grow the proxy's memory. Reads and writes may come from the event loop
and from the analysis thread (proxy/analysis_budget.py); each operation is safe under the GIL and
an entry evicted by the other thread in between is simply a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class BoundedCache(Generic[K, V]):
    """At most `maxsize` entries; `get` and `put` make an entry the most recently used."""

    __slots__ = ("maxsize", "_data")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a bounded cache holds at least one entry")
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()

    @overload
    def get(self, key: K) -> V | None: ...

    @overload
    def get(self, key: K, default: D) -> V | D: ...

    def get(self, key: K, default: object = None) -> object:
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            return default
        try:
            self._data.move_to_end(key)
        except KeyError:  # evicted by the other thread meanwhile: still a valid answer
            pass
        return value

    def put(self, key: K, value: V) -> None:
        data = self._data
        data[key] = value
        data.move_to_end(key)
        while len(data) > self.maxsize:
            try:
                data.popitem(last=False)
            except KeyError:  # emptied by the other thread meanwhile
                break

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first (a copy: safe to change the cache while iterating)."""
        return iter(list(self._data))


_MISSING = object()
