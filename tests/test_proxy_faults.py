"""Bad input and failures on either side: one session ends with a clear error, the proxy and
every other session carry on.

Each test keeps a bystander session open across the fault and checks, afterwards, that it still
works and that a fresh connection is served.
"""

from __future__ import annotations

import struct
import threading
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from fix_pg import APP_PASSWORD, APP_USER
from fix_proxy import ProxyHandle
from proxy_helpers import active_queries, backends_of, running_queries, superuser, wait_until
from rawpg import RawConn, msg, query, startup

from pgwarden.embedded import EmbeddedPostgres, free_port


def tag() -> str:
    return "f" + uuid.uuid4().hex[:10]


def raw(proxy: ProxyHandle) -> RawConn:
    return RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, proxy.dbname)


def assert_serves(proxy: ProxyHandle, *bystanders: RawConn) -> None:
    """The proxy serves a fresh connection, and sessions that were open still work."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (5,)
    for b in bystanders:
        assert b.simple("SELECT 'still here'") == [[b"still here"]]


def expect_protocol_error(c: RawConn) -> dict[str, str]:
    """An ErrorResponse 08P01, then the proxy closes the connection."""
    err = c.read_error()
    assert err["C"] == "08P01", err
    assert c.at_eof()
    return err


@pytest.fixture
def bystander(proxy: ProxyHandle) -> Iterator[RawConn]:
    with raw(proxy) as c:
        yield c


# -- bad bytes from the client -------------------------------------------------------------
@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: db\r\n\r\n",  # a length of 1.2 GB
        b"\x00\x00\x00\x10" + b"\xde\xad\xbe\xef" * 3,  # an unknown protocol version
        b"\x00\x00\x00\x02",  # a length below the minimum
        struct.pack("!II", 20, 196608) + b"user\0agent\0database",  # parameters not terminated
    ],
)
def test_garbage_at_startup(
    proxy: ProxyHandle, pg: EmbeddedPostgres, bystander: RawConn, garbage: bytes
) -> None:
    mark = pg.log_position()
    with RawConn.open(proxy.host, proxy.port) as c:
        c.send(garbage)
        err = expect_protocol_error(c)
        assert "startup" in err["M"]
    assert "app@shop" not in pg.log_since(mark)
    assert_serves(proxy, bystander)


def test_garbage_after_login(proxy: ProxyHandle, pg: EmbeddedPostgres, bystander: RawConn) -> None:
    with raw(proxy) as c:
        mark = pg.log_position()
        c.send(b"\x00\x01\x02\x03 this is not a message stream" * 4)
        expect_protocol_error(c)
    assert "this is not" not in pg.log_since(mark)
    assert_serves(proxy, bystander)


def test_out_of_order_messages_after_login(proxy: ProxyHandle, bystander: RawConn) -> None:
    with raw(proxy) as c:
        c.send(msg(b"p", b"a password message, long after authentication\0"))
        err = expect_protocol_error(c)
        assert "unexpected message type" in err["M"]
    with raw(proxy) as c:  # a second StartupMessage on an established session
        c.send(startup({"user": "postgres", "database": "postgres"}))
        expect_protocol_error(c)
    assert_serves(proxy, bystander)


def test_truncated_messages(proxy: ProxyHandle, pg: EmbeddedPostgres, bystander: RawConn) -> None:
    marker = tag()
    before = backends_of(pg, APP_USER)
    with RawConn.open(proxy.host, proxy.port) as c:  # half a startup packet, then gone
        c.send(startup({"user": proxy.user, "database": proxy.dbname})[:11])
    with raw(proxy) as c:  # half a Query, then gone
        c.send(query(f"SELECT '{marker}'")[:9])
    with raw(proxy) as c:  # a Parse cut inside its body
        c.send(msg(b"P", f"\0SELECT '{marker}'\0\0\0".encode())[:-3])
    # the proxy released the upstream connections of the truncated sessions
    wait_until(
        lambda: backends_of(pg, APP_USER) == before,
        what="the upstream connections of the truncated sessions to close",
    )
    assert_serves(proxy, bystander)


def test_huge_length_prefix(make_proxy: Callable[..., ProxyHandle], pg: EmbeddedPostgres) -> None:
    proxy = make_proxy(proxy_spec={"limits": {"maxMessageBytes": 65536}})
    marker = tag()
    with raw(proxy) as bystander:
        with raw(proxy) as c:
            mark = pg.log_position()
            c.send(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"SELECT 1")
            err = expect_protocol_error(c)
            assert "65536" in err["M"]
        with raw(proxy) as c:  # just over the configured limit, sent in full
            c.send(query(f"SELECT '{marker}' || '{'x' * 70000}'"))
            expect_protocol_error(c)
        assert marker not in pg.log_since(mark)
        with raw(proxy) as c:  # just under it is fine
            assert c.simple(f"SELECT length('{'x' * 60000}')") == [[b"60000"]]
        assert_serves(proxy, bystander)


def test_the_limit_is_for_what_clients_send_not_for_results(make_proxy: Callable[..., ProxyHandle]) -> None:
    proxy = make_proxy(proxy_spec={"limits": {"maxMessageBytes": 65536}})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        (value,) = conn.execute("SELECT repeat('ab', 3 * 1024 * 1024)").fetchone()  # type: ignore[misc]
        assert value == "ab" * 3 * 1024 * 1024


# -- the upstream fails --------------------------------------------------------------------
def test_upstream_killed_mid_query(proxy: ProxyHandle, pg: EmbeddedPostgres, bystander: RawConn) -> None:
    marker = tag()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:

        def kill() -> None:
            ((pid, _, _),) = wait_until(lambda: active_queries(pg, marker), what="pg_sleep to start")
            with superuser(pg) as direct:
                direct.execute("SELECT pg_terminate_backend(%s)", (pid,))

        t = threading.Thread(target=kill)
        t.start()
        try:
            with pytest.raises(psycopg.OperationalError) as e:
                conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
        finally:
            t.join()
        # the server's own FATAL reaches the client
        assert e.value.sqlstate == "57P01", e.value
        assert "terminating connection due to administrator command" in str(e.value)
        assert conn.closed or conn.broken
    assert_serves(proxy, bystander)


@pytest.fixture
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A dedicated server that a test may restart (immediately: commits must be on disk)."""
    server = EmbeddedPostgres(settings={"synchronous_commit": "on"}).start()
    try:
        server.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
        server.psql("CREATE DATABASE shop OWNER app")
        server.psql("CREATE TABLE customers AS SELECT g AS id FROM generate_series(1, 5) g", dbname="shop")
        server.psql("GRANT SELECT ON customers TO app", dbname="shop")
        yield server
    finally:
        server.stop()


