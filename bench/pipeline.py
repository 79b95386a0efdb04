"""The proxy's per-statement Python work, measured in-process: no sockets, no other processes.

`run.py --full` measures what a user sees, but on a shared 2-vCPU machine its CPU figures move by
±10 % from run to run (the host, and cross-CPU wake-ups that cost more when the peer CPU idles).
This drives one session's Relay and SessionGate exactly as the server does (client bytes in,
server bytes in, bytes out to both sides), built from the same configuration as `run.py`'s
`pgwarden+full` target: the bench AccessPolicy and MaskingRule (its catalog read from a real
PostgreSQL), the audit log (durability: write, real file writes) and session recordings. One
round trip is a pgbench -S transaction: a Query, or Bind/Execute/Sync of a prepared statement,
and its RowDescription/DataRow/CommandComplete/ReadyForQuery answer.

The same round trip is timed with parts of the configuration taken away, so the table says what
each part costs per statement (CPU time of this process, best of --repeat):

    python bench/pipeline.py                # both modes, every part
    python bench/pipeline.py --mode prepared --statements 20000
    python bench/pipeline.py --profile      # cProfile of the full configuration, by own time
    python bench/pipeline.py --cold 1       # 1 MB of memory written between round trips

`--cold MB` writes that much memory between round trips, as pgbench and PostgreSQL do between
the proxy's turns on a shared CPU, so each round trip starts with caches holding little of its
code and data; the cost of the writing, measured alone, is taken off. It shows what a change
saves end to end, where warm caches make every part cheaper than it is there.

What it leaves out, by design: the event loop, the sockets and the kernel (two sends and two
reads per transaction, the largest part of `run.py`'s per-transaction figure).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (this folder's runner: server, database, configuration)

from pgwarden.audit import records  # noqa: E402
from pgwarden.proxy import hooks  # noqa: E402
from pgwarden.proxy.config import parse_proxy_config  # noqa: E402
from pgwarden.proxy.relay import Relay  # noqa: E402
from pgwarden.proxy.sessioninfo import SessionInfo  # noqa: E402
from pgwarden.resources import parse_documents  # noqa: E402
from pgwarden.subjects import Identity  # noqa: E402

PARTS = {
    "full": ("audit", "recording"),
    "no recording": ("audit",),
    "no audit": ("recording",),
    "gate only": (),
}
STATEMENT = "SELECT abalance FROM pgbench_accounts WHERE aid = "


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


ROW_DESCRIPTION = msg(b"T", b"\x00\x01abalance\x00" + struct.pack("!IhIhih", 16400, 3, 23, 4, -1, 0))
DATA_ROW = msg(b"D", b"\x00\x01\x00\x00\x00\x04-123")
DONE = msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")


async def session(srv: bench.Server, parts: tuple[str, ...],
                  workdir: Path) -> tuple[Relay, Callable[[], None], Callable[[], Awaitable[None]]]:
    """A Relay and SessionGate as the proxy builds them for one pgbench session; a function that
    drops what the relay sent, and one that closes the runtime (audit log, recordings)."""
    spec = bench.full_spec(workdir, "write")
    if "audit" not in parts:
        spec.pop("audit")
    if "recording" not in parts:
        spec.pop("recording")
    else:  # the whole run in one session: keep it under the per-session and folder caps
        spec["recording"] = {**spec["recording"], "maxBytesPerSession": "8Gi", "maxTotalBytes": "16Gi"}
    docs = parse_documents(bench.proxy_documents(srv, bench.free_port(), list(bench.FULL_DOCUMENTS), spec))
    config = parse_proxy_config(docs)
    rt = hooks.prepare_runtime(config, docs)
    await hooks.open_runtime(rt, config)
    make = hooks.session_hooks(rt, config)
    assert make is not None
    identity = Identity(bench.AGENT_USER, ("ai-agents",))
    audit_info = records.SessionInfo(
        session_id="bench-1", workload=rt.workload, connection="default/bench", database=bench.BENCH_DB,
        application_name="pgbench", client="127.0.0.1:40000", user=bench.AGENT_USER,
    ).with_identity(identity)
    info = SessionInfo(id="bench-1", identity=identity, peer="127.0.0.1:40000", application_name="pgbench",
                       started=time.time(), params={"user": bench.AGENT_USER}, audit=audit_info, server_version=15)
    gate, observer = make(info, lambda data: None)
    sent: list[bytes] = []
    relay = Relay(sent.append, sent.append, gate=gate, observer=observer,
                  max_message_bytes=config.max_message_bytes, max_statement_bytes=config.max_statement_bytes)

    def clear() -> None:
        sent.clear()

    async def close() -> None:
        await hooks.close_runtime(rt)

    return relay, clear, close


def round_trip(relay: Relay, mode: str) -> Callable[[], None]:
    """One pgbench -S transaction through `relay` (a prepared statement is parsed first)."""
    if mode == "prepared":
        parse = msg(b"P", b"P0_1\x00" + (STATEMENT + "$1;").encode() + b"\x00\x00\x00")
        assert relay.client_data(parse + msg(b"D", b"SP0_1\x00") + msg(b"S")) is None
        relay.server_data(msg(b"1") + msg(b"t", b"\x00\x01\x00\x00\x00\x17") + ROW_DESCRIPTION + msg(b"Z", b"I"))

        def prepared() -> None:
            value = str(random.randint(1, 100_000)).encode()
            bind = msg(b"B", b"\x00P0_1\x00\x00\x00\x00\x01" + struct.pack("!I", len(value)) + value + b"\x00\x00")
            if relay.client_data(bind + msg(b"E", b"\x00\x00\x00\x00\x00") + msg(b"S")) is not None:
                raise RuntimeError("the gate held a statement the bench policy allows")
            relay.server_data(msg(b"2") + DATA_ROW + DONE)

        return prepared

    def simple() -> None:
        query = msg(b"Q", f"{STATEMENT}{random.randint(1, 100_000)};".encode() + b"\x00")
        if relay.client_data(query) is not None:
            raise RuntimeError("the gate held a statement the bench policy allows")
        relay.server_data(ROW_DESCRIPTION + DATA_ROW + DONE)

    return simple


class Evictor:
    """Writes `mb` MB of memory, a byte per 64-byte cache line: another process's turn on the CPU."""

    def __init__(self, mb: float) -> None:
        size = int(mb * 1024 * 1024)
        self.memory = bytearray(size)
        self.line = b"\x01" * len(range(0, size, 64))

    def __call__(self) -> None:
        self.memory[::64] = self.line

    def cost(self, times: int) -> float:
        """CPU seconds of `times` calls, best of three."""
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            for _ in range(times):
                self()
            best = min(best, time.process_time() - t0)
        return best


