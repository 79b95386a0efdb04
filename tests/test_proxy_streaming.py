"""Data streams through the proxy in both directions: a 1,000,000-row result (about 210 MB on the
wire) to a client that stops reading, and a 150 MB COPY from a client to a server that reads
nothing for a while, must not pile up in the proxy's memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fix_proxy import AGENT_PASSWORD, AGENT_USER, proxy_documents
from proxy_helpers import ProxyProcess, superuser, wait_until
from rawpg import RawConn, msg, query

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


def receive_queue(local_port: int, peer_port: int) -> int:
    """Bytes the kernel holds for the socket 127.0.0.1:local_port <- peer_port, not yet read."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == peer_port:
            return int(queues.split(":")[1], 16)
    return 0


def test_copy_from_a_fast_client_to_a_blocked_server_stays_bounded(
    proxy_process: ProxyProcess, pg: EmbeddedPostgres
) -> None:
    chunk = msg(b"d", (b"y" * 1000 + b"\n") * 256)  # 256 kB of CopyData
    chunks = 600  # about 150 MB
    with RawConn.login("127.0.0.1", proxy_process.port, AGENT_USER, AGENT_PASSWORD, "shop", timeout=60) as c:
        c.simple("CREATE TABLE IF NOT EXISTS copy_sink (t text)")
        c.simple("TRUNCATE copy_sink")
        client_port = c.sock.getsockname()[1]
        baseline = proxy_process.status("VmRSS")
        sent = threading.Event()

        def send_all() -> None:
            c.send(query("COPY copy_sink FROM STDIN"))
            for _ in range(chunks):
                c.send(chunk)
            c.send(msg(b"c"))
            sent.set()

        with superuser(pg, "shop") as locker:
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE copy_sink IN ACCESS EXCLUSIVE MODE")
            sender = threading.Thread(target=send_all)
            sender.start()
            # the server waits for the lock and reads nothing: the proxy must stop reading the client
            wait_until(
                lambda: sent.is_set() or receive_queue(proxy_process.port, client_port) > 64 * 1024,
                timeout=30,
                what="the client's bytes to queue up in the kernel",
            )
            assert not sent.is_set(), "the proxy read the whole COPY while the server read nothing"
            held = proxy_process.status("VmRSS")
            locker.execute("COMMIT")
        sender.join(60)
        replies = c.until_ready()
        assert (b"C", b"COPY %d\0" % (chunks * 256)) in replies, replies
        assert c.simple("SELECT count(*) FROM copy_sink") == [[str(chunks * 256).encode()]]
        c.simple("DROP TABLE copy_sink")
    assert held - baseline < MAX_GROWTH_KB
    assert proxy_process.status("VmHWM") - baseline < MAX_GROWTH_KB
