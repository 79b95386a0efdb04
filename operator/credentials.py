"""The credentials Secret the sidecars mount: a pure builder.

Keys (files under /etc/pgwarden/credentials in the proxy): username, password, version, host,
port, database, sslmode, sslrootcert (empty when the admin Secret has none). Every key is
always present because the sidecar's projected volume lists them by name.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from pgwarden.connection import DatabaseConnection
from pgwarden.k8s.names import (
    ANNOTATION_CREDENTIALS_VERSION,
    API_VERSION,
    LABEL_CONNECTION,
    LABEL_MANAGED_BY,
    MANAGED_BY_OPERATOR,
)


def b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8")).decode("ascii")


def unb64(value: str | None) -> str:
    return base64.b64decode(value or "").decode("utf-8")


def managed_labels(connection: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY_OPERATOR, LABEL_CONNECTION: connection}


def owner_reference(owner: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """ownerReferences for objects the DatabaseConnection owns (empty when the uid is unknown)."""
    meta = (owner or {}).get("metadata") or {}
    if not meta.get("uid"):
        return []
    return [{
        "apiVersion": (owner or {}).get("apiVersion", API_VERSION),
        "kind": (owner or {}).get("kind", "DatabaseConnection"),
        "name": meta.get("name"),
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }]


def not_ours(existing: Mapping[str, Any] | None, owner: Mapping[str, Any]) -> str:
    """Why the operator must not write or delete `existing` for the DatabaseConnection `owner`
    ("" when it may: absent, or made by pgwarden for this connection).

    A `credentials.secretName` may name any Secret of the namespace — the admin Secret, another
    application's — and a bundle ConfigMap name may be taken: pgwarden adopts only objects that
    carry its labels for this connection and no other controller's owner reference."""
    if existing is None:
        return ""
    meta = existing.get("metadata") or {}
    kind = existing.get("kind") or "object"
    where = f"{kind} {meta.get('namespace', '')}/{meta.get('name', '')}"
    conn = (owner.get("metadata") or {}).get("name", "")
    labels = meta.get("labels") or {}
    if labels.get(LABEL_MANAGED_BY) != MANAGED_BY_OPERATOR or labels.get(LABEL_CONNECTION) != conn:
        return (f"{where} already exists and was not made by pgwarden for DatabaseConnection {conn}; pgwarden does "
                "not take over objects it did not create: choose another name (spec.credentials.secretName) or "
                "delete that object")
    uid = (owner.get("metadata") or {}).get("uid")
    controllers = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if uid and controllers and not any(r.get("uid") == uid for r in controllers):
        other = controllers[0]
        return (f"{where} is controlled by {other.get('kind')} {other.get('name')}, not by DatabaseConnection {conn}; "
                "pgwarden leaves it alone")
    return ""


def credentials_secret(
    conn: DatabaseConnection, *, username: str, password: str, version: int, sslrootcert: str = "",
    owner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    values = {
        "username": username,
        "password": password,
        "version": str(version),
        "host": conn.host,
        "port": str(conn.port),
        "database": conn.database,
        "sslmode": conn.ssl_mode,
        "sslrootcert": sslrootcert,
    }
    meta: dict[str, Any] = {
        "name": conn.secret_name,
        "namespace": conn.namespace,
        "labels": managed_labels(conn.name),
        "annotations": {ANNOTATION_CREDENTIALS_VERSION: str(version)},
    }
    refs = owner_reference(owner)
    if refs:
        meta["ownerReferences"] = refs
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {k: b64(v) for k, v in values.items()},
    }


def secret_version(secret: Mapping[str, Any] | None) -> int | None:
    """The `version` key of an existing credentials Secret; None when absent or unreadable."""
    if not secret:
        return None
    try:
        return int(unb64((secret.get("data") or {}).get("version")))
    except (ValueError, TypeError):
        return None


def read_admin_secret(secret: Mapping[str, Any] | None, ref: str) -> tuple[str, str, str]:
    """(username, password, sslrootcert) from the admin Secret, or ValueError saying what is wrong."""
    if secret is None:
        raise ValueError(f"admin Secret {ref} does not exist; create it with keys username and password "
                         "(optional sslrootcert), e.g. kubectl create secret generic ... --from-literal=username=...")
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    missing = [k for k in ("username", "password") if not (data.get(k) or string_data.get(k))]
    if missing:
        have = ", ".join(sorted(set(data) | set(string_data))) or "none"
        raise ValueError(f"admin Secret {ref} lacks key(s) {', '.join(missing)} (it has: {have}); "
                         "add them: username and password of a role with CREATEROLE")

    def get(key: str) -> str:
        if key in string_data:
            return str(string_data[key])
        try:
            return unb64(data.get(key))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"admin Secret {ref} key {key} is not valid base64 UTF-8 text") from e

    return get("username"), get("password"), get("sslrootcert") if ("sslrootcert" in data or "sslrootcert" in string_data) else ""
