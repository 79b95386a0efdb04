"""Measuring a held write before its approval request is filed (approval.preview: rows).

The I/O shell around `pgwarden.policy.preview` (which statements, which text) and masking (what
the reviewer may see). One preview is one short-lived upstream connection, with the proxy's
upstream login and the session settings the agent's own connection was opened with:

    BEGIN; SET LOCAL statement_timeout = …; SET LOCAL lock_timeout = …
    the lookup of what the write would run (functions, triggers, rules)
    SET LOCAL statement_timeout = …; SET LOCAL lock_timeout = …   -- what is left, from now
    Parse / Bind (the agent's parameters) / Describe / Execute / Sync   -- the preview text
    ROLLBACK; Terminate

The whole exchange, connecting included, runs under one deadline (approval.previewTimeout):
the server stops the statement itself (statement_timeout, lock_timeout) a little before it, and
should the server not answer in time the connection is cancelled and dropped, which rolls the
transaction back too. The agent is never held longer than the deadline for a preview.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pgwarden.approvals.model import PREVIEW_SAMPLE_MAX, PREVIEW_VALUE_MAX, Preview
from pgwarden.errors import AgentError
from pgwarden.pgwire import Field
from pgwarden.policy.preview import (
    COUNT_COLUMN,
    NoPreview,
    PreviewPlan,
    effects_refusal,
    effects_sql,
    plan_preview,
)
from pgwarden.proxy import messages as m
from pgwarden.proxy import upstream as up
from pgwarden.proxy.config import ProxyConfig
from pgwarden.proxy.wire import ConnectionClosed

log = logging.getLogger("pgwarden.proxy.preview")

MAX_MESSAGE = 64 << 20
# the share of the deadline left for the statement once connected goes to the server's own
# timeouts, less this margin for ROLLBACK and the answer to travel back
SERVER_MARGIN = 0.15
LOCK_SHARE = 0.8  # of the statement's time: a wait on a lock ends first and is reported as such
LOCK_WAIT = "55P03"  # lock_not_available: lock_timeout
CANCELED = "57014"  # query_canceled: statement_timeout

_cancels: set[asyncio.Task[None]] = set()

RowMasker = Callable[[Sequence[Field]], Callable[[bytes], bytes] | None]


@dataclass(frozen=True)
class Result:
    """What the preview text returned: its RowDescription, DataRows (masked) and tag, or the
    server's error (masked)."""

    fields: tuple[Field, ...] = ()
    rows: tuple[bytes, ...] = ()
    tag: str = ""
    error: Mapping[str, str] | None = None
    unavailable: str = ""  # the write was not run: why (what it would run besides itself)


# -- wire messages (frontend) -------------------------------------------------------------------
def parse_message(sql: str, nparams: int) -> bytes:
    return m.message(m.F_PARSE, m.cstr("") + m.cstr(sql) + m.U16.pack(nparams) + b"\0\0\0\0" * nparams)


def bind_message(params: Sequence[bytes | None], formats: Sequence[int]) -> bytes:
    out = [
        m.cstr(""),
        m.cstr(""),
        m.U16.pack(len(formats)),
        struct.pack(f"!{len(formats)}h", *formats),
        m.U16.pack(len(params)),
    ]
    for p in params:
        out.append(m.I32.pack(-1) if p is None else m.I32.pack(len(p)) + p)
    out.append(m.U16.pack(1) + m.I16.pack(0))  # every result column in text
    return m.message(m.F_BIND, b"".join(out))


def run_messages(sql: str, params: Sequence[bytes | None], formats: Sequence[int]) -> bytes:
    return (
        parse_message(sql, len(params))
        + bind_message(params, formats)
        + m.message(m.F_DESCRIBE, b"P\0")
        + m.message(m.F_EXECUTE, b"\0" + m.I32.pack(0))
        + m.message(m.F_SYNC)
    )


# -- pure: what a result means ------------------------------------------------------------------
def _text(v: bytes | None) -> str | None:
    if v is None:
        return None
    s = v.decode("utf-8", "replace")
    return s if len(s) <= PREVIEW_VALUE_MAX else s[: PREVIEW_VALUE_MAX - 1] + "…"


