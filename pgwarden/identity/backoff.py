"""Back-off against password guessing: a limit on attempts, not a sleep.

Failures are counted per (source, user) and per source (client address). After `free_failures`
failures of a key, its next attempt is allowed only `base * 2**(n - free_failures)` seconds after
the last failure (capped at `max_delay`); an attempt before that is refused outright, without
looking at the password, and does not count. Attempts per (source, user) are serialised: a
parallel connection waits until the one before it was checked (and sees its failure), so many
connections at once cannot each get a guess in within one back-off window, while a connection
pool of a user who knows the password still logs in, one connection after the other.

A success clears only its own (source, user) key, never the source's count: an agent that can
log in as itself (its own token, its pod identity) cannot wipe the record of its guesses at
another user's password by logging in between them. Keys quiet for `forget_after` are forgotten;
the table is bounded so a spray of addresses cannot grow it without limit (oldest entries go first).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from pgwarden.cache import BoundedCache
from pgwarden.errors import AuthenticationFailed


@dataclass
class _Entry:
    failures: int
    last: float


@dataclass(frozen=True)
class Attempt:
    """A login attempt that `begin` let through; hand it back to `failed` / `succeeded` / `end`."""

    source: str
    user: str


class LoginThrottled(AuthenticationFailed):
    """Refused before the credentials were looked at: too many recent failures."""


class FailureBackoff:
    def __init__(self, *, free_failures: int = 3, base: float = 0.5, max_delay: float = 30.0,
                 forget_after: float = 900.0, max_sources: int = 10_000) -> None:
        self.free_failures = free_failures
        self.base = base
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_sources = max_sources
        self._entries: BoundedCache[tuple[str, str | None], _Entry] = BoundedCache(max_sources)
        # one lock per (source, user) with attempts running or waiting, and how many there are
        self._turns: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    # --- one login attempt ------------------------------------------------------------------------

    async def begin(self, source: str, user: str, clock: Callable[[], float] = time.monotonic) -> Attempt:
        """Wait for this (source, user)'s turn, then let the attempt through or raise LoginThrottled
        (28P01) saying when to retry. Every Attempt returned must be handed to `end`."""
        key = (source, user)
        lock, n = self._turns.get(key) or (asyncio.Lock(), 0)
        self._turns[key] = (lock, n + 1)
        try:
            await lock.acquire()
        except BaseException:  # cancelled while waiting (the handshake timed out)
            self._leave(key)
            raise
        now = clock()
        wait = max(self.delay_for(source, now, user), self.delay_for(source, now))
        if wait > 0:
            self.end(Attempt(source, user))
            raise LoginThrottled(
                f"too many failed logins from this address; the next attempt is allowed in {wait:.1f}s",
                hint="Check the password or token, and retry after the wait; each further failure doubles it.")
        return Attempt(source, user)

    def failed(self, attempt: Attempt, now: float) -> float:
        """The attempt's credentials were wrong; returns the wait before the next one is allowed."""
        own = self._record(attempt.source, attempt.user, now)
        per_source = self._record(attempt.source, None, now)
        return max(own, per_source)

    def succeeded(self, attempt: Attempt) -> None:
        """Clears this (source, user) only: the source's failures stand."""
        self._entries.pop((attempt.source, attempt.user))

    def end(self, attempt: Attempt) -> None:
        """The attempt is over, however it ended (also a client that went away mid-login): next, please."""
        key = (attempt.source, attempt.user)
        turn = self._turns.get(key)
        if turn is not None and turn[0].locked():
            turn[0].release()
        self._leave(key)

    def _leave(self, key: tuple[str, str]) -> None:
        turn = self._turns.get(key)
        if turn is None:
            return
        if turn[1] <= 1:
            del self._turns[key]
        else:
            self._turns[key] = (turn[0], turn[1] - 1)

    # --- the counts -------------------------------------------------------------------------------

    def record_failure(self, source: str, now: float, user: str | None = None) -> float:
        """Count a failure of `source` (and of `user` from it); returns the wait before its next attempt."""
        if user is None:
            return self._record(source, None, now)
        return self.failed(Attempt(source, user), now)

    def delay_for(self, source: str, now: float, user: str | None = None) -> float:
        """Seconds until `source` (or `user` from `source`) may try again (0: now)."""
        e = self._live((source, user), now)
        if e is None:
            return 0.0
        return max(0.0, self._delay(e.failures) - (now - e.last))

    def failures(self, source: str, now: float, user: str | None = None) -> int:
        e = self._live((source, user), now)
        return e.failures if e else 0

    def _record(self, source: str, user: str | None, now: float) -> float:
        key = (source, user)
        e = self._live(key, now)
        if e is None:
            e = _Entry(0, now)
        e.failures += 1
        e.last = now
        self._entries.put(key, e)
        return self._delay(e.failures)

    def _live(self, key: tuple[str, str | None], now: float) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None and now - e.last > self.forget_after:
            self._entries.pop(key)
            return None
        return e

    def _delay(self, failures: int) -> float:
        over = failures - self.free_failures
        if over < 0:
            return 0.0
        return min(self.max_delay, self.base * (2.0 ** min(over, 30)))
