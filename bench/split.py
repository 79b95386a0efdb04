"""Would more proxy processes help? Two fully loaded proxies with pgbench's clients split between
them, against one proxy with all of them, and PgBouncer, interleaved round by round.

This models SO_REUSEPORT workers from above (no shared circuit breaker, cancel routing or audit
chain to pay for): if two processes do not raise the TPS on a machine, neither would workers.

    python bench/split.py                          # simple, 6 s, 2 rounds, the installed pgwarden
    python bench/split.py --mode prepared --compiled

`--compiled` builds this checkout's wheel first (run.py --compiled). Prints one line per round.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (this folder's runner: server, proxies, pgbench)


def tps(target: bench.Target, mode: str, clients: int, seconds: int) -> float:
    s = bench.parse_args(["--clients", str(clients), "--jobs", str(min(2, clients))])
    out = bench.run_pgbench(target, mode, s, seconds, None)
    m = bench.TX_RE.search(out)
    if m is None:
        raise bench.BenchError(f"pgbench printed no transaction count against {target.name}")
    return int(m.group(1)) / seconds


def split_tps(targets: tuple[bench.Target, bench.Target], mode: str, clients: int, seconds: int) -> float:
    """Both proxies at once, `clients` split between them: the sum of their TPS."""
    got = [0.0, 0.0]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            got[i] = tps(targets[i], mode, clients // 2, seconds)
        except BaseException as e:  # reported after both ran
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(got)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["simple", "prepared"], default="simple")
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8, help="in all; each of the two proxies gets half")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--compiled", action="store_true", help="run the proxies from this checkout's compiled wheel")
    a = ap.parse_args(argv)
    bench.check_tools()
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if a.compiled:
            env["PYTHONPATH"] = str(stack.enter_context(bench.compiled_build()))
        srv = stack.enter_context(bench.postgres())
        bench.prepare_database(srv, a.scale)
        bouncer = stack.enter_context(bench.pgbouncer(srv))
        docs = list(bench.FULL_DOCUMENTS)
        first = stack.enter_context(bench.pgwarden_proxy(srv, "pgwarden+full", docs, "write", env))
        second = stack.enter_context(bench.pgwarden_proxy(srv, "pgwarden+full-2", docs, "write", env))
        print(f"builds: {first.build}, {second.build}", flush=True)
        for t in (bouncer, first, second):  # warm: connections, caches, files
            tps(t, a.mode, a.clients, 2)
        for r in range(1, a.rounds + 1):
            base = tps(bouncer, a.mode, a.clients, a.duration)
            one = tps(first, a.mode, a.clients, a.duration)
            two = split_tps((first, second), a.mode, a.clients, a.duration)
            print(f"round {r} {a.mode}: pgbouncer {base:.0f} TPS; one proxy {one:.0f} ({one / base:.2f}x); "
                  f"two proxies, {a.clients // 2} clients each, {two:.0f} ({two / base:.2f}x, "
                  f"{(two / one - 1) * 100:+.0f} % over one)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
