"""A session recording's lines in C (pgwarden/audit/_recording.c) are the bytes of the orjson
path, call for call: a security auditor replays what an agent sent and saw, and the replayer must
read the same file whichever build wrote it.

Each test drives two recorders through the same calls, one with the C steps and one without,
on the same clock, and compares the files byte for byte and every answer the proxy acts on (a
row kept or refused at the cap). On an editable install the extension is compiled here from its
source (tests/native_helpers.py), so both CI stages check the C code.
"""

from __future__ import annotations

import random
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from native_helpers import native_extension

from pgwarden.audit import recording
from pgwarden.audit.recording import SessionRecorder
from pgwarden.audit.replay import load_events, render


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return native_extension("_recording", tmp_path_factory.mktemp("recording"))


class Clock:
    """time.monotonic_ns for both recorders: the same readings, in the same order."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = steps
        self.now = 1_000_000_000_000
        self.i = 0

    def __call__(self) -> int:
        self.now += self.steps[self.i % len(self.steps)]
        self.i += 1
        return self.now


def data_row(values: list[bytes | None]) -> bytes:
    out = [struct.pack("!h", len(values))]
    for v in values:
        out.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return b"".join(out)


def _text(rng: random.Random) -> str:
    alphabet = ["a", "Z", "0", " ", '"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "€", "😀",
                "\u2028", "\b", "'", "ß"]
    return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 17, 60])))


def _raw(rng: random.Random) -> bytes | None:
    kind = rng.randrange(6)
    if kind == 0:
        return None
    if kind == 1:  # not UTF-8: shown with U+FFFD, as Python decodes it
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    if kind == 2:  # overlong forms, surrogates, past U+10FFFF, cut short: all invalid
        return rng.choice([b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"a\xf0\x9f\x98",
                           b"\xe0\x9f\xbf", b"\xf0\x8f\xbf\xbf", b"ok\xff"])
    if kind == 3:
        return str(rng.randint(-10**9, 10**9)).encode()
    return _text(rng).encode()


def drive(rec: SessionRecorder, rng: random.Random) -> list[Any]:
    """One session's worth of calls, as the proxy makes them; returns what the proxy is told."""
    said: list[Any] = []
    in_flight: list[str] = []
    for n in range(60):
        stmt = str(n)
        what = rng.randrange(10)
        params: Any = None if what < 4 else rng.choice([
            [_text(rng), None, str(rng.randint(0, 99))], (_text(rng),), []])
        rec.statement(stmt, _text(rng) or "SELECT 1", params)
        in_flight.append(stmt)
        if rng.random() < 0.8:
            names = tuple(_text(rng) or f"c{i}" for i in range(rng.randint(0, 3)))
            rec.columns(stmt, names, tuple(rng.choice([23, 25, 17, 1043]) for _ in names))
        formats = rng.choice([[], [0], [1], [0, 1], [1, 0, 1], [0, 0, 0, 0]])
        for _ in range(rng.choice([0, 1, 2, 5, 12])):
            if rng.random() < 0.8:
                said.append(rec.row_payload(stmt, data_row([_raw(rng) for _ in range(rng.randint(0, 4))]), formats))
            else:
                said.append(rec.row(stmt, [rng.choice([None, _text(rng)]) for _ in range(rng.randint(0, 3))]))
        end = rng.randrange(10)
        if end < 7:
            rec.complete(stmt, rng.choice(["SELECT 3", "INSERT 0 1", "UPDATE 2", "é\n\"tag\""]),
                         rng.choice([None, 0, 3, 2**40]))
            in_flight.remove(stmt)
        elif end < 9:
            rec.error(stmt, {"C": "42501", "M": _text(rng), "S": "ERROR"})
            in_flight.remove(stmt)
        if rng.random() < 0.1:
            rec.notice(stmt, {"M": _text(rng)})
    rec.close("client closed")  # the statements left in flight are written as incomplete
    return said


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[list[int]], Clock]]:
    def install(steps: list[int]) -> Clock:
        c = Clock(steps)
        monkeypatch.setattr(time, "monotonic_ns", c)
        return c

    yield install


def both(tmp_path: Path, native: ModuleType, monkeypatch: pytest.MonkeyPatch, clock: Callable[[list[int]], Clock],
         steps: list[int], seed: int, **limits: int) -> tuple[tuple[bytes, list[Any]], tuple[bytes, list[Any]]]:
    out = []
    for module in (native, None):
        monkeypatch.setattr(recording, "_native", module)
        clock(steps)
        folder = tmp_path / ("c" if module is not None else "py")
        rec = SessionRecorder(folder, f"s-{seed}", {"user": "agent"}, **limits)
        said = drive(rec, random.Random(seed))
        # the session's start and end are wall-clock times (records.now_iso), not the clock above
        written = re.sub(rb'"(started|ended)":"[^"]*"', b'"\\1":"-"', (folder / f"s-{seed}.jsonl").read_bytes())
        out.append((written, said))
    return out[0], out[1]


