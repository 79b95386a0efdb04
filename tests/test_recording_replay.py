"""Session recordings round-trip; replay shows statements, rows, errors; caps leave truncation markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgwarden.audit import SessionRecorder, parse_recording_config
from pgwarden.audit.recording import open_recorder
from pgwarden.audit.replay import find_recording, load_events, render
from pgwarden.cli import main
from pgwarden.errors import UserError

META = {"identity": {"subject": "alice", "groups": ["ai-agents"], "method": "jwt"}, "applicationName": "cursor",
        "workload": {"namespace": "agents", "pod": "cursor-7d9f"}}


def record_session(d: Path, session: str = "sess-42") -> Path:
    rec = SessionRecorder(d, session, META, max_rows=3, max_bytes=10_000)
    rec.statement(1, "SELECT id, email FROM customers ORDER BY id")
    rec.columns(1, ["id", "email"], [23, 25])
    results = [rec.row(1, [str(i), f"c{i}***@example.com"]) for i in range(1, 6)]
    assert results == [True, True, True, False, False]  # capped at 3: the proxy stops handing rows over
    rec.complete(1, "SELECT 5", rows=5)
    rec.statement(2, "SELECT name FROM customers WHERE id = $1", params=["2"])
    rec.columns(2, ["name"], [25])
    rec.row(2, [None])
    rec.complete(2, "SELECT 1", rows=1)
    rec.statement(3, "DELETE FROM orders")
    rec.error(3, {"S": "ERROR", "C": "42501", "M": "denied by AccessPolicy agents/orders: defaultAction deny",
                  "H": "ask a DBA for a review rule"})
    rec.notice(None, {"S": "NOTICE", "M": "relation already exists, skipping"})
    rec.statement(4, "SELECT pg_sleep(100)")
    rec.close("client closed")
    return d / "sess-42.jsonl"


def test_round_trip(tmp_path: Path) -> None:
    path = record_session(tmp_path)
    events = load_events(path)
    kinds = [e["k"] for e in events]
    assert kinds == ["session", "query", "result", "query", "result", "query", "error", "notice", "query", "result",
                     "end"]
    first = events[2]
    assert first["columns"] == ["id", "email"] and first["types"] == [23, 25]
    assert first["rows"] == [["1", "c1***@example.com"], ["2", "c2***@example.com"], ["3", "c3***@example.com"]]
    assert first["truncated"] == {"recordedRows": 3, "reason": "maxRowsPerResult 3"}
    assert first["rowCount"] == 5 and first["tag"] == "SELECT 5" and first["ms"] >= 0
    assert events[3]["params"] == ["2"] and events[4]["rows"] == [[None]]
    assert events[6]["error"]["code"] == "42501" and events[6]["error"]["hint"].startswith("ask")
    assert events[9].get("incomplete") is True
    assert events[0]["meta"]["identity"]["subject"] == "alice"


def test_byte_cap(tmp_path: Path) -> None:
    rec = SessionRecorder(tmp_path, "s", max_rows=100, max_bytes=25)
    rec.statement(1, "SELECT doc FROM docs")
    rec.columns(1, ["doc"])
    assert rec.row(1, ["x" * 20])
    assert not rec.row(1, ["y" * 20])
    rec.complete(1, "SELECT 2", rows=2)
    rec.close()
    ev = load_events(tmp_path / "s.jsonl")[2]
    assert ev["truncated"]["reason"] == "maxBytesPerResult 25" and ev["rows"] == [["x" * 20]]


def test_replay_text_shows_what_the_agent_saw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record_session(tmp_path)
    assert main(["replay", "sess-42", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "session sess-42" in out and "as alice" in out and "pod agents/cursor-7d9f" in out
    assert "[1] SELECT id, email FROM customers ORDER BY id" in out
    assert "c1***@example.com" in out and "c4" not in out
    assert "recording truncated: 3 rows of 5 kept (maxRowsPerResult 3)" in out
    assert 'params: ["2"]' in out and "NULL" in out
    assert "ERROR 42501: denied by AccessPolicy agents/orders" in out and "hint: ask a DBA" in out
    assert "NOTICE: relation already exists" in out
    assert "session ended (client closed): 4 statements" in out


def test_replay_json_and_lookup(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = record_session(tmp_path)
    monkeypatch.setenv("PGWARDEN_RECORDINGS", str(tmp_path))
    assert main(["replay", "sess-4", "--json"]) == 0  # unambiguous prefix, folder from the environment
    doc = json.loads(capsys.readouterr().out)
    assert doc["recording"] == str(path) and doc["events"][1]["sql"].startswith("SELECT id")
    assert main(["replay", str(path)]) == 0  # a file path
    capsys.readouterr()
    assert main(["replay", "nope"]) == 2
    assert "no recording 'nope'" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not exist"):
        find_recording("x", tmp_path / "missing")


def test_damaged_tail_still_replays(tmp_path: Path) -> None:
    path = record_session(tmp_path)
    with path.open("ab") as fh:
        fh.write(b'{"k":"query","s":5,"sq')
    assert "damaged and skipped" in render(load_events(path))


def test_session_ids_cannot_escape_the_folder(tmp_path: Path) -> None:
    rec = SessionRecorder(tmp_path / "rec", "../../etc/passwd")
    rec.close()
    assert [p.name for p in (tmp_path / "rec").iterdir()] == [".._.._etc_passwd.jsonl"]


def test_unwritable_folder_disables_recording_quietly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rec = SessionRecorder(blocker / "rec", "s")
    rec.statement(1, "SELECT 1")
    assert rec.row(1, ["1"])
    rec.complete(1, "SELECT 1")
    rec.close()
    assert rec.failed


def test_disabled_by_config(tmp_path: Path) -> None:
    assert open_recorder(parse_recording_config({"recording": {"enabled": False}}), "s") is None
    rec = open_recorder(parse_recording_config({"recording": {"dir": str(tmp_path), "maxRowsPerResult": 1}}), "s")
    assert rec is not None and rec.max_rows == 1
    rec.close()
