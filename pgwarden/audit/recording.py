"""Session recordings: what an agent sent and saw, statement by statement, for replay.

One JSON-lines file per session in the recordings folder (`<session>.jsonl`). The proxy hands
the recorder values exactly as the agent received them (already masked), so a recording never
holds a value the agent did not see. Results are capped per statement (rows and bytes); past the
cap `row()` returns False so the proxy stops handing rows over, and the result line carries a
`truncated` marker.

The recorder sits on the proxy's hot path, so its methods only append to memory and a buffered
file. Built as the proxy image builds it, a result's rows go from the DataRow's payload straight
into the result's JSON text and each line is one call into C (pgwarden/audit/_recording.c); the
Python path beside it writes the same bytes. Recording is best effort: an I/O error disables the
recorder for the session (logged once) and never fails a statement — the audit log is the
fail-closed record.

Recordings hold what the agent saw and sent: the folder is 0700 and each file 0600. They are
bounded, so one agent's large statements cannot fill the volume: a session past
`maxBytesPerSession` stops recording with a `stopped` line saying why (its statements still
run), and a `RecordingStore` keeps the folder under `maxTotalBytes` by removing the oldest closed
recordings first; when only open sessions are left, the session that needs room stops instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from pgwarden.audit.records import now_iso
from pgwarden.compiled import native_module
from pgwarden.pgwire import parse_data_row

log = logging.getLogger(__name__)

# A query line, a result's rows and its line in C (pgwarden/audit/_recording.c), built with the
# wheel: the bytes of the orjson path below, from one call per statement and one per row (a
# DataRow's payload straight into the result's JSON). None in a pure-Python run.
_native: Any = native_module("pgwarden.audit._recording")

FORMAT = "pgwarden.recording/v1"
FLUSH_EVERY_NS: Final = 1_000_000_000  # a second
# ErrorResponse / NoticeResponse field codes -> names (PostgreSQL protocol, "Error and Notice Message Fields")
FIELD_NAMES = {"S": "severity", "V": "severity", "C": "code", "M": "message", "D": "detail", "H": "hint",
               "P": "position", "p": "internalPosition", "q": "internalQuery", "W": "where", "s": "schema",
               "t": "table", "c": "column", "d": "dataType", "n": "constraint", "F": "file", "L": "line",
               "R": "routine"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# room kept in every budget for the `stopped` line that says why recording stopped
STOP_RESERVE: Final = 512
DIR_MODE = 0o700
FILE_MODE = 0o600


def recording_name(session_id: str) -> str:
    """File name for a session id (ids come from the proxy, but a path must never escape the folder)."""
    return _UNSAFE.sub("_", session_id)[:200] + ".jsonl"


def named_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {FIELD_NAMES.get(k, k): v for k, v in fields.items()}


class _Result:
    """One statement's result as recorded so far (one per statement: kept light)."""

    __slots__ = ("started", "columns", "types", "rows", "bytes", "capped")

    def __init__(self, started: int) -> None:
        self.started = started  # time.monotonic_ns()
        # what columns() was given (kept, not copied: the proxy hands over tuples it never changes)
        self.columns: Sequence[str] = ()
        self.types: Sequence[int] = ()
        self.rows: list[Sequence[str | None]] = []
        self.bytes = 0
        self.capped = ""


BLOCK_BYTES: Final = 65536


class _Lines:
    """A recording file written in blocks: lines gather here (an append each) and go to the file
    in one write(2) per BLOCK_BYTES, per FLUSH_EVERY_NS (the recorder's clock) and at the end.
    io.BufferedWriter did the same, at the price of a lock and a copy per line (two per statement)."""

    __slots__ = ("fd", "parts", "size")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, line: bytes) -> None:
        self.parts.append(line)
        self.size += len(line)
        if self.size >= BLOCK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        data = b"".join(self.parts)
        self.parts = []
        self.size = 0
        done = os.write(self.fd, data)
        while done < len(data):  # a short write (a signal, a nearly full disk): the rest, as the kernel takes it
            done += os.write(self.fd, memoryview(data)[done:])

    def close(self) -> None:
        """Flush and close, once: a second call (the recorder's failure path after a failed
        flush) must not close the fd number again, which another file may hold by then."""
        if self.fd < 0:
            return
        try:
            self.flush()
        finally:
            fd, self.fd = self.fd, -1
            os.close(fd)