@pytest.mark.parametrize("seed", range(12))
def test_a_session_comes_out_byte_for_byte_as_the_orjson_path_writes_it(
        seed: int, tmp_path: Path, native: ModuleType, monkeypatch: pytest.MonkeyPatch,
        clock: Callable[[list[int]], Clock]) -> None:
    steps = [3_000, 1_234_567, 17, 999_999_999, 250_001]  # ns: the first lines land within 100 µs
    (c_file, c_said), (py_file, py_said) = both(tmp_path, native, monkeypatch, clock, steps, seed,
                                                max_rows=rng_cap(seed), max_bytes=[10_000, 40, 400][seed % 3])
    assert c_said == py_said
    assert c_file == py_file
    assert b'"truncated"' in c_file or seed % 3 == 0  # the caps were reached


def rng_cap(seed: int) -> int:
    return [100, 3, 7][seed % 3]


def test_the_replayer_reads_a_native_recording_as_it_reads_the_python_one(
        tmp_path: Path, native: ModuleType, monkeypatch: pytest.MonkeyPatch,
        clock: Callable[[list[int]], Clock]) -> None:
    (c_file, _), (py_file, _) = both(tmp_path, native, monkeypatch, clock, [1_000_000], 99, max_rows=5)
    c_path, py_path = tmp_path / "c.jsonl", tmp_path / "py.jsonl"
    c_path.write_bytes(c_file)
    py_path.write_bytes(py_file)
    assert load_events(c_path) == load_events(py_path)
    assert render(load_events(c_path)) == render(load_events(py_path))


def test_the_c_steps_write_a_statements_lines_themselves(native: ModuleType) -> None:
    """What the session tests compare is written by C, not declined to orjson: a query line and a
    result line with columns, rows and a cap come out of the C steps, as the orjson path writes them."""
    r = native.Result(1_000, 3, 10_000)
    r.columns, r.types = ("id", "note"), (23, 25)
    kept = [r.add_payload(data_row(row), []) for row in ([b"1", b"caf\xc3\xa9"], [b"2", None], [b"3", b"x"], [b"4", b"y"])]
    assert kept == [True, True, True, False]
    line = r.complete_line("7", 2_500_000, 1_234, "SELECT 4", 4)
    assert line is not None and line == recording._line(
        {"k": "result", "s": "7", "t": 2.5, "ms": 1.234, "columns": ("id", "note"), "types": (23, 25),
         "rows": [["1", "café"], ["2", None], ["3", "x"]],
         "truncated": {"recordedRows": 3, "reason": "maxRowsPerResult 3"}, "tag": "SELECT 4", "rowCount": 4})
    query = native.query_line("7", 2_400_001, "SELECT $1", ["x", None])
    assert query is not None and query == recording._line(
        {"k": "query", "s": "7", "t": 2.400001, "sql": "SELECT $1", "params": ["x", None]})


def test_a_datarow_is_shown_as_the_agent_saw_it(native: ModuleType) -> None:
    """Text as UTF-8 (bad bytes replaced), binary columns as \\x and hex, NULL as null; the
    size counted in characters, as the Python path counts `len(str)`."""
    r = native.Result(0, 100, 12)
    assert r.add_payload(data_row([b"caf\xc3\xa9", None, b"\x00\xff"]), [0, 0, 1])
    assert r.rows_json() == '[["café",null,"\\\\x00ff"]]'.encode()
    assert r.bytes == 4 + 6
    assert not r.add_payload(data_row([b"abc"]), [])  # 10 + 3 > 12: capped, and stays capped
    assert r.capped == "maxBytesPerResult 12" and r.kept == 1
    assert not r.add_payload(data_row([]), [])


def test_a_datarow_cut_short_is_refused_not_read_past(native: ModuleType) -> None:
    r = native.Result(0, 100, 10_000)
    for cut in (b"", b"\x00", b"\x00\x01", b"\x00\x01\x00\x00\x00\x05ab", b"\x00\x02\x00\x00\x00\x01a"):
        with pytest.raises(ValueError, match="cut short"):
            r.add_payload(cut, [])
    assert r.kept == 0 and r.rows_json() == b"[]"


def test_what_it_does_not_write_it_leaves_to_the_orjson_path(native: ModuleType) -> None:
    assert native.query_line(1.5, 10, "SELECT 1", None) is None  # a statement id neither str nor int
    assert native.query_line("1", 50, "SELECT 1", None) is None  # 5e-05 s: orjson's exponent form
    assert native.query_line("1", 10**6, "\ud800", None) is None  # a lone surrogate
    assert native.query_line("1", 10**6, "SELECT $1", [b"bytes"]) is None
    assert native.query_line("1", 0, "SELECT 1", ("x",)) == b'{"k":"query","s":"1","t":0.0,"sql":"SELECT 1","params":["x"]}\n'
    r = native.Result(0, 10, 100)
    with pytest.raises(ValueError):
        r.add(["\ud800"])
    with pytest.raises(ValueError):
        r.add([b"not a str"])
    assert r.kept == 0 and r.rows_json() == b"[]"
