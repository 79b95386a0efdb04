"""How the proxy logs in to the real server: scram-sha-256, md5 and cleartext password, with the
password from the config, an environment variable or a file, over TCP or a unix socket.

Each method gets its own role and pg_hba.conf line on the session server; the server's own log
(`log_connections`) proves which method it used. A wrong upstream password must reach the agent
as a clear FATAL that names the upstream login, not as a hang or a bare disconnect.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from fix_pg import APP_PASSWORD, APP_USER, SHOP_DB
from fix_proxy import ProxyHandle
from proxy_helpers import superuser, wait_until
from rawpg import PgError, RawConn

from pgwarden.embedded import EmbeddedPostgres


@dataclass(frozen=True)
class UpstreamRole:
    name: str
    password: str
    method: str  # what the server's log says: scram-sha-256, md5, password


ROLES = {
    "scram-sha-256": UpstreamRole("up_scram", "scram-upstream-pw", "scram-sha-256"),
    "md5": UpstreamRole("up_md5", "md5-upstream-pw", "md5"),
    "password": UpstreamRole("up_pw", "cleartext-upstream-pw", "password"),
}


def _write_as_owner(path: Path, text: str, like: os.stat_result) -> None:
    """Rewrite a file of the server's data folder, keeping its owner (postgres under root) and mode."""
    path.write_text(text)
    if os.geteuid() == 0:
        os.chown(path, like.st_uid, like.st_gid)
    path.chmod(like.st_mode & 0o7777)


@pytest.fixture(scope="module")
def upstream_roles(pg: EmbeddedPostgres) -> Iterator[dict[str, UpstreamRole]]:
    """A role per upstream method, pg_hba.conf lines that force md5 and password for two of them,
    and `log_connections` so the server's log names the method each login used."""
    hba = pg.datadir / "pg_hba.conf"
    original = hba.read_text()
    st = hba.stat()
    for role in ROLES.values():
        # md5 needs an md5 hash stored: with a SCRAM verifier the server silently upgrades md5 to SCRAM
        encryption = "md5" if role.method == "md5" else "scram-sha-256"
        pg.psql(
            f"SET password_encryption = '{encryption}'; "
            f"DROP ROLE IF EXISTS {role.name}; "
            f"CREATE ROLE {role.name} LOGIN PASSWORD '{role.password}' IN ROLE shop_reader",
            dbname=SHOP_DB,
        )
    forced = (
        f"host {SHOP_DB} {ROLES['md5'].name} 127.0.0.1/32 md5\n"
        f"host {SHOP_DB} {ROLES['password'].name} 127.0.0.1/32 password\n"
    )
    _write_as_owner(hba, forced + original, st)
    pg.psql("ALTER SYSTEM SET log_connections = on")
    pg.psql("SELECT pg_reload_conf()")
    try:
        rules = pg.psql("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL")
        assert rules.strip() == "0", "the edited pg_hba.conf has errors"
        yield ROLES
    finally:
        _write_as_owner(hba, original, st)
        pg.psql("ALTER SYSTEM RESET log_connections")
        pg.psql("SELECT pg_reload_conf()")
        for role in ROLES.values():
            pg.psql(f"DROP ROLE IF EXISTS {role.name}", check=False)


def _proxy_for(make_proxy: Callable[..., ProxyHandle], upstream: dict[str, str]) -> ProxyHandle:
    return make_proxy(proxy_spec={"upstream": upstream})


def _connect_error(proxy: ProxyHandle) -> dict[str, str]:
    """The ErrorResponse the agent gets when the proxy cannot log in upstream."""
    with pytest.raises(PgError) as e:
        RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, proxy.dbname)
    fields = e.value.fields
    assert fields["C"] == "08006" and fields["S"] == "FATAL", fields
    return fields


def _authenticated_as(pg: EmbeddedPostgres, mark: int, role: UpstreamRole) -> str:
    """The server's `connection authenticated` log line for `role` since `mark`."""

    def line() -> str:
        for ln in pg.log_since(mark).splitlines():
            if "connection authenticated" in ln and f'identity="{role.name}"' in ln:
                return ln
        return ""

    return wait_until(line, timeout=5, what=f"the server to log {role.name}'s login")


# -- each method logs in ----------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ROLES))
def test_upstream_login_with_each_method(
    make_proxy: Callable[..., ProxyHandle],
    pg: EmbeddedPostgres,
    upstream_roles: dict[str, UpstreamRole],
    method: str,
) -> None:
    role = upstream_roles[method]
    proxy = _proxy_for(make_proxy, {"username": role.name, "password": role.password})
    mark = pg.log_position()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role.name,)
        assert conn.execute("SELECT name FROM customers WHERE id = %s", (1,)).fetchone() == ("Ada Lovelace",)
    logged = _authenticated_as(pg, mark, role)
    assert f"method={role.method} " in logged, logged


