"""Reading recordings back: find one, parse it, and render a timeline for people.

Pure functions over parsed events, so the CLI is a thin shell and tests need no terminal.
Everything in a recording came from the agent or the database (statements, parameters, cell
values, error texts, application_name): every value is escaped by `pgwarden.textsafe`, so an
ESC sequence cannot erase a denied statement from the auditor's screen, and a multi-line
statement's continuation lines are marked (`│`) so a newline cannot forge a line of the timeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pgwarden.audit.config import DEFAULT_DATA_DIR
from pgwarden.audit.recording import recording_name
from pgwarden.errors import UserError
from pgwarden.textsafe import Escaper

CELL_MAX = 40


def recordings_dir(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(explicit or env.get("PGWARDEN_RECORDINGS") or f"{DEFAULT_DATA_DIR}/recordings")


def find_recording(session: str, directory: Path) -> Path:
    """SESSION is a file path, a session id, or an unambiguous prefix of one."""
    p = Path(session)
    if p.is_file():
        return p
    exact = directory / recording_name(session)
    if exact.is_file():
        return exact
    if not directory.is_dir():
        raise UserError(f"no recording {session!r}: the recordings folder {directory} does not exist "
                        f"(pass --dir or set PGWARDEN_RECORDINGS)")
    matches = sorted(directory.glob(recording_name(session)[: -len(".jsonl")] + "*.jsonl"))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(m.stem for m in matches[:5])
        raise UserError(f"{session!r} matches {len(matches)} recordings ({names}…); give more of the id")
    raise UserError(f"no recording {session!r} in {directory}; list the folder to see recorded sessions")


def load_events(path: Path) -> list[dict[str, Any]]:
    events = []
    with path.open("rb") as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                # the last line of a recording cut off by a crash; everything before it still reads
                events.append({"k": "damaged", "line": i})
                continue
            if isinstance(ev, dict):
                events.append(ev)
    return events


def _cell(v: str | None, safe: Escaper) -> str:
    if v is None:
        return "NULL"
    v = safe(v)  # one line: newlines become \n
    return v if len(v) <= CELL_MAX else v[: CELL_MAX - 1] + "…"


def table(columns: Sequence[str], rows: Sequence[Sequence[str | None]], safe: Escaper | None = None) -> list[str]:
    safe = safe or Escaper()
    cells = [[_cell(v, safe) for v in r] for r in rows]
    columns = [safe(c) for c in columns]
    widths = [len(c) for c in columns]
    for r in cells:
        for i, c in enumerate(r[: len(widths)]):
            widths[i] = max(widths[i], len(c))
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)),
           "-+-".join("-" * w for w in widths)]
    for r in cells:
        out.append(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))
    return out


def _who(meta: Mapping[str, Any], safe: Escaper) -> str:
    ident = meta.get("identity") or {}
    parts = []
    if ident.get("subject"):
        parts.append(f"as {safe(ident['subject'])}")
    if ident.get("groups"):
        parts.append(f"groups {safe(','.join(str(g) for g in ident['groups']))}")
    if ident.get("method"):
        parts.append(f"via {safe(ident['method'])}")
    for key, label in (("applicationName", "app"), ("client", "from"), ("connection", "connection"),
                       ("database", "database")):
        if meta.get(key):
            parts.append(f"{label} {safe(meta[key])}")
    work = meta.get("workload") or {}
    if work.get("pod"):
        parts.append(f"pod {safe(work.get('namespace', ''))}/{safe(work['pod'])}")
    return "  ".join(parts)


def _statement(t: str, ev: Mapping[str, Any], pad: str, safe: Escaper) -> list[str]:
    lines = safe(ev.get("sql", ""), multiline=True).split("\n")
    return [f"{t}  [{safe(ev.get('s'))}] {lines[0]}", *(f"{pad}│ {line}" for line in lines[1:])]


def render(events: Iterable[Mapping[str, Any]], safe: Escaper | None = None) -> str:
    """The timeline: one block per statement with its rows, errors and notices. Pass an `Escaper`
    to learn afterwards whether anything had to be escaped (`safe.note()`)."""
    safe = safe or Escaper()
    out: list[str] = []
    pad = "           "
    for ev in events:
        k = ev.get("k")
        t = f"+{float(ev.get('t', 0)):8.3f}s"
        if k == "session":
            out.append(f"session {safe(ev.get('session'))}  started {safe(ev.get('started', '?'))}")
            who = _who(ev.get("meta") or {}, safe)
            if who:
                out.append(f"  {who}")
        elif k == "query":
            out.append("")
            out.extend(_statement(t, ev, pad, safe))
            if ev.get("params") is not None:
                out.append(f"{pad}params: {safe(json.dumps(ev['params'], ensure_ascii=False))}")
        elif k in ("result", "error"):
            if ev.get("columns"):
                out.extend(pad + line for line in table(ev["columns"], ev.get("rows") or [], safe))
            trunc = ev.get("truncated")
            if trunc:
                total = ev.get("rowCount")
                more = f" of {total}" if isinstance(total, int) else ""
                out.append(f"{pad}… recording truncated: {safe(trunc.get('recordedRows'))} rows{more} kept "
                           f"({safe(trunc.get('reason'))})")
            ms = f"({float(ev.get('ms', 0)):.3f} ms)"
            if k == "error":
                err = ev.get("error") or {}
                out.append(f"{pad}{safe(err.get('severity', 'ERROR'))} {safe(err.get('code', ''))}: "
                           f"{safe(err.get('message', ''))} {ms}")
                for key in ("detail", "hint"):
                    if err.get(key):
                        out.append(f"{pad}{key}: {safe(err[key])}")
            elif ev.get("incomplete"):
                out.append(f"{pad}(no result: the session ended first) {ms}")
            else:
                out.append(f"{pad}{safe(ev.get('tag', ''))} {ms}")
        elif k == "notice":
            n = ev.get("notice") or {}
            out.append(f"{t}  {safe(n.get('severity', 'NOTICE'))}: {safe(n.get('message', ''))}")
        elif k == "end":
            out.append("")
            reason = f" ({safe(ev['reason'])})" if ev.get("reason") else ""
            out.append(f"{t}  session ended{reason}: {safe(ev.get('statements', 0))} statements")
        elif k == "stopped":
            out.append("")
            out.append(f"{t}  recording stopped ({safe(ev.get('reason', ''))}): the session went on, its later "
                       f"statements are in the audit log only")
        elif k == "damaged":
            out.append(f"(line {safe(ev.get('line'))} of the recording is damaged and skipped)")
    return "\n".join(out) + "\n"
