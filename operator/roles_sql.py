"""SQL that applies a rotation plan: pure string builders, no I/O.

Login roles get LOGIN, a password, VALID UNTIL and membership in `grantRoles` — and nothing
else (NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS). Passwords are sent as
SCRAM-SHA-256 verifiers computed here, so the clear text never reaches the server (nor its
statement log); identifiers and literals are quoted, never interpolated raw.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import zlib
from collections.abc import Iterable, Sequence

from pgwarden.operator.rotation import Action, RotationPlan

SAFE_ATTRIBUTES = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"
COMMENT_KEY = "pgwarden"


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, always double-quoted (so case and keywords are preserved)."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A string literal that is safe whatever standard_conforming_strings says."""
    if "\x00" in value:
        raise ValueError("literals cannot contain NUL")
    escaped = value.replace("'", "''")
    if "\\" in escaped:
        return "E'" + escaped.replace("\\", "\\\\") + "'"
    return "'" + escaped + "'"


def new_password(nbytes: int = 32) -> str:
    """A random password (URL-safe base64: no quoting surprises in client configs)."""
    return secrets.token_urlsafe(nbytes)


def scram_verifier(password: str, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677)."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def timestamp_literal(epoch: float) -> str:
    return quote_literal(dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat())


def role_comment(connection: str, version: int, activated_at: float | None) -> str:
    body = {"connection": connection, "version": version, "activatedAt": activated_at}
    return json.dumps({COMMENT_KEY: body}, sort_keys=True)


def lock_key(role_prefix: str) -> int:
    """The advisory-lock key that serialises all rotation work on one pair of roles."""
    return zlib.crc32(("pgwarden:" + role_prefix).encode()) - 2**31


def lock_sql(role_prefix: str) -> str:
    """A session-level lock: held from before the Secret is read until after it is written, so
    a second replica never plans from a Secret version the first one is about to replace."""
    return f"SELECT pg_advisory_lock({lock_key(role_prefix)})"


def unlock_sql(role_prefix: str) -> str:
    return f"SELECT pg_advisory_unlock({lock_key(role_prefix)})"


READ_ROLES_SQL = """
SELECT r.rolname, r.rolcanlogin, shobj_description(r.oid, 'pg_authid'),
       ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE m.member = r.oid ORDER BY g.rolname)
FROM pg_roles r WHERE r.rolname = ANY(%s)
"""

MISSING_ROLES_SQL = "SELECT x FROM unnest(%s::text[]) AS x WHERE x NOT IN (SELECT rolname FROM pg_roles)"


def activate_sql(
    role: str, exists: bool, password: str, valid_until: float, grant_roles: Sequence[str],
    connection: str, version: int, activated_at: float | None, *, salt: bytes | None = None,
) -> list[str]:
    """Create or re-password `role` so it can log in with `password` until `valid_until`."""
    verifier = quote_literal(scram_verifier(password, salt=salt))
    until = timestamp_literal(valid_until)
    if exists:
        stmts = [f"ALTER ROLE {quote_ident(role)} WITH LOGIN {SAFE_ATTRIBUTES} PASSWORD {verifier} VALID UNTIL {until}"]
    else:
        in_role = f" IN ROLE {', '.join(quote_ident(r) for r in grant_roles)}" if grant_roles else ""
        stmts = [f"CREATE ROLE {quote_ident(role)} WITH LOGIN {SAFE_ATTRIBUTES} PASSWORD {verifier} VALID UNTIL {until}{in_role}"]
    stmts.append(comment_sql(role, connection, version, activated_at))
    return stmts


def comment_sql(role: str, connection: str, version: int, activated_at: float | None) -> str:
    return f"COMMENT ON ROLE {quote_ident(role)} IS {quote_literal(role_comment(connection, version, activated_at))}"


def retire_sql(role: str) -> list[str]:
    """Disable a login role and end its remaining sessions (in every database)."""
    return [
        f"ALTER ROLE {quote_ident(role)} WITH NOLOGIN PASSWORD NULL",
        terminate_sql(role),
    ]


def terminate_sql(role: str) -> str:
    return (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE usename = {quote_literal(role)} AND pid <> pg_backend_pid()"
    )


def sync_grants_sql(role: str, current: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """GRANT what is missing, REVOKE what is no longer listed in grantRoles."""
    cur, want = set(current), set(wanted)
    stmts = [f"GRANT {quote_ident(g)} TO {quote_ident(role)}" for g in sorted(want - cur)]
    stmts += [f"REVOKE {quote_ident(g)} FROM {quote_ident(role)}" for g in sorted(cur - want)]
    return stmts


def drop_role_sql(role: str) -> list[str]:
    """Drop a login role cleanly: end its sessions, hand anything it created to the admin,
    drop its privileges, then the role. Run in each database the role may own objects in."""
    q = quote_ident(role)
    return [
        terminate_sql(role),
        f"REASSIGN OWNED BY {q} TO CURRENT_USER",
        f"DROP OWNED BY {q}",
        f"DROP ROLE IF EXISTS {q}",
    ]


def plan_sql(
    plan: RotationPlan, *, connection: str, exists: dict[str, bool], grant_roles: Sequence[str],
    password: str | None, salt: bytes | None = None,
) -> list[str]:
    """Every statement that applies `plan` (run inside one transaction, under lock_sql)."""
    stmts: list[str] = []
    if plan.retire is not None:
        stmts += retire_sql(plan.retire)
    if plan.target is not None:
        if password is None:
            raise ValueError(f"plan {plan.action.value} sets a password but none was given")
        stmts += activate_sql(
            plan.target, exists.get(plan.target, False), password, plan.valid_until or 0.0, grant_roles,
            connection, plan.version, plan.activated_at, salt=salt,
        )
    if plan.action is Action.NONE:
        return []
    return stmts
