"""`pgwarden approvals list / show ID / approve ID / deny ID --as NAME` — the local queue's reviewer side.

The database is `--db`, else `$PGWARDEN_APPROVALS_DB`, else `./pgwarden-data/approvals.db` —
the same file the standalone proxy writes. The local backend is for development: names given
with `--as` are self-declared, and every command says so. In a cluster, reviewers use
`kubectl patch approvalrequest …` and the API server vouches for who they are.

Statements, subjects and parameters come from the agent: everything printed goes through
`pgwarden.textsafe`, so an ESC sequence or a bidi override in a SQL comment is shown as a visible
escape instead of moving the cursor, erasing a line or reordering what the reviewer reads.
`list` cuts statements to one line; `show` prints one in full, and `approve` prints what it
approves before it approves it.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from pathlib import Path

from pgwarden.approvals.local import DEV_WARNING, LocalApprovals, Row, default_db_path
from pgwarden.approvals.model import APPROVED, DENIED, ApprovalError, Preview
from pgwarden.errors import UserError
from pgwarden.textsafe import Escaper
from pgwarden.times import iso


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def _collapse(text: str) -> str:
    # spaces, newlines and tabs only: other whitespace (\x1c-\x1f, NEL, U+2028) is escaped, not hidden
    return re.sub(r"[ \n\t]+", " ", text).strip()


def _one_line(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(rows: list[Row], now: float, safe: Escaper | None = None) -> str:
    """The queue as a table; agent-supplied cells escaped (cut to one line after escaping, so an
    escape sequence is never cut in half into something a terminal would act on)."""
    safe = safe or Escaper()
    header = ("ID", "AGE", "REQUESTER", "STATE", "APPROVALS", "ROWS", "STATEMENT")
    lines = [header]
    for r in rows:
        votes = f"{len(r.votes)}/{r.min_approvals}"
        lines.append((safe(r.id), _age(now - r.created_at), safe(r.requester_subject), safe(r.state), votes,
                      _rows_cell(r.preview), _one_line(safe(_collapse(r.statement)))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
                      for line in lines)
    if any(len(_collapse(r.statement)) > 60 for r in rows):
        table += "\n(statements are cut to one line; `pgwarden approvals show ID` prints one in full)"
    return table


def _rows_cell(preview: Preview | None) -> str:
    """The ROWS column: the measured count, or what became of the preview (- for none)."""
    if preview is None:
        return "-"
    return str(preview.affected_rows) if preview.measured else preview.state


def render_preview(preview: Preview | None, safe: Escaper) -> list[str]:
    """The preview's lines: first in `show` and `approve`, so the reviewer reads the effect before
    the statement. Sampled values come from the database (the agent may have written them): escaped."""
    if preview is None:
        return ["preview     none (the AccessPolicy's approval.preview is not rows)"]
    out = [f"preview     {safe(preview.summary())}"]
    if preview.measured and preview.reason:  # notes that came with a measurement (sequences, a withheld sample)
        out.append(f"  note: {safe(preview.reason)}")
    if preview.state in ("failed", "timeout"):
        out.append("  approving it needs --without-preview: nobody knows how many rows it changes")
    if preview.sample:
        shown = len(preview.sample)
        total = preview.affected_rows if preview.affected_rows is not None else shown
        out.append(f"sample      {shown} of {total:,} row(s), masked as the agent would see them")
        for row in preview.sample:
            if "before" in row or "after" in row:
                out.append("  │ before " + safe(json.dumps(row.get("before"), ensure_ascii=False)))
                out.append("  │ after  " + safe(json.dumps(row.get("after"), ensure_ascii=False)))
            else:
                out.append("  │ " + safe(json.dumps(row.get("row", row), ensure_ascii=False)))
    return out


def render_request(r: Row, now: float, safe: Escaper | None = None) -> str:
    """One request in full. The statement is a block whose every line starts with `│ `, so a
    newline in it cannot forge a line of this report."""
    safe = safe or Escaper()
    ident = r.requester or {}
    who = safe(r.requester_subject)
    if ident.get("serviceAccount"):
        who += f" (service account {safe(ident['serviceAccount'])})"
    if ident.get("groups"):
        who += f", groups {safe(', '.join(str(g) for g in ident['groups']))}"
    if ident.get("method"):
        who += f", via {safe(ident['method'])}"
    out = [f"request     {safe(r.id)}", *render_preview(r.preview, safe),
           f"state       {safe(r.state)}" + (f" by {safe(r.decided_by)}" if r.decided_by else "")
           + (f": {safe(r.reason)}" if r.reason else ""),
           f"requester   {who}"]
    work = r.workload or {}
    if work:
        out.append("workload    " + ", ".join(f"{safe(k)}={safe(v)}" for k, v in sorted(work.items())))
    reviewers = (f"{safe(', '.join(r.reviewers)) or '(none)'}; {r.min_approvals} approval(s) needed"
                 if r.min_approvals else f"as AccessPolicy {safe(r.policy) or '?'} names them")
    out += [f"connection  {safe(r.connection)}",
            f"rule        {safe(r.rule)}" + (f" ({safe(r.policy)})" if r.policy else ""),
            f"reviewers   {reviewers}, {len(r.votes)} approval(s) given"
            + (f" ({safe(', '.join(r.votes))})" if r.votes else ""),
            f"mode        {safe(r.mode)}",
            f"created     {iso(r.created_at)} ({_age(now - r.created_at)} ago), expires {iso(r.expires_at)}",
            f"statement   ({len(r.statement)} characters)"]
    out += [f"  │ {line}" for line in safe(r.statement, multiline=True).split("\n")]
    if r.params:
        out.append(f"parameters  ({len(r.params)})")
        out += [f"  ${i} = " + ("NULL" if p is None else safe(json.dumps(p, ensure_ascii=False)))
                for i, p in enumerate(r.params, 1)]
    return "\n".join(out)


def preview_refusal(row: Row, decision: str, without_preview: bool) -> str | None:
    """Approving a request whose preview failed or timed out is a choice made knowingly. Pure."""
    pv = row.preview
    if decision != APPROVED or pv is None or pv.state not in ("failed", "timeout") or without_preview:
        return None
    what = "timed out" if pv.state == "timeout" else "failed"
    return (f"the preview of request {row.id} {what}, so nobody knows how many rows this statement changes; "
            "read the statement above and approve again with --without-preview if you accept that, or deny it")


def rows_from_objects(text: str) -> list[Row]:
    """ApprovalRequest objects (`kubectl get approvalrequest NAME -o json|yaml`, or a List) as rows,
    so a cluster's reviewers see a statement escaped too: kubectl prints field values raw."""
    import yaml

    from pgwarden.approvals.model import parse_iso

    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        raise UserError(f"cannot read the ApprovalRequest: {e}; pass the output of "
                        "`kubectl get approvalrequest NAME -o yaml`") from None
    objs: list[object] = []
    for d in docs:
        objs.extend(d["items"] if isinstance(d, dict) and isinstance(d.get("items"), list) else [d])
    rows = []
    for o in objs:
        if not isinstance(o, dict) or o.get("kind") not in ("ApprovalRequest", None):
            continue
        meta, spec, status = o.get("metadata") or {}, o.get("spec") or {}, o.get("status") or {}
        req = spec.get("requester") or {}

        def when(value: object) -> float:
            try:
                return parse_iso(str(value))
            except ValueError:
                return 0.0

        rows.append(Row(
            id=f"{meta.get('namespace', '')}/{meta.get('name', '')}", created_at=when(meta.get("creationTimestamp")),
            expires_at=when(spec.get("expiresAt") or status.get("expiresAt")),
            connection=str((spec.get("connectionRef") or {}).get("name", "")),
            requester_subject=str(req.get("subject", "")), statement=str(spec.get("statement", "")),
            params=tuple(None if p is None else str(p) for p in spec.get("params") or ()),
            rule=str(spec.get("rule", "")), reviewers=(), min_approvals=0, mode=str(spec.get("mode", "")),
            state=str(status.get("phase") or spec.get("decision") or ""),
            decided_by=str((status.get("decidedBy") or {}).get("username", "")), reason=str(spec.get("reason", "")),
            votes=tuple(str(a.get("username", "")) for a in status.get("approvals") or () if isinstance(a, dict)),
            policy=str(spec.get("policy", "")), requester={k: v for k, v in req.items() if k != "pod"},
            workload={"pod": req["pod"]} if req.get("pod") else {}, preview=Preview.from_json(spec.get("preview"))))
    if not rows:
        raise UserError("no ApprovalRequest in the input; pass the output of "
                        "`kubectl get approvalrequest NAME -o yaml` (or -o json)")
    return rows


