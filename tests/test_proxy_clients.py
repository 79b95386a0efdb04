"""Real clients through the proxy, unchanged: psql, pgbench, pg8000, psycopg 3, asyncpg.

Each test does what a user of that client does and checks what the user would notice: the
rows, the errors, the notifications, the cancellations.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pg8000.native
import psycopg
import pytest
from fix_pg import APP_PASSWORD
from fix_proxy import ProxyHandle
from proxy_helpers import active_queries, superuser, wait_until
from rawpg import PgError, RawConn, error_fields, msg, startup

from pgwarden.embedded import EmbeddedPostgres

Logins = Callable[[int], list[str]]


def tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


# -- psql ----------------------------------------------------------------------------------
def test_psql_queries_and_describe(proxy: ProxyHandle) -> None:
    r = proxy.psql(
        "-A",
        "-t",
        "-c",
        "SELECT name FROM customers ORDER BY id LIMIT 2",
        "-c",
        "SELECT count(*) FROM orders",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Ada", "Lovelace", "Grace", "Hopper", "20"]
    r = proxy.psql("-c", r"\d customers")
    assert r.returncode == 0, r.stderr
    assert 'Table "public.customers"' in r.stdout
    assert "card_number" in r.stdout and "customers_email_key" in r.stdout


def test_psql_copy_both_directions(proxy: ProxyHandle, pg: EmbeddedPostgres, tmp_path: Path) -> None:
    marker = tag()
    src = tmp_path / "in.csv"
    src.write_text("".join(f"{marker}-{i}\n" for i in range(500)))
    mark = pg.log_position()
    r = proxy.psql("-c", rf"\copy audit_scratch(payload) from '{src}'")
    assert r.returncode == 0, r.stderr
    assert "COPY 500" in r.stdout
    assert "FROM STDIN" in pg.log_since(mark)

    out = tmp_path / "out.csv"
    r = proxy.psql(
        "-c",
        rf"\copy (SELECT payload FROM audit_scratch WHERE payload LIKE '{marker}-%' ORDER BY id) to '{out}'",
    )
    assert r.returncode == 0, r.stderr
    assert out.read_text() == src.read_text()


# -- pgbench -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(proxy: ProxyHandle, tmp_path: Path, mode: str) -> None:
    script = tmp_path / "shop.sql"
    script.write_text(
        "\\set id random(1, 5)\n"
        "SELECT name, email FROM customers WHERE id = :id;\n"
        "SELECT count(*), sum(total_cents) FROM orders WHERE customer_id = :id;\n"
        "BEGIN;\n"
        "SELECT status FROM orders WHERE customer_id = :id ORDER BY id LIMIT 3;\n"
        "END;\n"
    )
    r = subprocess.run(
        ["pgbench", "-n", "-f", str(script), "-t", "50", "-c", "2", "-M", mode],
        capture_output=True,
        text=True,
        env=proxy.env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "number of transactions actually processed: 100/100" in r.stdout
    failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
    assert failed is not None and failed.group(1) == "0", r.stdout


# -- pg8000 --------------------------------------------------------------------------------
def test_pg8000_native_with_parameters(proxy: ProxyHandle) -> None:
    conn = pg8000.native.Connection(
        proxy.user, host=proxy.host, port=proxy.port, database=proxy.dbname, password=proxy.password
    )
    try:
        assert conn.run("SELECT name FROM customers WHERE id = :id", id=3) == [["Alan Turing"]]
        rows = conn.run(
            "SELECT id, total_cents FROM orders WHERE customer_id = :c AND total_cents > :t ORDER BY id",
            c=1,
            t=500,
        )
        assert rows and all(r[1] > 500 for r in rows)
        marker = tag()
        conn.run("START TRANSACTION")
        (row,) = conn.run("INSERT INTO audit_scratch (payload) VALUES (:p) RETURNING payload", p=marker)
        assert row == [marker]
        conn.run("ROLLBACK")
        assert conn.run("SELECT count(*) FROM audit_scratch WHERE payload = :p", p=marker) == [[0]]
        with pytest.raises(pg8000.native.DatabaseError) as e:
            conn.run("SELECT 1/0")
        assert e.value.args[0]["C"] == "22012"
        assert conn.run("SELECT 1") == [[1]]
    finally:
        conn.close()


# -- psycopg 3 -----------------------------------------------------------------------------
def test_psycopg_pipeline_mode(proxy: ProxyHandle) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            cursors = [conn.execute("SELECT name FROM customers WHERE id = %s", (i,)) for i in range(1, 6)]
            bad = conn.cursor()
            counts = conn.execute("SELECT count(*) FROM orders")
        assert [c.fetchone()[0] for c in cursors][:2] == ["Ada Lovelace", "Grace Hopper"]  # type: ignore[index]
        assert counts.fetchone() == (20,)
        # an error in the middle of a pipeline is reported and the pipeline recovers
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT 1")
                bad.execute("SELECT 1/0")
                conn.execute("SELECT 2")
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_psycopg_copy_from_and_to(proxy: ProxyHandle) -> None:
    marker = tag()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY audit_scratch (payload) FROM STDIN") as copy:
                for i in range(2000):
                    copy.write_row((f"{marker}-{i}",))
            assert cur.execute(
                "SELECT count(*) FROM audit_scratch WHERE payload LIKE %s", (marker + "-%",)
            ).fetchone() == (2000,)
            with cur.copy(
                "COPY (SELECT payload FROM audit_scratch WHERE payload LIKE %s ORDER BY id) TO STDOUT",
                (marker + "-%",),
            ) as copy:
                rows = [r[0] for r in copy.rows()]
            assert rows == [f"{marker}-{i}" for i in range(2000)]
        # an aborted COPY FROM (CopyFail) leaves the session usable
        with pytest.raises(RuntimeError):
            with conn.cursor().copy("COPY audit_scratch (payload) FROM STDIN") as copy:
                copy.write_row((marker,))
                raise RuntimeError("client gave up")
        assert conn.execute(
            "SELECT count(*) FROM audit_scratch WHERE payload = %s", (marker,)
        ).fetchone() == (0,)


def test_psycopg_binary_results(proxy: ProxyHandle) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        cur = conn.cursor(binary=True)
        cur.execute(
            "SELECT o.id, c.name, o.created_at, o.total_cents::numeric / 100"
            " FROM customers c JOIN orders o ON o.customer_id = c.id ORDER BY o.id LIMIT 3"
        )
        rows = cur.fetchall()
        assert cur.pgresult is not None and all(cur.pgresult.fformat(i) == 1 for i in range(4))
        assert [r[1] for r in rows] == ["Grace Hopper", "Alan Turing", "Katherine Johnson"]
        assert rows[0][3] == pytest.approx(1)


# -- asyncpg -------------------------------------------------------------------------------
async def test_asyncpg_prepared_statements_and_binary_types(proxy: ProxyHandle) -> None:
    conn = await proxy.asyncpg()
    try:
        stmt = await conn.prepare(
            "SELECT id, name, created_at FROM customers WHERE id = ANY($1::int[]) ORDER BY id"
        )
        rows = await stmt.fetch([2, 4])
        assert [r["name"] for r in rows] == ["Grace Hopper", "Katherine Johnson"]
        assert rows[0]["created_at"].tzinfo is not None  # decoded from binary timestamptz
        assert [r["id"] for r in await stmt.fetch([1])] == [1]
        total = await conn.fetchval("SELECT sum(total_cents)::bigint FROM orders WHERE customer_id = $1", 2)
        assert isinstance(total, int) and total > 0
        async with conn.transaction():
            cur_rows = [
                r async for r in conn.cursor("SELECT g FROM generate_series(1, 1000) g", prefetch=100)
            ]
        assert len(cur_rows) == 1000
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("SELECT * FROM no_such_table")
        assert await conn.fetchval("SELECT $1::text || $2::text", "a", "b") == "ab"
    finally:
        await conn.close()


async def test_asyncpg_copy_records_to_table(proxy: ProxyHandle) -> None:
    conn = await proxy.asyncpg()
    try:
        await conn.execute("CREATE TEMP TABLE items (id int, label text, price numeric)")
        records = [(i, f"item {i}", i * 1.5) for i in range(5000)]
        result = await conn.copy_records_to_table("items", records=records)
        assert result == "COPY 5000"
        assert await conn.fetchval("SELECT count(*) FROM items") == 5000
        assert await conn.fetchval("SELECT label FROM items WHERE id = 4242") == "item 4242"
    finally:
        await conn.close()


async def test_asyncpg_timeout_cancels_the_query(proxy: ProxyHandle, pg: EmbeddedPostgres) -> None:
    marker = tag()
    conn = await proxy.asyncpg()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetch(f"SELECT pg_sleep(10) /* {marker} */", timeout=0.5)
        # asyncpg cancelled the query with the proxy's BackendKeyData: the server stopped it
        await asyncio.to_thread(
            wait_until, lambda: not active_queries(pg, marker), 5, 0.05, "pg_sleep to stop"
        )
        assert await conn.fetchval("SELECT 42") == 42
    finally:
        await conn.close()


# -- LISTEN/NOTIFY and cancel --------------------------------------------------------------
def test_listen_notify_delivery(proxy: ProxyHandle, pg: EmbeddedPostgres) -> None:
    channel = tag()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"LISTEN {channel}")
        with superuser(pg, "shop") as direct:
            direct.execute(f"NOTIFY {channel}, 'hello through the proxy'")
            direct.execute("SELECT pg_notify(%s, %s)", (channel, "second"))
        got = []
        for n in conn.notifies(timeout=10, stop_after=2):
            got.append((n.channel, n.payload))
        assert got == [(channel, "hello through the proxy"), (channel, "second")]


def test_cancel_with_the_clients_cancel_key(proxy: ProxyHandle, pg: EmbeddedPostgres) -> None:
    # cancel_safe(), not cancel(): psycopg's binary cancel() holds the GIL while libpq waits for
    # the answer, and this proxy runs in a thread of the same process.
    marker = tag()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        timer = threading.Thread(
            target=lambda: (
                wait_until(lambda: active_queries(pg, marker), what="pg_sleep to start"),
                conn.cancel_safe(),
            )
        )
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
        finally:
            timer.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_cancel_with_a_wrong_key_does_nothing(proxy: ProxyHandle, pg: EmbeddedPostgres) -> None:
    marker = tag()
    answers: list[bytes] = []

    def wrong_cancel() -> None:
        wait_until(lambda: active_queries(pg, marker), what="pg_sleep to start")
        with socket.create_connection((proxy.host, proxy.port)) as s:
            s.sendall(struct.pack("!IIiI", 16, 80877102, 12345, 678))
            answers.append(s.recv(1))  # closed without an answer, as PostgreSQL does

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        t = threading.Thread(target=wrong_cancel)
        t.start()
        try:
            assert conn.execute(f"SELECT 1 FROM pg_sleep(0.5) /* {marker} */").fetchone() == (1,)
        finally:
            t.join()
    assert answers == [b""]


# -- startup parameters --------------------------------------------------------------------
def test_startup_parameters_outside_the_allowlist_do_not_reach_the_server(
    proxy: ProxyHandle, pg: EmbeddedPostgres
) -> None:
    dsn = proxy.dsn() + " options='-c role=postgres -c search_path=evil' application_name=agent-x"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("public",)
        assert conn.execute("SELECT current_user, session_user").fetchone() == ("app", "app")
        assert conn.execute("SHOW application_name").fetchone() == ("agent-x",)
        assert conn.info.parameter_status("application_name") == "agent-x"
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        with superuser(pg) as direct:
            row = direct.execute(
                "SELECT application_name, usename FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
        assert row == ("agent-x", "app")


def test_forwarded_session_settings_take_effect(proxy: ProxyHandle) -> None:
    # client_encoding is pinned to UTF8 (the policy engine must read what the server reads)
    env = proxy.env(PGTZ="Asia/Tokyo", PGDATESTYLE="German", PGCLIENTENCODING="LATIN1")
    r = subprocess.run(
        [
            "psql",
            "-X",
            "-A",
            "-t",
            "-c",
            "SHOW TimeZone",
            "-c",
            "SHOW DateStyle",
            "-c",
            "SHOW client_encoding",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Asia/Tokyo", "German,", "DMY", "UTF8"]


def test_a_client_asking_for_a_newer_protocol_falls_back_to_3_0(proxy: ProxyHandle) -> None:
    with RawConn.open(proxy.host, proxy.port) as c:
        params = {"user": proxy.user, "database": proxy.dbname, "_pq_.future_option": "on"}
        c.send(startup(params, protocol=(3 << 16) | 2))
        kind, payload = c.recv()
        assert kind == b"v"
        assert payload == struct.pack("!II", 3 << 16, 1) + b"_pq_.future_option\0"  # 3.0, one unknown
        c.authenticate(proxy.user, proxy.password)
        assert c.simple("SELECT 1") == [[b"1"]]
    if psycopg.pq.version() >= 180000:  # libpq 18 knows max_protocol_version
        with psycopg.connect(proxy.dsn(max_protocol_version="latest")) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)


# -- authentication and the FunctionCall message -------------------------------------------
@pytest.fixture(scope="module")
def connection_log(pg: EmbeddedPostgres) -> Iterator[Callable[[int], list[str]]]:
    """Turns on log_connections; gives the upstream logins as `app` since a log mark."""
    with superuser(pg) as direct:
        direct.execute("ALTER SYSTEM SET log_connections = on")
        direct.execute("SELECT pg_reload_conf()")

    def logins(mark: int) -> list[str]:
        return [line for line in pg.log_since(mark).splitlines() if "connection authorized: user=app" in line]

    # the reload is asynchronous: wait until a login shows up
    mark = pg.log_position()
    wait_until(lambda: (psycopg.connect(pg.dsn("shop", "app", APP_PASSWORD)).close(), logins(mark))[1])
    try:
        yield logins
    finally:
        with superuser(pg) as direct:
            direct.execute("ALTER SYSTEM RESET log_connections")
            direct.execute("SELECT pg_reload_conf()")


def login_error(proxy: ProxyHandle, **over: str) -> dict[str, str]:
    args = {"user": proxy.user, "password": proxy.password, "database": proxy.dbname, **over}
    with pytest.raises(PgError) as e:
        RawConn.login(proxy.host, proxy.port, args["user"], args["password"], args["database"])
    return e.value.fields


def test_wrong_password_is_refused(proxy: ProxyHandle, pg: EmbeddedPostgres, connection_log: Logins) -> None:
    mark = pg.log_position()
    err = login_error(proxy, password="not-the-password")
    assert (err["S"], err["C"]) == ("FATAL", "28P01")
    assert err["M"] == 'password authentication failed for user "agent"'
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(
            asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user=proxy.user,
                password="nope",
                database=proxy.dbname,
                ssl=False,
            )
        )
    assert connection_log(mark) == []  # the proxy did not even connect upstream


def test_unknown_user_is_refused_like_a_wrong_password(
    proxy: ProxyHandle, pg: EmbeddedPostgres, connection_log: Logins
) -> None:
    mark = pg.log_position()
    err = login_error(proxy, user="mallory", password="x")
    assert (err["S"], err["C"]) == ("FATAL", "28P01")
    assert err["M"] == 'password authentication failed for user "mallory"'
    for user in ("postgres", "app"):  # the database's own roles are not the proxy's users
        assert login_error(proxy, user=user, password=APP_PASSWORD)["C"] == "28P01"
    assert connection_log(mark) == []


def test_a_database_not_served_is_refused(
    proxy: ProxyHandle, pg: EmbeddedPostgres, connection_log: Logins
) -> None:
    mark = pg.log_position()
    err = login_error(proxy, database="postgres")
    assert (err["S"], err["C"]) == ("FATAL", "3D000")
    assert 'database "postgres" is not served' in err["M"] and "dbname=shop" in err["H"]
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        asyncio.run(
            asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user=proxy.user,
                password=proxy.password,
                database="postgres",
                ssl=False,
            )
        )
    assert connection_log(mark) == []


def test_a_good_login_is_one_upstream_login(
    proxy: ProxyHandle, pg: EmbeddedPostgres, connection_log: Logins
) -> None:
    mark = pg.log_position()
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("SELECT 1")
    (line,) = connection_log(mark)
    assert "database=shop" in line


def test_function_call_message_is_refused_and_the_session_goes_on(
    proxy: ProxyHandle, pg: EmbeddedPostgres
) -> None:
    with superuser(pg, "shop") as direct:
        (oid,) = direct.execute("SELECT 'pg_terminate_backend'::regproc::oid").fetchone()  # type: ignore[misc]
    with RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, proxy.dbname) as c:
        mark = pg.log_position()
        # FunctionCall(pg_terminate_backend, 1 text-format argument)
        arg = b"1"
        c.send(msg(b"F", struct.pack("!Ihhhi", oid, 1, 0, 1, len(arg)) + arg + struct.pack("!h", 0)))
        replies = c.until_ready()
        errors = [error_fields(p) for k, p in replies if k == b"E"]
        assert len(errors) == 1 and errors[0]["C"] == "42501"
        assert "FunctionCall" in errors[0]["M"]
        assert replies[-1] == (b"Z", b"I")
        assert "pg_terminate_backend" not in pg.log_since(mark)
        assert c.simple("SELECT 7") == [[b"7"]]
