"""Cost of parsing and deciding one statement, per statement, on this machine.

    python bench/policy_bench.py [--seconds 0.3]

Compares the parsers pglast offers (AST objects, JSON, fingerprint) and measures the engine's
own paths: analysis without cache (a new literal every time, as pgbench sends), a full
decision without cache, and a cached decision (the same text again, as ORMs and prepared
statements send). Figures are recorded in docs/policy.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable

import pglast
from pglast.parser import fingerprint, parse_sql_json

from pgwarden.policy import SessionState, load_policies
from pgwarden.policy.analysis import _analyze
from pgwarden.resources import parse_documents
from pgwarden.subjects import Identity

POLICY = """
apiVersion: pgwarden.dev/v1alpha1
kind: AccessPolicy
metadata: {name: bench, namespace: bench}
spec:
  connectionRef: {name: shop}
  subjects: [{group: agents}]
  rules:
    - {action: deny, operations: [select, insert, update, delete], tables: [public.customers]}
    - {action: allow, operations: [select], tables: [public.orders, public.customer_contacts, public.pgbench_accounts]}
    - {action: allow, operations: [insert, update, delete], tables: [public.audit_scratch], requireWhere: true}
    - {action: review, operations: [insert, update, delete], tables: [public.orders], requireWhere: true}
  defaultAction: deny
  approval: {reviewers: [{group: dba}]}
"""

# {n} is replaced by a counter so that text caches miss, as with pgbench's random literals
STATEMENTS = {
    "pgbench -S select": "SELECT abalance FROM pgbench_accounts WHERE aid = {n};",
    "join + aggregate": (
        "SELECT c.name, count(*), sum(o.total_cents) FROM orders o JOIN customer_contacts c ON c.id = o.customer_id "
        "WHERE o.created_at > now() - interval '7 days' AND o.id > {n} GROUP BY c.name ORDER BY 3 DESC LIMIT 10"
    ),
    "psql \\dt": (
        "SELECT n.nspname as \"Schema\", c.relname as \"Name\", CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' "
        "THEN 'view' END as \"Type\", pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\" FROM pg_catalog.pg_class c "
        "LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p','') "
        "AND n.nspname <> 'pg_catalog' AND n.nspname !~ '^pg_toast' AND c.oid > {n} "
        "AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2;"
    ),
    "CTE with DELETE": "WITH d AS (DELETE FROM orders WHERE id = {n} RETURNING *) SELECT count(*) FROM d",
    "splice (denied)": "SELECT {n}; DROP TABLE orders",
}


def per_call(fn: Callable[[int], object], seconds: float) -> float:
    """Microseconds per call of fn(i), i counting up."""
    counter = itertools.count()
    for _ in range(50):  # warm up
        fn(next(counter))
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(100):
            fn(next(counter))
        n += 100
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    args = ap.parse_args()
    subject = load_policies(parse_documents(POLICY)).for_identity(Identity("bench", ("agents",)), "shop")
    session = SessionState()
    cols = ("parse_sql", "json", "fingerprint", "analyze", "decide", "cached")
    print(f"{'statement':<20}" + "".join(f"{c:>13}" for c in cols) + "   (µs per statement)")
    for label, template in STATEMENTS.items():
        def text(i: int, template: str = template) -> str:
            return template.replace("{n}", str(i))

        fixed = text(1)
        subject.decide(fixed, session)
        figures = [
            per_call(lambda i: pglast.parse_sql(text(i)), args.seconds),
            per_call(lambda i: json.loads(parse_sql_json(text(i))), args.seconds),
            per_call(lambda i: fingerprint(text(i)), args.seconds),
            per_call(lambda i: _analyze(text(i), ("public",)), args.seconds),
            per_call(lambda i: subject.decide(text(i + 1_000_000_000), session), args.seconds),
            per_call(lambda i, fixed=fixed: subject.decide(fixed, session), args.seconds),
        ]
        print(f"{label:<20}" + "".join(f"{f:>13.1f}" for f in figures))


if __name__ == "__main__":
    main()
