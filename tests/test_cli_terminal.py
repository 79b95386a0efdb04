"""What a reviewer and an auditor see in a real terminal (tmux) when the agent hides escape
sequences in its statements: cursor moves and line erases, OSC 8 links, bidi overrides.

Each attack first runs raw in the same terminal (`cat` of the statement) to show that it does hide
text there; then the pgwarden command must show the hidden part, with the sequences escaped."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
from terminal_helpers import pgwarden_command, terminal

API = "pgwarden.dev/v1alpha1"
# the reviewer would see `... WHERE id = 8`; `OR id > 0` is moved over and erased
HIDE_TAIL = "DELETE FROM audit_scratch WHERE id = 8 OR id > 0 --\x1b[13D\x1b[K"
# an OSC 8 link over harmless-looking text, and a right-to-left override
LINK_BIDI = (
    "DELETE FROM audit_scratch WHERE id = 9 /* \x1b]8;;https://evil.example/\x07see ticket\x1b]8;;\x07 "
    "\u202e 0 < di RO \u202c*/"
)
# a denied statement that wipes its own line (and the one above) from the auditor's screen
WIPE_DENIED = "SELECT pg_read_file('/etc/passwd') --\r\x1b[2K\x1b[1A\x1b[2K"


def policy(mode: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "AccessPolicy",
        "metadata": {"name": "reviewed"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"group": "ai-agents"}],
            "rules": [
                {"action": "allow", "operations": ["select"], "tables": ["public.audit_scratch"]},
                {"action": "review", "operations": ["delete"], "tables": ["public.audit_scratch"]},
            ],
            "defaultAction": "deny",
            "approval": {"reviewers": [{"group": "dba"}], "timeout": "60s", "mode": mode},
        },
    }


def connect(proxy: Any, **kw: Any) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password, **kw
    )


def screen_lines(screen: str) -> list[str]:
    return [line.rstrip() for line in screen.splitlines()]


@pytest.fixture
def queued(make_proxy: Any, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Two requests the agent created through the live proxy (defer mode: it gets PW001 at once)."""
    db = tmp_path / "approvals.db"
    # the terminal's commands run as this process's OS user, which is the proxy's: allowed here only,
    # test_approvals_local_guard shows the refusal
    proxy = make_proxy(
        extra=[policy("defer")],
        proxy_spec={"approvals": {"backend": "local", "path": str(db), "allowProxyUserDecisions": True}},
    )
    conn = connect(proxy)
    ids: dict[str, str] = {}
    for name, sql in (("hide", HIDE_TAIL), ("link", LINK_BIDI)):
        with pytest.raises(pg8000.native.DatabaseError) as e:
            conn.run(sql)
        assert e.value.args[0]["C"] == "PW001"
        ids[name] = re.search(r"request (\d{6}-[0-9a-f]{6})", e.value.args[0]["M"]).group(1)  # type: ignore[union-attr]
    conn.close()
    return db, ids


