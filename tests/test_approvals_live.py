"""Approvals through the live proxy, the local backend and the real database.

A reviewer in another process decides with the real CLI; the server's statement log proves
what ran, and how often.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest

API = "pgwarden.dev/v1alpha1"


def policy(mode: str, timeout: str = "20s") -> dict[str, Any]:
    return {
        "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "reviewed"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"group": "ai-agents"}],
            "rules": [
                {"action": "allow", "operations": ["select"], "tables": ["public.audit_scratch"]},
                {"action": "review", "operations": ["insert", "delete"], "tables": ["public.audit_scratch"]},
            ],
            "approval": {"reviewers": [{"group": "dba"}], "timeout": timeout, "mode": mode},
        },
    }


def cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgwarden.cli", "approvals", *args, "--db", str(db)],
                          capture_output=True, text=True, timeout=60)


def pending(db: Path) -> list[dict[str, Any]]:
    out = cli(db, "list", "--json")
    return [r for r in json.loads(out.stdout or "[]") if r.get("state") == "pending"] if out.returncode == 0 else []


def reviewer(db: Path, verb: str, name: str = "dba-alice") -> threading.Thread:
    """Another process decides the first pending request it sees."""

    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = pending(db) if db.exists() else []
            if rows:
                cli(db, verb, rows[0]["id"], "--as", name)
                return
            time.sleep(0.1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def reviewed(make_proxy: Any, tmp_path: Path) -> Any:
    def make(mode: str, timeout: str = "20s") -> tuple[Any, Path]:
        db = tmp_path / "approvals.db"
        # the reviewer CLI runs as this process's OS user, which is also the proxy's: allowed only because
        # no agent runs here (test_approvals_local_guard checks the refusal without it)
        spec = {"approvals": {"backend": "local", "path": str(db), "allowProxyUserDecisions": True},
                "audit": {"path": str(tmp_path / "audit.jsonl")}}
        return make_proxy(extra=[policy(mode, timeout)], proxy_spec=spec), db

    return make


def connect(proxy: Any) -> pg8000.native.Connection:
    return pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password)


def ran(pg: Any, mark: int, marker: str) -> int:
    return sum(1 for line in pg.log_since(mark).splitlines() if "statement:" in line and marker in line)


def test_wait_mode_runs_the_statement_once_after_approval(reviewed: Any, pg: Any, tmp_path: Path) -> None:
    proxy, db = reviewed("wait")
    mark = pg.log_position()
    conn = connect(proxy)
    t = reviewer(db, "approve")
    conn.run("INSERT INTO audit_scratch (payload) VALUES ('approved-wait-1')")
    t.join()
    assert conn.notices and "needs approval" in conn.notices[0][b"M"].decode()
    assert ran(pg, mark, "approved-wait-1") == 1
    assert conn.run("SELECT count(*) FROM audit_scratch WHERE payload = 'approved-wait-1'") == [[1]]
    conn.close()
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    steps = [e["approval"]["event"] for e in events if e["event"] == "approval"]
    assert steps[:2] == ["requested", "approved"]
    approved = next(e for e in events if e["event"] == "approval" and e["approval"]["event"] == "approved")
    assert approved["approval"]["approver"] == "dba-alice"


def test_denied_statement_never_runs(reviewed: Any, pg: Any) -> None:
    proxy, db = reviewed("wait")
    mark = pg.log_position()
    conn = connect(proxy)
    t = reviewer(db, "deny")
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run("DELETE FROM audit_scratch WHERE payload = 'denied-marker'")
    t.join()
    assert e.value.args[0]["C"] == "PW002"
    assert "dba-alice" in e.value.args[0]["M"]
    assert ran(pg, mark, "denied-marker") == 0
    conn.close()


def test_expired_request_never_runs(reviewed: Any, pg: Any) -> None:
    proxy, _ = reviewed("wait", timeout="1s")
    mark = pg.log_position()
    conn = connect(proxy)
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run("DELETE FROM audit_scratch WHERE payload = 'expired-marker'")
    assert e.value.args[0]["C"] == "PW003"
    assert ran(pg, mark, "expired-marker") == 0
    conn.close()


def test_defer_mode_runs_the_identical_statement_once(reviewed: Any, pg: Any) -> None:
    proxy, db = reviewed("defer")
    sql = "INSERT INTO audit_scratch (payload) VALUES ('deferred-once')"
    mark = pg.log_position()
    conn = connect(proxy)
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run(sql)
    assert e.value.args[0]["C"] == "PW001"
    rid = pending(db)[0]["id"]
    assert f"pgwarden approvals show {rid}" in e.value.args[0]["H"]
    assert "pgwarden approvals approve" not in e.value.args[0]["H"] and str(db) not in e.value.args[0]["H"]
    assert cli(db, "approve", rid, "--as", "dba-bob").returncode == 0
    with pytest.raises(pg8000.native.DatabaseError):  # a different statement is not covered
        conn.run("INSERT INTO audit_scratch (payload) VALUES ('deferred-other')")
    conn.run(sql)  # the approved one runs...
    with pytest.raises(pg8000.native.DatabaseError) as again:  # ...once
        conn.run(sql)
    assert again.value.args[0]["C"] == "PW001"
    assert ran(pg, mark, "deferred-once") == 1
    assert ran(pg, mark, "deferred-other") == 0
    conn.close()


def test_defer_mode_approval_is_attributed_in_the_chain_before_the_statement_runs(
        reviewed: Any, tmp_path: Path) -> None:
    proxy, db = reviewed("defer")
    sql = "INSERT INTO audit_scratch (payload) VALUES ('deferred-attributed')"
    conn = connect(proxy)
    with pytest.raises(pg8000.native.DatabaseError):
        conn.run(sql)
    rid = pending(db)[0]["id"]
    assert cli(db, "approve", rid, "--as", "dba-carol").returncode == 0
    conn.run(sql)
    conn.close()
    # the outcome record is emitted once the statement completed (after the client has its answer)
    deadline = time.monotonic() + 10
    while True:
        events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        approved = [e for e in events if e["event"] == "approval" and e["approval"]["event"] == "approved"]
        assert approved and approved[-1]["approval"]["approver"] == "dba-carol"
        ran_rec = [e for e in events if e["event"] == "statement" and e["decision"]["action"] == "approved"]
        assert ran_rec and ran_rec[-1]["approval"] == {"id": rid, "approver": "dba-carol"}
        outcome = [e for e in events if e["event"] == "statement.outcome" and e["stmt"] == ran_rec[-1]["stmt"]]
        if outcome or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert outcome, "the statement's outcome was never recorded"
    # in the chain before the statement's outcome: written before it was forwarded
    assert approved[-1]["seq"] < ran_rec[-1]["seq"] < outcome[-1]["seq"]


def test_cancel_withdraws_a_held_statement(reviewed: Any, pg: Any) -> None:
    import psycopg

    proxy, db = reviewed("wait")
    mark = pg.log_position()
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            conn.execute("DELETE FROM audit_scratch WHERE payload = 'cancel-marker'")
        except psycopg.Error as e:
            result["sqlstate"] = e.sqlstate

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 20
    while not pending(db) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pending(db), "the request was not created"
    conn.cancel_safe()  # (plain cancel() holds the GIL; this proxy runs in a thread of the same process)
    t.join(20)
    assert result.get("sqlstate") == "57014"
    assert not pending(db)  # withdrawn
    assert ran(pg, mark, "cancel-marker") == 0
    assert conn.execute("SELECT count(*) FROM audit_scratch").fetchone() is not None  # session still works
    conn.close()


def test_extended_protocol_needs_an_approval_per_bind(reviewed: Any, pg: Any, tmp_path: Path) -> None:
    """Approving a prepared DELETE once must not let it run again with other parameters."""
    import psycopg

    proxy, db = reviewed("wait")
    mark = pg.log_position()
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    sql = "DELETE FROM audit_scratch WHERE payload = %s"
    t = reviewer(db, "approve")
    conn.execute(sql, ["bind-approved"], prepare=True)  # the human approves these values
    t.join()
    t = reviewer(db, "deny")
    with pytest.raises(psycopg.Error) as e:  # same prepared statement, new values: a new request
        conn.execute(sql, ["bind-other"], prepare=True)
    t.join()
    assert e.value.sqlstate == "PW002"
    conn.close()
    log = pg.log_since(mark)
    assert "bind-approved" in log and "bind-other" not in log
    requests = json.loads(cli(db, "list", "--all", "--json").stdout)
    assert len(requests) == 2 and "denied" in {r["state"] for r in requests}
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert any(e.get("params") == ["bind-approved"] for e in events if e["event"] == "statement")
