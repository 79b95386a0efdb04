"""AuditLog: durable before it returns, fail-closed, one fsync for many writers, chained in call order."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pgwarden.audit import AuditConfig, AuditLog, SessionInfo, StdoutSink, records
from pgwarden.audit.chain import verify_path
from pgwarden.errors import AuditUnavailable
from pgwarden.subjects import Identity, Workload


class GatedFsync:
    """Counts fsyncs; the first one waits for a gate, so writers pile up behind it."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        self.gate.wait(5)
        os.fsync(fd)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


async def test_write_is_durable_and_chained(tmp_path: Path) -> None:
    log = AuditLog(AuditConfig(path=str(tmp_path / "audit.jsonl")))
    assert await log.open()
    info = SessionInfo("s1", Identity("alice", ("ai-agents",), issuer="https://idp"), Workload("agents", "pod-1"),
                       connection="agents/orders-prod", application_name="psql", client="10.0.0.7", user="alice")
    await log.write(records.session_start(info))
    await log.write(records.statement(info, 1, "SELECT 1", decision="allow", rule="rules[0]"))
    # durable on return: the line is in the file before anything else happens
    got = lines(tmp_path / "audit.jsonl")
    assert [r["event"] for r in got] == ["session.start", "statement"]
    assert got[1]["identity"]["subject"] == "alice" and got[1]["workload"] == {"namespace": "agents", "pod": "pod-1"}
    assert got[1]["prev"] == got[0]["hash"] and [r["seq"] for r in got] == [0, 1]
    log.emit(records.outcome(info, 1, duration_ms=1.5, tag="SELECT 1", rows=1))
    await log.close()
    assert verify_path(tmp_path / "audit.jsonl").ok


async def test_many_concurrent_writers_share_fsyncs(tmp_path: Path) -> None:
    fsync = GatedFsync()
    log = AuditLog(AuditConfig(path=str(tmp_path / "audit.jsonl"), durability="fsync"), fsync=fsync)
    await log.open()
    info = SessionInfo("s1")
    first = asyncio.create_task(log.write(records.statement(info, "first", "SELECT 0", decision="allow")))
    await asyncio.to_thread(fsync.entered.wait, 5)  # batch 1 is inside fsync
    n = 200
    tasks = [asyncio.create_task(log.write(records.statement(info, i, f"SELECT {i}", decision="allow")))
             for i in range(n)]
    await asyncio.sleep(0)  # all 200 handed in while the first fsync is still running
    fsync.gate.set()
    await asyncio.gather(first, *tasks)
    # 201 durable records, 2 fsyncs: the 200 concurrent writers shared one
    assert fsync.calls == 2
    assert log.stats.records == n + 1 and log.stats.largest_batch == n
    got = lines(tmp_path / "audit.jsonl")
    assert [r["stmt"] for r in got] == ["first", *range(n)]  # chained in call order
    await log.close()
    assert verify_path(tmp_path / "audit.jsonl").ok


async def test_unwritable_path_fails_closed(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = AuditLog(AuditConfig(path=str(blocker / "audit.jsonl")))
    assert not await log.open()
    with pytest.raises(AuditUnavailable) as e:
        await log.write(records.statement(SessionInfo("s"), 1, "DELETE FROM orders", decision="allow"))
    assert e.value.sqlstate == "PW004"
    assert "cannot be written" in e.value.message and "not forwarded" in e.value.message
    log.emit({"event": "statement.outcome"})
    await log.flush()
    assert log.stats.lost_emits == 1
    await log.close()


async def test_failed_fsync_rejects_the_batch_and_keeps_the_chain(tmp_path: Path) -> None:
    fail = {"on": False}

    def fsync(fd: int) -> None:
        if fail["on"]:
            raise OSError(28, "No space left on device")
        os.fsync(fd)

    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=str(path), durability="fsync"), fsync=fsync)
    await log.open()
    info = SessionInfo("s")
    await log.write(records.statement(info, 1, "SELECT 1", decision="allow"))
    fail["on"] = True
    with pytest.raises(AuditUnavailable, match="No space left"):
        await log.write(records.statement(info, 2, "DELETE FROM orders", decision="allow"))
    fail["on"] = False
    await log.write(records.statement(info, 3, "SELECT 3", decision="allow"))
    await log.close()
    got = lines(path)
    assert [r["stmt"] for r in got] == [1, 3]  # the rejected record is not in the log
    assert verify_path(path).ok