def preview_of(plan: PreviewPlan, result: Result, notes: Sequence[str] = ()) -> Preview:
    """The Preview for what the preview text returned. Pure."""
    reason = "; ".join(notes)
    if result.unavailable:
        return Preview("unavailable", reason=result.unavailable)
    if result.error is not None:
        code = result.error.get("C", "")
        msg = result.error.get("M", "")
        if code in (LOCK_WAIT, CANCELED):
            why = (
                "it waited for a lock another transaction holds"
                if code == LOCK_WAIT
                else "it ran longer than the preview may"
            )
            return Preview("timeout", reason=f"{why} ({msg})")
        return Preview("failed", reason=f"the database refused the preview run: {code} {msg}".strip())
    if plan.count_only:
        n = m.command_tag_rows(result.tag)
        if n is None:
            return Preview("failed", reason=f"the server's answer {result.tag!r} carried no row count")
        return Preview("measured", affected_rows=n, reason=reason)
    names = [f.name for f in result.fields]
    if not names or names[0] != COUNT_COLUMN:
        return Preview("failed", reason="the preview returned an unexpected shape")
    rows = [m.parse_data_row(r) for r in result.rows]
    if not rows:
        return Preview("measured", affected_rows=0, reason=reason)
    count = _text(rows[0][0])
    if count is None or not count.isdigit():
        return Preview("failed", reason="the preview's row count could not be read")
    sample: list[dict[str, Any]] = []
    columns = names[1:]
    if plan.before_sql:  # UPDATE: the target's columns before the change, then after it
        rest = columns
        half = len(rest) // 2
        if half * 2 != len(rest) or rest[:half] != rest[half:]:
            return Preview("failed", reason="the preview returned an unexpected shape")
        columns = rest[half:]
        for r in rows[:PREVIEW_SAMPLE_MAX]:
            vals = [_text(v) for v in r[1:]]
            sample.append(
                {
                    "before": dict(zip(rest[:half], vals[:half], strict=True)),
                    "after": dict(zip(rest[half:], vals[half:], strict=True)),
                }
            )
    else:
        for r in rows[:PREVIEW_SAMPLE_MAX]:
            sample.append({"row": dict(zip(columns, [_text(v) for v in r[1:]], strict=True))})
    return Preview(
        "measured", affected_rows=int(count), sample=tuple(sample), reason=reason, columns=tuple(columns)
    )


# -- the I/O shell ------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


def _timeouts(deadline: float) -> str:
    """The server's own limits for what is left until `deadline` (time.monotonic()), less the
    margin: a lock wait ends first (reported as such), then the statement."""
    rest = max(0.0, deadline - time.monotonic())
    left = rest - SERVER_MARGIN * rest
    return f"SET LOCAL statement_timeout = '{_ms(left)}'; SET LOCAL lock_timeout = '{_ms(left * LOCK_SHARE)}'"


async def _until_ready(
    ep: Any, mask_rows: RowMasker | None, mask_error: Callable[[dict[str, str]], dict[str, str]]
) -> Result:
    fields: tuple[Field, ...] = ()
    rewrite: Callable[[bytes], bytes] | None = None
    rows: list[bytes] = []
    tag = ""
    error: dict[str, str] | None = None
    while True:
        kind, payload = await ep.read_message(MAX_MESSAGE)
        if kind == m.B_ROW_DESCRIPTION:
            fields = m.parse_row_description(payload)
            rewrite = mask_rows(fields) if mask_rows is not None else None
        elif kind == m.B_DATA_ROW:
            if len(rows) < PREVIEW_SAMPLE_MAX:  # the rest are never decoded nor kept
                rows.append(rewrite(payload) if rewrite is not None else payload)
        elif kind == m.B_COMMAND_COMPLETE:
            tag = payload.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == m.B_ERROR and error is None:
            error = mask_error(m.parse_fields(payload))
        elif kind == m.B_READY:
            return Result(fields, tuple(rows), tag, error)


async def _query(ep: Any, sql: str) -> Result:
    ep.write(m.message(m.F_QUERY, m.cstr(sql)))
    return await _until_ready(ep, None, lambda f: f)


