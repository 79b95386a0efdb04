"""`pgwarden demo`: the product end to end on an embedded PostgreSQL, no cluster.

It starts a throw-away PostgreSQL seeded with a small shop (customers with e-mails, SSNs and card
numbers; orders), puts the proxy in front of it with the example policies from `demo.yaml`,
and plays a scripted agent session through a real client (pg8000), printing what the agent
asked, what pgwarden decided and what came back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pg8000.dbapi

from pgwarden.embedded import EmbeddedPostgres, EmbeddedPostgresError, server_major
from pgwarden.errors import UserError
from pgwarden.resources import parse_documents

APP_USER, APP_PASSWORD = "app", "demo-app-password"
AGENT_USER, AGENT_PASSWORD = "cursor-agent", "demo-agent-password"


@dataclass(frozen=True)
class Step:
    title: str
    sql: str
    expect: str  # what the audience should see: allowed | denied | masked | review


SCRIPT = (
    Step("The agent looks at recent orders", "SELECT id, customer_id, status, total_cents FROM orders ORDER BY id LIMIT 5", "allowed"),
    Step("It reads customers: PII comes back masked", "SELECT id, name, email, ssn, card_number FROM customers ORDER BY id LIMIT 3", "masked"),
    Step("It tries to get the e-mails another way", "SELECT name, upper(email) AS e, row_to_json(c)::text AS j FROM customers c LIMIT 2", "masked"),
    Step("A free-text column leaks an address: the detectors catch it", "SELECT id, notes FROM customers WHERE notes IS NOT NULL ORDER BY id", "masked"),
    Step("It tries to become the superuser", "SET ROLE postgres", "denied"),
    Step("It tries to read a server file", "SELECT pg_read_file('/etc/passwd')", "denied"),
    Step("It hides a DROP behind a comment and a second statement", "SELECT 1 /* harmless */; DROP TABLE orders", "denied"),
    Step("It wants to delete an order: a human must approve", "DELETE FROM orders WHERE id = 20", "review"),
)


def _config_text(pg: EmbeddedPostgres, workdir: Path) -> str:
    template = resources.files("pgwarden.demo").joinpath("demo.yaml").read_text()
    return (
        template.replace("${PG_PORT}", str(pg.port))
        .replace("${WORKDIR}", str(workdir))
        .replace("${APP_PASSWORD}", APP_PASSWORD)
        .replace("${AGENT_PASSWORD}", AGENT_PASSWORD)
    )


def _seed(pg: EmbeddedPostgres) -> None:
    pg.psql("CREATE DATABASE shop")
    pg.psql(resources.files("pgwarden.demo").joinpath("shop.sql").read_text(), dbname="shop")
    pg.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}' IN ROLE shop_reader, shop_writer", dbname="shop")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _show(rows: list[tuple[Any, ...]], names: list[str]) -> str:
    widths = [max(len(n), *(len(str(r[i])) for r in rows)) if rows else len(n) for i, n in enumerate(names)]
    line = " | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))
    out = [line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _reviewer(db: Path, stop: threading.Event) -> None:
    """A DBA on call: waits for the held request and approves it with the real CLI."""
    import json
    import subprocess
    import sys

    cli = [sys.executable, "-m", "pgwarden.cli", "approvals"]
    while not stop.is_set():
        out = subprocess.run([*cli, "list", "--json", "--db", str(db)], capture_output=True, text=True, check=False)
        pending = json.loads(out.stdout or "[]") if out.returncode == 0 else []
        pending = [r for r in pending if r.get("state") == "pending"]
        if pending:
            rid = pending[0]["id"]
            print(f"    dba-alice> pgwarden approvals list\n      {rid}  {pending[0]['statement']}")
            print(f"    dba-alice> pgwarden approvals approve {rid} --as dba-alice")
            subprocess.run([*cli, "approve", rid, "--as", "dba-alice", "--db", str(db), "--reason", "checked: one old order"],
                           capture_output=True, text=True, check=False)
            return
        stop.wait(0.2)


def _run_step(conn: pg8000.dbapi.Connection, step: Step, approve: Any) -> str:
    cur = conn.cursor()
    print(f"\n▶ {step.title}\n  agent> {step.sql}")
    try:
        if step.expect == "review" and approve is not None:
            approve()
        cur.execute(step.sql)
        while conn.notices:
            notice = conn.notices.popleft()
            print(f"    notice: {notice.get(b'M', b'').decode() if isinstance(notice, dict) else notice}")
        if cur.description:
            names = [d[0] for d in cur.description]
            print(textwrap.indent(_show(cur.fetchall(), names), "    "))
        else:
            print(f"    ok: {cur.rowcount} row(s)")
        return "ok"
    except pg8000.dbapi.DatabaseError as e:
        info = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
        code, msg = info.get("C", "?"), info.get("M", str(e))
        print(f"    ✗ {code}: {msg}")
        if info.get("H"):
            print(f"      hint: {info['H']}")
        return str(code)


def _epilogue(workdir: Path) -> None:
    """What an auditor does next: check the audit chain, then replay the agent's session."""
    import json
    import subprocess
    import sys

    cli = [sys.executable, "-m", "pgwarden.cli"]
    audit = workdir / "audit.jsonl"
    print(f"\n▶ The auditor checks the tamper-evident audit log\n  auditor> pgwarden audit verify {audit}")
    out = subprocess.run([*cli, "audit", "verify", str(audit)], capture_output=True, text=True, check=False)
    print(textwrap.indent((out.stdout + out.stderr).strip(), "    "))
    sessions = [json.loads(line)["session"] for line in audit.read_text().splitlines() if '"session.start"' in line]
    if sessions:
        print(f"\n▶ ...and replays what the agent saw (masked, as it saw it)\n  auditor> pgwarden replay {sessions[-1]}")
        out = subprocess.run([*cli, "replay", sessions[-1], "--dir", str(workdir / "recordings")],
                             capture_output=True, text=True, check=False)
        print(textwrap.indent((out.stdout + out.stderr).rstrip() or f"(exit {out.returncode}, no output)", "    "))


