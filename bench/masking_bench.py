"""Rows per second through the masking rewriter, pure level (no sockets).

A 100k-row result (id int4, name, email, ssn, status, notes), text format, rewritten DataRow by
DataRow as the proxy does: unmasked vs two masked columns, with and without detectors.

    python bench/masking_bench.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from masking_helpers import masking, shop_catalog  # noqa: E402

from pgwarden.masking import Field, build_data_row  # noqa: E402
from pgwarden.masking.detectors import DetectorSet  # noqa: E402

N = 100_000


def rows(secrets: bool) -> list[bytes]:
    """Rows of the shop's shape; without `secrets` the email/ssn columns hold harmless text."""
    out = []
    for i in range(N):
        email = f"user{i}@example.com" if secrets else f"user {i}"
        ssn = f"{100 + i % 800:03d}-{10 + i % 89:02d}-{1000 + i % 8999:04d}" if secrets else "n/a"
        out.append(build_data_row([
            str(i).encode(), f"Customer {i}".encode(), email.encode(), ssn.encode(), b"shipped",
            b"prefers email" if i % 50 else b"call grace@example.org after 5pm",
        ]))
    return out


FIELDS = [Field("id", 0, 0, 23, 4, -1, 0)] + [Field(n, 0, 0, 25, -1, -1, 0)
                                              for n in ("name", "email", "ssn", "status", "notes")]


def run(label: str, sql: str, detectors: bool, data: list[bytes]) -> float:
    sm = masking()
    if not detectors:
        sm.detectors = DetectorSet([])
    plan = sm.plan(sql, shop_catalog())
    rw = plan.bind(0, FIELDS)
    t0 = time.perf_counter()
    if rw is None:
        for _r in data:  # the proxy relays the bytes: nothing to call
            pass
    else:
        rewrite = rw.rewrite
        for r in data:
            rewrite(r)
    dt = time.perf_counter() - t0
    rate = N / dt
    print(f"{label:58s} {rate:12,.0f} rows/s  ({dt * 1000:7.1f} ms)")
    return rate


def main() -> None:
    clear, secret = rows(False), rows(True)
    unmasked = "SELECT id, name, status AS email, status AS ssn, status, notes FROM orders, customers"
    masked = "SELECT id, name, email, ssn, status, notes FROM customers, orders"
    run("unmasked, no detectors (rewriter is None: bytes relayed)", unmasked, False, clear)
    run("unmasked, detectors (whole-row prefilter; 2% of rows hit)", unmasked, True, clear)
    run("two masked columns (email, ssn), no detectors", masked, False, secret)
    run("two masked columns, detectors (per-value prefilter)", masked, True, secret)


if __name__ == "__main__":
    main()
