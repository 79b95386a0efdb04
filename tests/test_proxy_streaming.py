"""Results stream through the proxy: a 1,000,000-row result (about 210 MB on the wire) to a
client that stops reading must not pile up in the proxy's memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fix_proxy import AGENT_PASSWORD, AGENT_USER, proxy_documents
from proxy_helpers import ProxyProcess, superuser, wait_until
from rawpg import RawConn, query

from pgwarden.embedded import EmbeddedPostgres, free_port

ROWS = 1_000_000
WIDTH = 200
# every DataRow: type 1 + length 4 + column count 2 + value length 4 + the value
RESULT_BYTES = ROWS * (1 + 4 + 2 + 4 + WIDTH)
# Streaming keeps a few socket buffers' worth in flight; buffering would need the whole result.
# The bound leaves room for the interpreter's allocator, and is still far below RESULT_BYTES.
MAX_GROWTH_KB = 64 * 1024


@pytest.fixture
def proxy_process(pg: EmbeddedPostgres, tmp_path: Path) -> Iterator[ProxyProcess]:
    port, health = free_port(), free_port()
    text = proxy_documents(
        pg, proxy_spec={"listen": {"host": "127.0.0.1", "port": port}, "health": {"port": health}}
    )
    p = ProxyProcess(text, tmp_path, port, health)
    try:
        yield p
    finally:
        p.stop()


def backend_waits_on_client(pg: EmbeddedPostgres, marker: str) -> bool:
    """The server is blocked writing the result: the proxy stopped reading from it."""
    with superuser(pg) as direct:
        row = direct.execute(
            "SELECT wait_event FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        ).fetchone()
    return row is not None and row[0] == "ClientWrite"


def test_a_million_rows_stream_with_bounded_memory(proxy_process: ProxyProcess, pg: EmbeddedPostgres) -> None:
    marker = "stream_1m"
    with RawConn.login("127.0.0.1", proxy_process.port, AGENT_USER, AGENT_PASSWORD, "shop", timeout=60) as c:
        baseline = proxy_process.status("VmRSS")
        c.send(query(f"SELECT repeat('x', {WIDTH}) FROM generate_series(1, {ROWS}) /* {marker} */"))
        # the client reads nothing; back-pressure must reach the server
        wait_until(
            lambda: backend_waits_on_client(pg, marker), timeout=30, what="the server to block on ClientWrite"
        )
        stalled = proxy_process.status("VmRSS")

        rows = 0
        received = 0
        tag = b""
        for kind, payload in c.messages():
            if kind == b"D":
                rows += 1
                received += len(payload) + 5
                if rows == 1:
                    assert payload[6:] == b"x" * WIDTH
            elif kind == b"C":
                tag = payload.rstrip(b"\0")
            elif kind == b"E":
                raise AssertionError(payload)
            elif kind == b"Z":
                break
        assert rows == ROWS
        assert tag == f"SELECT {ROWS}".encode()
        assert received == RESULT_BYTES
        assert c.simple("SELECT 1") == [[b"1"]]

    peak = proxy_process.status("VmHWM")
    growth = peak - baseline
    assert stalled - baseline < MAX_GROWTH_KB, (baseline, stalled)
    assert growth < MAX_GROWTH_KB, (
        f"proxy peak RSS grew by {growth} kB for a {RESULT_BYTES // 1024} kB result"
    )
