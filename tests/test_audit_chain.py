"""`pgwarden audit verify`: an intact chain passes; edits, removals and reorderings are named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgwarden.audit.chain import GENESIS, digest, rotation_marker, seal, verify_path
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
    marker, h = seal(rotation_marker("2026-11-29T00:00:00Z", rotated_files=1, keep=1), 3, last_hash)
    p.write_bytes(marker + b"".join(write_chain(tmp_path / "tmp", 3, start_seq=4, prev=h)))
    code, out = verify(p, capsys)
    assert code == 0 and "ok: 7 records" in out and "seq 0..6" in out
    # keep: 1 and a second rotation: audit.jsonl.1 deleted by the writer, a marker says so
    (tmp_path / "audit.jsonl.1").rename(tmp_path / "gone")
    p.rename(tmp_path / "audit.jsonl.1")
    marker2, h2 = seal(rotation_marker("2026-11-29T00:00:01Z", rotated_files=1, keep=1), 7,
                       json.loads((tmp_path / "audit.jsonl.1").read_bytes().splitlines()[-1])["hash"])
    p.write_bytes(marker2 + b"".join(write_chain(tmp_path / "tmp", 2, start_seq=8, prev=h2)))
    code, out = verify(p, capsys)
    assert code == 0 and "starts at seq 3" in out and "rotated away" in out


def test_deleting_the_oldest_records_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "audit.jsonl"
    lines = write_chain(p, 6)
    p.write_bytes(b"".join(lines[2:]))  # no rotation ever happened: the head was cut
    code, out = verify(p, capsys)
    assert code == 1
    assert f"{p}:1: the chain starts at seq 2 and its first record is no rotation marker" in out
    assert "seq 0..1" in out and "deleted" in out


def test_deleting_the_oldest_rotated_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "audit.jsonl"
    old = write_chain(tmp_path / "audit.jsonl.1", 3)
    marker, h = seal(rotation_marker("2026-11-29T00:00:00Z", rotated_files=1, keep=5), 3,
                     json.loads(old[-1])["hash"])
    p.write_bytes(marker + b"".join(write_chain(tmp_path / "tmp", 2, start_seq=4, prev=h)))
    assert verify(p, capsys)[0] == 0
    (tmp_path / "audit.jsonl.1").unlink()  # keep is 5: rotation never deleted it
    code, out = verify(p, capsys)
    assert code == 1 and "left 1 rotated file(s) and only 0 hold records" in out
    # an empty stand-in file does not explain it either
    (tmp_path / "audit.jsonl.1").write_bytes(b"")
    code, out = verify(p, capsys)
    assert code == 1 and "only 0 hold records" in out


@pytest.mark.parametrize("rewrite", [
    "unicode-escape", "duplicate-key", "reordered", "whitespace", "crlf", "trailing-blank-line",
])
def test_a_line_that_is_not_its_canonical_bytes_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      rewrite: str) -> None:
    p = tmp_path / "a.jsonl"
    lines = []
    prev = GENESIS
    for i, sql in enumerate(["SELECT 1", "DELETE FROM orders WHERE id = 8 OR id > 0", "SELECT 3"]):
        line, prev = seal({"event": "statement", "sql": sql}, i, prev)
        lines.append(line)
    rec = json.loads(lines[1])
    if rewrite == "unicode-escape":
        # what a grep for "OR id" no longer finds; the parsed record is unchanged
        lines[1] = lines[1].replace(b"OR id > 0", b"\\u004fR id \\u003e 0")
    elif rewrite == "duplicate-key":
        # a reader that keeps the first value sees a harmless statement; json.loads keeps the last
        lines[1] = lines[1].replace(b'{"event"', b'{"sql":"DELETE FROM orders WHERE id = 8","event"', 1)
    elif rewrite == "reordered":
        moved = {"hash": rec["hash"], **{k: v for k, v in rec.items() if k != "hash"}}
        lines[1] = json.dumps(moved, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    elif rewrite == "whitespace":
        lines[1] = lines[1].replace(b'":"', b'": "')
    elif rewrite == "crlf":
        lines[1] = lines[1][:-1] + b"\r\n"
    else:
        lines.append(b"\n")
    assert json.loads(lines[1]) == rec  # the parsed record (and so its hash) is what was sealed
    p.write_bytes(b"".join(lines))
    code, out = verify(p, capsys)
    assert code == 1, out
    if rewrite == "trailing-blank-line":
        assert f"{p}:4: an empty line" in out
    else:
        assert f"{p}:2: record seq 1 is not byte for byte what the writer wrote" in out


def test_a_lone_surrogate_escape_is_refused_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p, 2)
    lines[1] = lines[1].replace(b"SELECT 1", b"SELECT \\ud800")
    p.write_bytes(b"".join(lines))
    code, out = verify(p, capsys)
    assert code == 1 and f"{p}:2: record seq 1 was edited" in out


def test_expect_head_anchors_the_tail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p, 6)
    code, out = verify(p, capsys)
    head = json.loads(lines[-1])["hash"]
    assert code == 0 and f"head {head}" in out  # the full hash, to keep off the node
    assert main(["audit", "verify", "--expect-head", head, str(p)]) == 0
    capsys.readouterr()
    # the chain grows: the kept head is still in it
    write_chain(p, 8)
    assert main(["audit", "verify", "--expect-head", head, str(p)]) == 0
    assert "is seq 5" in capsys.readouterr().out
    # the tail cut back to before the kept head: the chain alone looks intact, the anchor does not
    p.write_bytes(b"".join(lines[:4]))
    assert verify(p, capsys)[0] == 0
    code = main(["audit", "verify", "--expect-head", head, str(p)])
    out = capsys.readouterr().err
    assert code == 1 and f"the expected head {head} is not in the chain" in out
    # the tail rewritten and re-hashed from seq 3 on: same length, different hashes
    prev = json.loads(lines[2])["hash"]
    forged = lines[:3]
    for i in range(3, 6):
        line, prev = seal({"event": "statement", "stmt": i, "sql": "SELECT 0", "decision": {"action": "allow"}}, i, prev)
        forged.append(line)
    p.write_bytes(b"".join(forged))
    assert verify(p, capsys)[0] == 0
    assert main(["audit", "verify", "--expect-head", head, str(p)]) == 1
    capsys.readouterr()


def test_expect_head_wants_a_full_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.jsonl"
    lines = write_chain(p, 2)
    code = main(["audit", "verify", "--expect-head", json.loads(lines[-1])["hash"][:16], str(p)])
    assert code == 2 and "64 hex digits" in capsys.readouterr().err


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
    # the audit log seals a batch in one loop: the same lines, the same last hash
    from pgwarden.audit.chain import seal_all

    lines, last = seal_all(records, 0, "0" * 64)
    assert last == prev
    assert lines == [seal(rec, i, "0" * 64 if i == 0 else seal_all(records[:i], 0, "0" * 64)[1])[0]
                     for i, rec in enumerate(records)]


def test_the_writer_encodes_every_character_as_earlier_versions_did() -> None:
    """The fast encoder must write the bytes json.dumps wrote: an auditor's grep and the hash see one text."""
    from pgwarden.audit.chain import canonical, legacy_canonical

    text = "".join(chr(c) for c in range(0, 0xD800)) + "".join(chr(c) for c in range(0xE000, 0x10000, 7)) + "\U0001F600"
    rec = {"sql": text, "z": [1, None, True, 2.5, -0.0, 2**63 - 1], "a": {"b\n": "\u2028\x7f"}, "durationMs": 0.001}
    assert canonical(rec) == legacy_canonical(rec)
    big = {"n": 2**64}  # past what the fast encoder takes: the earlier one writes it
    assert canonical(big) == legacy_canonical(big) == b'{"n":18446744073709551616}'


def test_a_chain_written_by_the_earlier_encoder_still_verifies(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Records sealed with json.dumps' spelling of floats (1e-05) by an earlier version stay valid."""
    import hashlib

    from pgwarden.audit.chain import legacy_canonical

    prev, out = GENESIS, []
    for i in range(3):
        body = {"event": "statement.outcome", "stmt": i, "durationMs": 1e-05 * (i + 1), "seq": i, "prev": prev}
        data = legacy_canonical(body)
        h = hashlib.sha256(data).hexdigest()
        out.append(data[:-1] + b',"hash":"' + h.encode() + b'"}\n')
        prev = h
    assert b"e-05" in out[0]
    p = tmp_path / "old.jsonl"
    p.write_bytes(b"".join(out))
    code, text = verify(p, capsys)
    assert code == 0 and "ok: 3 records" in text, text
    p.write_bytes(b"".join(out).replace(b"1e-05", b"2e-05", 1))
    code, text = verify(p, capsys)
    assert code == 1 and "was edited" in text, text
