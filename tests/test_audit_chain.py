"""`pgwarden audit verify`: an intact chain passes; edits, removals and reorderings are named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgwarden.audit.chain import GENESIS, digest, seal, verify_path
from pgwarden.cli import main


def write_chain(path: Path, n: int = 6, start_seq: int = 0, prev: str = GENESIS) -> list[bytes]:
    out = []
    for i in range(n):
        line, prev = seal({"event": "statement", "stmt": i, "sql": f"SELECT {i}", "decision": {"action": "allow"}},
                          start_seq + i, prev)
        out.append(line)
    path.write_bytes(b"".join(out))
    return out


def verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", "verify", str(path)])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_intact_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chain(tmp_path / "a.jsonl")
    code, out = verify(tmp_path / "a.jsonl", capsys)
    assert code == 0 and "ok: 6 records" in out


def test_edit_is_reported_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p)
    lines[2] = lines[2].replace(b"SELECT 2", b"SELECT 9")
    p.write_bytes(b"".join(lines))
    code, out = verify(p, capsys)
    assert code == 1
    assert f"{p}:3: record seq 2 was edited" in out
    assert out.count(str(p) + ":") == 1


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p)
    rec = json.loads(lines[2])
    rec.pop("hash")
    rec["decision"] = {"action": "deny"}
    rec["hash"] = digest(rec)
    lines[2] = json.dumps(rec).encode() + b"\n"
    p.write_bytes(b"".join(lines))
    code, out = verify(p, capsys)
    assert code == 1 and f"{p}:4: does not chain to seq 2 ({p}:3)" in out


def test_removal_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p)
    del lines[2:4]
    p.write_bytes(b"".join(lines))
    code, out = verify(p, capsys)
    assert code == 1 and f"{p}:3: records seq 2..3 (2) are missing before this one: removed" in out


def test_reorder_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p)
    lines[2], lines[3] = lines[3], lines[2]
    p.write_bytes(b"".join(lines))
    code, out = verify(p, capsys)
    assert code == 1 and f"{p}:4: seq 2 comes after seq 3 ({p}:3): records were reordered" in out
    assert "edited" not in out and "missing" not in out


def test_garbage_and_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p)
    p.write_bytes(b"".join([*lines[:3], lines[1], b"not json\n", *lines[3:]]))
    report = verify_path(p)
    msgs = [str(x) for x in report.problems]
    assert any(":4: seq 1 appears twice" in m for m in msgs)
    assert any(":5: not a JSON record" in m for m in msgs)


def test_rotated_files_are_one_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "audit.jsonl"
    old = write_chain(tmp_path / "audit.jsonl.1", 3)
    last_hash = json.loads(old[-1])["hash"]
    write_chain(p, 3, start_seq=3, prev=last_hash)
    code, out = verify(p, capsys)
    assert code == 0 and "ok: 6 records" in out and "seq 0..5" in out
    # the oldest file rotated away: a note, not a failure
    (tmp_path / "audit.jsonl.1").unlink()
    code, out = verify(p, capsys)
    assert code == 0 and "starts at seq 3" in out


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verify(tmp_path / "nope.jsonl", capsys)
    assert code == 2 and "no audit log" in out


def test_seal_writes_the_canonical_form_it_hashes_with_the_hash_last() -> None:
    import json as _json

    from pgwarden.audit.chain import canonical, digest, seal

    records = [
        {"event": "statement", "sql": "SELECT 'é' /* ✓ */", "params": ["\x00", None, 3.5, True], "z": {"b": 1, "a": [1, {"y": 2, "x": 1}]}},
        {"a": 1, "hash": "forged", "hashes": 2, "has": 3, "prev": "x", "time": "2026-11-29T00:00:00Z"},
        {"event": "session.end", "duration_ms": 1.25, "weird key \u202e": "\u0085"},
    ]
    prev = "0" * 64
    for i, rec in enumerate(records):
        line, h = seal(rec, i, prev)
        body = {k: v for k, v in rec.items() if k != "hash"} | {"seq": i, "prev": prev}
        assert h == digest(body)
        assert line == canonical(body)[:-1] + b',"hash":"' + h.encode() + b'"}\n'  # hash appended last
        assert _json.loads(line)["hash"] == h
        prev = h
