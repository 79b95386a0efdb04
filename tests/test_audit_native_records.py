"""A statement's two audit records built in C (pgwarden/audit/_records.h, in the sealing step's
extension) seal to exactly the lines of the dicts records.statement() and records.outcome() build,
or the builder declines and the dict is built.

The auditor reads and verifies the lines; which path built a record must not show in them. The
extension is built with the wheel; on an editable install it is compiled here from source, so
both CI stages check the C code.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from native_helpers import native_extension

from pgwarden.audit import chain, records
from pgwarden.audit.chain import GENESIS, verify_path
from pgwarden.audit.config import AuditConfig
from pgwarden.audit.log import AuditLog
from pgwarden.subjects import Identity, Workload


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    module = native_extension("_seal", tmp_path_factory.mktemp("seal"))
    assert module.available, "no SHA-256 from the interpreter's libcrypto"
    return module


@pytest.fixture
def builders(native: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """records.statement_record / outcome_record and chain.seal_all with the C steps, as the
    compiled build runs them."""
    monkeypatch.setattr(records, "_native_members", native.members)
    monkeypatch.setattr(records, "_native_statement", native.statement_body)
    monkeypatch.setattr(records, "_native_outcome", native.outcome_body)
    monkeypatch.setattr(chain, "_seal", native)
    monkeypatch.setattr(chain, "_native_block", native.seal_block)
    return native


def iso(ns: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """records.now_iso() at `ns`."""
    with monkeypatch.context() as m:
        m.setattr(time, "time_ns", lambda: ns)
        return records.now_iso()


def sealed(record: records.Record, seq: int = 5, prev: str = "ab" * 32) -> tuple[list[bytes], str]:
    return chain.seal_all([record], seq, prev)


def _text(rng: random.Random, longest: int = 60) -> str:
    alphabet = ["a", "Z", " ", '"', "\\", "\n", "\t", "\x00", "\x7f", "é", "€", "😀", "'", "$1"]
    return "".join(rng.choice(alphabet) if rng.random() < 0.3 else chr(rng.randint(0x20, 0x7e))
                   for _ in range(rng.randint(0, longest)))


def _info(rng: random.Random) -> records.SessionInfo:
    identity = rng.choice([None, Identity("cursor", ("ai-agents",), method="oidc"),
                           Identity("ci-bot", (), method="static"), Identity(_text(rng, 10) or "x", ("a", "b"))])
    workload = rng.choice([Workload(), Workload(namespace="agents", service_account="cursor")])
    return records.SessionInfo(_text(rng, 12) or "s-1", identity, workload, rng.choice(["", "agents/shop"]),
                               "shop", rng.choice(["", "psql", "pgbench"]), rng.choice(["", "10.0.0.7:51000"]),
                               "cursor")


def _scrub(text: str) -> str:
    return text.replace("4111", "****")


def _params(rng: random.Random) -> list[Any] | tuple[Any, ...] | None:
    kind = rng.randrange(4)
    if kind == 0:
        return None
    values = [rng.choice([None, _text(rng), "4111 1111", b"\x00\x01", bytearray(b"abc"), memoryview(b"xyz"),
                          "x" * rng.choice([4095, 4096])]) for _ in range(rng.randint(0, 4))]
    return tuple(values) if kind == 1 else values


def _extra(rng: random.Random) -> dict[str, Any] | None:
    return rng.choice([None, {}, {"phase": "bind"},
                       {"policy": {"operations": ["select"], "tables": ["public.t"], "mode": "enforce"}},
                       {"policy": {"operations": [], "tables": [], "mode": "audit"},
                        "refusal": {"sqlstate": "42501", "message": _text(rng)}}])


def test_statement_records_seal_to_the_lines_of_the_dicts(builders: ModuleType,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(20261201)
    built = 0
    for i in range(3000):
        info, ns = _info(rng), rng.randint(1_600_000_000 * 10**9, 2_000_000_000 * 10**9)
        args: dict[str, Any] = dict(
            decision=rng.choice(["allow", "deny", "allow-audit-only", "approved"]),
            rule=rng.choice(["", "default/bench-readonly rule 1", _text(rng, 10)]),
            reason=rng.choice(["", _text(rng)]), params=_params(rng),
            mask_text=rng.choice([None, _scrub]), protocol=rng.choice(["simple", "extended"]),
            approval_id=rng.choice(["", "ar-1"]), approver=rng.choice(["", "dba@example.com"]),
            masked_columns=rng.choice([(), ["public.customers.ssn"], ("a.b.c", "d.e.f")]), extra=_extra(rng))
        stmt, sql = rng.choice([str(i), i]), _text(rng, 200)
        body = builders.statement_body(info.native_members, ns, stmt, args["protocol"], sql, args["decision"], args["rule"],
                                       args["reason"], args["params"], args["mask_text"], args["approval_id"],
                                       args["approver"], args["masked_columns"], args["extra"])
        reference = records.statement(info, stmt, sql, **args)
        reference["time"] = iso(ns, monkeypatch)
        if body is None:  # only a parameter past its clip: the dict path writes the "…[N more chars]"
            assert any(isinstance(p, str) and len(p) > records.MAX_PARAM_CHARS for p in args["params"] or ()), args
            continue
        built += 1
        assert sealed(body) == sealed(reference), (args, body)
        assert chain.body_record(body) == reference
    assert built > 2500


def test_outcome_records_seal_to_the_lines_of_the_dicts(builders: ModuleType,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    built = 0
    for i in range(3000):
        ns = rng.randint(1_600_000_000 * 10**9, 2_000_000_000 * 10**9)
        started = ns / 1e9 - rng.choice([0.0004567, 0.001, rng.random(), rng.random() * 100, 3600.5, 1e-9])
        args: dict[str, Any] = dict(
            tag=rng.choice(["", "SELECT 1", "UPDATE 12", "COPY 3"]), rows=rng.choice([None, 0, 1, 10**12]),
            sqlstate=rng.choice(["", "42501", "PW005"]), message=rng.choice(["", _text(rng), "m" * 2000]),
            masked_values=rng.choice([0, 3]), decision=rng.choice(["", "allow"]), undone=rng.random() < 0.2)
        session, stmt = _text(rng, 10) or "s", rng.choice([str(i), i])
        info = records.SessionInfo(session)
        body = builders.outcome_body(session, ns, stmt, started, args["tag"], args["rows"], args["sqlstate"],
                                     args["message"], args["masked_values"], args["decision"], args["undone"])
        reference = records.outcome(info, stmt, duration_ms=(float(ns) / 1e9 - started) * 1000, **args)
        reference["time"] = iso(ns, monkeypatch)
        if body is None:  # a duration orjson writes in exponent form (under 0.0001 ms, not zero)
            assert 0 < abs(reference["durationMs"]) < 1e-4, reference
            continue
        built += 1
        assert sealed(body) == sealed(reference), (args, body)
    assert built > 2500


@pytest.mark.parametrize("case", ["key twice", "a session member twice", "long parameter", "an id past 64 bits",
                                  "a str subclass", "session members it does not write"])
def test_what_the_builder_does_not_write_the_dict_path_does(builders: ModuleType, case: str) -> None:
    info = records.SessionInfo("s-1", Identity("cursor", ("ai-agents",)))
    kwargs: dict[str, Any] = {"decision": "allow"}
    stmt: Any = "1"
    if case == "key twice":  # extra replaces a member in the dict path: the last value wins
        kwargs["extra"] = {"sql": "the extra one"}
    elif case == "a session member twice":
        kwargs["extra"] = {"session": "another"}
    elif case == "session members it does not write":  # a lone surrogate: the dict path's json fallback
        info = records.SessionInfo("s-1", Identity("agent\ud800", ()))
        assert info.native_members is None
    elif case == "long parameter":
        kwargs["params"] = ["y" * 5000]
    elif case == "an id past 64 bits":  # orjson refuses it; the dict path's json fallback writes it
        stmt = 2**70
    else:
        kwargs["rule"] = type("Shout", (str,), {})("r")
    got = records.statement_record(info, stmt, "SELECT 1", **kwargs)
    assert isinstance(got, dict)
    if case == "key twice":
        assert got["sql"] == "the extra one"
    if case == "a session member twice":
        assert got["session"] == "another"
    if case == "long parameter":
        assert got["params"][0].endswith("…[904 more chars]")
    message = "x" * 2001
    out = records.outcome_record(info, "1", started=time.time() - 1, message=message)
    assert isinstance(out, dict) and out["message"].endswith("…[1 more chars]")


def test_the_builders_read_the_clock_as_the_dict_path_does(builders: ModuleType) -> None:
    info = records.SessionInfo("s-1")
    before = time.time_ns() // 1000
    body = records.statement_record(info, "1", "SELECT 1", decision="allow")
    out = records.outcome_record(info, "1", started=time.time() - 0.25)
    after = time.time_ns() // 1000
    assert isinstance(body, tuple) and isinstance(out, tuple)
    for record in (chain.body_record(body), chain.body_record(out)):
        stamp = record["time"]
        assert stamp.endswith("Z") and len(stamp) == len("2026-11-29T23:41:24.123456Z")
        us = int(time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone) * 10**6 + int(stamp[20:26])
        assert before <= us <= after
    assert 250.0 <= chain.body_record(out)["durationMs"] < 250.0 + (after - before) / 1000 + 1


class _Sink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def publish(self, lines: Any, recs: Any) -> None:
        self.records.extend(recs)

    def close(self) -> None:
        pass


def _session(info: records.SessionInfo, t0: float) -> list[records.Record]:
    made: list[records.Record] = [records.session_start(info, tls=True)]
    for i in range(40):
        made.append(records.statement_record(info, str(i), f"SELECT * FROM t WHERE id = $1 -- {i}", decision="allow",
                                             protocol="extended", params=[str(i), None, b"\x01"], mask_text=_scrub,
                                             extra={"phase": "bind"}))
        made.append(records.outcome_record(info, str(i), started=t0, tag="SELECT 1", rows=1))
    made.append(records.session_end(info, duration_ms=12.5, statements=40))
    return made


@pytest.mark.parametrize("with_sink", [True, False])
def test_an_audit_log_of_native_and_dict_records_verifies_and_its_sinks_read_records(
        builders: ModuleType, tmp_path: Path, with_sink: bool) -> None:
    """What the proxy writes: the session's records as dicts, its statements' as native bodies,
    one chain. `pgwarden audit verify` accepts it; the sinks (OpenTelemetry reads the events) get
    the records as dicts, as they did before. Without a sink a batch is sealed as one block."""
    info = records.SessionInfo("s-1", Identity("cursor", ("ai-agents",)), Workload(namespace="agents"),
                               "agents/shop", "shop", "psql", "10.0.0.7:51000", "cursor")
    sink = _Sink()

    async def run() -> list[records.Record]:
        log = AuditLog(AuditConfig(path=str(tmp_path / "audit.jsonl")), sinks=[sink] if with_sink else [])
        await log.open()
        made = _session(info, time.time())
        for record in made:
            if isinstance(record, tuple) and b'"statement.outcome"' in record[0]:
                log.emit(record)
            else:
                await log.write(record)
        await log.close()
        return made

    made = asyncio.run(run())
    assert sum(isinstance(r, tuple) for r in made) == 80
    report = verify_path(tmp_path / "audit.jsonl")
    assert report.ok, report.problems
    assert report.records == len(made)
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    if not with_sink:
        written = [orjson.loads(line) for line in lines]
        assert [r["seq"] for r in written] == list(range(len(made)))
        assert sum(r["event"] == "statement" for r in written) == 40
        return
    events = [r["event"] for r in sink.records]
    assert events[0] == "session.start" and events[-1] == "session.end"
    assert events.count("statement") == 40 and events.count("statement.outcome") == 40
    for line, rec in zip(lines, sink.records, strict=True):  # what the sinks read is what was sealed
        assert chain.sealed_form(rec, orjson.loads(line)["hash"]) == line
    bind = next(r for r in sink.records if r["event"] == "statement")
    assert bind["params"] == ["0", None, "<binary 1 bytes>"] and bind["phase"] == "bind"
    assert bind["identity"]["subject"] == "cursor" and bind["decision"] == {"action": "allow"}


def test_a_pure_run_builds_the_dicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_native_statement", None)
    monkeypatch.setattr(records, "_native_outcome", None)
    info = records.SessionInfo("s-1")
    assert isinstance(records.statement_record(info, "1", "SELECT 1", decision="allow"), dict)
    out = records.outcome_record(info, "1", started=time.time(), tag="SELECT 1", rows=1)
    assert isinstance(out, dict) and out["rows"] == 1
    lines, head = chain.seal_all([out], 0, GENESIS)
    assert head in lines[0].decode()


def _mixed(rng: random.Random, info: records.SessionInfo) -> list[records.Record]:
    """What an audit log batch holds: statement and outcome bodies, and dict records."""
    made: list[records.Record] = []
    for i in range(rng.randint(1, 6)):
        kind = rng.randrange(4)
        if kind == 0:
            made.append(records.statement_record(info, str(i), _text(rng, 80), decision="allow", params=_params(rng),
                                                 mask_text=_scrub, extra=_extra(rng)))
        elif kind == 1:
            made.append(records.outcome_record(info, i, started=time.time() - rng.random(), tag="SELECT 1", rows=1))
        elif kind == 2:
            made.append(records.session_end(info, duration_ms=rng.random() * 1000, statements=i, reason=_text(rng)))
        else:
            made.append(records.approval(info, i, approval_id="ar-1", event="requested",
                                         preview={"rows": i, "sample": [[_text(rng), None]]}))
    return made


def test_a_block_of_lines_sealed_in_one_call_is_what_seal_all_writes(builders: ModuleType) -> None:
    """The audit log without sinks seals a batch as one block (chain.seal_block): the same bytes
    and the same last hash as sealing it record by record, and the dicts get `seq` and `prev` set
    in them all the same."""
    rng = random.Random(5)
    blocks = 0
    for _ in range(500):
        info = _info(rng)
        made = _mixed(rng, info)
        twin = [dict(r) if isinstance(r, dict) else r for r in made]
        seq, prev = rng.randint(0, 10**9), rng.choice([GENESIS, "0123456789abcdef" * 4])
        block = chain.seal_block(made, seq, prev)
        lines, head = chain.seal_all(twin, seq, prev, owned=True)
        if block is None:  # a value only orjson writes (a lone surrogate in the session's members)
            continue
        blocks += 1
        assert block == (b"".join(lines), head)
        assert [r for r in made if isinstance(r, dict)] == [r for r in twin if isinstance(r, dict)]
    assert blocks > 450


@pytest.mark.parametrize("case", ["prev that is no hash", "a dict with a hash", "a value only orjson writes",
                                  "another type"])
def test_what_the_block_does_not_seal_seal_all_does(builders: ModuleType, case: str) -> None:
    info = records.SessionInfo("s-1")
    made: list[Any] = [records.outcome_record(info, 1, started=time.time(), tag="SELECT 1"),
                       records.session_end(info, duration_ms=1.0, statements=1)]
    prev = GENESIS
    if case == "prev that is no hash":  # a tail read back from a tampered file: orjson escapes it
        prev = '"' * 64
    elif case == "a dict with a hash":
        made[1]["hash"] = "x"
    elif case == "a value only orjson writes":
        made[1]["reason"] = 2**70
    else:
        made.append(["not", "a", "record"])
    assert chain.seal_block(made, 0, prev) is None
