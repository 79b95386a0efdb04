"""The proxy process: health endpoints for Kubernetes probes, and SIGTERM drains."""

from __future__ import annotations

import json
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fix_proxy import AGENT_PASSWORD, AGENT_USER, proxy_documents
from proxy_helpers import ProxyProcess, active_queries, wait_until

from pgwarden.embedded import EmbeddedPostgres, free_port


@pytest.fixture
def proxy_process(pg: EmbeddedPostgres, tmp_path: Path) -> Iterator[ProxyProcess]:
    port, health = free_port(), free_port()
    text = proxy_documents(
        pg,
        proxy_spec={
            "listen": {"host": "127.0.0.1", "port": port},
            "health": {"port": health},
            "drainTimeout": "20s",
        },
    )
    p = ProxyProcess(text, tmp_path, port, health)
    try:
        yield p
    finally:
        p.stop()


def dsn(p: ProxyProcess) -> str:
    return f"host=127.0.0.1 port={p.port} dbname=shop user={AGENT_USER} password={AGENT_PASSWORD} sslmode=disable"


def test_health_endpoints(proxy_process: ProxyProcess) -> None:
    assert proxy_process.http("/healthz") == (200, "ok\n")
    status, body = proxy_process.http("/readyz")
    assert status == 200
    ready = json.loads(body)
    assert ready["ready"] is True and ready["draining"] is False
    with psycopg.connect(dsn(proxy_process)) as conn:
        conn.execute("SELECT 1")
        assert json.loads(proxy_process.http("/readyz")[1])["sessions"] == 1
    assert proxy_process.http("/nope")[0] == 404


def test_sigterm_drains(proxy_process: ProxyProcess, pg: EmbeddedPostgres) -> None:
    marker = "drain_" + uuid.uuid4().hex[:8]
    results: list[object] = []
    conn = psycopg.connect(dsn(proxy_process), autocommit=True)

    def in_flight() -> None:
        try:
            results.append(conn.execute(f"SELECT 'finished' FROM pg_sleep(2) /* {marker} */").fetchone())
        except Exception as e:  # reported by the assertion below
            results.append(e)

    t = threading.Thread(target=in_flight)
    t.start()
    try:
        wait_until(lambda: active_queries(pg, marker), what="the query to start")
        proxy_process.proc.send_signal(signal.SIGTERM)
        # draining: not ready, and no new connections
        status, body = wait_until(
            lambda: (r := proxy_process.http("/readyz"))[0] == 503 and r, timeout=5, what="/readyz to say 503"
        )
        assert json.loads(body) == {"ready": False, "sessions": 1, "draining": True, "config": {"generation": 0}}
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn(proxy_process), connect_timeout=5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy_process.port), timeout=5).close()
    finally:
        t.join(30)
    # the statement in flight finished normally
    assert results == [("finished",)]
    assert proxy_process.proc.wait(30) == 0
    conn.close()


@pytest.fixture
def impatient_proxy(pg: EmbeddedPostgres, tmp_path: Path) -> Iterator[ProxyProcess]:
    port, health = free_port(), free_port()
    text = proxy_documents(
        pg,
        proxy_spec={
            "listen": {"host": "127.0.0.1", "port": port},
            "health": {"port": health},
            "drainTimeout": "1s",
        },
    )
    p = ProxyProcess(text, tmp_path, port, health)
    try:
        yield p
    finally:
        p.stop()


def test_sigterm_stops_what_outlives_the_drain_timeout(
    impatient_proxy: ProxyProcess, pg: EmbeddedPostgres
) -> None:
    marker = "outlives_" + uuid.uuid4().hex[:8]
    errors: list[Exception] = []
    conn = psycopg.connect(dsn(impatient_proxy), autocommit=True)
    idle = psycopg.connect(dsn(impatient_proxy), autocommit=True)

    def in_flight() -> None:
        try:
            conn.execute(f"SELECT pg_sleep(60) /* {marker} */")
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=in_flight)
    t.start()
    try:
        wait_until(lambda: active_queries(pg, marker), what="the query to start")
        impatient_proxy.proc.send_signal(signal.SIGTERM)
        assert impatient_proxy.proc.wait(30) == 0
    finally:
        t.join(30)
    (err,) = errors
    assert isinstance(err, psycopg.OperationalError)
    assert "shutting down" in str(err) or err.sqlstate == "57P01", err
    # the statement cut off by the shutdown does not run on in the database
    wait_until(lambda: not active_queries(pg, marker), timeout=10, what="the cut-off query to stop")
    with pytest.raises(psycopg.OperationalError):
        idle.execute("SELECT 1")
    conn.close()
    idle.close()
