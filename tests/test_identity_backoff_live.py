"""Login back-off through the live proxy: a limit per source and user, not a sleep, and the
agent's own successful logins do not wipe the record of its guesses at another user's password."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest

from pgwarden.identity.backoff import Attempt, FailureBackoff, LoginThrottled
from pgwarden.identity.workload import is_loopback

CAROL = {"name": "dba-carol", "password": "carol-right-password", "groups": ["dba"]}


def login(proxy: Any, user: str, password: str) -> str:
    """'' when the login worked, else the server's message."""
    try:
        conn = pg8000.native.Connection(
            user, host=proxy.host, port=proxy.port, database="shop", password=password, timeout=30
        )
    except pg8000.native.DatabaseError as e:
        assert e.args[0]["C"] == "28P01"
        return str(e.args[0]["M"])
    conn.run("SELECT 1")
    conn.close()
    return ""


def auth_failures(path: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "auth.failure"]


@pytest.fixture
def guarded(make_proxy: Any, tmp_path: Path) -> Any:
    spec = {
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "users": [{"name": "agent", "password": "agent-pw", "groups": ["ai-agents"]}, CAROL],
    }
    return make_proxy(proxy_spec=spec)


def test_guessing_is_limited_and_the_agents_own_login_does_not_reset_it(guarded: Any, tmp_path: Path) -> None:
    for i in range(3):  # the free failures
        assert "password authentication failed" in login(guarded, "dba-carol", f"guess-{i}")
    time.sleep(0.6)  # past the first back-off step
    assert login(guarded, "agent", "agent-pw") == ""  # the agent's own login, between its guesses
    assert "password authentication failed" in login(guarded, "dba-carol", "guess-3")
    # the count went on (4 failures: 1 s), where a reset would have made it the first again (0 s)
    assert auth_failures(tmp_path / "audit.jsonl")[-1]["backoffSeconds"] == 1.0
    # within the back-off even the right password is refused: not checked, so no guess gets in
    started = time.monotonic()
    refused = login(guarded, "dba-carol", CAROL["password"])
    assert "too many failed logins" in refused
    assert time.monotonic() - started < 0.9  # refused at once, not after sleeping out the 1 s


def test_parallel_guesses_are_serialised_not_each_checked(guarded: Any, tmp_path: Path) -> None:
    for i in range(3):
        login(guarded, "dba-carol", f"guess-{i}")
    time.sleep(0.6)
    answers: list[str] = []

    def guess(i: int) -> None:
        answers.append(login(guarded, "dba-carol", f"parallel-{i}"))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # one of them was checked (and failed); the others waited their turn and found the back-off
    assert sum("password authentication failed" in a for a in answers) == 1
    assert sum("too many failed logins" in a for a in answers) == 7
    checked = [r for r in auth_failures(tmp_path / "audit.jsonl") if "password authentication" in r["reason"]]
    assert len(checked) == 4


def test_a_connection_pool_that_knows_the_password_still_logs_in(guarded: Any) -> None:
    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(login(guarded, "dba-carol", CAROL["password"])))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [""] * 8


async def test_backoff_counts_per_source_and_user() -> None:
    b = FailureBackoff(free_failures=1, base=10.0)
    a = await b.begin("10.0.0.1", "carol", clock=lambda: 0.0)
    assert b.failed(a, 0.0) == 10.0
    b.end(a)
    b.succeeded(Attempt("10.0.0.1", "agent"))  # someone else's success from that source
    with pytest.raises(LoginThrottled, match="in 9.0s"):  # 10 s after the failure, 1 s of it gone
        await b.begin("10.0.0.1", "carol", clock=lambda: 1.0)
    with pytest.raises(LoginThrottled):  # the source as a whole, for any user
        await b.begin("10.0.0.1", "dave", clock=lambda: 1.0)
    ok = await b.begin("10.0.0.2", "carol", clock=lambda: 1.0)  # another source
    b.end(ok)
    assert b._turns == {}  # nothing left behind by refused or finished attempts


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.3.4.5:1", True),
        ("::1:5000", True),
        ("unix", True),
        ("::ffff:127.0.0.1:5000", True),
        ("::10.0.0.1:5000", False),  # an IPv4-compatible address of another host, spelled like ::1…
        ("::1.2.3.4:5000", False),
        ("::100:5000", False),
        ("10.0.0.1:5000", False),
        ("1270.0.0.1:1", False),
        ("", False),
        ("127.example.com:1", False),
    ],
)
def test_loopback_is_decided_on_the_address(peer: str, loopback: bool) -> None:
    assert is_loopback(peer) is loopback
