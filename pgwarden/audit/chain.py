"""The hash chain: each record carries `seq`, the hash of its predecessor (`prev`) and its own `hash`.

`hash` is sha256 over the record's canonical JSON (sorted keys, no whitespace) without `hash`
itself, so `verify` can recompute it from the line alone. A line is exactly those canonical
bytes with `"hash"` appended as the last member (one serialization per record). Links are checked by `seq`, not by
position, which lets the verifier tell the three kinds of tampering apart: an edited record no
longer matches its hash, a removed one leaves a gap in `seq`, a reordered one appears after a
higher `seq`. An edit that also recomputes the record's hash breaks the next record's `prev`.

`seq` and `prev` continue across rotated files (audit.jsonl.2 -> .1 -> audit.jsonl), so the
files together form one chain; deleting a middle file shows up as a gap.

Each line must be byte-identical to what `seal` writes for the record it parses to: a line
re-encoded (`\\u` escapes, reordered keys, whitespace, a duplicate key whose last value is the
sealed one) is a different line even when its parsed record hashes right, and an auditor who
reads the bytes (grep, a log pipeline) may see something else than what was hashed.

Every file after the first starts with a rotation marker (`event: audit.rotation`), a chained
record like any other that says how many rotated files existed when it was written. A chain whose
oldest present record is neither seq 0 nor such a marker, or whose marker promises more rotated
files than are present, lost its oldest records without a rotation to explain it.

What a chain alone cannot show: the newest records cut off the end, or the whole tail rewritten
and re-hashed by someone who can write the file. The stdout / OpenTelemetry copies (sealed lines
with their hashes) are the outside witnesses for that, and `expect_head` checks the chain against
a head hash kept off the node.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from pgwarden.audit.records import NativeBody
from pgwarden.compiled import native_module

# The sealing step in C (pgwarden/audit/_seal.c), built with the wheel: the same bytes as the
# orjson path below for every record it writes, None for the rest. Not in a pure-Python run.
_seal: Any = native_module("pgwarden.audit._seal")
_native_seal: Any = _seal.seal if _seal is not None and _seal.available else None
_native_block: Any = _seal.seal_block if _seal is not None and _seal.available else None

GENESIS = "0" * 64
ROTATION_EVENT = "audit.rotation"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_head_hash(value: str) -> bool:
    """A full record hash as `verify` prints it (64 lowercase hex digits)."""
    return bool(_HEX64.fullmatch(value))


def rotation_marker(time: str, *, rotated_files: int, keep: int) -> dict[str, Any]:
    """The first record of every file after the first: why the chain continues from another file.

    `rotated_files` is how many rotated files (PATH.1 ...) exist right after the rotation, so the
    verifier can tell a file that rotation deleted from one that someone deleted."""
    return {"time": time, "event": ROTATION_EVENT, "rotatedFiles": rotated_files, "keep": keep}


def sealed_form(record_without_hash: Mapping[str, Any], hash_: str) -> bytes:
    """The exact line `seal` writes for a record (without its newline)."""
    return canonical(record_without_hash)[:-1] + b',"hash":"' + hash_.encode() + b'"}'


# What orjson would encode natively but json.dumps(default=str) writes as str(): kept as before.
_ORJSON_OPTIONS: Final = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def canonical(record: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not \\u-escaped). orjson for speed (a record per statement);
    what it cannot encode (an integer past 64 bits, a lone surrogate) goes through json as before."""
    try:
        return orjson.dumps(record, default=str, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return legacy_canonical(record)


def legacy_canonical(record: Mapping[str, Any]) -> bytes:
    """The canonical form of earlier versions (json.dumps). It differs from `canonical` for values no
    record the proxy writes contains: floats in exponent notation (1e-05 / 0.00001, 1e+16 / 1e16),
    NaN and infinities (json: NaN, orjson: null), Enum members and float subclasses. `verify` accepts
    a line in either form (it recomputes the hash from the line as written)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def digest(record_without_hash: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record_without_hash)).hexdigest()


def seal(record: Mapping[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """One JSON line for `record` at position `seq` after `prev`; returns (line, its hash)."""
    lines, prev = seal_all((record,), seq, prev)
    return lines[0], prev


def body_record(body: NativeBody) -> dict[str, Any]:
    """The record dict a native body stands for (without `seq`, `prev` and `hash`): for the sinks,
    which read records, and for sealing it the orjson way."""
    record: dict[str, Any] = orjson.loads(body[0])
    return record


def seal_block(records: list[dict[str, Any] | NativeBody], seq: int, prev: str) -> tuple[bytes, str] | None:
    """The lines of `records` as one block, and the last hash, sealed in C in one call (the audit
    log's hot path when no sink reads the lines one by one); the bytes of `seal_all(owned=True)`,
    which also sets `seq` and `prev` in the dicts. None: not built, or a record only the orjson
    path writes (then `seal_all`)."""
    if _native_block is None:
        return None
    block: tuple[bytes, str] | None = _native_block(records, seq, prev)
    return block


def seal_all(records: Iterable[Mapping[str, Any] | NativeBody], seq: int, prev: str, *,
             owned: bool = False) -> tuple[list[bytes], str]:
    """The lines of `records` chained from position `seq` after `prev`, and the last hash (the
    audit log's hot path: two records per statement, one loop). `owned`: the records are the
    caller's to change (the audit log's, built for it): `seq` and `prev` are set in them rather
    than in a copy. A native body is sealed by the C step that built it."""
    lines = []
    sha256, dumps, native = hashlib.sha256, orjson.dumps, _native_seal
    for record in records:
        if isinstance(record, tuple):  # a native body (records.statement_record, outcome_record)
            sealed = _seal.seal_body(record, seq, prev)
            if sealed is None:  # libcrypto's SHA-256 failed: the dict it stands for, the way below
                record = body_record(record)
            else:
                lines.append(sealed[0])
                prev = sealed[1]
                seq += 1
                continue
        if owned and isinstance(record, dict) and "hash" not in record:
            body = record
            body["seq"] = seq
            body["prev"] = prev
        else:
            body = {**record, "seq": seq, "prev": prev}
            if "hash" in body:
                del body["hash"]
        if native is not None:
            sealed = native(body)  # (line, hash), or None: a record only the path below writes
            if sealed is not None:
                lines.append(sealed[0])
                prev = sealed[1]
                seq += 1
                continue
        try:  # canonical(), inlined (tests/test_audit_chain.py holds the two to the same bytes)
            data = dumps(body, default=str, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            data = legacy_canonical(body)
        prev = sha256(data).hexdigest()
        lines.append(b"".join((data[:-1], b',"hash":"', prev.encode(), b'"}\n')))  # sealed_form + newline
        seq += 1
    return lines, prev


@dataclass(frozen=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Problem:
    where: Location
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Report:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str = ""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


_ROTATED = re.compile(r"\.(\d+)$")


def chain_files(path: str | Path) -> list[Path]:
    """The files of one chain, oldest first: PATH.N ... PATH.1, PATH.

    Given a rotated file (PATH.3) itself, only that file is checked."""
    p = Path(path)
    if _ROTATED.search(p.name) and not p.with_name(p.name + ".1").exists():
        return [p]
    rotated = []
    for sib in p.parent.glob(p.name + ".*"):
        m = _ROTATED.fullmatch(sib.name[len(p.name):])
        if m:
            rotated.append((int(m.group(1)), sib))
    files = [f for _, f in sorted(rotated, reverse=True)]
    if p.exists():
        files.append(p)
    return files


def read_lines(files: Iterable[Path]) -> Iterator[tuple[Location, bytes]]:
    for f in files:
        with f.open("rb") as fh:
            for i, line in enumerate(fh, 1):
                yield Location(str(f), i), line


def verify_lines(lines: Iterable[tuple[Location, bytes]], *, expect_head: str | None = None,
                 complete: bool = True) -> Report:
    """Check bytes, hashes and links of a sequence of sealed lines (pure: no file access).

    `complete`: the lines are the whole chain as found on disk (all rotated files), so a missing
    head must be explained by a rotation marker. `expect_head`: a record hash kept elsewhere that
    must still be in the chain."""
    report = Report()
    by_seq: dict[int, tuple[str, Location]] = {}
    max_seen: tuple[int, Location] | None = None
    pending_links: list[tuple[int, str, Location]] = []
    files: list[str] = []                                   # files that hold records, oldest first
    oldest: tuple[int, dict[str, Any], Location] | None = None   # the first record of the chain
    newest_marker: dict[str, Any] | None = None
    last_loc: Location | None = None
    for loc, raw in lines:
        last_loc = loc
        text = raw.strip()
        if not text:
            report.problems.append(Problem(loc, "an empty line: the writer never writes one"))
            continue
        try:
            rec = json.loads(text)
        except ValueError:
            cut = "" if raw.endswith(b"\n") else " (cut off: the writer may have crashed mid-write)"
            report.problems.append(Problem(loc, f"not a JSON record{cut}"))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str) or not isinstance(rec.get("seq"), int) \
                or not isinstance(rec.get("prev"), str):
            report.problems.append(Problem(loc, "not an audit record (no seq/prev/hash)"))
            continue
        report.records += 1
        stored = rec.pop("hash")
        seq, prev = rec["seq"], rec["prev"]
        if digest_or_none(rec, stored) != stored:
            report.problems.append(Problem(loc, f"record seq {seq} was edited: its content does not match its hash"))
        elif not _is_sealed_form(raw, rec, stored):
            report.problems.append(Problem(loc, f"record seq {seq} is not byte for byte what the writer wrote "
                                                f"(re-encoded, reordered or duplicate keys, or whitespace): "
                                                f"what a reader of this line sees may not be what was hashed"))
        if not files or files[-1] != loc.file:
            files.append(loc.file)
            if oldest is None:
                oldest = (seq, rec, loc)
        if rec.get("event") == ROTATION_EVENT:
            newest_marker = rec
        if seq in by_seq:
            report.problems.append(Problem(loc, f"seq {seq} appears twice (first at {by_seq[seq][1]}): a record "
                                                f"was duplicated or replaced"))
            continue
        if max_seen is not None and seq < max_seen[0]:
            report.problems.append(Problem(loc, f"seq {seq} comes after seq {max_seen[0]} ({max_seen[1]}): records "
                                                f"were reordered"))
        by_seq[seq] = (stored, loc)
        if max_seen is None or seq > max_seen[0]:
            max_seen = (seq, loc)
        pending_links.append((seq, prev, loc))
        report.last_hash = stored
    if expect_head is not None:
        _check_expected_head(report, expect_head, by_seq, last_loc)
    if not by_seq or oldest is None:
        return report
    first, last = min(by_seq), max(by_seq)
    report.first_seq, report.last_seq = first, last
    _check_head(report, oldest, newest_marker, rotated_present=len(files) - 1, complete=complete)
    for seq, prev, loc in pending_links:
        if seq == 0:
            if prev != GENESIS:
                report.problems.append(Problem(loc, "seq 0 does not start a chain (prev is not the genesis hash)"))
            continue
        before = by_seq.get(seq - 1)
        if before is None:
            if seq - 1 >= first:
                gap_start = seq - 1
                while gap_start - 1 >= first and gap_start - 1 not in by_seq:
                    gap_start -= 1
                if gap_start == seq - 1:
                    what = f"record seq {seq - 1} is missing"
                else:
                    what = f"records seq {gap_start}..{seq - 1} ({seq - gap_start}) are missing"
                report.problems.append(Problem(loc, f"{what} before this one: removed"))
            continue
        if prev != before[0]:
            report.problems.append(Problem(loc, f"does not chain to seq {seq - 1} ({before[1]}): that record was "
                                                f"altered and re-hashed, or replaced"))
    return report


def digest_or_none(record_without_hash: Mapping[str, Any], stored: str | None = None) -> str | None:
    """`digest`, or None for a record no writer could have sealed (a lone surrogate from `\\ud800`).
    With `stored`: the legacy canonical form's digest where that one matches it."""
    try:
        h = digest(record_without_hash)
        if stored is not None and h != stored:
            legacy = hashlib.sha256(legacy_canonical(record_without_hash)).hexdigest()
            if legacy == stored:
                return legacy
        return h
    except UnicodeEncodeError:
        return None


def _is_sealed_form(raw: bytes, rec: Mapping[str, Any], stored: str) -> bool:
    try:
        if raw == sealed_form(rec, stored) + b"\n":
            return True
        return raw == legacy_canonical(rec)[:-1] + b',"hash":"' + stored.encode() + b'"}\n'
    except UnicodeEncodeError:
        return False


def _check_head(report: Report, oldest: tuple[int, dict[str, Any], Location], newest_marker: dict[str, Any] | None,
                *, rotated_present: int, complete: bool) -> None:
    """The oldest record must be seq 0, or a rotation marker with every rotated file it promises."""
    seq, rec, loc = oldest
    if seq == 0:
        return
    if rec.get("event") != ROTATION_EVENT:
        msg = (f"the chain starts at seq {seq} and its first record is no rotation marker: the oldest records "
               f"(seq 0..{seq - 1}) were deleted, not rotated away")
    else:
        promised = newest_marker.get("rotatedFiles") if newest_marker is not None else None
        if not isinstance(promised, int) or rotated_present >= promised:
            report.notes.append(f"the chain starts at seq {seq}: older records were rotated away")
            return
        msg = (f"the chain starts at seq {seq}, but the last rotation left {promised} rotated file(s) and only "
               f"{rotated_present} hold records: older files were deleted, not rotated away")
    if complete:
        report.problems.append(Problem(loc, msg))
    else:
        report.notes.append(f"{loc}: {msg} (only this file was checked)")


def _check_expected_head(report: Report, expect_head: str, by_seq: Mapping[int, tuple[str, Location]],
                         last_loc: Location | None) -> None:
    for seq, (h, loc) in by_seq.items():
        if h == expect_head:
            after = max(by_seq) - seq
            report.notes.append(f"the expected head is seq {seq} ({loc}); {after} record(s) follow it")
            return
    where = last_loc or Location("-", 0)
    report.problems.append(Problem(where, f"the expected head {expect_head} is not in the chain: the records from it "
                                          f"on were cut off or rewritten (or it was rotated away: anchor with a "
                                          f"newer head)"))


def verify_path(path: str | Path, *, expect_head: str | None = None) -> Report:
    files = chain_files(path)
    if not files:
        raise FileNotFoundError(path)
    complete = not (len(files) == 1 and _ROTATED.search(files[0].name) is not None)
    return verify_lines(read_lines(files), expect_head=expect_head, complete=complete)


def last_link(files: Iterable[Path]) -> tuple[int, str] | None:
    """(seq, hash) of the newest sealed record across `files` (newest file last), or None."""
    for f in reversed(list(files)):
        tail = _last_complete_line(f)
        if tail is None:
            continue
        try:
            rec = json.loads(tail)
            return int(rec["seq"]), str(rec["hash"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _last_complete_line(f: Path) -> bytes | None:
    try:
        with f.open("rb") as fh:
            fh.seek(0, 2)
            end = fh.tell()
            chunk = 65536
            pos = end
            buf = b""
            while pos > 0:
                step = min(chunk, pos)
                pos -= step
                fh.seek(pos)
                buf = fh.read(step) + buf
                lines = buf.rstrip(b"\n").split(b"\n")
                if len(lines) > 1 or pos == 0:
                    last = lines[-1].strip()
                    return last or None
    except FileNotFoundError:
        return None
    return None
