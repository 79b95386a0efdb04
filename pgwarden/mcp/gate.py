"""The MCP server's session to the gate: a PostgreSQL client of the pgwarden proxy.

Statements go to the proxy as simple-protocol Query messages, what the model wrote behind a
comment naming the tool, so the proxy decides them exactly as it decides psql's. The credential
is the agent's (a token read afresh for every connection, because tokens rotate) and never a
database password.

pg8000 is synchronous: each statement runs on a thread of its own while the event loop watches the
connection's notices. When the proxy holds a statement for a reviewer (mode: wait) it says so in
a NoticeResponse at once; the tool returns "held" and the connection, still waiting, is parked
under the request's name until `wait` collects its result. Later statements use a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pg8000.native
from pg8000.exceptions import DatabaseError, InterfaceError

from pgwarden.errors import AgentError
from pgwarden.mcp.outcomes import (
    Held,
    Refusal,
    Rows,
    connection_failure,
    held_from_notice,
    refusal_from_fields,
)

if TYPE_CHECKING:
    from pgwarden.mcp.policyview import Planner, PolicyView

log = logging.getLogger(__name__)

Outcome = Rows | Refusal | Held

_CANCEL_REQUEST_CODE = 80877102
MAX_HELD = 16  # statements waiting for a reviewer at once, each on its own connection and thread

# type OIDs whose text form becomes a JSON number or boolean; everything else stays text, exactly
# as the proxy sent it (a masked value is text even in a numeric column)
_INTS = {20, 21, 23, 26}
_FLOATS = {700, 701}
_TYPE_NAMES = {
    16: "boolean",
    17: "bytea",
    18: "char",
    19: "name",
    20: "bigint",
    21: "smallint",
    23: "integer",
    25: "text",
    26: "oid",
    114: "json",
    700: "real",
    701: "double precision",
    1042: "character",
    1043: "character varying",
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1184: "timestamp with time zone",
    1186: "interval",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
}


def _int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def _float(text: str) -> Any:
    try:
        v = float(text)
    except ValueError:
        return text
    return v if math.isfinite(v) else text  # NaN and Infinity are not JSON


def _bool(text: str) -> Any:
    return {"t": True, "f": False}.get(text, text)


def _text(text: str) -> str:
    return text


class _Decoders(dict[int, Callable[[str], Any]]):
    def __missing__(self, oid: int) -> Callable[[str], Any]:
        if oid in _INTS:
            return _int
        if oid in _FLOATS:
            return _float
        return _bool if oid == 16 else _text


class _CappedConnection(pg8000.native.Connection):  # type: ignore[misc]
    """Keeps the first `row_cap` rows of a result and counts (but drops) the rest, so a huge result
    costs the server's memory nothing beyond the cap."""

    row_cap = 500

    def handle_ROW_DESCRIPTION(self, data: bytes, context: Any) -> None:  # noqa: N802 (pg8000's name)
        # several statements in one Query: keep the last result set, so rows match their columns
        if context.columns is not None:
            context.earlier_results = getattr(context, "earlier_results", 0) + 1
            context.rows, context.dropped = [], 0
        super().handle_ROW_DESCRIPTION(data, context)

    def handle_DATA_ROW(self, data: bytes, context: Any) -> None:  # noqa: N802 (pg8000's name)
        if context.rows is not None and len(context.rows) >= self.row_cap:
            context.dropped = getattr(context, "dropped", 0) + 1
            return
        super().handle_DATA_ROW(data, context)


@dataclass(frozen=True)
class GateSettings:
    """Where the proxy is and who this server is to it."""

    host: str
    port: int
    database: str
    user: str
    credential: Callable[[], str | None]  # the token, read for every new connection; None: pod identity
    max_rows: int = 500
    connect_timeout: float = 15.0
    application_name: str = "pgwarden-mcp"
    notice_grace: float = 0.05  # how often a running statement's notices are looked at


@dataclass
class _Parked:
    """A statement the proxy holds for a reviewer, on its own connection."""

    request: str
    sql: str
    conn: Any
    task: asyncio.Future[Outcome]
    held: Held
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Deferred:
    """A request made in defer mode: nothing waits; the identical statement runs once approved."""

    request: str
    sql: str


