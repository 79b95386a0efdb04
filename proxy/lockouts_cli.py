"""`pgwarden lockouts list|lift`: the identities a proxy locked out (limits.maxDenials).

The proxy keeps its lockouts in a file only its user can read (ProxyConfig spec.lockouts.path).
`lift` marks a lockout lifted; the proxy writes who lifted it into its audit chain and admits the
identity again at its next login. In a cluster, run it in the proxy container:
`kubectl exec POD -c pgwarden-proxy -- pgwarden lockouts lift SUBJECT --as NAME --state /var/lib/pgwarden/lockouts.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pgwarden.proxy.circuit import lift, read_book
from pgwarden.textsafe import escape
from pgwarden.times import iso

DEFAULT_STATE = "pgwarden-data/lockouts.json"


def main(args: argparse.Namespace) -> int:
    path = Path(args.state or DEFAULT_STATE)
    if args.lockouts_verb == "lift":
        lk = lift(path, args.subject, args.as_user)
        print(f"lifted the lockout of {escape(lk.subject)} (was until {iso(lk.until)}), by {escape(args.as_user)}; "
              "the proxy records it and admits the identity at its next login")
        return 0
    now = time.time()
    rows = [lk for lk in read_book(path).values() if not lk.lifted_by and lk.until > now]
    if args.json:
        json.dump([{"subject": lk.subject, "until": iso(lk.until), "refused": lk.refused, "lastRefusal": lk.reason}
                   for lk in rows], sys.stdout, indent=2, ensure_ascii=True)
        print()
        return 0
    if not rows:
        print(f"no identity is locked out ({path})")
    for lk in rows:
        print(f"{escape(lk.subject)}  until {iso(lk.until)}  after {lk.refused} refused statements; "
              f"the last: {escape(lk.reason)[:200]}")
    return 0