def test_approvals_list_and_show_reveal_what_is_hidden(
    queued: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    db, ids = queued
    (tmp_path / "raw.txt").write_text(HIDE_TAIL + "\n" + LINK_BIDI + "\n")
    with terminal({"PGWARDEN_APPROVALS_DB": str(db)}, tmp_path) as term:
        raw = term.run("cat raw.txt")
        assert "WHERE id = 8" in raw and "OR id > 0" not in raw  # the attack works on a raw terminal
        assert "evil.example" not in raw  # the link target is invisible there

        listed = term.run(pgwarden_command("approvals", "list"))
        row = next(line for line in screen_lines(listed) if ids["hide"] in line)
        assert "DELETE FROM audit_scratch WHERE id = 8 OR id > 0 --\\x1b[13" in row
        link_row = next(line for line in screen_lines(listed) if ids["link"] in line)
        assert "WHERE id = 9 /* \\x1b]8;;https://e…" in link_row  # cut to one line, escape visible
        assert "shown escaped" in listed and "for development" in listed

        shown = term.run(pgwarden_command("approvals", "show", ids["hide"]))
        assert "  │ DELETE FROM audit_scratch WHERE id = 8 OR id > 0 --\\x1b[13D\\x1b[K" in screen_lines(
            shown
        )
        assert f"request     {ids['hide']}" in shown and "requester   agent" in shown
        assert "shown escaped" in shown

        shown = term.run(pgwarden_command("approvals", "show", ids["link"]))
        stmt = next(line for line in screen_lines(shown) if line.startswith("  │ "))
        assert stmt == (
            "  │ DELETE FROM audit_scratch WHERE id = 9 /* \\x1b]8;;https://evil.example/\\x07see ticket"
            "\\x1b]8;;\\x07 \\u202e 0 < di RO \\u202c*/"
        )

        # approve prints what it approves, in full, before approving it
        approved = term.run(pgwarden_command("approvals", "approve", ids["hide"], "--as", "dba-alice"))
        lines = screen_lines(approved)
        assert "approving:" in lines
        assert "  │ DELETE FROM audit_scratch WHERE id = 8 OR id > 0 --\\x1b[13D\\x1b[K" in lines
        assert f"request {ids['hide']} approved by dba-alice" in approved
        assert lines.index("approving:") < lines.index(f"request {ids['hide']} approved by dba-alice")


def test_replay_shows_the_denied_statement_the_agent_tried_to_wipe(
    make_proxy: Any, pg: Any, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    proxy = make_proxy(extra=[policy("wait")], proxy_spec={"recording": {"dir": str(rec)}})
    mark = pg.log_position()
    conn = connect(proxy, application_name="cursor\x1b]0;pwned\x07\x1b[2J")
    conn.run("SELECT count(*) FROM audit_scratch")
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run(WIPE_DENIED)
    assert e.value.args[0]["C"] == "42501"
    conn.close()
    assert "pg_read_file" not in pg.log_since(mark)
    recording = next(rec.glob("*.jsonl"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the recorder finishes the file after the session ends
        events = [json.loads(x) for x in recording.read_bytes().split(b"\n") if x.strip()]
        if events and events[-1].get("k") == "end":
            break
        time.sleep(0.05)
    assert any(ev.get("sql") == WIPE_DENIED for ev in events)
    (tmp_path / "raw.txt").write_text("SELECT count(*) FROM audit_scratch\n" + WIPE_DENIED + "\n")
    with terminal({}, tmp_path) as term:
        raw = term.run("cat raw.txt")
        assert "pg_read_file" not in raw and "count(*)" not in raw  # both lines wiped on a raw terminal

        shown = term.run(pgwarden_command("replay", str(recording)))
        lines = screen_lines(shown)
        denied = next(line for line in lines if "pg_read_file" in line)
        assert denied.endswith("SELECT pg_read_file('/etc/passwd') --\\x0d\\x1b[2K\\x1b[1A\\x1b[2K")
        assert any("count(*)" in line for line in lines)
        after = lines[lines.index(denied) + 1]
        assert "42501" in after  # the refusal stays next to the statement it refused
        assert "app cursor\\x1b]0;pwned\\x07\\x1b[2J" in shown
        assert "shown escaped" in shown

        as_json = term.run(pgwarden_command("replay", str(recording), "--json"))
        assert "pg_read_file" in as_json and "\\u001b[2K" in as_json


def test_a_cluster_request_is_shown_escaped_too(tmp_path: Path) -> None:
    """kubectl prints field values raw; `pgwarden approvals show -f -` reads the object and escapes."""
    import yaml

    obj = {
        "apiVersion": API,
        "kind": "ApprovalRequest",
        "metadata": {
            "name": "orders-prod-7c4c8ede-9a10f1",
            "namespace": "agents",
            "creationTimestamp": "2026-11-24T10:15:00Z",
        },
        "spec": {
            "connectionRef": {"name": "orders-prod"},
            "policy": "orders",
            "rule": "agents/orders rule 2",
            "requester": {
                "subject": "system:serviceaccount:agents:cursor-agent",
                "groups": ["ai-agents"],
                "pod": "agents/cursor-agent-7d9f",
            },
            "statement": HIDE_TAIL,
            "mode": "wait",
            "expiresAt": "2026-11-24T10:30:00Z",
            "decision": "pending",
        },
        "status": {"phase": "Pending"},
    }
    (tmp_path / "req.yaml").write_text(yaml.safe_dump(obj))
    (tmp_path / "raw.txt").write_text(HIDE_TAIL + "\n")
    with terminal({}, tmp_path) as term:
        assert "OR id > 0" not in term.run("cat raw.txt")
        shown = term.run(f"cat req.yaml | {pgwarden_command('approvals', 'show', '-f', '-')}")
        lines = screen_lines(shown)
        assert "  │ DELETE FROM audit_scratch WHERE id = 8 OR id > 0 --\\x1b[13D\\x1b[K" in lines
        assert "request     agents/orders-prod-7c4c8ede-9a10f1" in lines
        assert "reviewers   as AccessPolicy orders names them, 0 approval(s) given" in lines
        assert "shown escaped" in shown