class GateSession:
    """One agent's session to the gate. Statements run one at a time, in order."""

    def __init__(self, settings: GateSettings, view: PolicyView | None = None) -> None:
        self.settings = settings
        self.view = view
        self._planner: Planner | None = None
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._parked: dict[str, _Parked] = {}
        self._deferred: dict[str, Deferred] = {}

    # -- connections ---------------------------------------------------------------------------
    def _connect(self) -> Any:
        s = self.settings
        conn = _CappedConnection(
            s.user,
            host=s.host,
            port=s.port,
            database=s.database,
            password=s.credential(),
            timeout=s.connect_timeout,
            application_name=s.application_name,
        )
        conn._usock.settimeout(None)  # a statement may legitimately run (or wait for a reviewer) for long
        conn.pg_types = _Decoders()
        conn.row_cap = s.max_rows
        return conn

    @staticmethod
    def _close(conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    async def close(self) -> None:
        """End the session. A statement still held for a reviewer is cancelled, which withdraws its
        request (closing the connection alone would leave the request pending until it expires)."""
        for parked in list(self._parked.values()):
            if not parked.task.done():
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._cancel, parked.conn)
                    await asyncio.wait_for(asyncio.shield(parked.task), 5)
            self._close(parked.conn)
        self._parked.clear()
        if self._conn is not None:
            self._close(self._conn)
            self._conn = None

    async def _abandon(self, conn: Any, task: asyncio.Future[Outcome]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._cancel, conn)
            await asyncio.wait_for(asyncio.shield(task), 30)
        self._close(conn)

    def _cancel(self, conn: Any) -> None:
        """A CancelRequest for `conn`, as psql sends on Ctrl-C, on a connection of its own."""
        key = getattr(conn, "_backend_key_data", None)
        if not key:
            return
        with socket.create_connection((self.settings.host, self.settings.port), timeout=5) as sock:
            sock.sendall(struct.pack("!ii", 8 + len(key), _CANCEL_REQUEST_CODE) + key)
            sock.recv(1)  # the proxy closes the connection once it has the request

    async def _ensure_connected(self) -> Refusal | None:
        """Connect if needed (the caller holds the lock); a refusal if the proxy said no."""
        if self._conn is not None:
            return None
        try:
            self._conn = await asyncio.to_thread(self._connect)
        except DatabaseError as e:
            refusal = refusal_from_fields(_fields(e))
            if isinstance(refusal, Refusal):
                return refusal
            s = self.settings  # not a refusal the proxy gives at login: never "connected"
            return connection_failure(f"the pgwarden proxy at {s.host}:{s.port} did not accept the login", e)
        except (OSError, InterfaceError) as e:
            s = self.settings
            return connection_failure(f"cannot connect to the pgwarden proxy at {s.host}:{s.port}", e)
        return None

    async def planner(self) -> Planner | Refusal | None:
        """The policy view for this agent (None without --config policies). Resolved once the
        proxy has accepted the credential, with the proxy's own identity code."""
        if self.view is None:
            return None
        if self._planner is not None:
            return self._planner
        async with self._lock:
            failed = await self._ensure_connected()
            if failed is not None:
                return failed
            version = str(self._conn.parameter_statuses.get("server_version", "0"))
        try:
            identity = await self.view.identity(self.settings.user, self.settings.credential())
        except AgentError as e:
            return refusal_from_fields({"C": e.sqlstate, "M": e.message, "H": e.hint})  # type: ignore[return-value]
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
        self._planner = self.view.planner(identity, major)
        return self._planner

    # -- statements ----------------------------------------------------------------------------
    async def run(self, sql: str, tool: str = "") -> Outcome:
        """Send `sql` to the gate; the answer: rows, a refusal, or a statement held for approval.

        `tool` names the MCP tool in a leading comment, so the audit log, the recording and an
        approval request show which tool call ran the statement (a comment changes no decision)."""
        if len(self._parked) >= MAX_HELD:
            return Refusal(
                kind="too_many_held",
                sqlstate="53000",
                retryable=True,
                message=f"{MAX_HELD} statements are already waiting for a reviewer; nothing was sent",
                next_step="Call wait_for_approval for the held requests (or end the session to withdraw them) first.",
            )
        async with self._lock:
            failed = await self._ensure_connected()
            if failed is not None:
                return failed
            conn = self._conn
            conn.notices.clear()
            text = f"/* pgwarden-mcp: {tool} */ {sql}" if tool else sql
            task: asyncio.Future[Outcome] = _in_thread(self._execute, conn, text)
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=self.settings.notice_grace)
                    if done:
                        break
                    held = _held_notice(conn)
                    if held is not None:  # park the waiting connection; the next statement gets a new one
                        self._conn = None
                        self._parked[held.request] = _Parked(held.request, sql, conn, task, held)
                        return held
            except asyncio.CancelledError:
                # the client gave up on the call: cancel the statement as psql would, and never reuse
                # a connection that is still in the middle of it
                self._conn = None
                asyncio.get_running_loop().create_task(self._abandon(conn, task))
                raise
            outcome = task.result()
            if isinstance(outcome, Held):
                self._deferred[outcome.request] = Deferred(outcome.request, sql)
            await self._after(conn, outcome)
            return outcome

    async def _after(self, conn: Any, outcome: Outcome) -> None:
        """Each call stands alone: a transaction it leaves open is rolled back, a broken
        connection replaced."""
        if isinstance(outcome, Refusal) and outcome.kind in ("connection_failed", "locked_out"):
            self._close(conn)
            self._conn = None
            return
        if getattr(conn, "_transaction_status", b"I") in (b"T", b"E"):
            try:
                await asyncio.to_thread(conn.run, "ROLLBACK")
            except Exception:
                self._close(conn)
                self._conn = None
            note = (
                "The statement left a transaction open; it was rolled back. Send a whole transaction "
                "(BEGIN; ...; COMMIT) in one call."
            )
            if isinstance(outcome, Rows):
                outcome.notes.append(note)

    def _execute(self, conn: Any, sql: str) -> Outcome:
        try:
            conn.run(sql)
        except DatabaseError as e:
            return refusal_from_fields(_fields(e))
        except (OSError, InterfaceError) as e:
            return connection_failure("the connection to the pgwarden proxy failed", e)
        ctx = conn._context
        columns = [
            {"name": c["name"], "type": _TYPE_NAMES.get(c["type_oid"], f"oid {c['type_oid']}")}
            for c in (ctx.columns or [])
        ]
        notes = [f"{_s(n.get(b'S', b'NOTICE'))}: {_s(n.get(b'M', b''))}" for n in conn.notices]
        if getattr(ctx, "earlier_results", 0):
            notes.append(
                f"The statements returned {ctx.earlier_results + 1} result sets; only the last one is shown."
            )
        return Rows(
            columns=columns,
            rows=[list(r) for r in (ctx.rows or [])],
            row_count=ctx.row_count,
            truncated=getattr(ctx, "dropped", 0),
            notes=notes,
        )

    # -- approvals -----------------------------------------------------------------------------
    async def wait(self, request: str, timeout: float) -> dict[str, Any]:
        """The result of a held statement once a reviewer decided, or "pending" after `timeout`."""
        parked = self._parked.get(request)
        if parked is None:
            if request in self._deferred:
                d = self._deferred[request]
                return {
                    "status": "not_waiting",
                    "request": request,
                    "mode": "defer",
                    "statement": d.sql,
                    "next_step": "This request was made in defer mode: nothing is waiting. Once a reviewer has "
                    "approved it, send the identical statement again; it then runs once.",
                }
            known = sorted(self._parked)
            return {
                "status": "unknown_request",
                "request": request,
                "held_requests": known,
                "next_step": "This server holds no statement under that request. "
                + (f"Held now: {', '.join(known)}." if known else "No statement is held now."),
            }
        done, _ = await asyncio.wait({parked.task}, timeout=max(0.0, timeout))
        if not done:
            return {
                "status": "pending",
                "request": request,
                "statement": parked.sql,
                "waiting_seconds": round(time.monotonic() - parked.since, 1),
                "next_step": "No reviewer has decided yet. Call wait_for_approval again, or tell the user "
                f"that request {request} needs a reviewer.",
            }
        del self._parked[request]
        outcome = parked.task.result()
        self._close(parked.conn)
        result = outcome.as_dict(self.settings.max_rows) if isinstance(outcome, Rows) else outcome.as_dict()
        return {**result, "request": request, "statement": parked.sql}


def _in_thread(fn: Callable[..., Outcome], *args: Any) -> asyncio.Future[Outcome]:
    """`fn(*args)` on a thread of its own: a statement held for a reviewer can block for its whole
    approval timeout, and must not take a worker of the event loop's shared executor."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Outcome] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting task, not lost in the thread
            value, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="pgwarden-mcp-statement", daemon=True).start()
    return future


def _s(b: bytes | str) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def _fields(e: DatabaseError) -> dict[str, str]:
    raw = e.args[0] if e.args and isinstance(e.args[0], dict) else {"C": "XX000", "M": str(e)}
    return {str(k): str(v) for k, v in raw.items()}


def _held_notice(conn: Any) -> Held | None:
    for n in list(conn.notices):
        held = held_from_notice({_s(k): _s(v) for k, v in n.items()})
        if held is not None:
            return held
    return None
