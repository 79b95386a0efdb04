"""ProxyConfig: how one proxy listens, whom it lets in, and how it reaches its database.

The proxy is configured by the same YAML documents as the operator (examples/, docs/crd-reference.md) plus one
`ProxyConfig`. Upstream credentials come from a mounted folder (the operator's rotating
Secret: files `username` and `password`, re-read for every new upstream connection), a file,
an environment variable or, for development, the config itself.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scramp

from pgwarden.connection import DatabaseConnection, parse_connection
from pgwarden.resources import Document, ResourceError, get_field, of_kind, parse_duration

# Client startup parameters forwarded upstream. Everything else (notably `options`, which can
# carry `-c role=…` or `-c search_path=…`) is dropped; client_encoding is pinned to UTF8.
FORWARDED_STARTUP_PARAMS = frozenset(
    {
        "application_name",
        "DateStyle",
        "TimeZone",
        "IntervalStyle",
        "extra_float_digits",
        "datestyle",
        "timezone",
        "intervalstyle",
    }
)


# 512 KiB: the worst text of this size measured (a long OR chain) peaks at ~125 MB in the
# analysis process and ~35 MB more in the proxy, so both stay well inside the sidecar's 256 MiB
# limit; at 1 MiB the two together came near 300 MB. Far above what a hand- or agent-written
# statement needs, and 128 times below the message limit. Bulk data belongs in COPY or parameters.
DEFAULT_MAX_STATEMENT_BYTES = 512 * 1024
# Above 16 KiB a single parse-tree decode (json.loads) holds the interpreter for ~30 ms or more,
# so longer texts are analysed in the analysis worker, not on the event loop.
DEFAULT_ANALYSIS_OFFLOAD_BYTES = 16 * 1024
DEFAULT_ANALYSIS_TIMEOUT = 10.0


@dataclass(frozen=True)
class StaticUser:
    """A development user with a password in the config. Not for production: use tokens."""

    name: str
    # scramp auth info: (salt, stored_key, server_key, iterations)
    scram: tuple[bytes, bytes, bytes, int]
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamCredentials:
    """Where the upstream login comes from; resolved anew for every upstream connection."""

    credentials_dir: str = ""
    username: str = ""
    password: str = ""
    password_env: str = ""
    password_file: str = ""

    def resolve(self) -> tuple[str, str]:
        if self.credentials_dir:
            d = Path(self.credentials_dir)
            try:
                return read_credentials_dir(d)
            except OSError as e:
                raise RuntimeError(
                    f"cannot read upstream credentials from {d}: {e.strerror}; is the credentials Secret mounted?"
                ) from e
        if self.password_file:
            try:
                return self.username, Path(self.password_file).read_text().strip()
            except OSError as e:
                raise RuntimeError(f"cannot read upstream password file {self.password_file}: {e.strerror}") from e
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise RuntimeError(f"environment variable {self.password_env} (upstream password) is not set")
            return self.username, value
        return self.username, self.password


def read_credentials_dir(d: Path, attempts: int = 20) -> tuple[str, str]:
    """`username` and `password` from one version of a mounted Secret.

    kubelet updates a Secret volume by writing a new timestamped folder, swapping the `..data`
    symlink to it and deleting the old folder; each key is a symlink through `..data`. Reading
    the two keys one after the other through `..data` can pair the new username with the old
    password, or find the old folder gone: resolve `..data` once, read both keys from that
    folder, and start again if it was deleted meanwhile (kubelet swaps about once a minute, so
    more than one retry means the folder is broken, not busy; 20 covers a loaded machine).
    """
    data = d / "..data"
    for attempt in range(attempts):
        base = Path(os.path.realpath(data)) if data.is_symlink() else d
        try:
            return (base / "username").read_text().strip(), (base / "password").read_text().strip()
        except FileNotFoundError:
            if base == d or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ProxyConfig:
    connection: DatabaseConnection
    listen_host: str = "127.0.0.1"
    listen_port: int = 5432
    health_host: str = "127.0.0.1"
    health_port: int = 0  # 0: no health endpoint
    tls_cert_file: str = ""
    tls_key_file: str = ""
    upstream: UpstreamCredentials = field(default_factory=UpstreamCredentials)
    upstream_unix_socket: str = ""
    upstream_connect_timeout: float = 10.0
    users: tuple[StaticUser, ...] = ()
    search_path: tuple[str, ...] = ("public",)
    # applies only when no AccessPolicy document names this connection
    default_action: str = "deny"
    # sidecar mode: a loopback connection comes from a container of this pod, so it is the pod's
    # service account (kubelet's downward API), with no password to steal or replay
    pod_identity: bool = False
    max_message_bytes: int = 64 * 1024 * 1024
    # The longest Query or Parse text (bytes) the proxy accepts; longer ones are refused (54000)
    # and nothing of them reaches the server. Analysis cost and memory grow with the text, so this
    # bounds what one session can make the proxy do (docs/operating.md, "Statement limits").
    max_statement_bytes: int = DEFAULT_MAX_STATEMENT_BYTES
    # Texts longer than this are analysed off the event loop, within analysis_timeout seconds.
    analysis_offload_bytes: int = DEFAULT_ANALYSIS_OFFLOAD_BYTES
    analysis_timeout: float = DEFAULT_ANALYSIS_TIMEOUT
    max_startup_bytes: int = 10000
    drain_timeout: float = 30.0
    handshake_timeout: float = 30.0
    # sections owned by other components (identity, audit, recording, approvals), kept raw
    sections: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)


def _scram_from_spec(doc: Document, u: Mapping[str, Any], path: str) -> tuple[bytes, bytes, bytes, int]:
    verifier = u.get("scramVerifier")
    if verifier:
        # PostgreSQL's format: SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>
        try:
            head, keys = verifier.split("$", 1)[1].split("$")
            it, salt = head.split(":")
            stored, server = keys.split(":")
            return base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server), int(it)
        except (ValueError, IndexError) as e:
            raise doc.error(f"{path}.scramVerifier", "is not a SCRAM-SHA-256 verifier as pg_authid stores it") from e
    password = u.get("password")
    env = u.get("passwordEnv")
    if env:
        password = os.environ.get(env)
        if password is None:
            raise doc.error(f"{path}.passwordEnv", f"environment variable {env} is not set")
    if not isinstance(password, str) or not password:
        raise doc.error(path, "needs one of password, passwordEnv or scramVerifier")
    salt, stored, server, it = scramp.ScramMechanism().make_auth_info(password, iteration_count=4096)
    return salt, stored, server, it


def parse_proxy_config(docs: list[Document]) -> ProxyConfig:
    """Build the ProxyConfig from a set of documents (exactly one ProxyConfig)."""
    pcs = of_kind(docs, "ProxyConfig")
    if len(pcs) != 1:
        raise ResourceError("configuration", "", f"expected exactly one ProxyConfig document, found {len(pcs)}")
    doc = pcs[0]
    s = doc.spec
    conns = {d.name: d for d in of_kind(docs, "DatabaseConnection")}
    ref = get_field(doc, s, "connectionRef", Mapping, "spec.connectionRef", None)
    if ref is None:
        if len(conns) != 1:
            raise doc.error("spec.connectionRef", "is required when there is not exactly one DatabaseConnection")
        conn_doc = next(iter(conns.values()))
    else:
        name = get_field(doc, ref, "name", str, "spec.connectionRef.name")
        if name not in conns:
            raise doc.error("spec.connectionRef.name", f"no DatabaseConnection named {name!r} in the configuration")
        conn_doc = conns[name]
    connection = parse_connection(conn_doc)

    listen = get_field(doc, s, "listen", Mapping, "spec.listen", {})
    health = get_field(doc, s, "health", Mapping, "spec.health", {})
    tls = get_field(doc, s, "tls", Mapping, "spec.tls", {})
    up = get_field(doc, s, "upstream", Mapping, "spec.upstream", {})
    limits = get_field(doc, s, "limits", Mapping, "spec.limits", {})

    users = []
    for i, u in enumerate(get_field(doc, s, "users", list, "spec.users", [])):
        path = f"spec.users[{i}]"
        if not isinstance(u, Mapping):
            raise doc.error(path, "must be a mapping with name, password and groups")
        groups = get_field(doc, u, "groups", list, f"{path}.groups", [])
        users.append(
            StaticUser(
                name=get_field(doc, u, "name", str, f"{path}.name"),
                scram=_scram_from_spec(doc, u, path),
                groups=tuple(str(g) for g in groups),
            )
        )
    pod_identity = get_field(doc, s, "podIdentity", bool, "spec.podIdentity", False)
    default_action = get_field(doc, s, "defaultAction", str, "spec.defaultAction", "deny")
    if default_action not in ("allow", "deny"):
        raise doc.error("spec.defaultAction", "must be allow or deny")
    search_path = get_field(doc, s, "searchPath", list, "spec.searchPath", ["public"])
    max_message = get_field(doc, limits, "maxMessageBytes", int, "spec.limits.maxMessageBytes", 64 * 1024 * 1024)
    max_statement = get_field(doc, limits, "maxStatementBytes", int, "spec.limits.maxStatementBytes",
                              min(DEFAULT_MAX_STATEMENT_BYTES, max_message))
    if not 0 < max_statement <= max_message:
        raise doc.error("spec.limits.maxStatementBytes", f"must be between 1 and maxMessageBytes ({max_message})")
    analysis_timeout = parse_duration(limits.get("analysisTimeout", DEFAULT_ANALYSIS_TIMEOUT), doc,
                                      "spec.limits.analysisTimeout")
    if analysis_timeout <= 0:
        raise doc.error("spec.limits.analysisTimeout", "must be a positive duration such as 10s")
    known = {
        "connectionRef", "listen", "health", "tls", "upstream", "users", "searchPath", "defaultAction",
        "limits", "drainTimeout", "handshakeTimeout", "podIdentity",
    }
    return ProxyConfig(
        connection=connection,
        listen_host=get_field(doc, listen, "host", str, "spec.listen.host", "127.0.0.1"),
        listen_port=get_field(doc, listen, "port", int, "spec.listen.port", 5432),
        health_host=get_field(doc, health, "host", str, "spec.health.host", "127.0.0.1"),
        health_port=get_field(doc, health, "port", int, "spec.health.port", 0),
        tls_cert_file=get_field(doc, tls, "certFile", str, "spec.tls.certFile", ""),
        tls_key_file=get_field(doc, tls, "keyFile", str, "spec.tls.keyFile", ""),
        upstream=UpstreamCredentials(
            credentials_dir=get_field(doc, up, "credentialsDir", str, "spec.upstream.credentialsDir", ""),
            username=get_field(doc, up, "username", str, "spec.upstream.username", ""),
            password=get_field(doc, up, "password", str, "spec.upstream.password", ""),
            password_env=get_field(doc, up, "passwordEnv", str, "spec.upstream.passwordEnv", ""),
            password_file=get_field(doc, up, "passwordFile", str, "spec.upstream.passwordFile", ""),
        ),
        upstream_unix_socket=get_field(doc, up, "unixSocket", str, "spec.upstream.unixSocket", ""),
        upstream_connect_timeout=parse_duration(up.get("connectTimeout", 10), doc, "spec.upstream.connectTimeout"),
        users=tuple(users),
        search_path=tuple(str(x) for x in search_path),
        default_action=default_action,
        pod_identity=pod_identity,
        max_message_bytes=max_message,
        max_statement_bytes=max_statement,
        analysis_offload_bytes=get_field(doc, limits, "analysisOffloadBytes", int, "spec.limits.analysisOffloadBytes",
                                         DEFAULT_ANALYSIS_OFFLOAD_BYTES),
        analysis_timeout=analysis_timeout,
        drain_timeout=parse_duration(s.get("drainTimeout", 30), doc, "spec.drainTimeout"),
        handshake_timeout=parse_duration(s.get("handshakeTimeout", 30), doc, "spec.handshakeTimeout"),
        sections={k: v for k, v in s.items() if k not in known},
    )
