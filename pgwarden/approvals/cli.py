"""`pgwarden approvals list / approve ID / deny ID --as NAME` — the local queue's reviewer side.

The database is `--db`, else `$PGWARDEN_APPROVALS_DB`, else `./pgwarden-data/approvals.db` —
the same file the standalone proxy writes. Names given with `--as` are self-declared: the local
backend cannot authenticate reviewers, and every decision says so. In a cluster, reviewers use
`kubectl patch approvalrequest …` and the API server vouches for who they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pgwarden.approvals.local import LocalApprovals, Row, default_db_path
from pgwarden.approvals.model import APPROVED, DENIED, ApprovalError
from pgwarden.errors import UserError

SELF_DECLARED = ("note: local mode — the name given with --as is self-declared, not authenticated; "
                 "use the Kubernetes backend where reviewers must prove who they are")


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def _one_line(text: str, width: int = 60) -> str:
    t = " ".join(text.split())
    return t if len(t) <= width else t[: width - 1] + "…"


def render_table(rows: list[Row], now: float) -> str:
    header = ("ID", "AGE", "REQUESTER", "STATE", "APPROVALS", "STATEMENT")
    lines = [header]
    for r in rows:
        votes = f"{len(r.votes)}/{r.min_approvals}"
        lines.append((r.id, _age(now - r.created_at), r.requester_subject, r.state, votes, _one_line(r.statement)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
                     for line in lines)


def main(args: argparse.Namespace) -> int:
    path = Path(args.db) if getattr(args, "db", None) else default_db_path()
    verb = args.approvals_verb
    if verb != "list" and not path.exists():
        raise UserError(f"no approvals database at {path}; pass --db or set PGWARDEN_APPROVALS_DB to the file "
                        "the proxy uses (ProxyConfig approvals.path)")
    queue = LocalApprovals(path)
    if verb == "list":
        rows = queue.list_sync(include_decided=bool(getattr(args, "all", False)))
        now = time.time()
        if getattr(args, "json", False):
            out = []
            for r in rows:
                d = r.as_json()
                d["age"] = round(now - r.created_at, 1)
                out.append(d)
            print(json.dumps(out, indent=2))
        elif not rows:
            print("no pending requests" + ("" if getattr(args, "all", False) else " (--all shows decided ones)"))
        else:
            print(render_table(rows, now))
        return 0
    decision = APPROVED if verb == "approve" else DENIED
    try:
        change = queue.decide_sync(args.id, args.as_user, decision, getattr(args, "reason", "") or "")
    except ApprovalError as e:
        raise UserError(str(e)) from e
    print(change.message)
    for note in change.notes:
        print(f"note: {note}")
    print(SELF_DECLARED, file=sys.stderr)
    return 0
