"""Audit records as plain dicts, built by pure functions (the proxy decides when to write them).

Events and when the proxy writes them:

| event | written | with |
|---|---|---|
| `session.start` | after authentication succeeds | `AuditLog.write` |
| `auth.failure` | when authentication fails (before the 28P01 goes out) | `AuditLog.write` |
| `statement` | after the decision, before anything is forwarded | `AuditLog.write` (fail-closed) |
| `statement.outcome` | when the statement completes or fails | `AuditLog.emit` |
| `approval` | request created, approved, denied, expired, executed | `AuditLog.write` |
| `session.end` | when the client or server goes away | `AuditLog.emit` |

Parameter values of extended-protocol statements pass through the injected `mask_text` (the
content detectors) before they are recorded; the statement text is kept as sent, in full and
inside the hash chain, since the auditor needs exactly what ran. Its length is bounded by the
proxy's `limits.maxStatementBytes` (512 KiB by default), not by clipping here.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pgwarden.compiled import native_module
from pgwarden.subjects import Identity, Workload

MaskText = Callable[[str], str]
Param = str | bytes | bytearray | memoryview | None
# A statement's record as the C step builds it (pgwarden/audit/_records.h): its canonical JSON
# without `prev` and `seq`, and where they go, (text, prev_at, seq_at); sealed in chain order by
# chain.seal_all. Typed as a tuple of any length: compiled, a fixed-length tuple type would be
# unpacked into a native struct and boxed again into a new tuple on the way back
NativeBody = tuple[Any, ...]
# What the audit log takes: a record dict, or a native body of one
Record = dict[str, Any] | NativeBody

# The statement and outcome records built in C, the bytes of the dicts below once sealed; not in
# a pure-Python run (then the dicts are built, as before)
_seal: Any = native_module("pgwarden.audit._seal")
_native_members: Any = _seal.members if _seal is not None and _seal.available else None
_native_statement: Any = _seal.statement_body if _seal is not None and _seal.available else None
_native_outcome: Any = _seal.outcome_body if _seal is not None and _seal.available else None

MAX_PARAM_CHARS: Final = 4096


# the last whole second formatted, and its text up to the seconds: replaced as one tuple, so the
# writer thread (rotation markers) and the event loop never read a second with another's text
_second: tuple[int, str] = (-1, "")
_DIGITS3: Final = tuple(f"{i:03d}" for i in range(1000))


def now_iso() -> str:
    """Now, as `2026-11-29T23:41:24.123456Z`; the date and time of day are formatted once a second
    (every record carries a time, so this runs twice per statement)."""
    us = time.time_ns() // 1000
    sec = us // 1_000_000
    global _second
    known, text = _second
    if sec != known:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + "."
        _second = (sec, text)
    frac = us % 1_000_000  # compiled, a native remainder; `us - sec * 1_000_000` multiplied boxed integers
    # two table lookups: formatting an integer (f-string or %) costs more than the rest together;
    # one f-string of strings is one allocation where `+` makes three
    return f"{text}{_DIGITS3[frac // 1000]}{_DIGITS3[frac % 1000]}Z"


@dataclass(frozen=True)
class SessionInfo:
    """What every record of one client session repeats; built once per connection."""

    session_id: str
    identity: Identity | None = None
    workload: Workload = field(default_factory=Workload)
    connection: str = ""        # DatabaseConnection, NAMESPACE/NAME
    database: str = ""
    application_name: str = ""
    client: str = ""            # peer address of the agent
    user: str = ""              # user name from the startup message
    # what every record of the session repeats, built once (__post_init__); a field, not a
    # cached_property (see pgwarden/compiled.py)
    common: dict[str, Any] = field(init=False, repr=False, compare=False, hash=False, default_factory=dict)
    # the statement and outcome records' members, every key present: a record starts as a copy
    # (one allocation of the right size; building it member by member resized it twice)
    statement_base: dict[str, Any] = field(init=False, repr=False, compare=False, hash=False, default_factory=dict)
    outcome_base: dict[str, Any] = field(init=False, repr=False, compare=False, hash=False, default_factory=dict)
    # `common` rendered once by the C step for the statement records (None: a pure-Python run, or
    # members it does not write; the records are then built as dicts)
    native_members: Any = field(init=False, repr=False, compare=False, hash=False, default=None)

    def __post_init__(self) -> None:
        common = self._common()
        object.__setattr__(self, "common", common)
        if _native_members is not None:
            object.__setattr__(self, "native_members", _native_members(common))
        object.__setattr__(self, "statement_base", {"time": "", "event": "statement", **common, "stmt": "",
                                                    "protocol": "", "sql": "", "decision": None})
        object.__setattr__(self, "outcome_base", {"time": "", "event": "statement.outcome",
                                                  "session": self.session_id, "stmt": "", "durationMs": 0.0})

    def with_identity(self, identity: Identity) -> SessionInfo:
        return SessionInfo(self.session_id, identity, self.workload, self.connection, self.database,
                           self.application_name, self.client, self.user)

    def base(self, event: str) -> dict[str, Any]:
        return {"time": now_iso(), "event": event, **self.common}

    def _common(self) -> dict[str, Any]:
        """What every record of the session repeats (records are serialized, never mutated in
        place, so sharing the nested identity and workload dicts is safe)."""
        rec: dict[str, Any] = {"session": self.session_id}
        if self.identity is not None:
            rec["identity"] = self.identity.as_dict()
        w = self.workload.as_dict()
        if w:
            rec["workload"] = w
        if self.connection:
            rec["connection"] = self.connection
        if self.application_name:
            rec["applicationName"] = self.application_name
        if self.client:
            rec["client"] = self.client
        return rec


def to_microsecond(duration_ms: float) -> float:
    """Milliseconds to three decimals, as `round(x * 1000) / 1000` rounds (a tie to even). Not
    `round(x, 3)`, which goes through a decimal conversion (a microsecond per statement); and
    compiled, `round()` is a call that makes a Python integer (0.2 µs) where `math.floor` and
    the comparisons are native (0.04 µs)."""
    x = duration_ms * 1000.0
    whole = math.floor(x)
    rest = x - whole
    if rest > 0.5 or (rest == 0.5 and whole % 2 == 1):
        whole += 1
    return whole / 1000.0


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[{len(text) - limit} more chars]"


class PrefilteredText:
    """A content scrubber with its prefilter run here, in compiled code (pgwarden/compiled.py):
    most parameter values hold no candidate, and the scrubber's own module is interpreted.
    `prefilter`: a pattern that finds a superset of what `scrub` changes in ASCII text (None:
    `scrub` runs on every value)."""

    def __init__(self, scrub: MaskText, prefilter: re.Pattern[str] | None) -> None:
        self.scrub = scrub
        self.prefilter = prefilter

    def __call__(self, text: str) -> str:
        pre = self.prefilter
        if pre is not None and text.isascii() and pre.search(text) is None:
            return text
        return self.scrub(text)


def mask_params(params: Sequence[Param], mask_text: MaskText | None) -> list[str | None]:
    """Parameter values as the audit shows them: text through the detectors, binary by size only."""
    out: list[str | None] = []
    for p in params:
        if p is None:
            out.append(None)
        elif isinstance(p, str):
            out.append(_clip(mask_text(p) if mask_text else p, MAX_PARAM_CHARS))
        else:
            out.append(f"<binary {len(p)} bytes>")
    return out


def session_start(info: SessionInfo, *, tls: bool = False) -> dict[str, Any]:
    rec = info.base("session.start")
    rec.update(database=info.database, user=info.user, tls=tls)
    return rec


def session_end(info: SessionInfo, *, duration_ms: float, statements: int, reason: str = "") -> dict[str, Any]:
    rec = info.base("session.end")
    rec.update(durationMs=to_microsecond(duration_ms), statements=statements)
    if reason:
        rec["reason"] = reason
    return rec


def auth_failure(info: SessionInfo, *, reason: str, method: str, failures: int = 0,
                 delay_s: float = 0.0) -> dict[str, Any]:
    """`reason` is the message the client got (it never carries a password or a token)."""
    rec = info.base("auth.failure")
    rec.update(user=info.user, database=info.database, method=method, reason=reason)
    if failures:
        rec["failuresFromSource"] = failures
    if delay_s:
        rec["backoffSeconds"] = round(delay_s, 3)
    return rec


def statement(
    info: SessionInfo,
    stmt_id: str | int,
    sql: str,
    *,
    decision: str,
    rule: str = "",
    reason: str = "",
    params: Sequence[Param] | None = None,
    mask_text: MaskText | None = None,
    protocol: str = "simple",
    approval_id: str = "",
    approver: str = "",
    masked_columns: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The decision record, written (fail-closed) before the statement is forwarded."""
    shown: dict[str, Any] = {"action": decision}
    if rule:
        shown["rule"] = rule
    if reason:
        shown["reason"] = reason
    rec = info.statement_base.copy()
    rec["time"] = now_iso()
    rec["stmt"] = stmt_id
    rec["protocol"] = protocol
    rec["sql"] = sql
    rec["decision"] = shown
    if params is not None:
        rec["params"] = mask_params(params, mask_text)
    if approval_id:
        rec["approval"] = {"id": approval_id, **({"approver": approver} if approver else {})}
    if masked_columns:
        rec["maskedColumns"] = list(masked_columns)
    if extra:
        rec.update(extra)
    return rec