async def test_chain_continues_across_restart_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=str(path)))
    await log.open()
    await log.write(records.statement(SessionInfo("s"), 1, "SELECT 1", decision="allow"))
    await log.close()
    with path.open("ab") as fh:
        fh.write(b'{"event":"statement","se')  # crash in the middle of a write
    log = AuditLog(AuditConfig(path=str(path)))
    await log.open()
    await log.write(records.statement(SessionInfo("s2"), 1, "SELECT 2", decision="allow"))
    await log.close()
    got = lines(path)
    assert [r["seq"] for r in got] == [0, 1]
    assert verify_path(path).ok


def first_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_bytes().splitlines()[0]) for f in [*path.parent.glob(path.name + ".*"), path]]


async def test_rotation_keeps_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=str(path), rotate_bytes=2000, keep=50))
    await log.open()
    for i in range(40):
        await log.write(records.statement(SessionInfo("s"), i, f"SELECT {i}", decision="allow"))
    await log.close()
    assert log.file.rotations >= 3
    report = verify_path(path)
    assert report.ok and report.first_seq == 0
    assert report.records == 40 + log.file.rotations  # each later file starts with a rotation marker
    for first in first_records(path):
        assert first["event"] == "audit.rotation" or first["seq"] == 0
    # deleting a middle file is a removal
    (tmp_path / "audit.jsonl.2").unlink()
    report = verify_path(path)
    assert not report.ok and "missing" in str(report.problems[0])


async def test_stdout_sink_gets_sealed_lines(tmp_path: Path) -> None:
    class Stream(io.BytesIO):
        pass

    out = Stream()
    sink = StdoutSink(out)
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.jsonl")), sinks=[sink])
    await log.open()
    await log.write(records.statement(SessionInfo("s"), 1, "SELECT 1", decision="allow"))
    await log.close()
    assert out.getvalue() == (tmp_path / "a.jsonl").read_bytes()
    assert sink.dropped == 0


async def test_stuck_disk_times_out_with_pw004(tmp_path: Path) -> None:
    fsync = GatedFsync()
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.jsonl"), write_timeout=0.05, durability="fsync"), fsync=fsync)
    await log.open()
    with pytest.raises(AuditUnavailable, match="no fsync within 0.05s"):
        await log.write(records.statement(SessionInfo("s"), 1, "SELECT 1", decision="allow"))
    fsync.gate.set()
    await log.close()


# -- durability: write (the default) --------------------------------------------------------------
class CountingFsync:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self, fd: int) -> None:
        if self.fail:
            raise OSError(5, "Input/output error")
        self.calls += 1
        os.fsync(fd)


async def test_write_mode_acknowledges_once_in_the_kernel_and_fsyncs_in_groups(tmp_path: Path) -> None:
    fsync = CountingFsync()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=str(path), sync_interval=0.05), fsync=fsync)
    await log.open()
    info = SessionInfo("s")
    await asyncio.gather(*(log.write(records.statement(info, i, f"SELECT {i}", decision="allow")) for i in range(50)))
    # acknowledged: every record is readable from the file (the kernel has it) ...
    assert [r["stmt"] for r in lines(path)] == list(range(50))
    assert fsync.calls == 0  # ... before any fsync
    for _ in range(100):
        if fsync.calls:
            break
        await asyncio.sleep(0.02)
    assert fsync.calls == 1  # one fsync for all of them, within the interval
    await log.close()
    assert verify_path(path).ok


