"""What a decided statement text does to the session's names, and how it is shown to people.

Pure functions over the policy analysis and the masking plan of one text: the gate calls them,
the relay stages their result and confirms it statement by statement (see session.py).
"""

from __future__ import annotations

from typing import Any

import pglast

from pgwarden.policy.analysis import Analysis, Prepare
from pgwarden.proxy.session import (
    DISCARD,
    DROP_PORTAL,
    DROP_STATEMENT,
    PUT_PORTAL,
    PUT_STATEMENT,
    Change,
    PortalEntry,
    PreparedEntry,
    SessionNames,
)


def statement_slices(sql: str, count: int) -> list[str]:
    """The text of each statement of `sql` (the whole text when it cannot be split as parsed)."""
    try:
        parts = [sql[s].strip() for s in pglast.split(sql, with_parser=True, only_slices=True)]
    except Exception:  # the analysis parsed it; a split failure only costs the display
        parts = []
    return parts if len(parts) == count else [sql] * count


def statement_changes(sql: str, analysis: Analysis, plan: Any, max_rows: int | None) -> tuple[tuple[Change, ...], ...]:
    """For each statement of `sql`, the names it makes or drops when it runs: PREPARE,
    DEALLOCATE, DECLARE, CLOSE, DISCARD ALL. Empty when it touches no name (the common case)."""
    stmts = analysis.statements
    if not any(st.effects or st.cursors for st in stmts):
        return ()
    texts = statement_slices(sql, len(stmts))
    results = getattr(plan, "results", ()) if plan is not None else ()
    out: list[tuple[Change, ...]] = []
    for i, st in enumerate(stmts):
        made = results[i].names if i < len(results) else ()
        outs = {(kind, name): lineage for kind, name, lineage in made}
        changes: list[Change] = []
        for e in st.effects:
            if isinstance(e, Prepare):
                entry = PreparedEntry(e.name, texts[i], "prepare", policy_body=e.body,
                                      mask_outs=outs.get(("prepare", e.name)),
                                      planned_with=(plan.masking, plan.catalog) if plan is not None else None)
                changes.append((PUT_STATEMENT, e.name, entry))
            else:
                changes.append((DROP_STATEMENT, e.name, None))
        for c in st.cursors:
            if c.kind == "declare":
                portal = PortalEntry(c.name or "", "declare", holdable=c.hold, max_rows=max_rows, sql=texts[i],
                                     mask_outs=outs.get(("declare", c.name)))
                changes.append((PUT_PORTAL, c.name, portal))
            elif c.kind == "close":
                changes.append((DROP_PORTAL, c.name, None))
            else:
                changes.append((DISCARD, None, None))
        out.append(tuple(changes))
    return tuple(out)


def shown_sql(sql: str, analysis: Analysis, names: SessionNames) -> str:
    """`sql` with the body of every statement it EXECUTEs, as it will be when each EXECUTE runs
    (a PREPARE or DEALLOCATE earlier in the same text counts): what a reviewer approves, what an
    approval binds to and what the audit records."""
    stmts = analysis.statements
    if not any(st.executes for st in stmts):
        return sql
    texts = statement_slices(sql, len(stmts))
    local: dict[str, str | None] = {}  # names this text prepares or deallocates, so far
    all_gone = False  # a DEALLOCATE ALL earlier in the text
    lines: list[str] = []
    shown: set[tuple[str, str | None]] = set()
    for i, st in enumerate(stmts):
        for ex in st.executes:
            if ex.name in local:
                body = local[ex.name]
            else:
                entry = None if all_gone else names.statement(ex.name)
                body = entry.sql if entry is not None else None
            if (ex.name, body) in shown:
                continue
            shown.add((ex.name, body))
            if body is None:
                lines.append(f"-- pgwarden: {ex.name} is not a prepared statement of this session at that point")
                continue
            lines.append(f"-- pgwarden: {ex.name} is prepared as:")
            lines.extend("--   " + line for line in (body.splitlines() or [""]))
        for e in st.effects:
            if isinstance(e, Prepare):
                local[e.name] = texts[i]
            elif e.name is None:
                local = {}
                all_gone = True
            else:
                local[e.name] = None
    return sql + "\n" + "\n".join(lines) if lines else sql


def rebinds(analysis: Analysis) -> bool:
    """True when the text names a prepared statement or cursor that is looked up when it runs
    (EXECUTE, FETCH, MOVE): a Parse of it is decided again at every Bind, against the names as
    they are then, never by what the name meant at Parse."""
    return any(st.executes or st.kind == "FetchStmt" for st in analysis.statements)
