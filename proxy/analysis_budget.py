"""Bounds on what one statement can make the proxy do, so one agent cannot stall the others.

The proxy runs every session on one event loop. A statement's analysis (policy and masking)
grows with its text: a 1 MiB IN list costs seconds and a few hundred MB of parse trees, and
on the loop that would stop every other session for as long. Three bounds:

* **Size** (`limits.maxStatementBytes`, 512 KiB by default): a longer Query or Parse text is
  refused (54000) by the relay before anything reads it — as soon as the message header shows
  it, the rest dropped as it arrives, not buffered; the server sees only the relay's sentinel,
  so its state changes as it would for any failing statement.
* **Where**: a text above `limits.analysisOffloadBytes` (16 KiB) is analysed off the loop.
  The policy analysis decodes libpg_query's JSON tree with `json.loads`, one C call that holds
  the interpreter lock throughout (1.8 s for a 1 MiB OR chain, measured): a thread would still
  stall the loop, so it runs in a worker *process* (`_serve`). Only the compact, picklable
  `Analysis` comes back. The masking plan needs this session's catalog and cursors; it runs on
  a worker thread (pglast builds its AST in Python objects, so the loop gets the lock at least
  every few ms) on a scratch copy of the session's masking view (the session's own names change
  only when the server confirms them, proxy/session.py).
* **Time** (`limits.analysisTimeout`, 10 s): past it the statement is refused (54000, fail
  closed) and the worker process is killed; a fresh one starts for the next long statement.
  The worker process also restarts whenever a statement left it above `RECYCLE_RSS_BYTES`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pgwarden.errors import AgentError, PolicyDenied, StatementLimit

log = logging.getLogger("pgwarden.proxy.analysis")

# A worker process left above this after a statement is replaced (freed parse trees may stay
# mapped in the allocator's arenas).
RECYCLE_RSS_BYTES = 96 * 1024 * 1024


def statement_too_large(what: str, size: int, limit: int) -> StatementLimit:
    return StatementLimit(
        f"pgwarden refuses this {what}: its text is {size:,} bytes, above the proxy's limit of {limit:,} bytes "
        "(limits.maxStatementBytes); nothing was sent to the database",
        hint="Pass large data as parameters of a prepared statement (e.g. WHERE id = ANY($1)) or with COPY, "
        "or split the statement; an operator can raise spec.limits.maxStatementBytes in the ProxyConfig.",
    )


def analysis_too_long(size: int, timeout: float) -> StatementLimit:
    return StatementLimit(
        f"pgwarden refuses this statement: analysing its {size:,}-byte text took longer than {timeout:g}s "
        "(limits.analysisTimeout); nothing was sent to the database",
        hint="Shorten the statement (pass long lists as an array parameter or with COPY) or retry when the "
        "proxy is less busy; an operator can raise spec.limits.analysisTimeout in the ProxyConfig.",
    )


@dataclass
class Analysed:
    """What the gate needs from a statement's analysis, made off the event loop."""

    decision: Any = None  # pgwarden.policy.Decision, or None without an AccessPolicy
    plan: Any = None  # pgwarden.masking.StatementPlan, or None without masking
    error: AgentError | None = None


# -- the worker process ----------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _serve(conn: Connection) -> None:
    """The worker process: policy analyses of long texts, one at a time, until the pipe closes."""
    from pgwarden.policy.analysis import analyze

    while True:
        try:
            sql, search_path, server_version = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", analyze(sql, search_path, server_version))
        except BaseException as e:  # noqa: BLE001 - reported to the proxy, which refuses the statement
            reply = ("error", type(e).__name__)
        del sql
        try:
            conn.send((reply, _rss_bytes()))
        except (OSError, ValueError):
            return


@contextmanager
def _yielding() -> Iterator[None]:
    """While a long masking plan runs on its thread, let the event loop in sooner.

    The plan builds and drops a few hundred thousand AST objects; a cyclic collection over them
    holds the interpreter lock for ~50 ms at a time (measured), so the collector waits until the
    plan is done (the tree has no cycles: refcounting frees it). And the loop thread gets the lock
    after 1 ms instead of 5: its median wake-up delay fell from 5.3 to 1.2 ms (measured), the
    plan took no longer. Both settings are process-wide; only this thread changes them."""
    collecting, interval = gc.isenabled(), sys.getswitchinterval()
    gc.disable()
    sys.setswitchinterval(0.001)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if collecting:
            gc.enable()


class EngineFailed(Exception):
    """The policy analysis raised in the worker process (its exception's name is the message)."""


