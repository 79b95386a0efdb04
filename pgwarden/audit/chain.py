"""The hash chain: each record carries `seq`, the hash of its predecessor (`prev`) and its own `hash`.

`hash` is sha256 over the record's canonical JSON (sorted keys, no whitespace) without `hash`
itself, so `verify` can recompute it from the line alone. A line is exactly those canonical
bytes with `"hash"` appended as the last member (one serialization per record). Links are checked by `seq`, not by
position, which lets the verifier tell the three kinds of tampering apart: an edited record no
longer matches its hash, a removed one leaves a gap in `seq`, a reordered one appears after a
higher `seq`. An edit that also recomputes the record's hash breaks the next record's `prev`.

`seq` and `prev` continue across rotated files (audit.jsonl.2 -> .1 -> audit.jsonl), so the
files together form one chain; deleting a middle file shows up as a gap.

What a chain alone cannot show: the newest records cut off the end, or the whole tail rewritten
and re-hashed by someone who can write the file. The stdout / OpenTelemetry copies (sealed lines
with their hashes) are the outside witnesses for that.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def digest(record_without_hash: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record_without_hash)).hexdigest()


def seal(record: Mapping[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """One JSON line for `record` at position `seq` after `prev`; returns (line, its hash)."""
    body = dict(record)
    body.pop("hash", None)
    body["seq"] = seq
    body["prev"] = prev
    data = canonical(body)
    h = hashlib.sha256(data).hexdigest()
    return data[:-1] + b',"hash":"' + h.encode() + b'"}\n', h


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


def verify_lines(lines: Iterable[tuple[Location, bytes]]) -> Report:
    """Check hashes and links of a sequence of sealed lines (pure: no file access)."""
    report = Report()
    by_seq: dict[int, tuple[str, Location]] = {}
    max_seen: tuple[int, Location] | None = None
    pending_links: list[tuple[int, str, Location]] = []
    for loc, raw in lines:
        text = raw.strip()
        if not text:
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
        if digest(rec) != stored:
            report.problems.append(Problem(loc, f"record seq {seq} was edited: its content does not match its hash"))
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
    if not by_seq:
        return report
    first, last = min(by_seq), max(by_seq)
    report.first_seq, report.last_seq = first, last
    if first != 0:
        report.notes.append(f"the chain starts at seq {first}: older records were rotated away")
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


def verify_path(path: str | Path) -> Report:
    files = chain_files(path)
    if not files:
        raise FileNotFoundError(path)
    return verify_lines(read_lines(files))


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
