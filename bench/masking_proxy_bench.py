"""Rows per second of a 100k-row result through the live proxy: masked vs unmasked.

A throw-away PostgreSQL (pgwarden.embedded) gets a table `people` of 100k rows (id int4, name,
email, ssn, status, total_cents int4). The same `SELECT * FROM people` is read, interleaved and
repeated, from:

* PostgreSQL directly (reference);
* the proxy without a MaskingRule (the lean relay: bytes pass through);
* the proxy with a MaskingRule masking two columns (email: email, ssn: redact), no detectors;
* the same with detectors (email, us_ssn, credit_card, phone) over every text value.

The client is a raw socket reader (simple protocol, text format) that only looks for the final
ReadyForQuery, so the figures are the proxy's, not a driver's row decoding.

    python bench/masking_proxy_bench.py [--rows N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rawpg import RawConn, query  # noqa: E402

from pgwarden.embedded import EmbeddedPostgres  # noqa: E402
from pgwarden.k8s.names import API_VERSION  # noqa: E402
from pgwarden.proxy.main import start_proxy  # noqa: E402
from pgwarden.resources import parse_documents  # noqa: E402

DB, APP, APP_PW, AGENT, AGENT_PW = "bench", "benchapp", "benchapp-pw", "agent", "agent-pw"
API = API_VERSION
READY = b"Z\x00\x00\x00\x05"


def documents(pg: EmbeddedPostgres, masking: str) -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": API, "kind": "DatabaseConnection", "metadata": {"name": "bench"},
         "spec": {"host": pg.host, "port": pg.port, "database": DB, "sslMode": "disable"}},
        {"apiVersion": API, "kind": "ProxyConfig", "metadata": {"name": "bench"},
         "spec": {"connectionRef": {"name": "bench"}, "listen": {"host": "127.0.0.1", "port": 0},
                  "upstream": {"username": APP, "password": APP_PW},
                  "users": [{"name": AGENT, "password": AGENT_PW, "groups": ["ai-agents"]}],
                  "defaultAction": "allow"}},
    ]
    if masking != "none":
        docs.append({"apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "people"},
                     "spec": {"connectionRef": {"name": "bench"},
                              "columns": [{"table": "public.people", "column": "email", "strategy": "email"},
                                          {"table": "public.people", "column": "ssn", "strategy": "redact"}],
                              "detectors": ["email", "us_ssn", "credit_card", "phone"] if masking == "detectors" else []}})
    return yaml.safe_dump_all(docs, sort_keys=False)


def seed(pg: EmbeddedPostgres, rows: int) -> None:
    pg.psql(f"CREATE DATABASE {DB}")
    pg.psql(f"""
        CREATE ROLE {APP} LOGIN PASSWORD '{APP_PW}';
        CREATE TABLE people (id int PRIMARY KEY, name text, email text, ssn text, status text, total_cents int);
        INSERT INTO people SELECT g, 'Customer ' || g, 'user' || g || '@example.com',
            lpad((100 + g % 800)::text, 3, '0') || '-' || lpad((10 + g % 89)::text, 2, '0') || '-'
              || lpad((1000 + g % 8999)::text, 4, '0'),
            CASE WHEN g % 3 = 0 THEN 'shipped' ELSE 'new' END, g * 7
        FROM generate_series(1, {rows}) g;
        ANALYZE people;
        GRANT SELECT ON people TO {APP};
    """, dbname=DB)


def read_all(conn: RawConn, sql: str) -> tuple[float, bytes]:
    """Send one simple Query, read until ReadyForQuery; (seconds, a sample of the bytes)."""
    sock = conn.sock
    t0 = time.perf_counter()
    sock.sendall(query(sql))
    tail = b""
    first = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("connection closed")
        if len(first) < 4096:
            first += chunk[:4096]
        tail = (tail + chunk)[-6:]
        if tail[:5] == READY:
            return time.perf_counter() - t0, first


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    pg = EmbeddedPostgres().start()
    loop = Loop()
    running = []
    try:
        seed(pg, args.rows)
        targets: dict[str, RawConn] = {"direct PostgreSQL": RawConn.login(pg.host, pg.port, pg.superuser, pg.password, DB)}
        for label, masking in (("proxy, no MaskingRule (bytes relayed)", "none"),
                               ("proxy, 2 masked columns, no detectors", "columns"),
                               ("proxy, 2 masked columns + detectors", "detectors")):
            proxy = loop.call(start_proxy(parse_documents(documents(pg, masking))))
            running.append(proxy)
            targets[label] = RawConn.login("127.0.0.1", proxy.port, AGENT, AGENT_PW, DB)
        sql = "SELECT * FROM people"
        times: dict[str, list[float]] = {k: [] for k in targets}
        for rnd in range(args.rounds + 1):  # round 0 warms caches and is not counted
            order = list(targets)[rnd % len(targets):] + list(targets)[:rnd % len(targets)]
            for label in order:
                dt, sample = read_all(targets[label], sql)
                masked = b"[redacted]" in sample
                if masked != ("masked" in label):
                    raise RuntimeError(f"{label}: masking {'missing' if not masked else 'unexpected'}")
                if rnd:
                    times[label].append(dt)
        print(f"{args.rows:,} rows x 6 columns, text format, median of {args.rounds} rounds")
        base = statistics.median(times["proxy, no MaskingRule (bytes relayed)"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"{label:42s} {args.rows / med:12,.0f} rows/s  ({med * 1000:7.1f} ms, {base / med:4.2f}x unmasked proxy)")
        for c in targets.values():
            c.close()
    finally:
        for p in running:
            loop.call(p.stop())
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
