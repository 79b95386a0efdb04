"""The relay state machine of one authenticated session, as pure code over bytes.

The asyncio shell (`server.py`) feeds it what each side sent and gives it two sinks. It:

* frames client messages and asks the `Gate` about every statement (Query, Parse); a refused
  statement is replaced upstream by a *sentinel* that fails in PostgreSQL's raw parser, and the
  server's resulting ErrorResponse is swapped for ours. The server therefore goes through
  exactly the state change a failing statement causes (an open transaction becomes aborted, an
  extended-protocol batch is skipped until Sync, ReadyForQuery carries the true status), the
  client and server never fall out of step, and nothing of the refused statement reaches the
  server. Messages after a refused Parse are dropped until Sync (their parameters included).
* keeps a queue of the responses it expects, so every server message can be tied to the
  client message it answers: this is where results get their `RowRewriter` (masking) and
  where outcomes are reported.
* refuses FunctionCall (`F`), which could call any function by OID.
* runs a write whose verdict carries an `AffectedGuard` so that it can be undone: in its own
  transaction, or in a savepoint inside the client's, with its results held back until its
  command tag says how many rows it changed (see `_GuardRun`). The client sees one statement.

Hot path: an unmasked DataRow costs one frame step and no copy; a client chunk whose messages
are all forwarded unchanged is written upstream as the same bytes object.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pgwarden.errors import AgentError, PolicyDenied, ProtocolViolation, TooManyRowsAffected

try:  # mypyc reads the class decorator when compiling; at run time it does nothing
    from mypy_extensions import mypyc_attr
except ImportError:  # not installed (the images): the same no-op
    from pgwarden.compiled import mypyc_attr  # type: ignore[assignment]
from pgwarden.proxy import messages as m
from pgwarden.proxy.analysis_budget import statement_too_large
from pgwarden.proxy.session import (
    DROP_PORTAL,
    DROP_STATEMENT,
    PUT_PORTAL,
    PUT_STATEMENT,
    Change,
    PortalEntry,
    PreparedEntry,
    SessionNames,
)

# A statement that fails in the raw parser: no catalog access, no side effects.
SENTINEL_SQL = "pgwarden refused the statement that was sent here"
_SENTINEL_QUERY: Final = m.message(m.F_QUERY, m.cstr(SENTINEL_SQL))
# Sent after a row-limit cancel was delivered: it takes the cancel if that arrives late, so the
# cancel can never hit the client's next statement. Its answer is swallowed.
_ABSORBER_QUERY: Final = m.message(m.F_QUERY, m.cstr("SELECT 1 /* pgwarden: absorbs a late row-limit cancel */"))
_SENTINEL_PARSE: Final = m.message(m.F_PARSE, m.cstr("") + m.cstr(SENTINEL_SQL) + b"\0\0")
_FLUSH: Final = m.message(b"H", b"")
_SYNC: Final = m.message(b"S", b"")
_UNREAD_PARSE: Final = m.ParseMsg("", "", ())

# Message type bytes as ints (frames() yields ints). Literals marked Final: compiled (mypyc), a
# Final literal is a constant in the C code, any other module-level name a dict lookup at every
# use (about sixty per statement in the two loops below, measured with callgrind).
# client messages
_Q: Final = 0x51       # Q
_P: Final = 0x50       # P
_B: Final = 0x42       # B
_D: Final = 0x44       # D
_E: Final = 0x45       # E
_C: Final = 0x43       # C
_S: Final = 0x53       # S
_H: Final = 0x48       # H
_X: Final = 0x58       # X
_F: Final = 0x46       # F
_COPY_D: Final = 0x64  # d
_COPY_C: Final = 0x63  # c
_COPY_F: Final = 0x66  # f
_LEAN_PASS: Final = frozenset((_P, _B, _D, _E, _C, _H, _COPY_D, _COPY_C, _COPY_F))
# the first of these after a Sync (or a Query) opens an extended-protocol unit
_UNIT_OPENERS: Final = frozenset((_P, _B, _D, _E, _C))
# server messages
_T: Final = 0x54        # T RowDescription
_DR: Final = 0x44       # D DataRow
_CC: Final = 0x43       # C CommandComplete
_EQ: Final = 0x49       # I EmptyQueryResponse
_ER: Final = 0x45       # E ErrorResponse
_Z: Final = 0x5A        # Z ReadyForQuery
_PC: Final = 0x31       # 1 ParseComplete
_BC: Final = 0x32       # 2 BindComplete
_CLC: Final = 0x33      # 3 CloseComplete
_ND: Final = 0x6E       # n NoData
_PS: Final = 0x73       # s PortalSuspended
_COPYOUT: Final = 0x48  # H CopyOutResponse
_NOTICE: Final = 0x4E   # N NoticeResponse
_ASYNC: Final = frozenset((0x41, 0x53))  # A NotificationResponse, S ParameterStatus: any time

# The guard's savepoint, prepared statement and portal; clients may not use names with this prefix.
GUARD_PREFIX: Final = "pgwarden_guard"
_GUARD_REPLIES: Final = 5  # ParseComplete, BindComplete, CommandComplete, CloseComplete (portal, statement)
_GUARD_NOTICES: Final = 100
_COUNTED: Final = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE"))
# CommandComplete tags of an Execute that change the transaction state inside an extended batch:
# BEGIN opens a block; COMMIT / ROLLBACK may end it or, AND CHAIN, open the next one (unknown)
_TXN_TAGS: Final = {"BEGIN": b"T", "START TRANSACTION": b"T", "COMMIT": b"?", "ROLLBACK": b"?",
             "PREPARE TRANSACTION": b"?"}

# The server is trusted to frame its messages; a field value may be up to 1 GB, so results are
# not held to the client's message limit.
MAX_SERVER_MESSAGE: Final = 0x7FFFFFFF
# An incomplete server message needing more than this is gathered as a list of reads and joined
# once: joining at every read would copy a 500 MB value hundreds of times.
_GATHER_ABOVE: Final = 65536

# kinds of expected responses
QUERY: Final = 0
SYNC: Final = 1
PARSE: Final = 2
BIND: Final = 3
DESCRIBE: Final = 4
EXECUTE: Final = 5
CLOSE: Final = 6


class RowRewriter(Protocol):
    """Rewrites the rows of one result set (masking)."""

    def rewrite(self, payload: bytes) -> bytes: ...

    def copy_data(self, payload: bytes) -> bytes: ...


class ResultPolicy(Protocol):
    """What a statement's results must go through; produced by the gate with its verdict."""

    def bind(self, index: int, fields: tuple[m.Field, ...]) -> RowRewriter | None:
        """A rewriter for result set `index` of the statement, or None to pass rows as they are."""
        ...


class Verdict:
    """The gate's answer for one statement. `None` from the gate means: forward, nothing else."""

    # a plain class, not a dataclass: made per statement (see pgwarden/compiled.py)
    __slots__ = ("error", "wait", "results", "max_rows", "context", "changes", "entry", "guard", "pins")

    def __init__(self, error: AgentError | None = None, wait: Awaitable[Verdict] | None = None,
                 results: ResultPolicy | None = None, max_rows: int | None = None, context: Any = None,
                 changes: tuple[tuple[Change, ...], ...] = (), entry: PreparedEntry | None = None,
                 guard: AffectedGuard | None = None, pins: tuple[tuple[str, str, Any], ...] = ()) -> None:
        self.error = error
        # hold the statement until this resolves to a final Verdict (approvals, durable audit)
        self.wait = wait
        self.results = results
        # stop relaying rows beyond this many per result, cancel the query and fail it (policy limits)
        self.max_rows = max_rows
        # opaque to the relay; handed back in outcome events (audit ids, timings)
        self.context = context
        # Query: for each statement of the text, what it does to the session's names when it runs
        self.changes = changes
        # Parse: the statement as the gate decided it (kept in the session registry once confirmed)
        self.entry = entry
        # a write that is undone when it changes more rows than this allows (PW005)
        self.guard = guard
        # Bind of a text that looks names up when it runs: (kind "S"|"P", name, the entry it was
        # decided with); its Execute is refused when one of them means something else by then
        self.pins = pins


@dataclass(frozen=True)
class AffectedGuard:
    """Run a write so that it is undone if it changes more than `limit` rows (PW005).

    `source` names what set the limit, for the agent's error and the audit: "request pgw-…" (an
    approval bound to its preview) or "limits.maxAffectedRows of <rule>".
    """

    limit: int
    source: str


def stricter(a: AffectedGuard | None, b: AffectedGuard | None) -> AffectedGuard | None:
    """The guard with the smaller limit, when two apply (an approval's preview and maxAffectedRows)."""
    if a is None or (b is not None and b.limit < a.limit):
        return b
    return a


