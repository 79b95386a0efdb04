"""The local queue: rules (final decisions, no self-approval, distinct approvers, expiry), the
CLI as a second process deciding while the proxy's side waits, defer-mode one-time use, cancel."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pgwarden.approvals import ApprovalSpec, LocalApprovals, backend_from_config, statement_hash
from pgwarden.approvals.model import ApprovalError
from pgwarden.subjects import Identity, SubjectRef

AGENT = Identity(subject="cursor-agent", groups=("ai-agents",), service_account="agents/cursor-agent", method="tokenreview")


def spec(statement: str = "DELETE FROM orders WHERE id = 1", *, mode: str = "wait", min_approvals: int = 1,
         timeout: float = 30.0, params: tuple[str | None, ...] = (), requester: Identity = AGENT,
         reviewers: tuple[SubjectRef, ...] = (SubjectRef(group="dba"),)) -> ApprovalSpec:
    return ApprovalSpec(connection="orders-prod", requester=requester, workload={"pod": "cursor-agent-7d9f"},
                        statement=statement, params=params, rule="agents/orders rule 2 (writes)",
                        reviewers=reviewers, min_approvals=min_approvals, timeout=timeout, mode=mode)


def cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgwarden.cli", "approvals", *args, "--db", str(db)],
                          capture_output=True, text=True, timeout=60, cwd=db.parent)


def test_hash_binds_statement_params_requester_connection() -> None:
    base = statement_hash("DELETE FROM t WHERE id = $1", ("1",), "a", "c")
    assert base == statement_hash("DELETE FROM t WHERE id = $1", ("1",), "a", "c")
    assert len({base,
                statement_hash("DELETE FROM t WHERE id = $1", ("2",), "a", "c"),
                statement_hash("DELETE FROM t WHERE id = $1", (None,), "a", "c"),
                statement_hash("DELETE FROM t WHERE id = $1", ("1",), "b", "c"),
                statement_hash("DELETE FROM t WHERE id = $1", ("1",), "a", "d"),
                statement_hash("DELETE FROM t WHERE id = $1 ", ("1",), "a", "c")}) == 6


async def test_wait_approved_by_another_process(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    # the reviewer's CLI runs as the same OS user as this "proxy": allowed only by allowProxyUserDecisions
    q = LocalApprovals(db, poll_interval=0.05, proxy_user_may_decide=True)
    t = await q.create(spec())
    # what the agent is told: the request to ask about, not the command that decides it nor the file
    assert t.approve_command == f"`pgwarden approvals show {t.id}` on the reviewer's side, then approve or deny it"
    waiter = asyncio.create_task(q.wait(t, 30))
    listed = await asyncio.to_thread(cli, db, "list", "--json")
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [t.id] and rows[0]["state"] == "pending"
    assert rows[0]["requester"] == "cursor-agent" and rows[0]["statement"].startswith("DELETE")
    done = await asyncio.to_thread(cli, db, "approve", t.id, "--as", "alice", "--reason", "checked")
    assert done.returncode == 0, done.stderr
    assert f"request {t.id} approved by alice" in done.stdout
    assert "approving:" in done.stdout and "  │ DELETE FROM orders WHERE id = 1" in done.stdout
    assert "self-declared" in done.stderr
    out = await asyncio.wait_for(waiter, 10)
    assert (out.state, out.decided_by, out.reason) == ("approved", "alice", "checked")
    # one-time: the held statement consumed it
    again = await asyncio.to_thread(cli, db, "approve", t.id, "--as", "bob")
    assert again.returncode == 2 and "already executed" in again.stderr


async def test_denied(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db", poll_interval=0.02)
    t = await q.create(spec())
    waiter = asyncio.create_task(q.wait(t, 30))
    q.decide_sync(t.id, "alice", "denied", "no deletes on Fridays")
    out = await asyncio.wait_for(waiter, 5)
    assert (out.state, out.decided_by, out.reason) == ("denied", "alice", "no deletes on Fridays")
    with pytest.raises(ApprovalError, match="already denied by alice; a decision is final"):
        q.decide_sync(t.id, "bob", "approved")


async def test_expired_and_late_approval_refused(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db", poll_interval=0.02)
    t = await q.create(spec(timeout=0.2))
    out = await q.wait(t, 5)
    assert out.state == "expired"
    with pytest.raises(ApprovalError, match="already expired"):
        q.decide_sync(t.id, "alice", "approved")


async def test_wait_timeout_shorter_than_expiry(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db", poll_interval=0.02)
    t = await q.create(spec(timeout=60))
    out = await q.wait(t, 0.1)
    assert out.state == "expired"
    assert q.list_sync(include_decided=True)[0].state == "expired"


async def test_self_approval_refused(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db", proxy_user_may_decide=True)
    t = await q.create(spec())
    for me in ("cursor-agent", "agents/cursor-agent", "system:serviceaccount:agents:cursor-agent"):
        with pytest.raises(ApprovalError, match="requested this statement and cannot decide it"):
            q.decide_sync(t.id, me, "approved")
    r = cli(tmp_path / "a.db", "deny", t.id, "--as", "cursor-agent")
    assert r.returncode == 2 and "cannot decide it" in r.stderr


async def test_min_approvals_needs_distinct_reviewers(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db", poll_interval=0.02)
    t = await q.create(spec(min_approvals=2))
    waiter = asyncio.create_task(q.wait(t, 30))
    c = q.decide_sync(t.id, "alice", "approved")
    assert c.state == "pending" and "1 more needed" in c.message
    with pytest.raises(ApprovalError, match="alice already approved"):
        q.decide_sync(t.id, "alice", "approved")
    await asyncio.sleep(0.1)
    assert not waiter.done()
    c = q.decide_sync(t.id, "bob", "approved")
    assert c.state == "approved" and c.decided_by == "alice, bob"
    out = await asyncio.wait_for(waiter, 5)
    assert out.state == "approved" and out.decided_by == "alice, bob"


async def test_user_reviewers_are_checked_by_name(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db")
    t = await q.create(spec(reviewers=(SubjectRef(user="alice"),)))
    with pytest.raises(ApprovalError, match="mallory is not a reviewer"):
        q.decide_sync(t.id, "mallory", "approved")
    assert q.decide_sync(t.id, "alice", "approved").state == "approved"


async def test_defer_one_time_use(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db")
    s = spec(mode="defer", params=("1",))
    assert await q.consume(s) is None
    t = await q.create(s)
    assert await q.consume(s) is None  # pending
    q.decide_sync(t.id, "alice", "approved")
    # other parameters, another requester, another connection: not this approval
    assert await q.consume(spec(mode="defer", params=("2",))) is None
    other = Identity(subject="copilot", groups=("ai-agents",))
    assert await q.consume(spec(mode="defer", params=("1",), requester=other)) is None
    used = await q.consume(s)
    assert used is not None and used.id == t.id and used.decided_by == "alice"
    assert await q.consume(s) is None  # one time only
    await q.executed(used, "DELETE 1")
    row = q.list_sync(include_decided=True)[0]
    assert row.state == "executed"


async def test_defer_approval_unused_expires(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db")
    s = spec(mode="defer", timeout=0.3)
    t = await q.create(s)
    q.decide_sync(t.id, "alice", "approved")
    await asyncio.sleep(0.4)
    assert await q.consume(s) is None


async def test_wait_mode_request_is_not_consumable(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db")
    t = await q.create(spec(mode="wait"))
    q.decide_sync(t.id, "alice", "approved")
    assert await q.consume(spec(mode="defer")) is None


async def test_cancel_withdraws(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db", poll_interval=0.02)
    t = await q.create(spec())
    waiter = asyncio.create_task(q.wait(t, 30))
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.list_sync(include_decided=True)[0].state == "withdrawn"
    with pytest.raises(ApprovalError, match="already withdrawn"):
        q.decide_sync(t.id, "alice", "approved")
    assert q.list_sync() == []


def test_cli_list_table_and_errors(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    q = LocalApprovals(db, proxy_user_may_decide=True)
    t = asyncio.run(q.create(spec("UPDATE orders SET status = 'x'\n  WHERE id = 7")))
    r = cli(db, "list")
    assert r.returncode == 0
    head, line = r.stdout.splitlines()
    assert head.split() == ["ID", "AGE", "REQUESTER", "STATE", "APPROVALS", "ROWS", "STATEMENT"]
    assert t.id in line and "cursor-agent" in line and "UPDATE orders SET status = 'x' WHERE id = 7" in line
    r = cli(db, "approve", "nope", "--as", "alice")
    assert r.returncode == 2 and "there is no request 'nope'" in r.stderr
    r = cli(tmp_path / "missing.db", "approve", "x", "--as", "alice")
    assert r.returncode == 2 and "no approvals database" in r.stderr


def test_backend_from_config(tmp_path: Path) -> None:
    b: Any = backend_from_config({"backend": "local", "path": str(tmp_path / "q.db")})
    assert isinstance(b, LocalApprovals) and b.path == tmp_path / "q.db"
    with pytest.raises(ValueError, match="'sqlite' is not one of local, kubernetes"):
        backend_from_config({"backend": "sqlite"})
    with pytest.raises(ValueError, match="unknown field"):
        backend_from_config({"backend": "local", "pth": "x"})
    k: Any = backend_from_config({"backend": "kubernetes", "namespace": "agents", "apiUrl": "http://127.0.0.1:1"})
    assert k.namespace == "agents"
    asyncio.run(k.close())