async def test_write_mode_outcomes_share_the_next_statements_write_or_land_on_their_own(tmp_path: Path) -> None:
    """An outcome rides along with the next statement's record (one write(2), in chain order);
    with no statement after it, it reaches the file by itself within EMIT_DELAY."""
    from pgwarden.audit.log import EMIT_DELAY

    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=str(path)))
    await log.open()
    info = SessionInfo("s")
    log.write_now(records.statement(info, 1, "SELECT 1", decision="allow"))
    log.emit(records.outcome(info, 1, duration_ms=0.2, tag="SELECT 1", rows=1))
    batches = log.stats.batches
    log.write_now(records.statement(info, 2, "SELECT 2", decision="allow"))
    assert log.stats.batches == batches + 1  # the outcome and the next decision: one write
    assert [(r["event"], r["stmt"]) for r in lines(path)] == [
        ("statement", 1), ("statement.outcome", 1), ("statement", 2)]
    log.emit(records.outcome(info, 2, duration_ms=0.2, tag="SELECT 1", rows=1))
    assert len(lines(path)) == 3  # not yet: it waits for a statement that may follow
    await asyncio.sleep(EMIT_DELAY * 4)
    assert [(r["event"], r["stmt"]) for r in lines(path)][-1] == ("statement.outcome", 2)
    await log.close()
    assert verify_path(path).ok


async def test_write_mode_fails_closed_after_a_failed_background_fsync(tmp_path: Path) -> None:
    fsync = CountingFsync()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=str(path), sync_interval=0.02), fsync=fsync)
    await log.open()
    info = SessionInfo("s")
    fsync.fail = True
    await log.write(records.statement(info, 1, "SELECT 1", decision="allow"))
    for _ in range(100):
        if log._sync_error:
            break
        await asyncio.sleep(0.02)
    with pytest.raises(AuditUnavailable, match="fsync failed: Input/output error"):
        await log.write(records.statement(info, 2, "DELETE FROM orders", decision="allow"))
    fsync.fail = False  # a later fsync succeeds: it proves nothing about what the failed one lost
    await asyncio.sleep(0.1)
    with pytest.raises(AuditUnavailable, match="fsync failed"):
        await log.write(records.statement(info, 3, "SELECT 3", decision="allow"))
    await log.close()
    # the proxy restarts: it chains from what the file really holds
    log = AuditLog(AuditConfig(path=str(path), sync_interval=0.02), fsync=fsync)
    await log.open()
    await log.write(records.statement(info, 4, "SELECT 4", decision="allow"))
    await log.close()
    assert [r["stmt"] for r in lines(path)] == [1, 4]
    assert verify_path(path).ok


KILLED_WRITER = """
import asyncio, os, signal, sys
from pgwarden.audit import records
from pgwarden.audit.config import AuditConfig
from pgwarden.audit.log import AuditLog

async def main():
    log = AuditLog(AuditConfig(path=sys.argv[1], sync_interval=10))
    await log.open()
    info = records.SessionInfo("killed")
    for i in range(200):
        await log.write(records.statement(info, i, f"SELECT {i}", decision="allow"))
    print("acknowledged", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no fsync: the proxy is killed

asyncio.run(main())
"""


def test_write_mode_records_survive_the_proxy_being_killed(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "audit.jsonl"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9 and "acknowledged" in done.stdout, done.stderr
    assert [r["stmt"] for r in lines(path)] == list(range(200))
    assert verify_path(path).ok


async def test_write_mode_a_disk_stuck_in_fsync_fails_the_statement_instead_of_the_proxy(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(AuditConfig(path=str(path), rotate_bytes=600, write_timeout=0.2, sync_interval=10))
    await log.open()
    info = SessionInfo("s")
    await log.write(records.statement(info, 1, "SELECT 1", decision="allow"))
    log._io_lock.acquire()  # the writer thread is inside an fsync that does not come back
    try:
        started = time.monotonic()
        with pytest.raises(AuditUnavailable, match="did not finish an fsync"):
            await log.write(records.statement(info, 2, "SELECT 2 /* past rotateBytes: rotates */", decision="allow"))
        assert time.monotonic() - started < 2  # the event loop was held for writeTimeout, not forever
    finally:
        log._io_lock.release()
    await log.write(records.statement(info, 3, "SELECT 3", decision="allow"))
    await log.close()
    assert verify_path(path).ok