class SessionRecorder:
    """One per client session. Every method is cheap and never raises into the proxy."""

    def __init__(self, directory: str | Path, session_id: str, meta: Mapping[str, Any] | None = None, *,
                 max_rows: int = 100, max_bytes: int = 64 * 1024, max_session_bytes: int = 0,
                 store: RecordingStore | None = None) -> None:
        self.session_id = session_id
        self.path = Path(directory) / recording_name(session_id)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_session_bytes = max_session_bytes  # 0: no cap
        self.store = store
        self._t0 = time.monotonic_ns()
        self._last_flush = self._t0
        self._results: dict[Any, Any] = {}  # stmt id -> _Result, or _recording.Result where built
        self._fh: _Lines | None = None
        self.failed = False
        self.stopped = ""  # why recording stopped early (a cap), "" while recording
        self.written = 0
        self.statements = 0
        try:
            private_dir(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
            os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode on open: make it private too
            self._fh = _Lines(fd)
        except OSError as e:
            self._fail(e)
        if self.store is not None and self._fh is not None:
            self.store.opened(self)
        self._put({"k": "session", "format": FORMAT, "session": session_id, "started": now_iso(),
                   "meta": dict(meta or {})})

    # --- the proxy's calls -------------------------------------------------------------------

    def statement(self, stmt_id: Any, sql: str, params: Sequence[str | None] | None = None) -> None:
        """A query as the agent sent it (Query, or Parse/Bind with the text parameter values)."""
        now = time.monotonic_ns()
        self.statements += 1
        self._results[stmt_id] = self._new_result(now)
        if self._fh is None:
            return
        if _native is not None:
            line: bytes | None = _native.query_line(stmt_id, (now - self._t0) // 1000, sql, params)
            if line is not None:
                self._write(line, now)
                return
        ev: dict[str, Any] = {"k": "query", "s": stmt_id, "t": self._since_start(now), "sql": sql}
        if params is not None:
            ev["params"] = _kept(params)
        self._put(ev, now)

    def columns(self, stmt_id: Any, names: Sequence[str], type_oids: Sequence[int] = ()) -> None:
        r = self._result(stmt_id)
        r.columns = _kept(names)
        r.types = _kept(type_oids)

    def row(self, stmt_id: Any, values: Sequence[str | None]) -> bool:
        """Record one row as the agent saw it; False once this result reached its cap. A list is
        kept as it is (the proxy builds a new one per row): do not change it afterwards."""
        if self._fh is None:  # stopped or failed: the proxy need not hand over more rows
            return False
        r = self._result(stmt_id)
        if not isinstance(r, _Result):
            try:
                return bool(r.add(values))
            except ValueError as e:  # a value no line can hold (a lone surrogate): as a failed write
                self._fail(e)
                return False
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
        r.rows.append(values if isinstance(values, (list, tuple)) else list(values))
        r.bytes += size
        return True

    def row_payload(self, stmt_id: Any, payload: bytes, formats: Sequence[int]) -> bool:
        """Record one DataRow (its payload, as the agent received it) with the result's column
        format codes (0 or none: text, shown decoded; else binary, shown as \\x and hex); False
        once this result reached its cap."""
        if self._fh is None:
            return False
        r = self._result(stmt_id)
        if not isinstance(r, _Result):
            return bool(r.add_payload(payload, formats))
        values = parse_data_row(payload)
        if not any(formats):  # every column in text (what nearly every client asks for)
            shown = [None if v is None else v.decode("utf-8", "replace") for v in values]
        else:
            shown = [
                None if v is None else (v.decode("utf-8", "replace") if i >= len(formats) or formats[i] == 0
                                        else "\\x" + v.hex())
                for i, v in enumerate(values)
            ]
        return self.row(stmt_id, shown)

    def complete(self, stmt_id: Any, tag: str, rows: int | None = None) -> None:
        """CommandComplete: the tag and, if known, how many rows the agent received in total."""
        now = time.monotonic_ns()
        if self._fh is None:
            self._results.pop(stmt_id, None)
            return
        r = self._results.pop(stmt_id, None) or self._new_result(now)
        if not isinstance(r, _Result):
            line: bytes | None = r.complete_line(stmt_id, (now - self._t0) // 1000, (now - r.started) // 1000,
                                                 tag, rows)
            if line is not None:
                self._write(line, now)
                return
        ev = self._event(r, stmt_id, "result", now)
        ev["tag"] = tag
        if rows is not None:
            ev["rowCount"] = rows
        self._put(ev, now)

    def error(self, stmt_id: Any, fields: Mapping[str, Any]) -> None:
        """An ErrorResponse the agent received (from the server or from pgwarden itself)."""
        now = time.monotonic_ns()
        ev = self._finish(stmt_id, "error", now)
        ev["error"] = named_fields(fields)
        self._put(ev, now)

    def notice(self, stmt_id: Any, fields: Mapping[str, Any]) -> None:
        self._put({"k": "notice", "s": stmt_id, "t": self._since_start(),
                   "notice": named_fields(fields)})

    def close(self, reason: str = "") -> None:
        for stmt_id in list(self._results):  # statements cut off by the end of the session
            cut = self._finish(stmt_id, "result", time.monotonic_ns())
            cut["incomplete"] = True
            self._put(cut)
        ev: dict[str, Any] = {"k": "end", "t": self._since_start(), "ended": now_iso(),
                              "statements": self.statements}
        if reason:
            ev["reason"] = reason
        self._put(ev)
        self._close_file()

    def _close_file(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as e:
                self._fail(e)
            self._fh = None
        if self.store is not None:
            self.store.closed(self)

    # --- internals ---------------------------------------------------------------------------

    def _since_start(self, now: int = 0) -> float:
        """Seconds from the recording's start to `now` (time.monotonic_ns(); 0: the clock), to the
        microsecond: every line's `t`. Integer steps, where round(x, 6) converts through decimal
        text (three times per statement, a microsecond in all)."""
        return ((now or time.monotonic_ns()) - self._t0) // 1000 / 1e6

    def _new_result(self, started: int) -> Any:
        """A statement's result, recorded natively (`_recording.Result`) where it is built."""
        if _native is not None:
            return _native.Result(started, self.max_rows, self.max_bytes)
        return _Result(started)

    def _result(self, stmt_id: Any) -> Any:
        r = self._results.get(stmt_id)
        if r is None:
            r = self._results[stmt_id] = self._new_result(time.monotonic_ns())
        return r

    def _finish(self, stmt_id: Any, kind: str, now: int) -> dict[str, Any]:
        return self._event(self._results.pop(stmt_id, None) or self._new_result(now), stmt_id, kind, now)

    def _event(self, r: Any, stmt_id: Any, kind: str, now: int) -> dict[str, Any]:
        """The line of result `r` (a `_Result` or a native one) as a dict, for the orjson path."""
        rows: list[Any] = r.rows if isinstance(r, _Result) else orjson.loads(r.rows_json())
        ev: dict[str, Any] = {"k": kind, "s": stmt_id, "t": self._since_start(now),
                              "ms": (now - r.started) // 1000 / 1e3}  # whole microseconds too
        if r.columns:
            ev["columns"] = r.columns
            ev["types"] = r.types
        if rows or r.columns:
            ev["rows"] = rows
        if r.capped:
            ev["truncated"] = {"recordedRows": len(rows), "reason": r.capped}
        return ev

    def _put(self, ev: dict[str, Any], now: int = 0) -> None:
        """Write `ev`; `now`: time.monotonic_ns() if the caller has it (0: read the clock)."""
        if self._fh is None:
            return
        try:
            line = _line(ev)
        except (OSError, ValueError) as e:
            self._fail(e)
            return
        self._write(line, now)

    def _write(self, line: bytes, now: int = 0) -> None:
        """Write one line, within the session's and the folder's budgets."""
        if self._fh is None:
            return
        try:
            why = self._over_budget(len(line))
            if why:
                self._stop(why)
                return
            self._fh.write(line)
            self.written += len(line)
            if not now:
                now = time.monotonic_ns()
            if now - self._last_flush > FLUSH_EVERY_NS:
                self._fh.flush()
                self._last_flush = now
        except (OSError, ValueError) as e:
            self._fail(e)

    def _over_budget(self, n: int) -> str:
        """Why `n` more bytes may not be written ("" if they may): the session's cap, then the folder's."""
        if self.max_session_bytes and self.written + n > self.max_session_bytes - STOP_RESERVE:
            return f"maxBytesPerSession {self.max_session_bytes}"
        if self.store is not None and not self.store.charge(self, n):
            return f"maxTotalBytes {self.store.max_total_bytes}"
        return ""

    def _stop(self, why: str) -> None:
        """Past a cap: one last line says so, then nothing more is recorded (statements still run)."""
        assert self._fh is not None
        self.stopped = why
        log.warning("session recording %s stopped at %d bytes (%s)", self.path, self.written, why)
        ev = {"k": "stopped", "t": self._since_start(), "reason": why,
              "statements": self.statements}
        line = json.dumps(ev, separators=(",", ":")).encode() + b"\n"
        try:
            self._fh.write(line)  # within STOP_RESERVE, kept out of every budget for this line
            self.written += len(line)
            if self.store is not None:
                self.store.charge(self, len(line), force=True)
        except (OSError, ValueError) as e:
            self._fail(e)
        self._results.clear()
        self._close_file()

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
        if self.store is not None:
            self.store.closed(self)


def _kept(values: Sequence[Any]) -> Sequence[Any]:
    """`values` to keep until its line is written: a tuple as it is (it cannot change), else a copy."""
    return values if isinstance(values, tuple) else list(values)


def _line(ev: dict[str, Any]) -> bytes:
    """One JSON line (UTF-8, compact); orjson for speed, json for what it cannot encode."""
    try:
        return orjson.dumps(ev, default=str, option=orjson.OPT_APPEND_NEWLINE | _PASSTHROUGH)
    except orjson.JSONEncodeError:  # an integer past 64 bits; a lone surrogate (fails here as before)
        return json.dumps(ev, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"


_PASSTHROUGH: Final = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def private_dir(path: Path) -> None:
    """The recordings folder, 0700: recordings hold what agents sent and saw."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, DIR_MODE)  # an existing folder (an older version made it 0755)


class RecordingStore:
    """One per proxy: the recordings folder kept under `max_total_bytes`, oldest recordings first.

    Runs on the event loop with the recorders; the folder is listed only when a write would pass
    the limit, and then enough is removed to get under `low_water` of it."""

    def __init__(self, directory: str | Path, *, max_total_bytes: int, low_water: float = 0.9) -> None:
        self.dir = Path(directory)
        self.max_total_bytes = max_total_bytes
        self.low_water = low_water
        self.total = 0
        self.removed = 0  # recordings removed to make room
        self._open: dict[Path, SessionRecorder] = {}

    def prepare(self) -> None:
        """Make the folder private and count what it already holds (files from earlier runs too)."""
        private_dir(self.dir)
        self.total = 0
        for f in self.dir.glob("*.jsonl"):
            try:
                st = f.stat()
                if st.st_mode & 0o077:
                    os.chmod(f, FILE_MODE)
                self.total += st.st_size
            except OSError:
                continue

    def opened(self, rec: SessionRecorder) -> None:
        self._open[rec.path] = rec

    def closed(self, rec: SessionRecorder) -> None:
        self._open.pop(rec.path, None)

    def charge(self, rec: SessionRecorder, n: int, *, force: bool = False) -> bool:
        """Count `n` bytes `rec` is about to write; False when no room can be made for them."""
        if force or self.total + n <= self.max_total_bytes - STOP_RESERVE * max(1, len(self._open)):
            self.total += n
            return True
        self._make_room(n)
        if self.total + n <= self.max_total_bytes - STOP_RESERVE * max(1, len(self._open)):
            self.total += n
            return True
        return False

    def _make_room(self, n: int) -> None:
        target = int(self.max_total_bytes * self.low_water) - n
        candidates = []
        for f in self.dir.glob("*.jsonl"):
            if f in self._open:
                continue
            try:
                st = f.stat()
            except OSError:
                continue
            candidates.append((st.st_mtime, st.st_size, f))
        for _, size, f in sorted(candidates):  # oldest first
            if self.total <= target:
                break
            try:
                f.unlink()
            except OSError:
                continue
            self.total -= size
            self.removed += 1
            log.info("session recording %s removed to stay under maxTotalBytes %d", f.name, self.max_total_bytes)


def open_recorder(config: Any, session_id: str, meta: Mapping[str, Any] | None = None,
                  store: RecordingStore | None = None) -> SessionRecorder | None:
    """A recorder per `recording:` config (pgwarden.audit.config.RecordingConfig), None when disabled.

    Pass the proxy's one `RecordingStore` (`open_store(config)`) so the folder's total is kept."""
    if not config.enabled:
        return None
    return SessionRecorder(config.dir, session_id, meta, max_rows=config.max_rows_per_result,
                           max_bytes=config.max_bytes_per_result, max_session_bytes=config.max_bytes_per_session,
                           store=store)


def open_store(config: Any) -> RecordingStore | None:
    """The proxy's recordings folder, prepared (private, its size counted); None when disabled.
    An unusable folder is logged: sessions then record nothing and still run."""
    if not config.enabled:
        return None
    store = RecordingStore(config.dir, max_total_bytes=config.max_total_bytes)
    try:
        store.prepare()
    except OSError as e:
        log.error("session recordings folder %s cannot be prepared: %s", config.dir, e)
    return store