@pytest.mark.parametrize("method", list(ROLES))
def test_wrong_upstream_password_is_a_clear_error(
    make_proxy: Callable[..., ProxyHandle],
    upstream_roles: dict[str, UpstreamRole],
    method: str,
) -> None:
    role = upstream_roles[method]
    proxy = _proxy_for(make_proxy, {"username": role.name, "password": "not-" + role.password})
    err = _connect_error(proxy)
    assert f"the database refused pgwarden's login as '{role.name}'" in err["M"], err
    assert f'password authentication failed for user "{role.name}"' in err["M"], err
    assert "upstream credentials" in err.get("H", ""), err
    # the proxy itself carries on: a correct configuration next to it still serves
    good = _proxy_for(make_proxy, {"username": role.name, "password": role.password})
    with psycopg.connect(good.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psql_user_sees_the_upstream_login_failure(
    make_proxy: Callable[..., ProxyHandle], upstream_roles: dict[str, UpstreamRole]
) -> None:
    role = upstream_roles["md5"]
    proxy = _proxy_for(make_proxy, {"username": role.name, "password": "wrong"})
    r = proxy.psql("-c", "SELECT 1", timeout=30)
    assert r.returncode != 0
    assert "FATAL:  pgwarden cannot log in" not in r.stderr  # not a reach problem: a login problem
    assert f"FATAL:  the database refused pgwarden's login as '{role.name}'" in r.stderr, r.stderr
    assert "HINT:  Operators: check the upstream credentials" in r.stderr, r.stderr


# -- where the password comes from ------------------------------------------------------------
def test_password_from_environment_variable(
    make_proxy: Callable[..., ProxyHandle],
    upstream_roles: dict[str, UpstreamRole],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    role = upstream_roles["md5"]
    monkeypatch.setenv("PGWARDEN_TEST_UPSTREAM_PW", role.password)
    proxy = _proxy_for(make_proxy, {"username": role.name, "passwordEnv": "PGWARDEN_TEST_UPSTREAM_PW"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role.name,)
    # read for every new connection: once unset, new logins fail with a reason
    monkeypatch.delenv("PGWARDEN_TEST_UPSTREAM_PW")
    err = _connect_error(proxy)
    assert "PGWARDEN_TEST_UPSTREAM_PW" in err["M"] and "is not set" in err["M"], err


def test_password_from_file(
    make_proxy: Callable[..., ProxyHandle],
    upstream_roles: dict[str, UpstreamRole],
    tmp_path: Path,
) -> None:
    role = upstream_roles["password"]
    pwfile = tmp_path / "upstream-password"
    pwfile.write_text(role.password + "\n")  # a trailing newline, as `echo` or a Secret leaves it
    proxy = _proxy_for(make_proxy, {"username": role.name, "passwordFile": str(pwfile)})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role.name,)
    pwfile.unlink()
    err = _connect_error(proxy)
    assert f"cannot read upstream password file {pwfile}" in err["M"], err


# -- unix socket ------------------------------------------------------------------------------
def _can_reach_socket(pg: EmbeddedPostgres) -> bool:
    path = pg.socket_dir / f".s.PGSQL.{pg.port}"
    return path.exists() and os.access(pg.socket_dir, os.X_OK) and os.access(path, os.W_OK)


@pytest.fixture
def unix_proxy(make_proxy: Callable[..., ProxyHandle], pg: EmbeddedPostgres) -> ProxyHandle:
    if not _can_reach_socket(pg):
        pytest.skip(f"this user cannot open the server's unix socket in {pg.socket_dir}")
    return make_proxy(
        proxy_spec={
            "upstream": {"username": APP_USER, "password": APP_PASSWORD, "unixSocket": str(pg.socket_dir)}
        }
    )


def test_upstream_over_unix_socket(unix_proxy: ProxyHandle, pg: EmbeddedPostgres) -> None:
    with psycopg.connect(unix_proxy.dsn(), autocommit=True) as conn:
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (20,)
        with superuser(pg) as su:
            row = su.execute(
                "SELECT usename, client_addr, client_port FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
    # a unix-socket backend has no client address; the port is -1
    assert row == ("app", None, -1), row


def test_cancel_over_unix_socket(unix_proxy: ProxyHandle) -> None:
    """The cancel request goes to the server the same way the session did: over the socket."""
    with psycopg.connect(unix_proxy.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        assert time.monotonic() - start < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unix_socket_folder_without_server(make_proxy: Callable[..., ProxyHandle], tmp_path: Path) -> None:
    proxy = make_proxy(
        proxy_spec={"upstream": {"username": APP_USER, "password": "x", "unixSocket": str(tmp_path)}}
    )
    err = _connect_error(proxy)
    assert "pgwarden cannot reach the database" in err["M"], err
    # the message names where the proxy looked: the socket file, not the TCP host it did not use
    assert f"{tmp_path}/.s.PGSQL." in err["M"], err
    assert "retry" in err.get("H", ""), err


def test_psql_through_unix_socket_proxy(unix_proxy: ProxyHandle) -> None:
    r = unix_proxy.psql("-A", "-t", "-c", "SELECT inet_client_addr() IS NULL, current_user")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "t|app"