class _Worker:
    """One analysis process, started on first use.

    A plain `python -m pgwarden.proxy.analysis_budget FD` over a socket pair, not
    multiprocessing's spawn: that re-imports the parent's `__main__`, which need not be
    importable (an embedding program, stdin), and a fork of a process with threads is unsafe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.started = 0  # processes started so far (tests, metrics)
        self.last_rss = 0
        self.current: str | None = None  # the text being analysed now
        self._killed: str | None = None

    def analyze(self, sql: str, search_path: tuple[str, ...], server_version: int = 0) -> Any:
        with self._lock:
            self.current = sql
            try:
                conn = self._ensure()
                if self._killed is sql:  # its budget ran out while the process was starting
                    self._stop()
                    raise RuntimeError("the analysis was stopped")
                conn.send((sql, search_path, server_version))
                (kind, value), rss = conn.recv()
            except (EOFError, OSError) as e:
                self._stop()
                raise RuntimeError("the analysis worker stopped") from e
            finally:
                self.current = self._killed = None
            self.last_rss = rss
            if rss > RECYCLE_RSS_BYTES:
                self._stop()
        if kind != "ok":
            raise EngineFailed(value)
        return value

    def _ensure(self) -> Connection:
        if self._proc is None or self._proc.poll() is not None or self._conn is None:
            self._stop()
            mine, theirs = socket.socketpair()
            try:
                fd = theirs.fileno()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pgwarden.proxy.analysis_budget", str(fd)],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )
            finally:
                theirs.close()
            self._proc, self._conn = proc, Connection(mine.detach())
            self.started += 1
        return self._conn

    def _stop(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.wait(5)

    def kill(self, sql: str | None = None) -> None:
        """Stop the running analysis (of `sql` only, if given: from the event loop when that
        statement's budget ran out; another statement's analysis is left alone)."""
        proc = self._proc
        if sql is not None and self.current is not sql:
            return
        self._killed = sql
        if proc is not None and proc.poll() is None:
            proc.kill()  # the worker thread's recv() then fails, and _stop() cleans up

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


class AnalysisOffload:
    """One per proxy: analyses of texts longer than `above_bytes`, off the event loop."""

    def __init__(self, above_bytes: int, timeout: float) -> None:
        # a text longer than this many characters goes off the loop (the gate compares, compiled,
        # without a call). Characters <= bytes: a text with fewer characters than the threshold may
        # still pass it in UTF-8 bytes, but only by a factor of at most 4; close enough for a cost bound
        self.above_bytes = above_bytes
        self.timeout = timeout
        self.worker = _Worker()
        # one statement at a time: the memory of one long analysis is the most the proxy holds
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgwarden-analysis")

    async def check(self, gate: Any, sql: str, prepared_name: str | None) -> Any:
        """The gate's verdict for `sql`, analysed off the loop; a refusal past the time budget."""
        loop = asyncio.get_running_loop()
        work = self._work(gate, sql, prepared_name)
        try:
            analysed = await asyncio.wait_for(loop.run_in_executor(self._threads, work), self.timeout)
        except TimeoutError:
            self.worker.kill(sql)
            log.warning("analysis of a %d-character statement exceeded %gs; refused", len(sql), self.timeout)
            analysed = Analysed(error=analysis_too_long(len(sql.encode()), self.timeout))
        except EngineFailed as e:  # as the same failure on the loop is answered (gate._check)
            log.warning("policy analysis of a %d-character statement failed: %s", len(sql), e)
            analysed = Analysed(error=PolicyDenied(f"pgwarden could not decide this statement ({e})"))
        except Exception as e:  # the engine or the worker failing must never let a statement through
            log.exception("analysis of a %d-character statement failed", len(sql))
            analysed = Analysed(
                error=StatementLimit(
                    f"pgwarden could not analyse this statement ({type(e).__name__}); nothing was sent to the database",
                    hint="Shorten the statement or retry; the proxy's log has the details.",
                )
            )
        verdict = (
            gate.parse(prepared_name, sql, analysed)
            if prepared_name is not None
            else gate.query(sql, analysed)
        )
        if verdict is not None and verdict.wait is not None:
            return await verdict.wait
        return verdict

    def _work(self, gate: Any, sql: str, prepared_name: str | None) -> Callable[[], Analysed]:
        """The blocking part, run on the worker thread: everything it reads is taken now, on the loop."""
        from pgwarden.masking import MaskingSession
        from pgwarden.masking.catalog import UNKNOWN
        from pgwarden.policy.analysis import provide

        # the catalog the gate plans with now (UNKNOWN if the schema changed since it was read:
        # fail closed) and the session registry's view with it, as the gate decides
        catalog = (gate._snapshot() or UNKNOWN) if gate.masking is not None else None
        gate._sync_views(catalog)
        policy, masking, state = gate.policy, gate.masking, gate.state
        msession = gate.msession
        search_path = state.search_path if policy is not None else gate.rt.search_path
        version = state.server_version
        mask_path = gate.rt.search_path
        # a scratch copy: the plan may change it for later statements of the text; the session's
        # own names change only when the server confirms them (proxy/session.py)
        draft = MaskingSession(dict(msession.cursors), dict(msession.prepared))

        def work() -> Analysed:
            provide(sql, search_path, self.worker.analyze(sql, search_path, version), version)
            decision = policy.decide(sql, state, prepare_as=prepared_name) if policy is not None else None
            if decision is not None and decision.action == "deny" and decision.enforce:
                return Analysed(decision=decision)
            if masking is None:
                return Analysed(decision=decision)
            with _yielding():
                plan = masking.plan(sql, catalog, mask_path, session=draft)
            return Analysed(decision=decision, plan=plan)

        return work

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.worker.kill()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