def test_upstream_restarting(make_proxy: Callable[..., ProxyHandle], own_pg: EmbeddedPostgres) -> None:
    proxy = make_proxy(connection_spec={"port": own_pg.port})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        own_pg.restart()
        with pytest.raises(psycopg.OperationalError) as e:
            conn.execute("SELECT 2")
        # an immediate shutdown says nothing to its clients: the proxy does
        assert e.value.sqlstate == "08006", e.value
        assert "the connection to the database was lost" in str(e.value)
        assert "reconnect" in str(e.value)
    assert_serves(proxy)


def test_upstream_down(make_proxy: Callable[..., ProxyHandle]) -> None:
    proxy = make_proxy(connection_spec={"port": free_port()})
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(proxy.dsn())
    assert "pgwarden cannot reach the database" in str(e.value)
    # the process is still there and answers the next client the same way
    with RawConn.open(proxy.host, proxy.port) as c:
        c.send(startup({"user": proxy.user, "database": proxy.dbname}))
        with pytest.raises(Exception) as e2:
            c.authenticate(proxy.user, proxy.password)
        assert "08006" in str(e2.value)


# -- the client vanishes -------------------------------------------------------------------
def test_client_killed_mid_query(proxy: ProxyHandle, pg: EmbeddedPostgres, bystander: RawConn) -> None:
    marker = tag()
    c = raw(proxy)
    c.send(query(f"SELECT pg_sleep(30) /* {marker} */"))
    ((pid, _, _),) = wait_until(lambda: active_queries(pg, marker), what="pg_sleep to start")
    c.sock.close()
    # the proxy cancelled the query the client left behind and released its connection
    wait_until(lambda: not active_queries(pg, marker), timeout=10, what="the abandoned query to stop")
    wait_until(
        lambda: not [r for r in running_queries(pg, marker) if r[0] == pid],
        timeout=10,
        what="the backend to go",
    )
    assert_serves(proxy, bystander)


def test_client_gone_while_results_stream(
    proxy: ProxyHandle, pg: EmbeddedPostgres, bystander: RawConn
) -> None:
    marker = tag()
    c = raw(proxy)
    c.send(query(f"SELECT repeat('x', 1000) FROM generate_series(1, 2000000) /* {marker} */"))
    kind, _ = c.recv()
    assert kind == b"T"
    c.sock.close()
    wait_until(lambda: not running_queries(pg, marker), timeout=10, what="the abandoned result to stop")
    assert_serves(proxy, bystander)
