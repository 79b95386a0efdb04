"""Instructions per statement of the fully loaded proxy's Python work, counted by callgrind.

Timings on a shared 2-vCPU machine move by 10-20 % between runs of the same build (bench/run.py
and bench/pipeline.py both show it); the number of instructions a round trip executes does not.
This drives the same in-process session as bench/pipeline.py (the bench AccessPolicy and
MaskingRule, the audit log with `durability: write`, the session recordings) under
`valgrind --tool=callgrind` twice, with `--short` and `--long` round trips, and reports

    (instructions of the long run - instructions of the short run) / (long - short)

so start-up, imports and the server's set-up cancel out. Use it to compare two builds:

    python bench/instructions.py                          # this checkout's pgwarden, both modes
    PYTHONPATH=/tmp/build-a python bench/instructions.py  # a compiled build installed elsewhere
    python bench/instructions.py --mode prepared --short 300 --long 1300

What it leaves out: the event loop, the sockets and the kernel, which bench/run.py measures. And
valgrind's CPU has no SHA extensions, so OpenSSL hashes in software under it: SHA-256 counts about
20,000 instructions per statement here that the real CPU spends a fraction of (the same for
every build). About a minute per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def drive(mode: str, statements: int) -> None:
    """The child: `statements` round trips of the fully loaded session (run under valgrind)."""
    sys.path.insert(0, str(HERE))
    import pipeline
    import run as bench

    async def main(srv: bench.Server) -> None:
        with tempfile.TemporaryDirectory(prefix="pgwarden-instructions-") as tmp:
            relay, clear, close = await pipeline.session(srv, ("audit", "recording"), Path(tmp))
            one = pipeline.round_trip(relay, mode)
            random.seed(1)  # the same parameter values in both runs
            for _ in range(statements):
                one()
                clear()
            await close()

    with bench.postgres() as srv:
        bench.prepare_database(srv, 1)
        asyncio.run(main(srv))


def count(mode: str, statements: int) -> int:
    """Instructions valgrind counted for a child that runs `statements` round trips."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--child", mode, str(statements)],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    m = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or m is None:
        raise SystemExit(f"the run under valgrind failed:\n{done.stderr[-3000:]}")
    return int(m.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["simple", "prepared", "both"], default="both")
    ap.add_argument("--short", type=int, default=300, help="round trips of the short run")
    ap.add_argument("--long", type=int, default=1300, help="round trips of the long run")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        drive(a.child[0], int(a.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    if a.long <= a.short:
        ap.error("--long must be more round trips than --short")
    from pgwarden import compiled
    from pgwarden.proxy import relay

    print(f"pgwarden from {Path(relay.__file__).parent.parent}, hot path: {compiled.build_of(relay)}")
    for mode in (["simple", "prepared"] if a.mode == "both" else [a.mode]):
        per = (count(mode, a.long) - count(mode, a.short)) / (a.long - a.short)
        print(f"{mode:9s} {per:10,.0f} instructions per round trip (fully loaded, in-process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
