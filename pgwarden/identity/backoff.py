"""Per-source back-off against password guessing. Pure: the caller passes the time.

After `free_failures` failures from one source (client IP), each further attempt waits
`base * 2**(n - free_failures)` seconds, capped at `max_delay`. A success resets the source;
a source quiet for `forget_after` is forgotten. The table is bounded so a spray of addresses
cannot grow it without limit (oldest entries go first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Entry:
    failures: int
    last: float


class FailureBackoff:
    def __init__(self, *, free_failures: int = 3, base: float = 0.5, max_delay: float = 30.0,
                 forget_after: float = 900.0, max_sources: int = 10_000) -> None:
        self.free_failures = free_failures
        self.base = base
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_sources = max_sources
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def record_failure(self, source: str, now: float) -> float:
        """Count a failed attempt; returns the delay the next attempt from `source` will get."""
        e = self._live(source, now)
        if e is None:
            e = _Entry(0, now)
            self._entries[source] = e
        e.failures += 1
        e.last = now
        self._entries.move_to_end(source)
        while len(self._entries) > self.max_sources:
            self._entries.popitem(last=False)
        return self._delay(e.failures)

    def delay_for(self, source: str, now: float) -> float:
        """Seconds to wait before answering `source`'s next authentication attempt (0 if none).

        The proxy sleeps this long before checking credentials, so guessing stays slow even
        over many parallel connections from the same source."""
        e = self._live(source, now)
        if e is None:
            return 0.0
        return max(0.0, self._delay(e.failures) - (now - e.last))

    def reset(self, source: str) -> None:
        """A successful login from `source` clears its record."""
        self._entries.pop(source, None)

    record_success = reset

    def failures(self, source: str, now: float) -> int:
        e = self._live(source, now)
        return e.failures if e else 0

    def _live(self, source: str, now: float) -> _Entry | None:
        e = self._entries.get(source)
        if e is not None and now - e.last > self.forget_after:
            del self._entries[source]
            return None
        return e

    def _delay(self, failures: int) -> float:
        over = failures - self.free_failures
        if over < 0:
            return 0.0
        return min(self.max_delay, self.base * (2 ** min(over, 30)))
