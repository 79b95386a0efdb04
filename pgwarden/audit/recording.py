"""Session recordings: what an agent sent and saw, statement by statement, for replay.

One JSON-lines file per session in the recordings folder (`<session>.jsonl`). The proxy hands
the recorder values exactly as the agent received them (already masked), so a recording never
holds a value the agent did not see. Results are capped per statement (rows and bytes); past the
cap `row()` returns False so the proxy stops handing rows over, and the result line carries a
`truncated` marker.

The recorder sits on the proxy's hot path, so its methods only append to in-memory lists and a
buffered file; rows are serialised once per result, not per row. Recording is best effort: an
I/O error disables the recorder for the session (logged once) and never fails a statement — the
audit log is the fail-closed record.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pgwarden.audit.records import now_iso

log = logging.getLogger(__name__)

FORMAT = "pgwarden.recording/v1"
FLUSH_EVERY_S = 1.0
# ErrorResponse / NoticeResponse field codes -> names (PostgreSQL protocol, "Error and Notice Message Fields")
FIELD_NAMES = {"S": "severity", "V": "severity", "C": "code", "M": "message", "D": "detail", "H": "hint",
               "P": "position", "p": "internalPosition", "q": "internalQuery", "W": "where", "s": "schema",
               "t": "table", "c": "column", "d": "dataType", "n": "constraint", "F": "file", "L": "line",
               "R": "routine"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def recording_name(session_id: str) -> str:
    """File name for a session id (ids come from the proxy, but a path must never escape the folder)."""
    return _UNSAFE.sub("_", session_id)[:200] + ".jsonl"


def named_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {FIELD_NAMES.get(k, k): v for k, v in fields.items()}


@dataclass
class _Result:
    started: float
    columns: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    bytes: int = 0
    capped: str = ""


class SessionRecorder:
    """One per client session. Every method is cheap and never raises into the proxy."""

    def __init__(self, directory: str | Path, session_id: str, meta: Mapping[str, Any] | None = None, *,
                 max_rows: int = 100, max_bytes: int = 64 * 1024) -> None:
        self.session_id = session_id
        self.path = Path(directory) / recording_name(session_id)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._t0 = time.monotonic()
        self._last_flush = self._t0
        self._results: dict[Any, _Result] = {}
        self._fh: IO[bytes] | None = None
        self.failed = False
        self.statements = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab", buffering=64 * 1024)
        except OSError as e:
            self._fail(e)
        self._put({"k": "session", "format": FORMAT, "session": session_id, "started": now_iso(),
                   "meta": dict(meta or {})})

    # --- the proxy's calls -------------------------------------------------------------------

    def statement(self, stmt_id: Any, sql: str, params: Sequence[str | None] | None = None) -> None:
        """A query as the agent sent it (Query, or Parse/Bind with the text parameter values)."""
        now = time.monotonic()
        self.statements += 1
        self._results[stmt_id] = _Result(started=now)
        ev: dict[str, Any] = {"k": "query", "s": stmt_id, "t": round(now - self._t0, 6), "sql": sql}
        if params is not None:
            ev["params"] = list(params)
        self._put(ev)

    def columns(self, stmt_id: Any, names: Sequence[str], type_oids: Sequence[int] = ()) -> None:
        r = self._result(stmt_id)
        r.columns = list(names)
        r.types = list(type_oids)

    def row(self, stmt_id: Any, values: Sequence[str | None]) -> bool:
        """Record one row as the agent saw it; False once this result reached its cap."""
        r = self._result(stmt_id)
        if r.capped:
            return False
        size = 0
        for v in values:
            if v is not None:
                size += len(v)
        if len(r.rows) >= self.max_rows:
            r.capped = f"maxRowsPerResult {self.max_rows}"
            return False
        if r.bytes + size > self.max_bytes:
            r.capped = f"maxBytesPerResult {self.max_bytes}"
            return False
        r.rows.append(list(values))
        r.bytes += size
        return True

    def complete(self, stmt_id: Any, tag: str, rows: int | None = None) -> None:
        """CommandComplete: the tag and, if known, how many rows the agent received in total."""
        ev = self._finish(stmt_id, "result")
        ev["tag"] = tag
        if rows is not None:
            ev["rowCount"] = rows
        self._put(ev)

    def error(self, stmt_id: Any, fields: Mapping[str, Any]) -> None:
        """An ErrorResponse the agent received (from the server or from pgwarden itself)."""
        ev = self._finish(stmt_id, "error")
        ev["error"] = named_fields(fields)
        self._put(ev)

    def notice(self, stmt_id: Any, fields: Mapping[str, Any]) -> None:
        self._put({"k": "notice", "s": stmt_id, "t": round(time.monotonic() - self._t0, 6),
                   "notice": named_fields(fields)})

    def close(self, reason: str = "") -> None:
        for stmt_id in list(self._results):  # statements cut off by the end of the session
            cut = self._finish(stmt_id, "result")
            cut["incomplete"] = True
            self._put(cut)
        ev: dict[str, Any] = {"k": "end", "t": round(time.monotonic() - self._t0, 6), "ended": now_iso(),
                              "statements": self.statements}
        if reason:
            ev["reason"] = reason
        self._put(ev)
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as e:
                self._fail(e)
            self._fh = None

    # --- internals ---------------------------------------------------------------------------

    def _result(self, stmt_id: Any) -> _Result:
        r = self._results.get(stmt_id)
        if r is None:
            r = self._results[stmt_id] = _Result(started=time.monotonic())
        return r

    def _finish(self, stmt_id: Any, kind: str) -> dict[str, Any]:
        now = time.monotonic()
        r = self._results.pop(stmt_id, None) or _Result(started=now)
        ev: dict[str, Any] = {"k": kind, "s": stmt_id, "t": round(now - self._t0, 6),
                              "ms": round((now - r.started) * 1000, 3)}
        if r.columns:
            ev["columns"] = r.columns
            ev["types"] = r.types
        if r.rows or r.columns:
            ev["rows"] = r.rows
        if r.capped:
            ev["truncated"] = {"recordedRows": len(r.rows), "reason": r.capped}
        return ev

    def _put(self, ev: dict[str, Any]) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(json.dumps(ev, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n")
            now = time.monotonic()
            if now - self._last_flush > FLUSH_EVERY_S:
                self._fh.flush()
                self._last_flush = now
        except (OSError, ValueError) as e:
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        if not self.failed:
            log.error("session recording %s disabled: %s", self.path, e)
        self.failed = True
        if self._fh is not None:
            try:
                self._fh.close()
            except (OSError, ValueError):
                pass
            self._fh = None


def open_recorder(config: Any, session_id: str, meta: Mapping[str, Any] | None = None) -> SessionRecorder | None:
    """A recorder per `recording:` config (pgwarden.audit.config.RecordingConfig), None when disabled."""
    if not config.enabled:
        return None
    return SessionRecorder(config.dir, session_id, meta, max_rows=config.max_rows_per_result,
                           max_bytes=config.max_bytes_per_result)