# what a barrier resolves to: the held messages are decided afresh, with no verdict taken
BARRIER: Final = Verdict()


class Gate(Protocol):
    def query(self, sql: str) -> Verdict | None: ...

    def parse(self, name: str, sql: str) -> Verdict | None: ...

    def bind(self, bind: m.BindMsg, statement: PreparedEntry | None) -> Verdict | None:
        """`statement`: what the named statement is on the server (None: nothing the proxy knows)."""
        ...

    def execute(self, name: str, portal: PortalEntry | None) -> Verdict | None:
        """An Execute of a portal that no protocol Bind made: a SQL cursor, or a name unknown."""
        ...

    def attach(self, names: SessionNames) -> None:
        """The session's registry of names, which the gate decides against (once, at the start)."""
        ...

    def mask_error(self, fields: dict[str, str], plan: Any) -> dict[str, str]:
        """ErrorResponse / NoticeResponse fields as the client may see them (masked values out)."""
        ...

    def refuse_unread(self, head: bytes, size: int, err: AgentError) -> Verdict:
        """The refusal of a text too large to read (only its first bytes are known), recorded."""
        ...


@mypyc_attr(allow_interpreted_subclasses=True)  # DenyAll and the tests' gates are not compiled
class ForwardingGate:
    """A gate that decides nothing (every message is forwarded): the base of gates that decide
    only some messages, so each member of the Gate protocol has a plain default."""

    def query(self, sql: str) -> Verdict | None:
        return None

    def parse(self, name: str, sql: str) -> Verdict | None:
        return None

    def bind(self, bind: m.BindMsg, statement: PreparedEntry | None) -> Verdict | None:
        return None

    def execute(self, name: str, portal: PortalEntry | None) -> Verdict | None:
        return None

    def attach(self, names: SessionNames) -> None:
        return None

    def mask_error(self, fields: dict[str, str], plan: Any) -> dict[str, str]:
        return fields

    def refuse_unread(self, head: bytes, size: int, err: AgentError) -> Verdict:
        return Verdict(error=err)


class Observer(Protocol):
    """Outcome events, for audit and recording."""

    def statement_done(self, context: Any, tag: str, error: dict[str, str] | None, undone: bool = False) -> None:
        """`undone`: the statement ran (`tag` is the server's) and the proxy rolled it back (PW005)."""
        ...

    def server_error(self, fields: dict[str, str]) -> None: ...

    def result_columns(self, context: Any, fields: tuple[m.Field, ...]) -> bool:
        """A result set starts; return True to be handed its rows (as the client receives them)."""
        ...

    def result_row(self, context: Any, payload: bytes) -> bool:
        """One DataRow payload as sent to the client; return False to stop receiving rows."""
        ...

    def session_end(self, reason: str) -> None:
        """The session is over (the client, the server or the proxy ended it): close its records."""
        ...


class Pending:
    """A message sent to the server whose answer has not come back yet (one unit of the queue)."""

    # a plain class, not a dataclass: made per statement (see pgwarden/compiled.py)
    __slots__ = ("kind", "replace_error", "results", "context", "index", "name", "target", "rewriter", "fields",
                 "max_rows", "rows", "limit_hit", "swallow", "portal", "prep", "changes", "fail_changes", "qchanges",
                 "puts", "settle", "ddl")

    def __init__(self, kind: int, replace_error: bytes | None = None, results: ResultPolicy | None = None,
                 context: Any = None, index: int = 0, name: str = "", target: str = "",
                 rewriter: RowRewriter | None = None, fields: tuple[m.Field, ...] | None = None, max_rows: int | None = None,
                 rows: int = 0, limit_hit: bool = False, swallow: bool = False, portal: Any = None, prep: Any = None,
                 changes: tuple[Change, ...] = (), fail_changes: tuple[Change, ...] = (),
                 qchanges: tuple[tuple[Change, ...], ...] = (), puts: bool = False, settle: bool = False) -> None:
        self.kind = kind
        self.replace_error = replace_error
        self.results = results
        self.context = context
        # QUERY: index of the statement whose results are flowing; EXECUTE: portal name
        self.index = index
        self.name = name
        self.target = target
        self.rewriter = rewriter
        self.fields = fields
        self.max_rows = max_rows
        self.rows = rows
        self.limit_hit = limit_hit
        self.swallow = swallow  # the proxy's own statement: nothing of its answer reaches the client
        # EXECUTE / DESCRIBE of a portal: the portal as bound when the message was sent
        self.portal = portal
        # DESCRIBE of a statement: the statement the name meant when the message was sent
        self.prep = prep
        # session names: made when the server confirms this message (ParseComplete, BindComplete,
        # CloseComplete, an Execute's CommandComplete), or when it fails (`fail_changes`)
        self.changes = changes
        self.fail_changes = fail_changes
        # QUERY: per statement of the text, confirmed by that statement's CommandComplete
        self.qchanges = qchanges
        self.puts = puts  # makes a name: later units wait for the server's word on it
        self.settle = settle  # SYNC: ends the batch whose implicit transaction a guard made explicit
        self.ddl = False  # runs a schema change: counted in SessionNames.ddl_in_flight until answered


# A Query runs as if through the unnamed statement and portal: PostgreSQL drops both first.
_QUERY_DROPS: Final[tuple[Change, ...]] = ((DROP_STATEMENT, "", None), (DROP_PORTAL, "", None))
_SENTINEL_PARSE_FAILS: Final[tuple[Change, ...]] = ((DROP_STATEMENT, "", None),)


class _Barrier:
    """Held client messages wait here until the server has answered every earlier unit that
    makes a name (or everything sent, or a guarded statement). Made without an event loop (the
    relay is pure code); awaited in one. Resolves to `result`: BARRIER, or the verdict of a held
    Query that is to be taken up again as decided."""

    def __init__(self, result: Verdict = BARRIER) -> None:
        self.released = False
        self.result = result
        self._fut: asyncio.Future[Verdict] | None = None

    def release(self) -> None:
        self.released = True
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(self.result)

    async def wait(self) -> Verdict:
        if self.released:
            return self.result
        self._fut = asyncio.get_running_loop().create_future()
        return await self._fut


# phases of a guarded statement
_PRELUDE, _STATEMENT, _FINISH, _CLEANUP = range(4)


@dataclass(slots=True)
class _GuardRun:
    """One guarded write in flight. The client is held from its message on, and the server had
    answered everything sent before it, so every server message until the guard ends belongs to
    the guard: the prelude (BEGIN, or SAVEPOINT inside the client's transaction), the statement,
    and the finish (COMMIT / RELEASE, or ROLLBACK / ROLLBACK TO + RELEASE). The proxy's own
    commands are swallowed; the statement's messages are kept raw and replayed through the
    normal path (masking, audit, the session registry) once the outcome is known."""

    guard: AffectedGuard | None  # None: settling the transaction a guard left open (at Sync)
    head: Pending
    simple: bool  # a Query; else a protocol Execute (commands injected as Parse/Bind/Execute)
    own_tx: bool  # BEGIN … COMMIT/ROLLBACK; else a savepoint in the client's transaction
    waiter: _Barrier
    phase: int = _PRELUDE
    replies: int = 0  # extended: completion messages still owed for the injected commands
    frames: list[bytes] = field(default_factory=list)
    rows: int = 0
    overflow: bool = False  # more RETURNING rows than the limit: refused, rows not kept
    tag: str = ""
    broken: bool = False  # the prelude failed (simple): the statement fails on its own
    error: bytes | None = None  # the ErrorResponse the client gets (statement's, prelude's, COMMIT's)
    refusal: bytes | None = None  # ours, when the count is over the limit: the write is rolled back
    finish_failed: bool = False  # COMMIT / RELEASE / ROLLBACK failed: its error is the answer
    final_z: bytes = b""
    notices: int = 0  # NoticeResponses held back (at most _GUARD_NOTICES: a RAISE per row must not fill memory)


def _query(sql: str) -> bytes:
    return m.message(b"Q", m.cstr(sql))


def _injected(sql: str) -> bytes:
    """`sql` through the extended protocol under the reserved names, closed again at once: the
    client's unnamed statement and portal are untouched, and no Sync ends its batch. The statement
    is closed before the Execute: should the Execute fail, the server skips what follows up to the
    next Sync, and a statement left behind would make every later guard's Parse fail (42P05); the
    portal ends with the transaction at the latest."""
    n = m.cstr(GUARD_PREFIX)
    return (m.message(b"P", n + m.cstr(sql) + b"\0\0") + m.message(b"B", n + n + b"\0" * 6)
            + m.message(b"C", b"S" + n) + m.message(b"E", n + b"\0\0\0\0") + m.message(b"C", b"P" + n))


