"""DatabaseConnection: where the database is and how the operator administers it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgwarden.resources import Document, get_field, parse_duration

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_ROLE = re.compile(r"[a-z_][a-z0-9_$]{0,62}")


@dataclass(frozen=True)
class SecretRef:
    name: str
    namespace: str = ""


@dataclass(frozen=True)
class CredentialsSpec:
    grant_roles: tuple[str, ...] = ()
    rotation_interval: float = 3600.0
    # how long both passwords stay valid after a rotation; must exceed kubelet's Secret refresh
    grace_period: float = 120.0
    # the Secret the sidecars mount; default <connection>-pgwarden-credentials
    secret_name: str = ""
    # prefix of the two login roles (<prefix>_a, <prefix>_b); default pgw_<connection>
    role_prefix: str = ""


@dataclass(frozen=True)
class DatabaseConnection:
    name: str
    namespace: str
    host: str
    port: int = 5432
    database: str = "postgres"
    ssl_mode: str = "verify-full"
    ssl_root_cert: str = ""
    admin_secret_ref: SecretRef | None = None
    credentials: CredentialsSpec = field(default_factory=CredentialsSpec)

    @property
    def secret_name(self) -> str:
        return self.credentials.secret_name or f"{self.name}-pgwarden-credentials"

    @property
    def role_prefix(self) -> str:
        if self.credentials.role_prefix:
            return self.credentials.role_prefix
        return "pgw_" + re.sub(r"[^a-z0-9_]", "_", self.name.lower())[:40]


def parse_connection(doc: Document) -> DatabaseConnection:
    s = doc.spec
    host = get_field(doc, s, "host", str, "spec.host")
    port = get_field(doc, s, "port", int, "spec.port", 5432)
    if not 0 < port < 65536:
        raise doc.error("spec.port", f"{port} is not a TCP port")
    ssl_mode = get_field(doc, s, "sslMode", str, "spec.sslMode", "verify-full")
    if ssl_mode not in SSL_MODES:
        raise doc.error("spec.sslMode", f"{ssl_mode!r} is not one of {', '.join(SSL_MODES)}")
    admin = get_field(doc, s, "adminSecretRef", Mapping, "spec.adminSecretRef", None)
    admin_ref = None
    if admin is not None:
        admin_ref = SecretRef(
            name=get_field(doc, admin, "name", str, "spec.adminSecretRef.name"),
            namespace=get_field(doc, admin, "namespace", str, "spec.adminSecretRef.namespace", ""),
        )
    creds: Mapping[str, Any] = get_field(doc, s, "credentials", Mapping, "spec.credentials", {})
    roles = get_field(doc, creds, "grantRoles", list, "spec.credentials.grantRoles", [])
    for i, r in enumerate(roles):
        if not isinstance(r, str) or not _ROLE.fullmatch(r):
            raise doc.error(f"spec.credentials.grantRoles[{i}]", f"{r!r} is not a plain lower-case role name")
    interval = parse_duration(creds.get("rotationInterval", "1h"), doc, "spec.credentials.rotationInterval")
    grace = parse_duration(creds.get("gracePeriod", "2m"), doc, "spec.credentials.gracePeriod")
    if interval < 60:
        raise doc.error("spec.credentials.rotationInterval", "must be at least 1m")
    if grace < 120:
        raise doc.error("spec.credentials.gracePeriod", "must be at least 2m: kubelet takes 60-90s to bring a "
                        "rotated Secret to the sidecars, and the old password must outlive that")
    if grace >= interval:
        raise doc.error("spec.credentials.gracePeriod", "must be shorter than rotationInterval")
    prefix = get_field(doc, creds, "rolePrefix", str, "spec.credentials.rolePrefix", "")
    if prefix and not _ROLE.fullmatch(prefix):
        raise doc.error("spec.credentials.rolePrefix", f"{prefix!r} is not a plain lower-case role name")
    return DatabaseConnection(
        name=doc.name,
        namespace=doc.namespace,
        host=host,
        port=port,
        database=get_field(doc, s, "database", str, "spec.database", "postgres"),
        ssl_mode=ssl_mode,
        ssl_root_cert=get_field(doc, s, "sslRootCert", str, "spec.sslRootCert", ""),
        admin_secret_ref=admin_ref,
        credentials=CredentialsSpec(
            grant_roles=tuple(roles),
            rotation_interval=interval,
            grace_period=grace,
            secret_name=get_field(doc, creds, "secretName", str, "spec.credentials.secretName", ""),
            role_prefix=prefix,
        ),
    )