def main(args: argparse.Namespace) -> int:
    from pgwarden.proxy.main import start_proxy

    try:
        pg = EmbeddedPostgres().start()
    except EmbeddedPostgresError as e:
        raise UserError(str(e)) from e
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-demo-"))
    os.environ.setdefault("PGWARDEN_APPROVALS_DB", str(workdir / "approvals.db"))
    runner = _LoopThread()
    try:
        version = server_major(pg.bindir) if pg.bindir else "?"
        print(f"pgwarden demo: PostgreSQL {version} on port {pg.port} (embedded, from {pg.bindir}), workspace {workdir}")
        _seed(pg)
        docs = parse_documents(_config_text(pg, workdir), source="demo.yaml")
        running = runner.call(start_proxy(docs))
        print(f"proxy listening on 127.0.0.1:{running.port} — the agent connects there as {AGENT_USER!r}")
        conn = pg8000.dbapi.connect(
            user=AGENT_USER, password=AGENT_PASSWORD, host="127.0.0.1", port=running.port, database="shop",
            application_name="demo-agent",
        )
        conn.autocommit = True  # one statement, one decision: what an agent's tool call does
        stop = threading.Event()

        def approve() -> None:
            threading.Thread(target=_reviewer, args=(workdir / "approvals.db", stop), daemon=True).start()

        results = [_run_step(conn, step, approve) for step in SCRIPT]
        stop.set()
        conn.close()
        print("\nsummary:", ", ".join(f"{s.expect}->{r}" for s, r in zip(SCRIPT, results, strict=True)))
        deadline = time.monotonic() + 10  # let the proxy finish the session (its recording, its audit)
        while running.server.active_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        runner.call(running.stop(drain_timeout=5))
        _epilogue(workdir)
        if args.keep:
            print(f"proxy left running on 127.0.0.1:{running.port}; press Ctrl-C to stop")
            threading.Event().wait()
        return 0
    finally:
        pg.stop()
