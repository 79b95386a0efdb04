"""The audit chain's sealing step in C (pgwarden/audit/_seal.c) writes exactly the bytes of the
orjson path, or declines and leaves the record to it.

An auditor's tools read the lines (grep, log pipelines) and `pgwarden audit verify` recomputes
each hash from the line as written: a record must come out the same whichever path sealed it.
The extension is built with the wheel; on an editable install these tests compile it from the
source with the machine's C compiler, so both CI stages check the C code.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import sys
from types import ModuleType
from typing import Any

import pytest
from native_helpers import native_extension

from pgwarden.audit import chain, records
from pgwarden.audit.chain import GENESIS, Location, verify_lines
from pgwarden.subjects import Identity, Workload


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    module = native_extension("_seal", tmp_path_factory.mktemp("seal"))
    assert module.available, "no SHA-256 from the interpreter's libcrypto"
    return module


def python_line(record: dict[str, Any]) -> tuple[bytes, str] | None:
    """What the orjson path writes for `record` (seq and prev already in it)."""
    saved = chain._native_seal
    chain._native_seal = None
    try:
        body = dict(record)
        seq, prev = body.pop("seq"), body.pop("prev")
        lines, last = chain.seal_all([body], seq, prev)
        return lines[0], last
    finally:
        chain._native_seal = saved


def _text(rng: random.Random) -> str:
    alphabet = ["a", "Z", "0", " ", '"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "€", "😀",
                "\u2028", "\b", "\f", "\r", "\x0b", "'", "<", "ß"]
    n = rng.choice([0, 1, 3, 7, 8, 9, 15, 16, 17, 40, 200])
    return "".join(rng.choice(alphabet) if rng.random() < 0.4 else chr(rng.randint(0x20, 0x7e)) for _ in range(n))


def _float(rng: random.Random) -> float:
    kind = rng.randrange(5)
    if kind == 0:  # what records hold: thousandths (durations in ms)
        return round(rng.random() * 10 ** rng.randint(-3, 12) * 1000) / 1000 * rng.choice([1, -1])
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        return 10.0 ** rng.randint(-8, 20) * rng.random()
    if kind == 3:
        return float(rng.randint(-10**17, 10**17))
    return rng.choice([0.0, -0.0, 1.0, 0.1, 1e-4, 9.999e-5, 1e16, 9.999999999999998e15, 5e-324, 0.001])


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return _text(rng)
    if kind == 1:
        return rng.choice([0, 1, -1, 42, 2**31, -2**31, 2**53 + 1, 2**63 - 1, -2**63, 2**63, 2**64 - 1,
                           rng.randint(-10**12, 10**12)])
    if kind == 2:
        return _float(rng)
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return _text(rng)
    if kind == 5:
        return rng.randint(0, 10**6)
    if kind == 6:
        return {_text(rng) or "k": _value(rng, depth + 1) for _ in range(rng.randint(0, 5))}
    if kind == 7:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return tuple(_value(rng, depth + 1) for _ in range(rng.randint(0, 3)))


def test_random_records_come_out_byte_for_byte_as_the_orjson_path_writes_them(native: ModuleType) -> None:
    rng = random.Random(20261130)
    sealed_natively = 0
    for i in range(20000):
        record = {_text(rng) or "event": _value(rng) for _ in range(rng.randint(1, 12))}
        record["seq"], record["prev"] = i, GENESIS
        got = native.seal(record)
        if got is None:
            continue
        sealed_natively += 1
        assert got == python_line(record), record
    assert sealed_natively > 10000  # it declines records holding a float out of its range or a big int


def test_the_records_the_proxy_writes_are_sealed_natively_and_identically(native: ModuleType) -> None:
    info = records.SessionInfo("s-1", Identity("cursor", ("ai-agents",), method="oidc"),
                               Workload(namespace="agents", service_account="cursor"), "agents/shop", "shop",
                               "psql", "10.0.0.7:51000", "cursor")
    made = [
        records.session_start(info, tls=True),
        records.statement(info, 1, "SELECT * FROM orders WHERE note = 'naïve \"quoted\"\n\\'", decision="allow",
                          rule="read-orders", protocol="extended", params=["1", None, b"\x00\x01", "ssn 1"],
                          masked_columns=["public.customers.ssn"], extra={"phase": "bind"}),
        records.outcome(info, 1, duration_ms=0.1234567, tag="SELECT 3", rows=3, masked_values=2),
        records.outcome(info, 2, duration_ms=123456.7891, sqlstate="42501", message="permission denied\tfor x"),
        records.approval(info, 3, approval_id="ar-1", event="requested", preview={"rows": 2, "sample": [["a", None]]}),
        records.auth_failure(info, reason="bad password", method="password", failures=3, delay_s=0.25),
        records.session_end(info, duration_ms=5000.5, statements=7, reason="client"),
    ]
    for seq, record in enumerate(made):
        record["seq"], record["prev"] = seq, GENESIS
        got = native.seal(record)
        assert got is not None, record
        assert got == python_line(record)


class _Shout(str):
    pass


@dataclasses.dataclass
class _Thing:
    x: int = 1


@pytest.mark.parametrize("value", [
    "\ud800",                       # a lone surrogate (orjson refuses it; the json path writes it)
    2**64, -2**63 - 1,              # past 64 bits
    1e-5, 1e16, -1e17, float("nan"), float("inf"),  # floats written in exponent form or not at all
    _Shout("x"),                    # a str subclass
    _Thing(), datetime.datetime(2026, 11, 30),  # orjson passes these to default=str
    {1: "a"},                       # a key that is not a str
])
def test_what_it_does_not_write_it_leaves_to_the_orjson_path(native: ModuleType, value: Any) -> None:
    assert native.seal({"event": "x", "value": value, "seq": 0, "prev": GENESIS}) is None


def test_deep_nesting_is_left_to_the_orjson_path(native: ModuleType) -> None:
    deep: Any = "leaf"
    for _ in range(300):
        deep = [deep]
    assert native.seal({"deep": deep}) is None
    shallow: Any = "leaf"
    for _ in range(30):
        shallow = {"k": [shallow]}
    record = {"deep": shallow, "seq": 0, "prev": GENESIS}
    assert native.seal(record) == python_line(record)


def test_a_statement_of_megabytes_with_escapes_throughout_comes_out_the_same(native: ModuleType) -> None:
    """The largest texts an agent may send (the proxy's maxStatementBytes) and every escape in
    them: the buffer grows as the escapes come, and the bytes are orjson's."""
    rng = random.Random(3)
    sql = "".join(rng.choice(["a", "\n", '"', "\\", "\x01", "é", "😀", " ", "x" * 50]) for _ in range(120_000))
    record = {"event": "statement", "sql": sql, "seq": 1, "prev": GENESIS}
    assert native.seal(record) == python_line(record)
    record = {"event": "statement", "sql": "\x00" * 300_000, "seq": 2, "prev": GENESIS}
    assert native.seal(record) == python_line(record)


def test_a_chain_sealed_natively_is_the_chain_the_orjson_path_writes_and_it_verifies(
        native: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    batch = [{"event": "statement", "sql": _text(rng), "n": rng.randint(0, 9), "ms": _float(rng)} for _ in range(200)]
    monkeypatch.setattr(chain, "_native_seal", None)
    expected, head = chain.seal_all([dict(r) for r in batch], 0, GENESIS)
    monkeypatch.setattr(chain, "_native_seal", native.seal)
    got, got_head = chain.seal_all([dict(r) for r in batch], 0, GENESIS, owned=True)
    assert got == expected and got_head == head
    report = verify_lines((Location("audit.jsonl", i + 1), line) for i, line in enumerate(got))
    assert report.ok and report.last_hash == head


def test_the_compiled_build_seals_natively_and_a_pure_run_does_not() -> None:
    """The proxy image's build (CI's compiled stage) has the extension and uses it; with
    PGWARDEN_PURE_PYTHON=1 the whole audit path is Python, as the `-pure` benchmark targets say."""
    import subprocess

    probe = "from pgwarden.audit import chain; print(chain._native_seal is not None)"
    env = {k: v for k, v in os.environ.items() if k != "PGWARDEN_PURE_PYTHON"}
    pure = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**env, "PGWARDEN_PURE_PYTHON": "1"}, cwd="/")
    assert pure.returncode == 0 and pure.stdout.strip() == "False", pure.stderr
    if os.environ.get("PGWARDEN_EXPECT_BUILD") == "compiled":
        plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                               env=env, cwd="/")
        assert plain.returncode == 0 and plain.stdout.strip() == "True", plain.stderr
