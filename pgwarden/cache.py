"""One bounded cache type: a mapping that keeps at most `size` entries and drops the oldest.

Whatever is keyed by what a client sends (tokens, addresses, statements) must not grow without
bound. "Oldest" is the entry stored longest ago; `get(key, touch=True)` counts a read as a use
too, so a hot entry outlives a stream of one-off keys (least recently used). Expiry by age is the
caller's (it knows what time means for its entries).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class BoundedCache(Generic[K, V]):
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
        if key not in self._entries:
            return default
        if touch:
            self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: K, value: V) -> None:
        """Store `value` as the newest entry, dropping the oldest past `size`."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

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