def _show_objects(source: str) -> int:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    safe = Escaper()
    now = time.time()
    print("\n\n".join(render_request(r, now, safe) for r in rows_from_objects(text)))
    _finish(safe)
    return 0


def _finish(safe: Escaper) -> None:
    note = safe.note()
    if note:
        print(note)


def main(args: argparse.Namespace) -> int:
    path = Path(args.db) if getattr(args, "db", None) else default_db_path()
    verb = args.approvals_verb
    if verb == "show" and getattr(args, "file", None):
        return _show_objects(args.file)
    if verb == "show" and not getattr(args, "id", None):
        raise UserError("say which request: pgwarden approvals show ID (local queue), or "
                        "kubectl get approvalrequest NAME -o yaml | pgwarden approvals show -f -")
    try:
        queue = LocalApprovals(path, create=False)
    except ApprovalError as e:
        raise UserError(str(e)) from e
    print(f"note: {DEV_WARNING}", file=sys.stderr)
    now = time.time()
    safe = Escaper()
    try:
        if verb == "list":
            rows = queue.list_sync(include_decided=bool(getattr(args, "all", False)))
            if getattr(args, "json", False):
                # json.dumps's default ensure_ascii escapes every non-ASCII character: nothing raw reaches a terminal
                print(json.dumps([{**r.as_json(), "age": round(now - r.created_at, 1)} for r in rows], indent=2))
                return 0
            if not rows:
                print("no pending requests" + ("" if getattr(args, "all", False) else " (--all shows decided ones)"))
            else:
                print(render_table(rows, now, safe))
            _finish(safe)
            return 0
        if verb == "show":
            row = queue.get_sync(args.id)
            if getattr(args, "json", False):
                print(json.dumps(row.as_json(), indent=2))
                return 0
            print(render_request(row, now, safe))
            _finish(safe)
            return 0
        refusal = queue.decider_refusal()
        if refusal:
            raise UserError(refusal)
        decision = APPROVED if verb == "approve" else DENIED
        row = queue.get_sync(args.id)
        # what is decided, in full, before the decision: the reviewer's last look at what will run
        print(f"{'approving' if decision == APPROVED else 'denying'}:")
        print(render_request(row, now, safe))
        print()
        refused = preview_refusal(row, decision, bool(getattr(args, "without_preview", False)))
        if refused:
            _finish(safe)
            raise UserError(refused)
        change = queue.decide_sync(args.id, args.as_user, decision, getattr(args, "reason", "") or "")
    except ApprovalError as e:
        raise UserError(str(e)) from e
    except sqlite3.Error as e:  # e.g. a reviewer outside the reviewer group, or a read-only copy
        raise UserError(f"cannot use the approvals database at {path}: {e}; reviewers need read and write access "
                        "to it and its folder (ProxyConfig approvals.reviewerGroup)") from e
    print(safe(change.message))
    for note in change.notes:
        print(f"note: {safe(note)}")
    _finish(safe)
    return 0
