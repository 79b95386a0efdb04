"""The one bounded cache type: a mapping that keeps at most `size` entries and drops the oldest.

Whatever is keyed by what a client sends (statement texts, tokens, addresses) must not grow
without bound: an agent that sends endless distinct texts or sources must not grow the proxy's
memory. "Oldest" is the entry stored longest ago; `get(key, touch=True)` counts a read as a use
too, so a hot entry outlives a stream of one-off keys (least recently used). Expiry by age is the
caller's (it knows what time means for its entries).

Reads and writes may come from the event loop and from the analysis thread
(proxy/analysis_budget.py); each operation is safe under the GIL, and an entry evicted by the
other thread in between is simply a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

_MISSING = object()


class BoundedCache(Generic[K, V]):
    __slots__ = ("size", "_entries")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"a cache holds zero entries or more, not {size}")
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    @overload
    def get(self, key: K, *, touch: bool = False) -> V | None: ...
    @overload
    def get(self, key: K, default: D, *, touch: bool = False) -> V | D: ...

    def get(self, key: K, default: object = None, *, touch: bool = False) -> object:
        value = self._entries.get(key, _MISSING)
        if value is _MISSING:
            return default
        if touch:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # evicted by the other thread meanwhile: still a valid answer
                pass
        return value

    def put(self, key: K, value: V) -> None:
        """Store `value` as the newest entry, dropping the oldest past `size`."""
        entries = self._entries
        # out and in again rather than move_to_end: another thread's eviction between the two
        # could drop the key and make move_to_end raise
        entries.pop(key, None)
        entries[key] = value
        while len(entries) > self.size:
            try:
                entries.popitem(last=False)
            except KeyError:  # emptied by the other thread meanwhile
                break

    @overload
    def pop(self, key: K) -> V | None: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...

    def pop(self, key: K, default: object = None) -> object:
        return self._entries.pop(key, default)

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        """Keys, oldest first (a copy: safe to change the cache while iterating)."""
        return iter(list(self._entries))