async def _run(
    cfg: ProxyConfig,
    settings: Mapping[str, str],
    plan: PreviewPlan,
    params: Sequence[bytes | None],
    formats: Sequence[int],
    deadline: float,
    mask_rows: RowMasker | None,
    mask_error: Callable[[dict[str, str]], dict[str, str]],
    session: list[Any],
) -> Result:
    conn = await up.connect(cfg, settings)
    session.append(conn)
    ep = conn.endpoint
    begin = await _query(ep, "BEGIN; " + _timeouts(deadline))
    if begin.error is not None:
        return Result(error={"C": begin.error.get("C", ""), "M": "could not start the preview transaction"})
    found = await _query(ep, effects_sql(plan))
    if found.error is not None or len(found.rows) != 1:  # no answer is no proof that nothing runs
        await _query(ep, "ROLLBACK")
        code = found.error.get("C", "") if found.error is not None else "XX000"
        return Result(error={"C": code, "M": "could not look up what the write would run"})
    values = m.parse_data_row(found.rows[0])
    why = effects_refusal(*(None if v is None else v.decode("utf-8", "replace") for v in values[:7]))
    if why:
        await _query(ep, "ROLLBACK")
        return Result(unavailable=why)
    # the server's timeouts again, from what is left now: set at BEGIN they would count the
    # connect and the lookup too, and a loaded server's lock wait could outlast the deadline
    # (then reported as no answer rather than as the lock it waited for)
    again = await _query(ep, _timeouts(deadline))
    if again.error is not None:
        await _query(ep, "ROLLBACK")
        return Result(error={"C": again.error.get("C", ""), "M": "could not start the preview run"})
    ep.write(run_messages(plan.sql, params, formats))
    result = await _until_ready(ep, mask_rows, mask_error)
    await _query(ep, "ROLLBACK")
    return result


async def measure(
    cfg: ProxyConfig,
    settings: Mapping[str, str],
    sql: str,
    *,
    params: Sequence[bytes | None] = (),
    formats: Sequence[int] = (),
    timeout: float = 2.0,
    server_version: int = 0,
    mask_rows: Callable[[PreviewPlan], RowMasker | str | None] | None = None,
    mask_error: Callable[[str, dict[str, str]], dict[str, str]] | None = None,
) -> Preview:
    """Run `sql` once in a rolled-back transaction and say what it changed; never raises, never
    takes longer than `timeout` (seconds).

    `mask_rows(plan)` returns a RowMasker for the preview text's rows (a function from its fields
    to a DataRow rewriter), or a string saying why the sample must be withheld;
    `mask_error(preview_sql, fields)` masks an ErrorResponse of it."""
    plan = plan_preview(sql, server_version)
    if isinstance(plan, NoPreview):
        return Preview("unavailable", reason=plan.reason)
    notes = list(plan.notes)
    masker: RowMasker | None = None
    if mask_rows is not None and not plan.count_only:
        made = mask_rows(plan)
        if isinstance(made, str):
            notes.append(f"the sample is withheld: {made}")
            masker = _withhold
        else:
            masker = made

    def error_masker(fields: dict[str, str]) -> dict[str, str]:
        return mask_error(plan.sql, fields) if mask_error is not None else fields

    session: list[Any] = []
    started = time.monotonic()
    deadline = started + timeout
    try:
        async with asyncio.timeout(timeout):
            result = await _run(
                cfg,
                {**settings, "application_name": "pgwarden preview"},
                plan,
                params,
                formats,
                deadline,
                masker,
                error_masker,
                session,
            )
    except TimeoutError:
        if session:  # the server may still be working on it: stop it, the dropped connection rolls back
            conn = session[0]
            task = asyncio.get_running_loop().create_task(up.send_cancel(cfg, conn.pid, conn.secret))
            _cancels.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(_cancels.discard)
        return Preview("timeout", reason=f"no answer within {timeout:g}s (approval.previewTimeout)")
    except AgentError as e:  # UpstreamUnavailable: the database could not be reached
        return Preview("failed", reason=e.message)
    except (OSError, ConnectionClosed, m.FrameError) as e:
        return Preview("failed", reason=f"the preview connection failed: {e or type(e).__name__}")
    except Exception as e:  # a preview never stands between the agent and its request
        log.exception("preview failed")
        return Preview("failed", reason=f"pgwarden could not run the preview ({type(e).__name__})")
    finally:
        for conn in session:
            with contextlib.suppress(Exception):
                conn.endpoint.write(m.message(m.F_TERMINATE))
            conn.endpoint.close()
    preview = preview_of(plan, result, notes)
    if masker is _withhold:
        preview = replace(preview, sample=())
    log.debug("preview of %r: %s in %.0f ms", sql[:80], preview.state, (time.monotonic() - started) * 1000)
    return preview


def _withhold(fields: Sequence[Field]) -> Callable[[bytes], bytes]:
    """Masking refused the preview text: no value of the sample is kept, only the count column."""
    n = len(fields)

    def rewrite(payload: bytes) -> bytes:
        values = m.parse_data_row(payload)
        return _data_row([values[0], *([None] * (n - 1))])

    return rewrite


def _data_row(values: Sequence[bytes | None]) -> bytes:
    from pgwarden.pgwire import build_data_row

    return build_data_row(values)