async def measure(srv: bench.Server, mode: str, parts: tuple[str, ...], statements: int, repeat: int,
                  profile: bool, cold_mb: float = 0.0) -> float:
    """CPU µs per round trip (best of `repeat` runs of `statements`); with `cold_mb`, each round
    trip after that much memory was written, the writing's own cost taken off."""
    with tempfile.TemporaryDirectory(prefix="pgwarden-pipeline-") as tmp:
        relay, clear, close = await session(srv, parts, Path(tmp))
        one = round_trip(relay, mode)
        for _ in range(2000):  # warm: caches filled, files open
            one()
        await asyncio.sleep(0)
        best = float("inf")
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(statements):
                one()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        evict = Evictor(cold_mb) if cold_mb else None
        for _ in range(repeat):
            t0 = time.process_time()
            if evict is None:
                for _ in range(statements):
                    one()
            else:
                for _ in range(statements):
                    evict()
                    one()
            best = min(best, time.process_time() - t0)
            clear()
            await asyncio.sleep(0.01)  # the emitted records' timer, the audit syncer
        await close()
    if evict is not None:
        best = max(0.0, best - evict.cost(statements))
    return best / statements * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["simple", "prepared", "both"], default="both")
    ap.add_argument("--statements", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the full configuration")
    ap.add_argument("--cold", type=float, default=0.0, metavar="MB",
                    help="write MB of memory between round trips (cold caches, as under load); its cost is taken off")
    args = ap.parse_args(argv)
    modes = ["simple", "prepared"] if args.mode == "both" else [args.mode]
    with bench.postgres() as srv:
        bench.prepare_database(srv, 1)
        cold = f", caches cold: {args.cold:g} MB written between" if args.cold else ""
        print(f"{'configuration':<14}" + "".join(f"{m:>12}" for m in modes) + f"   (CPU µs per round trip{cold})")
        for name, parts in PARTS.items():
            if args.profile and name != "full":
                continue
            row = [asyncio.run(measure(srv, mode, parts, args.statements, args.repeat, args.profile, args.cold))
                   for mode in modes]
            print(f"{name:<14}" + "".join(f"{v:>12.1f}" for v in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
