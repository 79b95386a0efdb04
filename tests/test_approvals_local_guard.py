"""The local backend against an agent that tries to approve itself: by another spelling of its
name, by running the CLI as the proxy's OS user, by reading the queue's file, or by following the
hint it is given. Reviewers are real processes of other OS users; the live proxy and the
server's statement log show what ran."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
from approvals_helpers import (
    OTHER_UID,
    REVIEWER_GID,
    REVIEWER_UID,
    cli_as,
    mode,
    python_as,
    reviewer_cli,
    root_cli,
    shared_base,
)

from pgwarden.approvals import ApprovalSpec, LocalApprovals, backend_from_config
from pgwarden.approvals.local import proxy_user_refusal
from pgwarden.approvals.model import ApprovalError
from pgwarden.resources import ResourceError
from pgwarden.subjects import Identity, SubjectRef

API = "pgwarden.dev/v1alpha1"
AGENT = Identity(subject="cursor-agent", groups=("ai-agents",), service_account="agents/cursor-agent")


def spec(statement: str = "DELETE FROM orders WHERE id = 8", min_approvals: int = 1) -> ApprovalSpec:
    return ApprovalSpec(
        connection="orders-prod",
        requester=AGENT,
        workload={},
        statement=statement,
        params=(),
        rule="agents/orders rule 2 (writes)",
        reviewers=(SubjectRef(group="dba"),),
        min_approvals=min_approvals,
        timeout=60,
        mode="wait",
    )


# -- names ----------------------------------------------------------------------------------------

SELF_SPELLINGS = [
    "CURSOR-AGENT",
    "Cursor-Agent",
    "cursor-agent ",
    "ｃｕｒｓｏｒ－ａｇｅｎｔ",  # fullwidth
    "cursor-age\u0301nt",
    "cursor-agént",  # combining / precomposed accent
    "cursor\u200b-agent",
    "cursor-agent\u202e",  # zero-width space, bidi override
    "AGENTS/CURSOR-AGENT",
    "SYSTEM:SERVICEACCOUNT:AGENTS:CURSOR-AGENT",
    "\u0441ursor-agent",  # Cyrillic с: refused as a name in another script
]


def test_self_approval_in_any_spelling_is_refused_by_the_cli(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    q = LocalApprovals(db, proxy_user_may_decide=True)  # the name check alone, whoever runs the CLI
    t = asyncio.run(q.create(spec()))
    for name in SELF_SPELLINGS:
        r = root_cli("approvals", "approve", t.id, "--as", name, "--db", str(db))
        assert r.returncode == 2, (name, r.stdout)
        assert "cannot decide it" in r.stderr or "not a usable reviewer name" in r.stderr, (name, r.stderr)
        assert "\u202e" not in r.stderr and "\u200b" not in r.stderr  # the refusal shows them escaped
    row = q.get_sync(t.id)
    assert row.state == "pending" and row.votes == ()


def test_one_reviewer_in_two_spellings_is_one_approval(tmp_path: Path) -> None:
    q = LocalApprovals(tmp_path / "a.db")
    t = asyncio.run(q.create(spec(min_approvals=2)))
    assert q.decide_sync(t.id, "alice", "approved").state == "pending"
    for again in ("ALICE", "ａｌｉｃｅ", "alice\u0301", "Alice "):
        with pytest.raises(ApprovalError, match="already approved"):
            q.decide_sync(t.id, again, "approved")
    assert q.decide_sync(t.id, "bob", "approved").state == "approved"


# -- the file and the OS user -----------------------------------------------------------------------


def test_the_queue_is_private_to_the_proxys_user(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    q: Any = backend_from_config({"backend": "local", "path": str(folder / "approvals.db")})
    t = asyncio.run(q.create(spec()))
    held = sqlite3.connect(q.path)  # keeps -wal and -shm in place while we look at them
    try:
        held.execute("SELECT count(*) FROM requests").fetchone()
        q.decide_sync(t.id, "alice", "denied")
        files = [q.path, Path(f"{q.path}-wal"), Path(f"{q.path}-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert mode(folder) == 0o700
    finally:
        held.close()


def test_a_world_readable_queue_from_before_is_made_private(tmp_path: Path) -> None:
    db = tmp_path / "approvals.db"
    LocalApprovals(db)
    os.chmod(db, 0o644)
    backend_from_config({"backend": "local", "path": str(db)})
    assert mode(db) == 0o600


def test_decisions_by_the_proxys_own_os_user_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "approvals.db"
    q: Any = backend_from_config({"backend": "local", "path": str(db)})
    t = asyncio.run(q.create(spec()))
    for verb in ("approve", "deny"):
        r = root_cli("approvals", verb, t.id, "--as", "dba-alice", "--db", str(db))
        assert r.returncode == 2 and "proxy's own OS user are refused" in r.stderr, r.stderr
        assert "approving:" not in r.stdout
    assert q.get_sync(t.id).state == "pending"
    # looking is allowed: list and show work for the proxy's user
    shown = root_cli("approvals", "show", t.id, "--db", str(db))
    assert shown.returncode == 0 and "DELETE FROM orders WHERE id = 8" in shown.stdout
    assert "for development" in shown.stderr


def test_refusal_rule() -> None:
    assert proxy_user_refusal(1000, 1000, 1000, False)
    assert proxy_user_refusal(0, 1000, 0, False)  # owns the file: the proxy's user in another guise
    assert proxy_user_refusal(0, 1000, 1000, False) is None  # sudo, proxy runs as 1000
    assert proxy_user_refusal(1000, 1000, 1000, True) is None  # allowProxyUserDecisions


def test_reviewer_group_lets_other_users_decide_and_nobody_else() -> None:
    with shared_base() as base:
        folder = base / "q"
        q: Any = backend_from_config(
            {"backend": "local", "path": str(folder / "approvals.db"), "reviewerGroup": REVIEWER_GID}
        )
        assert (mode(folder), folder.stat().st_gid) == (0o2770, REVIEWER_GID)
        assert (mode(q.path), q.path.stat().st_gid) == (0o660, REVIEWER_GID)
        t = asyncio.run(q.create(spec()))
        # a user outside the group cannot even see the queue
        r = cli_as(OTHER_UID, (), "approvals", "approve", t.id, "--as", "mallory", "--db", str(q.path))
        assert r.returncode == 2 and "permission denied" in r.stderr and "reviewerGroup" in r.stderr
        r = cli_as(OTHER_UID, (), "approvals", "list", "--db", str(q.path))
        assert r.returncode == 2 and "DELETE" not in r.stdout
        # a reviewer in the group sees what it approves, then approves it
        r = reviewer_cli("approvals", "approve", t.id, "--as", "dba-alice", "--db", str(q.path))
        assert r.returncode == 0, r.stderr
        assert "approving:" in r.stdout and "  │ DELETE FROM orders WHERE id = 8" in r.stdout
        assert f"request {t.id} approved by dba-alice" in r.stdout
        assert q.get_sync(t.id).state == "approved"
        for side in folder.iterdir():  # whatever the reviewer's SQLite created stays in the group, not world
            assert mode(side) & 0o007 == 0 and side.stat().st_gid == REVIEWER_GID, side


def test_reviewer_group_needs_a_folder_the_group_can_write(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="must belong to the reviewer group and be group-writable"):
        backend_from_config(
            {"backend": "local", "path": str(tmp_path / "approvals.db"), "reviewerGroup": REVIEWER_GID}
        )
    with pytest.raises(ResourceError, match="applies to the local backend only"):
        backend_from_config(
            {
                "backend": "kubernetes",
                "namespace": "agents",
                "apiUrl": "http://127.0.0.1:1",
                "reviewerGroup": "dba",
            }
        )


# -- through the live proxy -------------------------------------------------------------------------


def review_policy(mode_: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "AccessPolicy",
        "metadata": {"name": "reviewed"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"group": "ai-agents"}],
            "rules": [
                {"action": "review", "operations": ["insert", "delete"], "tables": ["public.audit_scratch"]}
            ],
            "approval": {"reviewers": [{"group": "dba"}], "timeout": "20s", "mode": mode_},
        },
    }


def connect(proxy: Any) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password
    )


def ran(pg: Any, mark: int, marker: str) -> int:
    return sum(1 for line in pg.log_since(mark).splitlines() if "statement:" in line and marker in line)


def pending(db: Path) -> list[dict[str, Any]]:
    r = reviewer_cli("approvals", "list", "--json", "--db", str(db))
    return [x for x in json.loads(r.stdout or "[]") if x["state"] == "pending"] if r.returncode == 0 else []


def test_agent_cannot_approve_itself_through_the_live_proxy(
    make_proxy: Any, pg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with shared_base() as base:
        db = base / "q" / "approvals.db"
        approvals = {"backend": "local", "path": str(db), "reviewerGroup": REVIEWER_GID}
        with caplog.at_level(logging.WARNING, logger="pgwarden.approvals"):
            proxy = make_proxy(extra=[review_policy("wait")], proxy_spec={"approvals": approvals})
        assert any("local approval backend is for development" in r.getMessage() for r in caplog.records)
        mark = pg.log_position()
        conn = connect(proxy)
        result: dict[str, Any] = {}

        def agent() -> None:
            try:
                conn.run("DELETE FROM audit_scratch WHERE payload = 'self-approved-marker'")
                result["ok"] = True
            except pg8000.native.DatabaseError as e:
                result["error"] = e.args[0]

        t = threading.Thread(target=agent)
        t.start()
        deadline = time.monotonic() + 20
        while not pending(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        rid = pending(db)[0]["id"]
        # what the agent was told: which request, not the command that decides it nor the file
        deadline = time.monotonic() + 5
        while not conn.notices and time.monotonic() < deadline:
            time.sleep(0.05)
        notice = " ".join(v.decode() if isinstance(v, bytes) else str(v) for v in conn.notices[0].values())
        assert rid in notice and "approvals show" in notice
        assert "approvals approve" not in notice and str(db) not in notice and "--db" not in notice
        # the agent runs as the proxy's OS user: every attempt to decide is refused
        for name in ("dba-alice", "AGENT", "cursor-agent"):
            r = root_cli("approvals", "approve", rid, "--as", name, "--db", str(db))
            assert r.returncode == 2 and "proxy's own OS user" in r.stderr
        time.sleep(0.5)
        assert t.is_alive() and ran(pg, mark, "self-approved-marker") == 0
        # a reviewer, another OS user in the reviewer group, approves: it runs once
        r = reviewer_cli("approvals", "approve", rid, "--as", "dba-alice", "--db", str(db))
        assert r.returncode == 0, r.stderr
        t.join(20)
        assert result.get("ok") is True, result
        assert ran(pg, mark, "self-approved-marker") == 1
        conn.close()


def test_defer_hint_keeps_the_database_out(make_proxy: Any, pg: Any) -> None:
    with shared_base() as base:
        db = base / "q" / "approvals.db"
        proxy = make_proxy(
            extra=[review_policy("defer")], proxy_spec={"approvals": {"backend": "local", "path": str(db)}}
        )
        mark = pg.log_position()
        conn = connect(proxy)
        with pytest.raises(pg8000.native.DatabaseError) as e:
            conn.run("INSERT INTO audit_scratch (payload) VALUES ('defer-hint-marker')")
        err = e.value.args[0]
        assert err["C"] == "PW001"
        everything = " ".join(str(v) for v in err.values())
        assert "approvals show" in everything
        assert (
            "approvals approve" not in everything and str(db) not in everything and "--db" not in everything
        )
        assert ran(pg, mark, "defer-hint-marker") == 0
        conn.close()


def test_a_queue_the_proxy_cannot_prepare_stops_it_with_a_message() -> None:
    """A proxy running as its own user, pointed at a folder it cannot write, refuses to start and
    says what to fix (instead of a traceback)."""
    with shared_base() as base:
        folder = base / "q"
        folder.mkdir(mode=0o700)
        os.chown(folder, REVIEWER_UID, REVIEWER_UID)
        code = (
            "from pgwarden.approvals import backend_from_config\n"
            "from pgwarden.resources import ResourceError\n"
            "try:\n"
            "    backend_from_config({'backend': 'local', 'path': %r})\n"
            "except ResourceError as e:\n"
            "    print(e)\n"
        )
        r = python_as(OTHER_UID, (), code % str(folder / "approvals.db"))  # noqa: UP031
        assert "ProxyConfig spec.approvals: path: cannot prepare the approvals database" in r.stdout, r.stderr
        assert "Permission denied" in r.stdout and "must own the file" in r.stdout