_SAVEPOINT: Final = f"SAVEPOINT {GUARD_PREFIX}"
_RELEASE: Final = f"RELEASE SAVEPOINT {GUARD_PREFIX}"
_ROLLBACK_TO: Final = f"ROLLBACK TO SAVEPOINT {GUARD_PREFIX}"


_TXN_UNKNOWN: Final = PolicyDenied(
    "pgwarden cannot tell whether this write runs inside a transaction: a COMMIT or ROLLBACK ran earlier "
    "in the same batch, and the write must run so that it can be undone",
    hint="Send Sync after the COMMIT or ROLLBACK, then the write.",
)


def _reserved(*names: str) -> PolicyDenied | None:
    for name in names:
        if name.startswith(GUARD_PREFIX):
            return PolicyDenied(
                f"pgwarden reserves the names starting with {GUARD_PREFIX} for its own statements; "
                f"{name!r} cannot be used",
                hint="Choose another prepared statement or portal name.",
            )
    return None


def _makes_names(changes: tuple[Change, ...]) -> bool:
    return any(c[0] in (PUT_STATEMENT, PUT_PORTAL) for c in changes)


@dataclass
class RelayStats:
    refused: int = 0


class Relay:
    def __init__(
        self,
        to_server: Callable[[bytes], None],
        to_client: Callable[[bytes], None],
        gate: Gate | None = None,
        observer: Observer | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_statement_bytes: int | None = None,
    ) -> None:
        self.to_server = to_server
        self.to_client = to_client
        self.gate = gate
        self.observer = observer
        self.max_message_bytes = max_message_bytes
        # the longest Query / Parse text accepted; longer ones are refused before any analysis
        # (without a gate nothing analyses a text, so nothing is refused)
        self.max_statement_bytes = max_statement_bytes
        self._stmt_limit = max_statement_bytes if max_statement_bytes is not None and gate is not None else 1 << 62
        self.pending: deque[Pending] = deque()
        self.tx_status = b"I"
        self.terminated = False
        self.server_fatal = False
        # no gate and no observer: extended-protocol messages pass without being parsed
        self.lean = gate is None and observer is None
        self.stats = RelayStats()
        self._cbuf = b""
        # client reads not yet processed, joined once: while a statement is held, and while the
        # message being received is incomplete (_chave of _cneed bytes arrived)
        self._cparts: list[bytes] = []
        self._chave = 0
        self._cneed = 0
        # bytes still to come of an over-size statement that was refused before it all arrived
        self._cdrop = 0
        self._dropped: tuple[int, AgentError] | None = None  # its type and error, while audited
        self._sbuf = b""
        self._sparts: list[bytes] = []
        self._shave = 0
        self._sneed = 0
        self._skip_until_sync = False
        self._held: Awaitable[Verdict] | None = None
        self._paused = False
        self._absorbing = 0  # absorber statements in flight
        self._unsynced = False  # extended-protocol messages forwarded since the last Sync/Query
        # called when the absorber's answer is complete: the shell releases the client
        self.on_absorbed: Callable[[], None] | None = None
        self._resolved: Verdict | None = None
        # every prepared statement, portal and cursor of the server session (see session.py)
        self.names = SessionNames()
        if gate is not None:
            gate.attach(self.names)
        self._puts_in_flight = 0  # pending entries that make a name the server has not confirmed
        self._barrier: _Barrier | None = None  # released when _puts_in_flight drops to 0
        self._drain: _Barrier | None = None  # a guarded statement waits for every answer before it
        self._guard: _GuardRun | None = None  # a guarded statement in flight (the client is held)
        # the transaction state an Execute in the open batch left: b"T" after BEGIN, b"?" unknown
        self._unit_txn: bytes | None = None
        # an extended batch outside a transaction whose guarded write succeeded: the proxy's BEGIN
        # stays open so the batch still commits (or rolls back) as one at Sync. b"": as the guard
        # left it; b"T" / b"?": the client's own BEGIN / COMMIT / ROLLBACK ran in it since
        self._open_tx: bytes | None = None
        self._settle_waiter: _Barrier | None = None
        self._rewriter: RowRewriter | None = None
        # the statement context whose rows the observer records, while it wants them
        self._recording: Any = None
        self._observe_rows = observer is not None
        self._exec_head: Pending | None = None
        # the last first-result rewriter: (plan, fields, rewriter); see _bind
        self._bound: tuple[object, object, RowRewriter | None] | None = None
        # masks values printed in ErrorResponse / NoticeResponse text (a failed cast shows its input)
        # called once when a result passes its row limit: the shell cancels the query upstream
        self.on_limit: Callable[[], None] | None = None
        self.error_masker: Callable[[dict[str, str], Any], dict[str, str]] | None = (
            gate.mask_error if gate is not None else None)

    # -- state visible to the shell ----------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while the server owes responses (a query is in flight)."""
        return bool(self.pending)

    @property
    def guarding(self) -> bool:
        """True while the client is held for a guarded write (waiting for the server's answers)."""
        return self._guard is not None or self._drain is not None or self._settle_waiter is not None

    # -- client -> server ------------------------------------------------------------------------
    def client_data(self, data: bytes) -> Awaitable[Verdict] | None:
        """Process bytes from the client. Returns an awaitable when a statement is held: the
        shell awaits it, then calls resume() with its result. Raises ProtocolViolation."""
        if self._cdrop:
            if len(data) <= self._cdrop:
                self._cdrop -= len(data)
                return None
            data, self._cdrop = data[self._cdrop :], 0
        if not (self._cbuf or self._cparts or self._held is not None or self._paused):
            return self._process_client(data)  # the common case: nothing waits from earlier reads
        self._cparts.append(data)
        self._chave += len(data)
        if self._held is not None or self._paused or self._chave < self._cneed:
            return None
        return self._process_client(self._take_client())

    def _take_client(self) -> bytes:
        """Everything the client sent that is not processed yet, as one bytes object."""
        parts = self._cparts
        if self._cbuf:
            parts.insert(0, self._cbuf)
        buf = b"" if not parts else parts[0] if len(parts) == 1 else b"".join(parts)
        self._cbuf, self._cparts, self._chave, self._cneed = b"", [], 0, 0
        return buf

    def pause_client(self) -> None:
        """Keep the client's next messages back (buffered) until unpause_client()."""
        self._paused = True

    def absorb_cancel(self) -> bool:
        """Send the absorber if the server is at a sync point; False when it cannot be used
        (an extended batch is still open: the client's Sync is among the held messages)."""
        if self._unsynced:
            return False
        self.to_server(_ABSORBER_QUERY)
        self.names.stage(_QUERY_DROPS)
        self._push(Pending(QUERY, swallow=True))
        self._absorbing += 1
        return True

    def unpause_client(self) -> Awaitable[Verdict] | None:
        self._paused = False
        if self._held is not None or not (self._cbuf or self._cparts):
            return None
        return self._process_client(self._take_client())

    def resume(self, verdict: Verdict) -> Awaitable[Verdict] | None:
        """Continue after a held statement resolved to `verdict`."""
        self._held = None
        if self._dropped is not None:  # the verdict is the over-size statement's, already dropped
            (kind, err), self._dropped = self._dropped, None
            self._refuse_dropped(kind, verdict.error or err, verdict.context)
        else:
            self._resolved = None if verdict is BARRIER else verdict
        return self._process_client(self._take_client())

    def _process_client(self, buf: bytes) -> Awaitable[Verdict] | None:
        span_start = 0  # start of bytes to forward unchanged
        pos = 0
        out: list[bytes] = []
        try:
            lean = self.lean
            for t, ps, end in m.frames(buf, 0, self.max_message_bytes):
                if self._skip_until_sync:
                    self._resolved = None  # a held message the server would skip: its verdict goes too
                    if span_start < pos:
                        out.append(buf[span_start:pos])
                    if t == _S:
                        self._skip_until_sync = False
                        self._unsynced = False
                        self._push(Pending(SYNC))
                        span_start = pos  # forward the Sync itself
                        if self._open_tx is not None:
                            return self._settle_hold(buf, pos, end, out)
                    else:
                        span_start = end
                    pos = end
                    continue
                if lean and t in _LEAN_PASS:
                    # nothing decides, masks or records: only sync points need tracking
                    pos = end
                    continue
                if t == _Q or (not self._unsynced and t in _UNIT_OPENERS):
                    if self._resolved is None and self._unit_start():
                        if self._unsynced:
                            # the server answers an open batch only at Sync or Flush: ask for its
                            # answers now, or this wait would never end
                            out.append(buf[span_start:pos])
                            out.append(_FLUSH)
                            span_start = pos
                        return self._hold(buf, span_start, pos, out, Verdict(wait=self._barrier_wait()))
                if t == _Q:
                    if self._open_tx is not None:
                        raise ProtocolViolation(
                            "a simple Query inside an extended batch after a guarded write: pgwarden keeps that "
                            "write's transaction open until Sync, and ends the session rather than commit it early",
                            hint="Send Sync before a simple Query.",
                        )
                    verdict = self._take_resolved()
                    if verdict is None and end - ps - 1 > self._stmt_limit:
                        verdict = self._oversize("Query", end - ps - 1, buf[ps : ps + 1024])
                    if verdict is None and self.gate is not None:
                        verdict = self.gate.query(m.parse_query(buf[ps:end]))
                    if verdict is not None and verdict.wait is not None:
                        return self._hold(buf, span_start, pos, out, verdict)
                    guard = verdict.guard if verdict is not None and verdict.error is None else None
                    if guard is not None and verdict is not None:
                        if self.pending:  # the transaction state is known once all before it is answered
                            return self._drain_hold(buf, span_start, pos, out, verdict)
                        state = self._unit_txn or self.tx_status  # a Query inside an open batch
                        if state == b"E":
                            guard = None  # a failed transaction refuses it anyway: nothing to undo
                        elif state == b"?":
                            verdict = Verdict(error=_TXN_UNKNOWN, context=verdict.context)
                            guard = None
                    self._unsynced = False
                    entry = Pending(QUERY)
                    if verdict is not None:
                        entry.results, entry.context, entry.max_rows = verdict.results, verdict.context, verdict.max_rows
                        if verdict.error is not None:
                            if verdict.error.severity == "FATAL":
                                self._end(buf, span_start, pos, out, verdict.error)
                            out.append(buf[span_start:pos])
                            out.append(_SENTINEL_QUERY)
                            span_start = end
                            entry.replace_error = m.error_response_from(verdict.error)
                            self.stats.refused += 1
                        elif verdict.changes:
                            entry.qchanges = verdict.changes
                            for ch in verdict.changes:
                                self.names.stage(ch)
                            entry.puts = any(_makes_names(ch) for ch in verdict.changes)
                    entry.changes = _QUERY_DROPS
                    self.names.stage(_QUERY_DROPS)
                    self._push(entry)
                    if guard is not None:
                        return self._start_guard(buf, span_start, pos, end, out, entry, guard, True,
                                                 (self._unit_txn or self.tx_status) == b"I")
                elif t == _P:
                    self._unsynced = True
                    verdict = self._take_resolved()
                    start, size = m.parse_text_span(buf, ps, end) if end - ps > self._stmt_limit else (0, 0)
                    if size > self._stmt_limit:  # refused unread: decoding it could cost more than the limit allows
                        verdict = verdict or self._oversize("Parse", size, buf[start : start + 1024])
                        parse = _UNREAD_PARSE
                    else:
                        parse = m.parse_parse(buf[ps:end])
                    if verdict is None and self.gate is not None:
                        verdict = Verdict(error=err) if (err := _reserved(parse.name)) else None
                    if verdict is None and self.gate is not None:
                        verdict = self.gate.parse(parse.name, parse.query)
                    if verdict is not None and verdict.wait is not None:
                        return self._hold(buf, span_start, pos, out, verdict)
                    if verdict is not None and verdict.error is not None:
                        self._refuse_extended(out, buf, span_start, pos, verdict.error)
                        span_start = end
                    else:
                        stmt = verdict.entry if verdict is not None and verdict.entry is not None else None
                        if stmt is None:
                            stmt = PreparedEntry(parse.name, parse.query, "parse")
                            if verdict is not None:
                                stmt.results, stmt.context, stmt.max_rows = verdict.results, verdict.context, verdict.max_rows
                                stmt.guard = verdict.guard
                        put: tuple[Change, ...] = ((PUT_STATEMENT, parse.name, stmt),)
                        self.names.stage(put)
                        self._push(Pending(PARSE, name=parse.name, changes=put, puts=True,
                                           fail_changes=_SENTINEL_PARSE_FAILS if not parse.name else ()))
                elif t == _B:
                    self._unsynced = True
                    bind = m.parse_bind(buf[ps:end])
                    stmt = self.names.statement(bind.statement)
                    verdict = self._take_resolved()
                    if verdict is None and self.gate is not None and (
                            err := _reserved(bind.portal, bind.statement)) is not None:
                        verdict = Verdict(error=err)
                    if verdict is None and self.gate is not None:
                        verdict = self.gate.bind(bind, stmt)
                    if verdict is not None and verdict.wait is not None:
                        return self._hold(buf, span_start, pos, out, verdict)
                    if verdict is not None and verdict.error is not None:
                        # refused at Bind (approval bound to parameters, a name not known): fail the batch
                        self._refuse_extended(out, buf, span_start, pos, verdict.error)
                        span_start = end
                        pos = end
                        continue
                    if stmt is not None:
                        portal = PortalEntry(bind.portal, "bind", statement=stmt, results=stmt.results,
                                             context=stmt.context, max_rows=stmt.max_rows, guard=stmt.guard,
                                             formats=bind.result_formats, sql=stmt.sql)
                    else:
                        portal = PortalEntry(bind.portal, "bind", formats=bind.result_formats)
                    if verdict is not None:
                        if verdict.context is not None:
                            portal.context = verdict.context  # the approval this Bind runs under
                        if verdict.results is not None:  # decided again at this Bind
                            portal.results = verdict.results
                        if verdict.max_rows is not None:
                            portal.max_rows = verdict.max_rows
                        if verdict.guard is not None:
                            portal.guard = stricter(portal.guard, verdict.guard)
                        portal.pins = verdict.pins
                    put = ((PUT_PORTAL, bind.portal, portal),)
                    self.names.stage(put)
                    self._push(Pending(BIND, changes=put, puts=True,
                                       fail_changes=((DROP_PORTAL, "", None),) if not bind.portal else ()))
                elif t == _E:
                    self._unsynced = True
                    portal_name, _max_rows = m.parse_execute(buf[ps:end])
                    p = self.names.portal(portal_name)
                    entry = Pending(EXECUTE, name=portal_name)
                    verdict = self._take_resolved()
                    if verdict is None and self.gate is not None and (err := _reserved(portal_name)) is not None:
                        verdict = Verdict(error=err)
                    if verdict is None and p is not None and p.pins and (err := self._moved(p)) is not None:
                        verdict = Verdict(error=err)
                    own_tx: bool | None = None  # guarded: in its own transaction, or a savepoint
                    if verdict is None and p is not None and p.origin == "bind" and p.guard is not None:
                        if self.pending:  # the transaction state is known once all before it is answered
                            return self._drain_hold(buf, span_start, pos, out, BARRIER)
                        verdict, own_tx = self._guard_mode(_max_rows)
                    if verdict is None and self.gate is not None and (p is None or p.origin != "bind"):
                        verdict = self.gate.execute(portal_name, p)
                    if verdict is not None and verdict.wait is not None:
                        return self._hold(buf, span_start, pos, out, verdict)
                    if verdict is not None and verdict.error is not None:
                        self._refuse_extended(out, buf, span_start, pos, verdict.error)
                        span_start = end
                        pos = end
                        continue
                    if p is not None and p.origin == "bind":
                        prep = p.statement
                        entry.context = p.context
                        entry.max_rows = p.max_rows
                        entry.fields = p.fields or (_formatted(prep, p.formats) if prep is not None else None)
                        if entry.fields is None:  # a Describe in this batch: its columns, at the first row
                            entry.portal = p
                        if p.results is not None:
                            entry.results = p.results
                            if entry.fields is not None:
                                entry.rewriter = self._bind(p.results, 0, entry.fields)
                        if prep is not None and prep.run_changes:
                            # a Parse of PREPARE / DECLARE / DEALLOCATE / CLOSE: its names change now
                            entry.changes = prep.run_changes
                            entry.puts = _makes_names(prep.run_changes)
                            self.names.stage(prep.run_changes)
                    elif verdict is not None:  # a SQL cursor: rows masked with the plan of its DECLARE
                        entry.context, entry.max_rows, entry.results = verdict.context, verdict.max_rows, verdict.results
                        if p is not None and p.fields is not None:
                            entry.fields = p.fields
                            if entry.results is not None:
                                entry.rewriter = self._bind(entry.results, 0, entry.fields)
                        else:  # its columns come from a Describe in this batch, at the first row
                            entry.portal = p
                    self._push(entry)
                    if own_tx is not None and p is not None and p.guard is not None:
                        return self._start_guard(buf, span_start, pos, end, out, entry, p.guard, False, own_tx)
                elif t == _D:
                    self._unsynced = True
                    kind, name = m.parse_target(buf[ps:end])
                    if self.gate is not None and (err := _reserved(name)) is not None:
                        self._refuse_extended(out, buf, span_start, pos, err)
                        span_start = end
                        pos = end
                        continue
                    self._push(Pending(DESCRIBE, target=kind, name=name,
                                       portal=self.names.portal(name) if kind == "P" else None,
                                       prep=self.names.statement(name) if kind == "S" else None))
                elif t == _C:
                    self._unsynced = True
                    kind, name = m.parse_target(buf[ps:end])
                    if self.gate is not None and (err := _reserved(name)) is not None:
                        self._refuse_extended(out, buf, span_start, pos, err)
                        span_start = end
                        pos = end
                        continue
                    drop: tuple[Change, ...] = ((DROP_STATEMENT if kind == "S" else DROP_PORTAL, name, None),)
                    self.names.stage(drop)  # dropping from the view early only refuses more
                    self._push(Pending(CLOSE, changes=drop))
                elif t == _S:
                    self._unsynced = False
                    self._push(Pending(SYNC))
                    if self._open_tx is not None:
                        return self._settle_hold(buf, span_start, end, out)
                elif t in (_H, _COPY_D, _COPY_C, _COPY_F):
                    pass
                elif t == _X:
                    self.terminated = True
                elif t == _F:
                    out.append(buf[span_start:pos])
                    out.append(_SENTINEL_QUERY)
                    span_start = end
                    err = PolicyDenied(
                        "pgwarden refuses the FunctionCall protocol message: it can call any function by OID",
                        hint="Call the function from SQL instead, where policy can check it.",
                    )
                    self._push(Pending(QUERY, replace_error=m.error_response_from(err), changes=_QUERY_DROPS))
                    self.names.stage(_QUERY_DROPS)
                    self.stats.refused += 1
                else:
                    raise ProtocolViolation(f"unexpected message type {chr(t)!r} from the client")
                pos = end
            if pos < len(buf) and buf[pos] not in m.FRONTEND_TYPES:
                # as PostgreSQL does: judge the type byte at once, not after `length` more bytes
                raise ProtocolViolation(f"invalid frontend message type {buf[pos]} from the client")
        except m.FrameError as e:
            raise ProtocolViolation(f"invalid message from the client: {e}") from e
        if pos < len(buf):
            # an incomplete message: wait until all of it arrived (its header was checked by frames())
            self._cbuf = buf[pos:]
            self._chave = len(buf) - pos
            self._cneed = 1 + m.U32.unpack_from(buf, pos + 1)[0] if self._chave >= 5 else 0
        if span_start == 0 and pos == len(buf) and not out:
            if pos:
                self.to_server(buf)  # the common case: the same bytes, no copy
            return None
        out.append(buf[span_start:pos])
        self._flush_out(out)
        return self._drop_oversize() if self._chave >= 5 else None

    def _drop_oversize(self) -> Awaitable[Verdict] | None:
        """The incomplete message left in _cbuf, when it is a Query or Parse already known to
        be over the statement limit: refused now, its remaining bytes dropped as they arrive
        (not gathered: a 60 MB text must not cost the proxy 60 MB before it is refused)."""
        rest, kind = self._cbuf, self._cbuf[0]
        if kind not in (_Q, _P) or self.max_statement_bytes is None:
            return None
        need = 1 + m.U32.unpack_from(rest, 1)[0]
        if kind == _Q:
            start, size = 5, need - 6
        else:
            n1 = rest.find(b"\0", 5)
            if n1 < 0:
                return None  # the statement name is still incomplete
            # the least the text can be: after it come its NUL, the type count and at most 65,535 types
            start = n1 + 1
            size = need - start - 3 - 4 * 0xFFFF
        if size <= self._stmt_limit:
            return None
        self._cbuf, self._chave, self._cneed, self._cdrop = b"", 0, 0, need - len(rest)
        if self._skip_until_sync:
            return None  # skipped, as every message up to Sync
        verdict = self._oversize("Query" if kind == _Q else "Parse", size, rest[start : start + 1024])
        if verdict.wait is not None:
            self._dropped = (kind, statement_too_large("statement", size, self.max_statement_bytes))
            self._held = verdict.wait
            return verdict.wait
        self._refuse_dropped(kind, verdict.error, verdict.context)
        return None

    # -- the session's names -------------------------------------------------------------------
    def _push(self, entry: Pending) -> None:
        self.pending.append(entry)
        if entry.puts:
            self._puts_in_flight += 1
        ctx = entry.context
        if ctx is not None and (entry.kind == QUERY or entry.kind == EXECUTE) and getattr(ctx, "ddl", False) is True:
            # a schema change goes to the server (also one held for approval first): watched
            # from now until the transaction it runs in ends
            entry.ddl = True
            self.names.schema_change_sent()

    def _pop(self) -> Pending:
        head = self.pending.popleft()
        if head.ddl:
            self.names.ddl_in_flight -= 1
        if head.puts:
            self._puts_in_flight -= 1
            if not self._puts_in_flight and self._barrier is not None:
                barrier, self._barrier = self._barrier, None
                barrier.release()
        return head

    def _unit_start(self) -> bool:
        """A unit (a Query, or extended messages up to Sync) is about to be decided. True: an
        earlier unit makes names the server has not yet confirmed, so wait for its answer;
        deciding now could use a name the server will not have made."""
        if self._puts_in_flight:
            return True
        if self.gate is not None or self.observer is not None:
            self.names.begin_unit()
            # drops still in flight stay out of the view: a name the server may be dropping is
            # only refused, never decided as what it was
            for p in self.pending:
                for ch in (p.changes, *p.qchanges):
                    drops = tuple(c for c in ch if c[0] not in (PUT_STATEMENT, PUT_PORTAL))
                    if drops:
                        self.names.stage(drops)
        return False

    def _moved(self, portal: PortalEntry) -> PolicyDenied | None:
        """The refusal of an Execute whose portal was decided with names that mean something else
        now (PREPARE p … EXECUTE p bound, then p deallocated and prepared again before Execute)."""
        for kind, name, entry in portal.pins:
            now = self.names.statement(name) if kind == "S" else self.names.portal(name)
            if now is not entry:
                what = "prepared statement" if kind == "S" else "cursor"
                return PolicyDenied(
                    f"pgwarden refuses to execute portal {portal.name!r}: the {what} {name!r} it names was "
                    "replaced or removed after the portal was bound, and the portal was decided with the old one",
                    hint="Send Sync, then bind the statement again.",
                )
        return None

    def _barrier_wait(self) -> Awaitable[Verdict]:
        self._barrier = _Barrier()
        return self._barrier.wait()

    def _refuse_extended(self, out: list[bytes], buf: bytes, span_start: int, pos: int, error: AgentError) -> None:
        """Replace the message at `pos` by a Parse that fails in the raw parser: the server skips
        the rest of the batch up to Sync, as for any failing message, and drops its unnamed
        statement. The messages up to Sync are dropped here. A FATAL error (a lockout) ends the
        session instead."""
        if error.severity == "FATAL":
            self._end(buf, span_start, pos, out, error)
        out.append(buf[span_start:pos])
        out.append(_SENTINEL_PARSE)
        self.names.stage(_SENTINEL_PARSE_FAILS)
        self._push(Pending(PARSE, replace_error=m.error_response_from(error), fail_changes=_SENTINEL_PARSE_FAILS))
        self._skip_until_sync = True
        self.stats.refused += 1

    def _refuse_dropped(self, kind: int, err: AgentError | None, context: Any) -> None:
        """Answer an over-size statement whose bytes were dropped: the sentinel goes upstream."""
        if err is None:  # every verdict for it is a refusal; fail closed all the same
            err = statement_too_large("statement", 0, self.max_statement_bytes or 0)
        entry = Pending(QUERY if kind == _Q else PARSE, replace_error=m.error_response_from(err), context=context)
        # the sentinel Query drops the unnamed statement and portal; the sentinel Parse fails and
        # drops the unnamed statement
        if kind == _Q:
            entry.changes = _QUERY_DROPS
        else:
            entry.fail_changes = _SENTINEL_PARSE_FAILS
        self.names.stage(entry.changes or entry.fail_changes)
        self._unsynced = kind == _P
        self._skip_until_sync = kind == _P
        self.to_server(_SENTINEL_QUERY if kind == _Q else _SENTINEL_PARSE)
        self._push(entry)
        self.stats.refused += 1

    def _oversize(self, what: str, size: int, head: bytes) -> Verdict:
        """The refusal of a statement text above max_statement_bytes, decided before any parsing;
        the gate may record it (audit), given the text's first bytes."""
        err = statement_too_large(what, size, self.max_statement_bytes or 0)
        return self.gate.refuse_unread(head, size, err) if self.gate is not None else Verdict(error=err)

    def _end(self, buf: bytes, span_start: int, pos: int, out: list[bytes], error: AgentError) -> None:
        """A FATAL verdict (a lockout): what was decided before it is forwarded, then the session
        ends with the error (the shell sends it and closes both sides)."""
        out.append(buf[span_start:pos])
        self._flush_out(out)
        self.terminated = True
        raise error

    def _take_resolved(self) -> Verdict | None:
        """The verdict a held statement resolved to, once, when processing resumes at it."""
        v, self._resolved = self._resolved, None
        return v

    def _hold(self, buf: bytes, span_start: int, pos: int, out: list[bytes], verdict: Verdict) -> Awaitable[Verdict]:
        out.append(buf[span_start:pos])
        self._flush_out(out)
        self._cbuf = buf[pos:]
        self._chave = len(self._cbuf)
        assert verdict.wait is not None
        self._held = verdict.wait
        return verdict.wait

    def _flush_out(self, out: list[bytes]) -> None:
        data = b"".join(out)
        out.clear()
        if data:
            self.to_server(data)

    # -- server -> client ------------------------------------------------------------------------
    def server_data(self, data: bytes) -> None:
        if self._guard is not None:
            self._guard_data(data)
        else:
            self._relay_server(data)

    def _server_bytes(self, data: bytes) -> bytes | None:
        """`data` after what was kept of an incomplete message; None while a large message is
        still arriving in pieces (joined once, when whole: joining at every read copies it over
        and over)."""
        if self._sneed:
            self._sparts.append(data)
            self._shave += len(data)
            if self._shave < self._sneed:
                return None
            data = b"".join(self._sparts)
            self._sparts, self._shave, self._sneed = [], 0, 0
        buf = self._sbuf + data if self._sbuf else data
        self._sbuf = b""
        return buf

    def _keep_server_rest(self, rest: bytes) -> None:
        """An incomplete server message waits for its remaining bytes: small ones in _sbuf, large
        ones gathered piece by piece (see _server_bytes)."""
        need = 1 + m.U32.unpack_from(rest, 1)[0] if len(rest) >= 5 else 0
        if need - len(rest) > _GATHER_ABOVE:
            self._sparts, self._shave, self._sneed = [rest], len(rest), need
        else:
            self._sbuf = rest

    def _relay_server(self, data: bytes) -> None:
        buf = self._server_bytes(data)
        if buf is None:
            return
        out: list[bytes] = []
        span_start = 0
        pos = 0
        pending = self.pending
        try:
            for t, ps, end in m.frames(buf, 0, MAX_SERVER_MESSAGE):
                if self._absorbing and pending and pending[0].swallow:
                    out.append(buf[span_start:pos])  # the absorber's answer stays here
                    span_start = end
                    if t == _Z:
                        self._pop()
                        self.names.confirm(_QUERY_DROPS)
                        if buf[ps : ps + 1] == b"I":
                            self.names.transaction_ended()
                        self._absorbing -= 1
                        if not self._absorbing and self.on_absorbed is not None:
                            self.on_absorbed()
                    pos = end
                    continue
                if t == _DR or t == _COPY_D:
                    head = pending[0] if pending else None
                    if head is not None and head.max_rows is not None:
                        head.rows += 1
                        if head.rows > head.max_rows:  # past the limit: drop the row, cancel once
                            out.append(buf[span_start:pos])
                            span_start = end
                            if not head.limit_hit:
                                head.limit_hit = True
                                if self.on_limit is not None:
                                    self.on_limit()
                            pos = end
                            continue
                    if t == _COPY_D:
                        rw = self._rewriter
                        if rw is not None:
                            out.append(buf[span_start:pos])
                            out.append(m.message(b"d", rw.copy_data(buf[ps:end])))
                            span_start = end
                        pos = end
                        continue
                    if head is not None and self._exec_head is not head:
                        self._start_execute(head)
                    rw = self._rewriter
                    if rw is not None:
                        payload = buf[ps:end]
                        row = rw.rewrite(payload)
                        if row is not payload:  # rewritten: framed anew; else the bytes stay in the span
                            out.append(buf[span_start:pos])
                            out.append(m.message(b"D", row))
                            span_start = end
                        if self._recording is not None and not self.observer.result_row(self._recording, row):  # type: ignore[union-attr]
                            self._recording = None
                    elif self._recording is not None and not self.observer.result_row(self._recording, buf[ps:end]):  # type: ignore[union-attr]
                        self._recording = None
                elif t == _CC or t == _EQ:
                    head = pending[0] if pending else None
                    self._rewriter = None
                    self._recording = None
                    if head is not None and head.limit_hit:
                        out.append(buf[span_start:pos])
                        out.append(self._limit_error(head))
                        span_start = end
                        head.limit_hit = False
                        head.rows = 0
                        self._command_done(head)
                        pos = end
                        continue
                    if head is not None:
                        head.rows = 0
                        tag = bytes(buf[ps : end - 1]).decode() if t == _CC else ""
                        # an Execute's BEGIN / COMMIT / ROLLBACK: the batch's transaction state,
                        # which a guarded write later in the batch needs (with or without an observer)
                        if head.kind == EXECUTE and tag in _TXN_TAGS:
                            self._unit_txn = _TXN_TAGS[tag]
                            if self._open_tx is not None:
                                self._open_tx = _TXN_TAGS[tag]
                        if self.observer is not None:
                            self.observer.statement_done(head.context, tag, None)
                        self._command_done(head)
                elif t == _Z:
                    if pending and pending[0].settle and self._settle(pending[0], buf[ps : ps + 1]):
                        out.append(buf[span_start:pos])  # held: the client gets the settled status
                        span_start = pos = end
                        continue
                    self.tx_status = buf[ps : ps + 1]
                    self._unit_txn = None
                    self._rewriter = None
                    if pending:
                        head = self._pop()
                        if head.kind == QUERY:  # the text ran (it was not skipped)
                            self.names.confirm(head.changes)
                    if self.tx_status == b"I":
                        self.names.transaction_ended()
                elif t == _T:
                    head = pending[0] if pending else None
                    if head is not None:
                        fields = (
                            m.parse_row_description(buf[ps:end])
                            if self._observe_rows or self._wants_fields(head)
                            else None
                        )
                        if self._observe_rows and fields is not None and head.kind == QUERY:
                            self._recording = head.context if self.observer.result_columns(head.context, fields) else None  # type: ignore[union-attr]
                        if head.kind == QUERY:
                            self._rewriter = self._bind(head.results, head.index, fields) if head.results and fields is not None else None
                        elif head.kind == DESCRIBE:
                            self._remember_fields(head, fields)
                            self._pop()
                elif t == _ER:
                    fields_err = m.parse_fields(buf[ps:end])
                    if fields_err.get("V", fields_err.get("S")) in ("FATAL", "PANIC"):
                        self.server_fatal = True  # the server said why it is closing; nothing to add
                    head = pending[0] if pending else None
                    self._rewriter = None
                    self._recording = None
                    if head is not None and head.replace_error is not None:
                        out.append(buf[span_start:pos])
                        out.append(head.replace_error)
                        span_start = end
                        head.replace_error = None
                    elif head is not None and head.limit_hit:  # our cancel landed: say why
                        out.append(buf[span_start:pos])
                        out.append(self._limit_error(head))
                        span_start = end
                        head.limit_hit = False
                    else:
                        if self.error_masker is not None:
                            masked = self.error_masker(fields_err, head.results if head is not None else None)
                            if masked != fields_err:
                                out.append(buf[span_start:pos])
                                out.append(m.build_fields(m.B_ERROR, masked))
                                span_start = end
                                fields_err = masked
                        if self.observer is not None:  # audit and recording see the error as the client does
                            if head is not None:
                                self.observer.statement_done(head.context, "", fields_err)
                            else:
                                self.observer.server_error(fields_err)
                    if head is not None and head.kind != QUERY:
                        self._batch_failed(head)
                elif t == _NOTICE and self.error_masker is not None:
                    fields_n = m.parse_fields(buf[ps:end])
                    head = pending[0] if pending else None
                    masked = self.error_masker(fields_n, head.results if head is not None else None)
                    if masked != fields_n:
                        out.append(buf[span_start:pos])
                        out.append(m.build_fields(m.B_NOTICE, masked))
                        span_start = end
                elif t in (_PC, _BC, _CLC, _ND, _PS):
                    if pending and pending[0].kind != QUERY and not self.lean:
                        head = self._pop()
                        if t != _ND and t != _PS:  # ParseComplete, BindComplete, CloseComplete
                            self.names.confirm(head.changes)
                elif t == _COPYOUT:
                    head = pending[0] if pending else None
                    if head is not None and head.results is not None:
                        self._rewriter = head.results.bind(head.index, ())
                pos = end
        except m.FrameError as e:
            raise ProtocolViolation(f"invalid message from the server: {e}") from e
        if pos < len(buf):
            self._keep_server_rest(buf[pos:])
        if self._drain is not None and not pending:
            drain, self._drain = self._drain, None
            drain.release()
        if span_start == 0 and not out:
            if pos:
                self.to_client(buf if pos == len(buf) else buf[:pos])
            return
        out.append(buf[span_start:pos])
        data_out = b"".join(out)
        if data_out:
            self.to_client(data_out)

    def _batch_failed(self, head: Pending) -> None:
        """An extended-protocol message failed: it changes only what its failure changes, and the
        server skips the rest up to Sync (Query messages too)."""
        pending = self.pending
        self.names.confirm(head.fail_changes)
        while pending and pending[0].kind != SYNC:
            self._pop()
        if not pending:
            # the client's Sync is not sent yet (held, or still to come): the server ignores
            # every message until it arrives, so they go nowhere
            self._skip_until_sync = True

    # -- guarded writes (AffectedGuard) ----------------------------------------------------------
    def _drain_hold(self, buf: bytes, span_start: int, pos: int, out: list[bytes], result: Verdict) -> Awaitable[Verdict]:
        """Hold the guarded message at `pos` until the server answered everything sent before it:
        only then are the transaction state and an earlier failure in its batch known."""
        self._drain = _Barrier(result)
        if self._unsynced:  # an open batch is answered only at Sync or Flush
            out.append(buf[span_start:pos])
            out.append(_FLUSH)
            span_start = pos
        return self._hold(buf, span_start, pos, out, Verdict(wait=self._drain.wait()))

    def _guard_mode(self, max_rows: int) -> tuple[Verdict | None, bool | None]:
        """How a guarded Execute runs, now that everything before it is answered: (refusal,
        None), or (None, True) in its own transaction, (None, False) in a savepoint, (None, None)
        as it is (a failed transaction refuses it anyway)."""
        if max_rows:
            return Verdict(error=PolicyDenied(
                "pgwarden runs this write only to completion: it counts the rows it changed before "
                "the results are sent, so it cannot be executed a few rows at a time",
                hint="Execute the portal with no row limit (0), as drivers do by default.",
            )), None
        state = self._unit_txn or self.tx_status
        if state == b"?":
            return Verdict(error=_TXN_UNKNOWN), None
        return None, (True if state == b"I" else False if state == b"T" else None)

    def _start_guard(self, buf: bytes, span_start: int, pos: int, end: int, out: list[bytes], entry: Pending,
                     guard: AffectedGuard, simple: bool, own_tx: bool) -> Awaitable[Verdict]:
        """Send the prelude and the guarded message at buf[pos:end]; hold the client until done."""
        g = _GuardRun(guard, entry, simple, own_tx, _Barrier())
        begin = "BEGIN" if own_tx else _SAVEPOINT
        out.append(buf[span_start:pos])
        if simple:
            out += (_query(begin), buf[pos:end])
        else:
            out += (_injected(begin), buf[pos:end], _FLUSH)
            g.replies = _GUARD_REPLIES
        self._guard = g
        return self._hold(buf, end, end, out, Verdict(wait=g.waiter.wait()))

    def _guard_data(self, data: bytes) -> None:
        """Server bytes while a guarded statement is in flight (never on the hot path)."""
        buf = self._server_bytes(data)
        if buf is None:
            return
        g = self._guard
        assert g is not None
        pos = 0
        try:
            for t, ps, end in m.frames(buf, 0, MAX_SERVER_MESSAGE):
                pos = end
                if t in _ASYNC:
                    self.to_client(buf[ps - 5 : end])
                elif self._guard_step(g, t, buf[ps - 5 : end]):
                    self._guard = None
                    self._guard_end(g)
                    if end < len(buf):
                        self._relay_server(buf[end:])
                    return
        except m.FrameError as e:
            raise ProtocolViolation(f"invalid message from the server: {e}") from e
        if pos < len(buf):
            self._keep_server_rest(buf[pos:])

    def _guard_step(self, g: _GuardRun, t: int, frame: bytes) -> bool:
        """One server message of a guarded statement; True when the guard is over."""
        if t == _ER and m.parse_fields(frame[5:]).get("S") in ("FATAL", "PANIC"):
            self.server_fatal = True  # the server is closing: the guard never ends, nor the session
        if g.phase == _PRELUDE:
            if g.simple:
                g.broken = g.broken or t == _ER  # the statement then fails on its own (25P02)
                if t == _Z:
                    g.phase = _STATEMENT
                return False
            if t == _ER:  # the server skips the statement too, up to the client's Sync
                g.error = frame
                return True
            if t in (_PC, _BC, _CC, _CLC):
                g.replies -= 1
                if not g.replies:
                    g.phase = _STATEMENT
            return False
        if g.phase == _STATEMENT:
            if t == _DR:
                g.rows += 1
                if g.guard is not None and g.rows > g.guard.limit:
                    g.overflow = True  # refused whatever the tag says; not kept
                    return False
            elif t == _CC:
                g.tag = bytes(frame[5:-1]).decode("utf-8", "replace")
                if not g.simple:
                    g.frames.append(frame)
                    return self._guard_finish(g)
            elif t == _ER:
                g.error = frame  # replayed once, after the frames before it (see _guard_end)
                if g.simple:
                    return False
                if not g.own_tx:
                    return True  # the client's transaction is failed, as without the guard
                # end the skipped batch and our failed transaction (never by a Query: it would
                # drop the client's unnamed statement); the client's Sync follows
                self.to_server(_SYNC + _injected("ROLLBACK") + _SYNC)
                g.phase, g.replies = _CLEANUP, 2
                return False
            elif t == _Z:
                if g.error is not None or g.broken:
                    if not g.own_tx:
                        g.final_z = frame
                        return True
                    self.to_server(_query("ROLLBACK"))
                    g.phase = _FINISH
                else:
                    self._guard_finish(g)
                return False
            elif t == _NOTICE:
                g.notices += 1
                if g.notices > _GUARD_NOTICES:
                    return False
            g.frames.append(frame)
            return False
        if g.phase == _FINISH:
            if t == _ER:
                if g.error is None:  # COMMIT failed (a deferred constraint): the client gets that error
                    g.error, g.finish_failed = frame, True
                if not g.simple:
                    return True  # the server skips the rest up to the client's Sync
            elif t == _Z:
                g.final_z = frame
                return True
            elif not g.simple and t in (_PC, _BC, _CC, _CLC):
                g.replies -= 1
                return not g.replies
            return False
        # _CLEANUP: the answers to our own Syncs (and what ran between them)
        if t == _ER and g.error is None:  # the COMMIT that settles a batch failed: the client gets that
            g.error = frame
        elif t == _Z:
            g.replies -= 1
            if not g.replies and g.guard is None:
                g.final_z = frame  # settling: the client's Sync is answered with the settled status
            return not g.replies
        return False

    def _guard_finish(self, g: _GuardRun) -> bool:
        """The statement completed: decide from its tag, then commit or undo it. True: over now."""
        g.refusal = self._guard_refusal(g)
        if g.refusal is None and g.own_tx and not g.simple:
            # an extended batch commits at Sync, all or nothing: the proxy's BEGIN stays open till then
            self._open_tx, self._unit_txn = b"", b"T"
            return True
        if g.refusal is None:
            cmds = ["COMMIT" if g.own_tx else _RELEASE]
        elif g.own_tx or self._open_tx == b"":
            # undone with everything before it in the batch, as an error would have done
            cmds, self._open_tx = ["ROLLBACK"], None
        else:
            cmds = [_ROLLBACK_TO, _RELEASE]
        g.phase = _FINISH
        if g.simple:
            self.to_server(_query("; ".join(cmds)))
        else:
            self.to_server(b"".join(_injected(c) for c in cmds) + _FLUSH)
            g.replies = _GUARD_REPLIES * len(cmds)
        return False

    def _settle_hold(self, buf: bytes, span_start: int, end: int, out: list[bytes]) -> Awaitable[Verdict]:
        """The client's Sync of a batch a guard left in the proxy's transaction: the Sync goes,
        the client is held until that transaction is settled at its ReadyForQuery."""
        self.pending[-1].settle = True
        self._settle_waiter = _Barrier()
        return self._hold(buf, span_start, end, out, Verdict(wait=self._settle_waiter.wait()))

    def _settle(self, head: Pending, status: bytes) -> bool:
        """ReadyForQuery of that Sync: commit the batch (or roll back a failed one) as its implicit
        transaction would have been. True: the ReadyForQuery is held until the outcome."""
        head.settle = False
        taint, self._open_tx = self._open_tx, None
        waiter, self._settle_waiter = self._settle_waiter, None
        waiter = waiter or _Barrier()
        if taint or status == b"I":  # the client's own BEGIN / COMMIT took the transaction over
            waiter.release()
            return False
        if self._absorbing:
            # a row-limit absorber is in flight behind this Sync: its answers would come first and
            # could not be told from ours; the session ends and the server rolls the batch back
            raise ProtocolViolation(
                "pgwarden ended the session: a result of the batch passed maxRows while its guarded write "
                "waited to be committed at Sync; nothing of the batch was committed",
                hint="Reconnect; add LIMIT to the query that returned too many rows.",
            )
        # extended-protocol messages and a Sync: a Query would drop the client's unnamed statement
        self.to_server(_injected("COMMIT" if status == b"T" else "ROLLBACK") + _SYNC)
        self._guard = _GuardRun(None, head, False, True, waiter, phase=_CLEANUP, replies=1)
        return True

    def _guard_refusal(self, g: _GuardRun) -> bytes | None:
        """The ErrorResponse that replaces the results of a write changing too many rows."""
        guard, parts = g.guard, g.tag.split()
        assert guard is not None
        count = int(parts[-1]) if len(parts) >= 2 and parts[-1].isdigit() else None
        head = g.head
        if head.max_rows is not None and g.rows > head.max_rows:
            return self._limit_error(head)
        by = "approved by" if guard.source.startswith("request") else "allowed by"
        if not parts or parts[0] not in _COUNTED or count is None:
            return m.error_response_from(TooManyRowsAffected(
                f"pgwarden could not count the rows this statement changed (its command tag was {g.tag!r}), "
                f"and at most {guard.limit} are {by} {guard.source}; it was undone",
                hint="Send the write as one INSERT, UPDATE, DELETE or MERGE statement.",
            ))
        if count <= guard.limit and not g.overflow:
            return None
        if guard.source.startswith("request"):
            hint = ("Nothing was changed: the data changed since the request was reviewed. Run the statement "
                    "again to file a new request that shows the current count.")
        else:
            hint = (f"Nothing was changed. Narrow the WHERE clause so it changes at most {guard.limit} rows, "
                    "or make the change in smaller batches.")
        return m.error_response_from(TooManyRowsAffected(
            f"{parts[0]} changed {max(count, g.rows)} rows, more than the {guard.limit} {by} {guard.source}; "
            "it was undone",
            hint=hint,
        ))

    def _guard_end(self, g: _GuardRun) -> None:
        """Give the client the outcome of a guarded statement, as one statement's answer, and
        release it."""
        head = g.head
        if g.guard is None:  # the batch's transaction settled: its error (a failed COMMIT), the status
            self._relay_server((g.error or b"") + g.final_z)
        elif g.refusal is not None and g.error is None:
            self.to_client(g.refusal)
            if self.observer is not None:
                fields = m.parse_fields(g.refusal[5:])
                self.observer.statement_done(head.context, g.tag, fields, undone=True)
            if g.simple:
                self._relay_server(g.final_z)  # the Query is done: its names, the true status
            else:  # as for a failed message: the rest of the batch goes nowhere
                self._batch_failed(head)
        elif g.finish_failed:  # COMMIT / RELEASE failed: only that error
            self._relay_server((g.error or b"") + g.final_z)
        else:  # the statement's own answer (rows and tag, or its own error), as the server sent it
            self._relay_server(b"".join(g.frames) + (g.error or b"") + g.final_z)
        if self._guard is not None:  # replaying settled a batch: that holds the client now
            self._guard.waiter = g.waiter
        else:
            g.waiter.release()

    def _command_done(self, head: Pending) -> None:
        """CommandComplete / EmptyQueryResponse: an Execute ended, or one statement of a Query."""
        if head.kind == EXECUTE:
            self._pop()
            self.names.confirm(head.changes)
        elif head.kind == QUERY:
            if head.index < len(head.qchanges):
                self.names.confirm(head.qchanges[head.index])
            head.index += 1

    def _limit_error(self, head: Pending) -> bytes:
        return m.error_response(
            "54000",
            f"pgwarden stopped this result after {head.max_rows} rows: the policy's maxRows limit",
            hint="Add a WHERE clause or LIMIT, or page through the data with ORDER BY … LIMIT … OFFSET.",
        )

    def _start_execute(self, head: Pending) -> None:
        """The first row of an Execute: its rewriter and recording come from its portal."""
        self._exec_head = head
        if head.kind != EXECUTE:
            return
        if head.fields is None and head.portal is not None:
            head.fields = head.portal.fields  # described in the same batch, answered before its rows
        if head.portal is not None and head.rewriter is None and head.results is not None:
            if head.fields is None:
                raise ProtocolViolation(
                    "cannot tell which columns this portal returns, so masked values cannot be protected",
                    hint="Describe the statement or portal before executing it (every common driver does).",
                )
            head.rewriter = self._bind(head.results, 0, head.fields)
        self._rewriter = head.rewriter
        if self._observe_rows and head.fields is not None:
            self._recording = head.context if self.observer.result_columns(head.context, head.fields) else None  # type: ignore[union-attr]

    def _bind(self, results: ResultPolicy, index: int, fields: tuple[m.Field, ...]) -> RowRewriter | None:
        """`results.bind(index, fields)`, remembered for the first result: a statement run again (a
        Query of the same shape, an Execute of the same prepared statement) brings the same plan
        and, parsed once per RowDescription's bytes, the same fields tuple, and the plan
        (interpreted code) is not asked again. Only for a plan that hands out one rewriter per
        fields object (its `shares_rewriters`: not a COPY, whose rewriter keeps a partial line)."""
        bound = self._bound
        if index == 0 and bound is not None and bound[0] is results and bound[1] is fields:
            return bound[2]
        rewriter = results.bind(index, fields)
        if index == 0 and type(fields) is tuple and getattr(results, "shares_rewriters", False):  # a tuple cannot change
            self._bound = (results, fields, rewriter)
        return rewriter

    def _wants_fields(self, head: Pending) -> bool:
        if head.kind == QUERY:
            return head.results is not None
        if head.kind == DESCRIBE:
            if head.target == "S":
                return head.prep is not None and head.prep.results is not None
            portal = head.portal
            return portal is not None and portal.results is not None
        return False

    def _remember_fields(self, head: Pending, fields: tuple[m.Field, ...] | None) -> None:
        if fields is None:
            return
        if head.target == "S":
            if head.prep is not None:
                head.prep.fields = fields
        elif head.portal is not None:
            head.portal.fields = fields


