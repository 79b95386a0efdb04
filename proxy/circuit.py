"""The circuit breaker: an agent that keeps hitting the gate is stopped, and one that floods it is slowed.

An agent whose statements keep being refused is broken or probing the gate ("DROP DATABASE"
refused, so it tries "DROP SCHEMA public CASCADE"). With `limits.maxDenials: {count, window,
lockout}` in its AccessPolicy, the refusal past `count` within `window` ends its session (PW006,
FATAL) and its identity is refused new sessions on this proxy for `lockout`. With
`limits.maxStatementsPerMinute` a statement past the rate is refused (53400) and the session goes
on. Allowed statements never count towards a lockout; refusals for the rate limit do not either.

Lockouts live in a JSON file (`ProxyConfig.spec.lockouts.path`, 0600) so that a person can list
and lift them with `pgwarden lockouts list|lift` while the proxy runs: the proxy reads the file
again when it changed. A lift is marked in the file (who, when) rather than deleted, so the proxy
can write it into the audit chain before it forgets the lockout.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgwarden.errors import UserError

log = logging.getLogger("pgwarden.proxy.circuit")


@dataclass
class Lockout:
    subject: str
    until: float  # epoch seconds
    refused: int
    reason: str
    locked_at: float
    lifted_by: str = ""
    lifted_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"until": self.until, "refused": self.refused, "reason": self.reason,
                               "lockedAt": self.locked_at}
        if self.lifted_by:
            out |= {"liftedBy": self.lifted_by, "liftedAt": self.lifted_at}
        return out

    @classmethod
    def from_json(cls, subject: str, raw: dict[str, Any]) -> Lockout:
        return cls(subject, float(raw["until"]), int(raw.get("refused", 0)), str(raw.get("reason", "")),
                   float(raw.get("lockedAt", 0)), str(raw.get("liftedBy", "")), float(raw.get("liftedAt", 0)))


def read_book(path: Path) -> dict[str, Lockout]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"the lockout file {path} cannot be read ({e}); fix or remove it") from e
    if not isinstance(raw, dict):
        raise UserError(f"the lockout file {path} is not a JSON object; fix or remove it")
    return {s: Lockout.from_json(s, v) for s, v in raw.items() if isinstance(v, dict)}


def write_book(path: Path, book: dict[str, Lockout]) -> None:
    """Atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".lockouts-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({s: lk.to_json() for s, lk in sorted(book.items())}, fh, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class CircuitBreaker:
    """One per proxy: refusals and statement rates per identity, and the lockouts they cause."""

    path: Path | None = None
    clock: Callable[[], float] = time.time
    _refusals: dict[str, deque[float]] = field(default_factory=dict)
    _statements: dict[str, deque[float]] = field(default_factory=dict)
    _book: dict[str, Lockout] = field(default_factory=dict)
    _book_mtime: float = -1.0

    # -- decisions ------------------------------------------------------------------------------
    def refused(self, subject: str, count: int, window: float, lockout: float, why: str) -> Lockout | None:
        """Count one refused statement; the Lockout it causes when it is past `count` in `window`."""
        now = self.clock()
        q = self._refusals.setdefault(subject, deque())
        q.append(now)
        while q and q[0] <= now - window:
            q.popleft()
        if len(q) <= count:
            return None
        self._refusals.pop(subject, None)
        self._load()
        lk = Lockout(subject, now + lockout, len(q), why, now)
        self._book[subject] = lk
        self._save()
        return lk

    def statement(self, subject: str, per_minute: int) -> bool:
        """Count one statement; False when it is past `per_minute` in the last 60 s (not counted)."""
        now = self.clock()
        q = self._statements.setdefault(subject, deque())
        while q and q[0] <= now - 60:
            q.popleft()
        if len(q) >= per_minute:
            return False
        q.append(now)
        return True

    def locked(self, subject: str) -> Lockout | None:
        """The lockout in force for `subject` now, if any."""
        self._load()
        lk = self._book.get(subject)
        if lk is None or lk.lifted_by or lk.until <= self.clock():
            return None
        return lk

    def take_lifts(self) -> list[Lockout]:
        """Lockouts lifted by a person (or run out) since the last call: dropped from the file here,
        after the caller recorded them."""
        self._load()
        now = self.clock()
        done = [lk for lk in self._book.values() if lk.lifted_by or lk.until <= now]
        if done:
            for lk in done:
                del self._book[lk.subject]
            self._save()
        return done

    # -- the file ---------------------------------------------------------------------------------
    def _load(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            self._book, self._book_mtime = {}, -1.0
            return
        if mtime != self._book_mtime:
            self._book = read_book(self.path)
            self._book_mtime = mtime

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            write_book(self.path, self._book)
            self._book_mtime = self.path.stat().st_mtime_ns / 1e9
        except OSError as e:  # the lockout still holds in memory; only lifting it by file fails
            log.error("lockouts cannot be written to %s (%s); they hold until the proxy restarts", self.path, e)


def lift(path: Path, subject: str, by: str, now: float | None = None) -> Lockout:
    """`pgwarden lockouts lift`: mark `subject`'s lockout lifted by `by`."""
    book = read_book(path)
    lk = book.get(subject)
    if lk is None or lk.lifted_by:
        raise UserError(f"{subject!r} is not locked out in {path} (`pgwarden lockouts list` shows who is)")
    lk.lifted_by, lk.lifted_at = by, now if now is not None else time.time()
    write_book(path, book)
    return lk
