"""Session recordings round-trip; replay shows statements, rows, errors; caps leave truncation markers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest

from pgwarden.audit import SessionRecorder, parse_recording_config
from pgwarden.audit.recording import RecordingStore, open_recorder, open_store
from pgwarden.audit.replay import find_recording, load_events, render
from pgwarden.cli import main
from pgwarden.errors import UserError
from pgwarden.resources import ResourceError

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
    assert not rec.row(1, ["1"])  # nothing to record into: the proxy stops handing rows over
    rec.complete(1, "SELECT 1")
    rec.close()
    assert rec.failed


def test_disabled_by_config(tmp_path: Path) -> None:
    assert open_recorder(parse_recording_config({"recording": {"enabled": False}}), "s") is None
    rec = open_recorder(parse_recording_config({"recording": {"dir": str(tmp_path), "maxRowsPerResult": 1}}), "s")
    assert rec is not None and rec.max_rows == 1
    rec.close()


# -- private, bounded recordings ------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_recordings_are_private(tmp_path: Path) -> None:
    d = tmp_path / "rec"
    old_umask = os.umask(0o022)
    try:
        path = record_session(d)
    finally:
        os.umask(old_umask)
    assert mode(d) == 0o700 and mode(path) == 0o600
    # a folder and a file an older version left readable to everyone are made private
    d.chmod(0o755)
    path.chmod(0o644)
    open_store(parse_recording_config({"recording": {"dir": str(d)}}))
    assert mode(d) == 0o700 and mode(path) == 0o600


def test_a_session_over_its_cap_stops_recording_with_a_marker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = SessionRecorder(tmp_path, "big", META, max_session_bytes=8192)
    for i in range(50):
        rec.statement(i, f"DROP TABLE orders /* {'x' * 1000} */")
        rec.error(i, {"S": "ERROR", "C": "42501", "M": "denied"})
    assert rec.stopped == "maxBytesPerSession 8192"
    assert not rec.row(51, ["1"])
    rec.close("client closed")
    path = tmp_path / "big.jsonl"
    assert path.stat().st_size <= 8192
    events = load_events(path)
    assert events[-1]["k"] == "stopped" and events[-1]["reason"] == "maxBytesPerSession 8192"
    assert main(["replay", str(path)]) == 0
    assert "recording stopped (maxBytesPerSession 8192)" in capsys.readouterr().out


def test_the_folder_stays_under_its_total_oldest_recordings_first(tmp_path: Path) -> None:
    d = tmp_path / "rec"
    d.mkdir()
    for i in range(4):  # recordings of earlier runs, oldest first
        (d / f"old-{i}.jsonl").write_bytes(b"x" * 20_000)
        os.utime(d / f"old-{i}.jsonl", (1_000_000 + i, 1_000_000 + i))
    store = RecordingStore(d, max_total_bytes=100_000)
    store.prepare()
    assert store.total == 80_000
    rec = SessionRecorder(d, "new", META, max_session_bytes=60_000, store=store)
    for i in range(40):
        rec.statement(i, "SELECT 1 /* " + "y" * 1000 + " */")
    rec.close()
    left = sorted(f.name for f in d.iterdir())
    assert "old-0.jsonl" not in left and "old-1.jsonl" not in left  # the oldest went first
    assert "old-3.jsonl" in left and "new.jsonl" in left
    assert sum(f.stat().st_size for f in d.iterdir()) <= 100_000
    assert store.removed >= 2


def test_open_sessions_are_not_removed_the_one_needing_room_stops(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path, max_total_bytes=30_000)
    store.prepare()
    a = SessionRecorder(tmp_path, "a", META, store=store)
    b = SessionRecorder(tmp_path, "b", META, store=store)
    for i in range(40):
        a.statement(i, "SELECT 1 /* " + "a" * 1000 + " */")
    assert a.stopped == "maxTotalBytes 30000"
    b.statement(1, "SELECT 2")  # the other session keeps what it has, and its file
    b.close()
    a.close()
    assert (tmp_path / "a.jsonl").exists() and (tmp_path / "b.jsonl").exists()
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 30_000


@pytest.mark.parametrize(("raw", "needle"), [
    ({"maxBytesPerSession": "1Ki"}, "at least 4Ki"),
    ({"maxBytesPerSession": "64Mi", "maxTotalBytes": "16Mi"}, "at least maxBytesPerSession"),
    ({"maxTotal": "1Gi"}, "unknown field"),
])
def test_recording_caps_config(raw: dict[str, Any], needle: str) -> None:
    cfg = parse_recording_config({"recording": {}})
    assert (cfg.max_bytes_per_session, cfg.max_total_bytes) == (16 * 1024**2, 512 * 1024**2)
    with pytest.raises(ResourceError, match=needle):
        parse_recording_config({"recording": raw})


POLICY = {
    "apiVersion": "pgwarden.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}],
        "defaultAction": "deny",
    },
}


def test_a_volume_filling_session_leaves_others_working_and_the_audit_writable(make_proxy: Any, pg: Any,
                                                                               tmp_path: Path) -> None:
    """One agent sends many large denied statements, session after session. Its recordings stop
    at their caps and the oldest go; the folder stays under its total; another user's statements
    run and are recorded; every statement of both is in an intact audit log."""
    rec_dir, audit = tmp_path / "rec", tmp_path / "audit.jsonl"
    proxy = make_proxy(extra=[POLICY], proxy_spec={
        "audit": {"path": str(audit)},
        "recording": {"dir": str(rec_dir), "maxBytesPerSession": "64Ki", "maxTotalBytes": "256Ki"},
    })
    mark = pg.log_position()
    filler = "z" * 16_000
    sent = 0
    for _ in range(12):
        flood = pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop",
                                         password=proxy.password)
        for _ in range(10):
            with pytest.raises(pg8000.native.DatabaseError) as e:
                flood.run(f"DROP TABLE orders /* flood {filler} */")
            assert e.value.args[0]["C"] == "42501"  # never PW004: the audit log stays writable
            sent += 1
        flood.close()
        other = pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop",
                                         password=proxy.password)
        assert other.run("SELECT count(*) FROM orders /* other-user */") == [[20]]
        other.close()
    assert "flood" not in pg.log_since(mark)
    deadline = time.monotonic() + 10  # the proxy closes each recording when it sees the session end
    while time.monotonic() < deadline and any(b'"k":"end"' not in f.read_bytes() and b'"k":"stopped"'
                                               not in f.read_bytes() for f in rec_dir.glob("*.jsonl")):
        time.sleep(0.05)
    files = list(rec_dir.glob("*.jsonl"))
    assert sum(f.stat().st_size for f in files) <= 256 * 1024
    assert all(f.stat().st_size <= 64 * 1024 for f in files)
    assert mode(rec_dir) == 0o700 and all(mode(f) == 0o600 for f in files)
    texts = [f.read_text() for f in files]
    assert any('"reason":"maxBytesPerSession 65536"' in t for t in texts)  # a flood session, stopped
    assert texts and "other-user" in "".join(texts)  # the newest sessions are there, the other user's too
    proxy.stop()
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    stmts = [r for r in recs if r.get("event") == "statement"]
    assert sum(1 for r in stmts if "flood" in r["sql"]) == sent
    assert sum(1 for r in stmts if "other-user" in r["sql"]) == 12
    ok = subprocess.run([sys.executable, "-m", "pgwarden.cli", "audit", "verify", str(audit)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_line_times_are_whole_microseconds_in_order(tmp_path: Path) -> None:
    """Every line's `t` (seconds into the session) and a result's `ms` are whole microseconds, as
    a replay prints them, and `t` never runs backwards."""
    events = load_events(record_session(tmp_path))
    times = [e["t"] for e in events if "t" in e]
    assert times == sorted(times) and len(times) == len(events) - 1  # all but the header
    for e in events:
        for key, scale in (("t", 1e6), ("ms", 1e3)):
            if key in e:
                assert isinstance(e[key], float) and abs(e[key] * scale - round(e[key] * scale)) < 1e-6, e


def test_a_recording_keeps_what_it_was_given_when_the_caller_changes_its_lists(tmp_path: Path) -> None:
    """Tuples are kept as they are (they cannot change); lists of names, types and values are
    copied, so a caller reusing its list for the next statement cannot rewrite a recorded one."""
    rec = SessionRecorder(tmp_path, "s")
    names, types, params = ["id", "email"], [23, 25], ["7"]
    rec.statement(1, "SELECT id, email FROM customers WHERE id = $1", params)
    rec.columns(1, names, types)
    params[0], names[1], types[1] = "8", "password", 0
    rec.row(1, ("7", "c7***@example.com"))
    rec.complete(1, "SELECT 1", rows=1)
    rec.statement(2, "SELECT id FROM customers WHERE id = $1", ("9",))
    rec.columns(2, ("id",), (23,))
    rec.row(2, ["9"])
    rec.complete(2, "SELECT 1", rows=1)
    rec.close()
    events = load_events(tmp_path / "s.jsonl")
    assert events[1]["params"] == ["7"]
    assert events[2]["columns"] == ["id", "email"] and events[2]["types"] == [23, 25]
    assert events[2]["rows"] == [["7", "c7***@example.com"]]
    assert events[3]["params"] == ["9"] and events[4]["columns"] == ["id"] and events[4]["rows"] == [["9"]]


def test_a_recording_holds_each_line_once_however_its_blocks_are_written(tmp_path: Path) -> None:
    """Lines gather and go to the file a block at a time (at the block size, once a second, at
    the end): every line is in the file exactly once and in order, also across blocks."""
    from pgwarden.audit import recording

    rec = recording.SessionRecorder(tmp_path, "s-blocks")
    for i in range(3000):  # several blocks of BLOCK_BYTES
        rec.statement(i, f"SELECT {i} /* {'x' * 40} */")
        rec.complete(i, "SELECT 1", 1)
    rec.close("client")
    events = [json.loads(line) for line in (tmp_path / "s-blocks.jsonl").read_text().splitlines()]
    assert [ev["k"] for ev in events] == ["session"] + ["query", "result"] * 3000 + ["end"]
    assert [ev["s"] for ev in events if ev["k"] == "query"] == list(range(3000))


def test_a_recording_whose_last_write_fails_closes_its_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at the end of a session: the recorder gives up quietly, and its file is closed
    exactly once (closing the fd number a second time could close a file another session or the
    audit log opened since)."""
    from pgwarden.audit import recording

    rec = recording.SessionRecorder(tmp_path, "s-full")
    rec.statement(1, "SELECT 1")
    fd = rec._fh.fd if rec._fh is not None else -1
    closed: list[int] = []
    real_close = os.close

    def full(fd_: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    def counting_close(fd_: int) -> None:
        closed.append(fd_)
        real_close(fd_)

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "close", counting_close)
    rec.close("client")
    assert rec.failed
    assert closed.count(fd) == 1, closed
