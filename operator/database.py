"""The operator's admin connection to PostgreSQL (pg8000, blocking; callers use a thread).

All rotation work on one pair of login roles happens under a session-level advisory lock
(`roles_sql.lock_sql`): the credentials Secret's version and the roles' state are read under the
lock, planned by the pure `plan_rotation`, applied in one transaction, and the new Secret is
published before the lock is released — so two operator replicas (or a replica and a retry of
itself) can never rotate twice, nor mistake the other's fresh rotation for a stale Secret.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pg8000.exceptions
import pg8000.native

from pgwarden.connection import DatabaseConnection
from pgwarden.operator import roles_sql
from pgwarden.operator.rotation import LoginRole, RotationPlan, RotationSpec, RotationState, plan_rotation
from pgwarden.operator.status import DatabaseReason


class DatabaseProblem(Exception):
    """The database could not be reached or refused the admin; the message says what to do."""

    def __init__(self, reason: DatabaseReason, message: str) -> None:
        super().__init__(message)
        self.reason: DatabaseReason = reason  # the reason of the CredentialsReady/Reachable conditions


@dataclass(frozen=True)
class AdminCredentials:
    username: str
    password: str
    sslrootcert: str = ""  # PEM, from the admin Secret's optional `sslrootcert` key


@dataclass(frozen=True)
class RotationOutcome:
    plan: RotationPlan
    password: str | None  # set when the plan gave a role a new password
    server_version: str
    state: RotationState
    grant_changes: list[str] = field(default_factory=list)


def ssl_context_for(mode: str, cadata: str = "") -> ssl.SSLContext | None:
    """TLS per libpq's sslmode: disable -> plain; allow/prefer/require -> encrypted, not
    verified (libpq verifies require only when a root cert is given); verify-ca -> chain;
    verify-full -> chain and host name."""
    if mode == "disable":
        return None
    ctx = ssl.create_default_context()
    if cadata:
        ctx.load_verify_locations(cadata=cadata)
    if mode == "verify-full":
        return ctx
    ctx.check_hostname = False
    if mode == "verify-ca" or (mode == "require" and cadata):
        return ctx
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(
    conn: DatabaseConnection, admin: AdminCredentials, *, timeout: float = 10.0, database: str | None = None,
) -> pg8000.native.Connection:
    """Open the admin connection, turning driver errors into DatabaseProblem with a next step."""
    where = f"{conn.host}:{conn.port}/{database or conn.database}"
    ctx = ssl_context_for(conn.ssl_mode, admin.sslrootcert)
    try:
        return pg8000.native.Connection(
            user=admin.username, password=admin.password, host=conn.host, port=conn.port,
            database=database or conn.database, ssl_context=ctx, timeout=timeout,
            application_name="pgwarden-operator",
        )
    except pg8000.exceptions.DatabaseError as e:
        code, msg = _pg_error(e)
        if code in ("28P01", "28000"):
            raise DatabaseProblem(
                "AuthenticationFailed",
                f"PostgreSQL at {where} rejected the admin user {admin.username!r} ({msg}); "
                f"fix the username/password keys of the admin Secret",
            ) from e
        if code == "3D000":
            raise DatabaseProblem("DatabaseMissing", f"database {database or conn.database!r} does not exist at {where}; "
                                  "fix spec.database") from e
        raise DatabaseProblem("ConnectFailed", f"PostgreSQL at {where} refused the connection: {msg}") from e
    except ssl.SSLError as e:
        raise DatabaseProblem(
            "TLSFailed",
            f"TLS to {where} failed with sslMode {conn.ssl_mode} ({e.reason or e}); add the server's CA as "
            "`sslrootcert` to the admin Secret, or choose another spec.sslMode",
        ) from e
    except (pg8000.exceptions.InterfaceError, OSError) as e:
        raise DatabaseProblem(
            "Unreachable", f"cannot reach PostgreSQL at {where}: {e}; check spec.host/spec.port and network policies"
        ) from e


def _pg_error(e: Exception) -> tuple[str, str]:
    arg = e.args[0] if e.args else {}
    if isinstance(arg, dict):
        return str(arg.get("C", "")), str(arg.get("M", arg))
    return "", str(arg)


def server_version(con: pg8000.native.Connection) -> str:
    return str(con.run("SHOW server_version")[0][0])


def read_state(con: pg8000.native.Connection, names: tuple[str, str], secret_version: int | None) -> tuple[RotationState, dict[str, list[str]]]:
    rows = con.run(roles_sql.READ_ROLES_SQL.replace("%s", ":names"), names=list(names))
    found: dict[str, LoginRole] = {}
    members: dict[str, list[str]] = {}
    for rolname, can_login, comment, groups in rows:
        meta = _parse_comment(comment)
        found[rolname] = LoginRole(
            name=rolname, exists=True, can_login=bool(can_login),
            version=int(meta.get("version") or 0), activated_at=meta.get("activatedAt"),
        )
        members[rolname] = list(groups or [])
    a, b = (found.get(n, LoginRole(name=n)) for n in names)
    return RotationState(a=a, b=b, secret_version=secret_version), members


def _parse_comment(comment: str | None) -> dict[str, Any]:
    if not comment:
        return {}
    try:
        body = json.loads(comment)
    except ValueError:
        return {}
    meta = body.get(roles_sql.COMMENT_KEY) if isinstance(body, dict) else None
    return meta if isinstance(meta, dict) else {}


def role_names(conn: DatabaseConnection) -> tuple[str, str]:
    return f"{conn.role_prefix}_a", f"{conn.role_prefix}_b"


def reconcile_roles(
    conn: DatabaseConnection, admin: AdminCredentials, spec: RotationSpec, secret_version: int | None, *,
    timeout: float = 10.0, clock: Callable[[], float] = time.time,
    read_secret_version: Callable[[], int | None] | None = None,
    publish: Callable[[RotationOutcome], None] | None = None,
) -> RotationOutcome:
    """One locked pass: check grantRoles exist, plan, apply, sync memberships, publish.

    `read_secret_version` (when given) replaces `secret_version` and is called under the lock;
    `publish` is called under the lock after the commit when a role got a new password, to write
    the credentials Secret. Reading the Secret before the lock would let a second replica see
    the version the first is replacing and "repair" a rotation that just happened.
    """
    con = connect(conn, admin, timeout=timeout)
    try:
        version = server_version(con)
        con.run(roles_sql.lock_sql(conn.role_prefix))
        try:
            if read_secret_version is not None:
                secret_version = read_secret_version()
            con.run("BEGIN")
            try:
                missing = [r[0] for r in con.run(roles_sql.MISSING_ROLES_SQL.replace("%s", ":names"),
                                                 names=list(conn.credentials.grant_roles))]
                if missing:
                    raise DatabaseProblem(
                        "GrantRoleMissing",
                        f"role(s) {', '.join(missing)} listed in spec.credentials.grantRoles do not exist in the "
                        "database; create them (CREATE ROLE ... NOLOGIN) or fix the list",
                    )
                names = role_names(conn)
                state, members = read_state(con, names, secret_version)
                plan = plan_rotation(state, clock(), spec)
                password = roles_sql.new_password() if plan.target else None
                stmts = roles_sql.plan_sql(
                    plan, connection=f"{conn.namespace}/{conn.name}",
                    exists={r.name: r.exists for r in state.roles()},
                    grant_roles=conn.credentials.grant_roles, password=password,
                )
                grant_changes: list[str] = []
                for r in state.roles():
                    if r.exists:
                        grant_changes += roles_sql.sync_grants_sql(r.name, members.get(r.name, []),
                                                                   conn.credentials.grant_roles)
                for sql in stmts + grant_changes:
                    con.run(sql)
                con.run("COMMIT")
            except BaseException:
                _quiet_rollback(con)
                raise
            outcome = RotationOutcome(plan=plan, password=password, server_version=version, state=state,
                                      grant_changes=grant_changes)
            if publish is not None and outcome.password is not None:
                publish(outcome)
        finally:
            _quiet_unlock(con, conn.role_prefix)
    except pg8000.exceptions.DatabaseError as e:
        code, msg = _pg_error(e)
        raise DatabaseProblem("SQLFailed", f"managing login roles failed ({code} {msg}); the admin user needs "
                              "CREATEROLE and ADMIN OPTION on the grantRoles") from e
    finally:
        _quiet_close(con)
    return outcome


def drop_roles(conn: DatabaseConnection, admin: AdminCredentials, *, timeout: float = 10.0) -> list[str]:
    """Drop both login roles (finalizer); returns the names that existed."""
    con = connect(conn, admin, timeout=timeout)
    dropped: list[str] = []
    try:
        existing = {r[0] for r in con.run("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)",
                                          names=list(role_names(conn)))}
        for name in role_names(conn):
            if name not in existing:
                continue
            for sql in roles_sql.drop_role_sql(name):
                con.run(sql)
            dropped.append(name)
    except pg8000.exceptions.DatabaseError as e:
        code, msg = _pg_error(e)
        raise DatabaseProblem("SQLFailed", f"dropping login roles failed ({code} {msg})") from e
    finally:
        _quiet_close(con)
    return dropped


def catalog_columns(conn: DatabaseConnection, admin: AdminCredentials, *, timeout: float = 10.0) -> dict[str, set[str]]:
    """`schema.table` -> column names, for warnings about unknown tables/columns in policies."""
    con = connect(conn, admin, timeout=timeout)
    try:
        rows = con.run(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
    finally:
        _quiet_close(con)
    out: dict[str, set[str]] = {}
    for schema, table, column in rows:
        out.setdefault(f"{schema}.{table}", set()).add(column)
    return out


def _quiet_rollback(con: pg8000.native.Connection) -> None:
    try:
        con.run("ROLLBACK")
    except Exception:  # the connection may be gone; the transaction dies with it
        pass


def _quiet_unlock(con: pg8000.native.Connection, role_prefix: str) -> None:
    try:
        con.run(roles_sql.unlock_sql(role_prefix))
    except Exception:  # the connection may be gone; closing it releases the lock
        pass


def _quiet_close(con: pg8000.native.Connection) -> None:
    try:
        con.close()
    except Exception:  # closing a broken socket can fail; nothing left to release
        pass