def statement_record(
    info: SessionInfo,
    stmt_id: str | int,
    sql: str,
    *,
    decision: str,
    rule: str = "",
    reason: str = "",
    params: Sequence[Param] | None = None,
    mask_text: MaskText | None = None,
    protocol: str = "simple",
    approval_id: str = "",
    approver: str = "",
    masked_columns: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Record:
    """`statement`'s record for the audit log: built in C where the extension is, else the dict.
    Either way the sealed line is the same (tests/test_audit_native_records.py)."""
    native, members = _native_statement, info.native_members
    if native is not None and members is not None:
        body = native(members, None, stmt_id, protocol, sql, decision, rule, reason, params, mask_text,
                      approval_id, approver, masked_columns, extra)
        if body is not None:
            return body  # type: ignore[no-any-return]
    return statement(info, stmt_id, sql, decision=decision, rule=rule, reason=reason, params=params,
                     mask_text=mask_text, protocol=protocol, approval_id=approval_id, approver=approver,
                     masked_columns=masked_columns, extra=extra)


def outcome_record(
    info: SessionInfo,
    stmt_id: str | int,
    *,
    started: float,
    tag: str = "",
    rows: int | None = None,
    sqlstate: str = "",
    message: str = "",
    masked_values: int = 0,
    decision: str = "",
    undone: bool = False,
) -> Record:
    """`outcome`'s record for the audit log, timed from `started` (time.time()) to now: built in C
    where the extension is, else the dict."""
    native = _native_outcome
    if native is not None:
        body = native(info.session_id, None, stmt_id, started, tag, rows, sqlstate, message, masked_values,
                      decision, undone)
        if body is not None:
            return body  # type: ignore[no-any-return]
    return outcome(info, stmt_id, duration_ms=(time.time() - started) * 1000, tag=tag, rows=rows,
                   sqlstate=sqlstate, message=message, masked_values=masked_values, decision=decision,
                   undone=undone)


def outcome(
    info: SessionInfo,
    stmt_id: str | int,
    *,
    duration_ms: float,
    tag: str = "",
    rows: int | None = None,
    sqlstate: str = "",
    message: str = "",
    masked_values: int = 0,
    decision: str = "",
    undone: bool = False,
) -> dict[str, Any]:
    """What happened once forwarded (or refused): command tag, rows, SQLSTATE, duration.
    `undone`: it ran and was rolled back by the proxy (more rows changed than allowed, PW005);
    `tag` and `rows` are then what the server reported before the rollback."""
    rec = info.outcome_base.copy()
    rec["time"] = now_iso()
    rec["stmt"] = stmt_id
    rec["durationMs"] = to_microsecond(duration_ms)
    if decision:
        rec["decision"] = decision
    if tag:
        rec["tag"] = tag
    if rows is not None:
        rec["rows"] = rows
    if sqlstate:
        rec["sqlstate"] = sqlstate
    if message:
        rec["message"] = _clip(message, 2000)
    if masked_values:
        rec["maskedValues"] = masked_values
    if undone:
        rec["undone"] = True
    return rec


def approval(info: SessionInfo, stmt_id: str | int, *, approval_id: str, event: str, approver: str = "",
             reason: str = "", preview: dict[str, Any] | None = None) -> dict[str, Any]:
    """event: requested | approved | denied | expired | executed. `preview` (requested): what the
    statement would change, as the request carries it (its sample masked as the agent sees rows)."""
    rec = info.base("approval")
    rec.update(stmt=stmt_id, approval={"id": approval_id, "event": event})
    if approver:
        rec["approval"]["approver"] = approver
    if reason:
        rec["approval"]["reason"] = reason
    if preview is not None:
        rec["approval"]["preview"] = preview
    return rec
