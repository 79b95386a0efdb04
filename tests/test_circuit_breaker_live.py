"""The circuit breaker through the live proxy: an agent that keeps hitting the gate is stopped
(limits.maxDenials), one that floods it is slowed (limits.maxStatementsPerMinute)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
from circuit_clock import FakeClock
from rawpg import Closed, PgError, RawConn, error_fields, query

from pgwarden.proxy.circuit import CircuitBreaker, lift, read_book

API = "pgwarden.dev/v1alpha1"
USERS = [{"name": "agent", "password": "agent-pw", "groups": ["ai-agents"]},
         {"name": "other", "password": "other-pw", "groups": ["ai-agents"]}]


def policy(limits: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
            "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"group": "ai-agents"}],
                     "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}],
                     "limits": limits}}


def connect(proxy: Any, user: str = "agent") -> pg8000.native.Connection:
    return pg8000.native.Connection(user, host=proxy.host, port=proxy.port, database="shop", password=f"{user}-pw")


@pytest.fixture
def guarded(make_proxy: Any, tmp_path: Path) -> Any:
    def make(limits: dict[str, Any]) -> Any:
        spec = {"users": USERS, "audit": {"path": str(tmp_path / "audit.jsonl")},
                "lockouts": {"path": str(tmp_path / "lockouts.json")}}
        proxy = make_proxy(extra=[policy(limits)], proxy_spec=spec)
        clock = FakeClock()
        proxy.running.server.runtime.breaker.clock = clock
        return proxy, clock

    return make


def refused(conn: pg8000.native.Connection, sql: str) -> dict[str, str]:
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run(sql)
    return e.value.args[0]


def records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]


def fatal_and_closed(conn: RawConn, sql: str) -> dict[str, str]:
    """Send `sql`; the ErrorResponse the proxy answers with, and the connection must then close."""
    conn.send(query(sql))
    fields: dict[str, str] = {}
    with pytest.raises(Closed):
        while True:
            kind, payload = conn.recv()
            if kind == b"E":
                fields = error_fields(payload)
    return fields


def test_the_refusal_past_the_limit_ends_the_session_and_locks_the_identity_out(
        guarded: Any, pg: Any, tmp_path: Path) -> None:
    proxy, clock = guarded({"maxDenials": {"count": 2, "window": "1m", "lockout": "10m"}})
    conn = RawConn.login(proxy.host, proxy.port, "agent", "agent-pw", "shop")
    assert conn.simple("SELECT count(*) FROM orders") == [[b"20"]]  # allowed statements never count
    for sql in ("DROP TABLE orders", "SELECT * FROM customers"):
        with pytest.raises(PgError) as e:
            conn.simple(sql)
        assert e.value.sqlstate == "42501"
    mark = pg.log_position()
    err = fatal_and_closed(conn, "DROP SCHEMA public CASCADE")
    assert err["C"] == "PW006" and err["S"] == "FATAL"
    assert "may not connect through this proxy until" in err["M"] and "pgwarden lockouts lift" in err["H"]
    assert "DROP SCHEMA" not in pg.log_since(mark)
    # the same identity gets no new session; another identity is unaffected
    with pytest.raises(pg8000.native.DatabaseError) as again:
        connect(proxy)
    assert again.value.args[0]["C"] == "PW006" and "until" in again.value.args[0]["M"]
    other = connect(proxy, "other")
    assert other.run("SELECT count(*) FROM orders") == [[20]]
    other.close()
    # after the lockout it is admitted again
    clock.advance(601)
    back = connect(proxy)
    assert back.run("SELECT 1") == [[1]]
    back.close()
    recs = records(tmp_path)
    lockout = [r for r in recs if r["event"] == "lockout"]
    assert lockout and lockout[0]["lockout"]["subject"] == "agent" and lockout[0]["lockout"]["refused"] == 3
    assert any(r["event"] == "lockout.end" and r["lockout"].get("expired") for r in recs)


def test_a_person_lifts_a_lockout_with_the_cli_and_the_chain_says_who(guarded: Any, tmp_path: Path) -> None:
    proxy, _ = guarded({"maxDenials": {"count": 1, "window": "1m", "lockout": "1h"}})
    conn = RawConn.login(proxy.host, proxy.port, "agent", "agent-pw", "shop")
    with pytest.raises(PgError):
        conn.simple("DROP TABLE orders")
    assert fatal_and_closed(conn, "DROP TABLE orders")["C"] == "PW006"
    state = tmp_path / "lockouts.json"
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    listed = subprocess.run([sys.executable, "-m", "pgwarden.cli", "lockouts", "list", "--state", str(state)],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.startswith("agent  until ")
    done = subprocess.run([sys.executable, "-m", "pgwarden.cli", "lockouts", "lift", "agent", "--as", "dba-alice",
                           "--state", str(state)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    back = connect(proxy)
    assert back.run("SELECT 1") == [[1]]
    back.close()
    ended = [r for r in records(tmp_path) if r["event"] == "lockout.end"]
    assert ended and ended[-1]["lockout"]["liftedBy"] == "dba-alice"
    assert read_book(state) == {}


def test_a_reviewers_denial_counts_like_a_policy_denial() -> None:
    clock = FakeClock()
    b = CircuitBreaker(None, clock)
    assert b.refused("a", 1, 60, 300, "denied by dba") is None
    lk = b.refused("a", 1, 60, 300, "denied by dba")
    assert lk is not None and lk.until == clock() + 300
    assert b.locked("a") is not None and b.locked("b") is None


def test_refusals_outside_the_window_do_not_add_up() -> None:
    clock = FakeClock()
    b = CircuitBreaker(None, clock)
    for _ in range(5):
        assert b.refused("a", 2, 60, 300, "x") is None
        clock.advance(31)  # never more than two inside one minute
    assert b.locked("a") is None


def test_lifting_an_identity_that_is_not_locked_out_says_so(tmp_path: Path) -> None:
    from pgwarden.errors import UserError

    with pytest.raises(UserError, match="not locked out"):
        lift(tmp_path / "lockouts.json", "agent", "dba")


def test_the_rate_limit_answers_with_an_error_and_the_session_stays_usable(guarded: Any, pg: Any) -> None:
    proxy, clock = guarded({"maxStatementsPerMinute": 5, "maxDenials": {"count": 2}})
    conn = connect(proxy)
    for _ in range(5):
        assert conn.run("SELECT 1") == [[1]]
    mark = pg.log_position()
    start = time.monotonic()
    err = refused(conn, "SELECT 2")
    assert time.monotonic() - start < 5  # an answer, not a hang
    assert err["C"] == "53400" and "maxStatementsPerMinute" in err["M"]
    assert "SELECT 2" not in pg.log_since(mark)
    assert refused(conn, "SELECT 3")["C"] == "53400"  # rate refusals do not count towards a lockout
    clock.advance(61)
    assert conn.run("SELECT 4") == [[4]]
    conn.close()


def test_every_run_of_a_prepared_statement_counts_towards_the_rate(guarded: Any) -> None:
    import psycopg

    proxy, clock = guarded({"maxStatementsPerMinute": 3})
    dsn = f"host={proxy.host} port={proxy.port} dbname=shop user=agent password=agent-pw"
    with psycopg.connect(dsn, prepare_threshold=0, autocommit=True) as c:  # Parse once, then Bind/Execute
        for i in range(3):
            assert c.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="maxStatementsPerMinute"):
            c.execute("SELECT %s::int", (9,))
        clock.advance(61)
        assert c.execute("SELECT %s::int", (10,)).fetchone() == (10,)


def test_a_long_statement_analysed_off_the_loop_counts_towards_the_rate(guarded: Any) -> None:
    proxy, _ = guarded({"maxStatementsPerMinute": 2})
    conn = RawConn.login(proxy.host, proxy.port, "agent", "agent-pw", "shop")
    long = "SELECT count(*) FROM orders WHERE id IN (" + ", ".join(str(i) for i in range(6000)) + ")"
    assert len(long) > 16 * 1024  # past limits.analysisOffloadBytes: decided off the event loop
    assert conn.simple(long) == [[b"20"]]
    assert conn.simple(long) == [[b"20"]]
    with pytest.raises(PgError) as e:
        conn.simple(long)
    assert e.value.sqlstate == "53400"
    conn.close()