def _formatted(prep: PreparedEntry, formats: tuple[int, ...]) -> tuple[m.Field, ...] | None:
    """The statement's described fields with a Bind's result formats, the same tuple for every Bind
    that asks the formats the last one asked (binary results: asyncpg, pg8000's binary codecs), so
    the kept rewriter (Relay._bind) serves their Executes as it does text results."""
    fields = prep.fields
    if fields is None or not formats:
        return fields
    kept = prep.formatted
    if kept is not None and kept[0] is fields and kept[1] == formats:
        return kept[2]
    out = _with_formats(fields, formats) or fields  # (never None: `fields` is not)
    prep.formatted = (fields, formats, out)
    return out


def _with_formats(fields: tuple[m.Field, ...] | None, formats: tuple[int, ...]) -> tuple[m.Field, ...] | None:
    """A statement's fields (described with format 0) with the result formats a Bind chose."""
    if fields is None:
        return None
    if not formats:
        return fields
    if len(formats) == 1:
        if all(f.format == formats[0] for f in fields):
            return fields  # as described (every Execute of a prepared statement asks the same)
        return tuple([m.Field(f.name, f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, formats[0]) for f in fields])
    return tuple([
        m.Field(f.name, f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, formats[i] if i < len(formats) else 0)
        for i, f in enumerate(fields)
    ])
