"""Assembling the per-proxy Runtime from the configuration documents.

`prepare_runtime` validates everything synchronously (so `pgwarden proxy` refuses to start on a
bad policy instead of falling open); `open_runtime` then opens what needs I/O (the audit log,
the masking catalog, the approval backend). Without AccessPolicy documents for the connection,
`ProxyConfig.spec.defaultAction` decides: `allow` forwards everything (development only),
`deny` (the default) refuses every statement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pgwarden.errors import PolicyDenied
from pgwarden.proxy import messages as m
from pgwarden.proxy.analysis_budget import AnalysisOffload
from pgwarden.proxy.config import ProxyConfig
from pgwarden.proxy.gate import Runtime, SessionGate
from pgwarden.proxy.relay import ForwardingGate, Gate, Observer, Verdict
from pgwarden.proxy.session import PortalEntry, PreparedEntry
from pgwarden.proxy.sessioninfo import SessionHooks, SessionInfo
from pgwarden.resources import Document, of_kind

log = logging.getLogger("pgwarden.proxy")


class DenyAll(ForwardingGate):
    """No policy covers this connection: nothing runs, whichever message asks for it."""

    def __init__(self, connection: str) -> None:
        self._verdict = Verdict(
            error=PolicyDenied(
                f"no AccessPolicy covers connection {connection!r}, so every statement is denied",
                hint="Ask your platform team for an AccessPolicy that names you as a subject.",
            )
        )

    def query(self, sql: str) -> Verdict | None:
        return self._verdict

    def parse(self, name: str, sql: str) -> Verdict | None:
        return self._verdict

    def bind(self, bind: m.BindMsg, statement: PreparedEntry | None) -> Verdict | None:
        return self._verdict

    def execute(self, name: str, portal: PortalEntry | None) -> Verdict | None:
        return self._verdict


def _names_connection(doc: Document, connection: str) -> bool:
    ref = doc.spec.get("connectionRef") or {}
    return isinstance(ref, dict) and ref.get("name") == connection


def _breaker(doc: Document) -> Any:
    """The circuit breaker (limits.maxDenials, maxStatementsPerMinute) and where its lockouts are
    kept: `spec.lockouts.path` of the ProxyConfig (default pgwarden-data/lockouts.json)."""
    from pathlib import Path

    from pgwarden.audit.config import DEFAULT_DATA_DIR
    from pgwarden.proxy.circuit import CircuitBreaker
    from pgwarden.resources import get_field

    raw = get_field(doc, doc.spec, "lockouts", Mapping, "spec.lockouts", {})
    for k in raw:
        if k != "path":
            raise doc.error(f"spec.lockouts.{k}", "unknown field; expected path")
    path = get_field(doc, raw, "path", str, "spec.lockouts.path", f"{DEFAULT_DATA_DIR}/lockouts.json")
    return CircuitBreaker(Path(path))


def prepare_runtime(config: ProxyConfig, docs: list[Document]) -> Runtime:
    """Parse and check every section; raises ResourceError. No I/O yet."""
    from pgwarden.audit.config import parse_audit_config, parse_recording_config
    from pgwarden.identity.backoff import FailureBackoff
    from pgwarden.identity.workload import workload_from_env

    conn = config.connection.name
    pc_doc = of_kind(docs, "ProxyConfig")[0]
    rt = Runtime(connection=conn, search_path=config.search_path)
    rt.proxy_config = config  # approval previews open a connection of their own
    rt.workload = workload_from_env()
    rt.backoff = FailureBackoff()
    rt.breaker = _breaker(pc_doc)
    rt.offload = AnalysisOffload(config.analysis_offload_bytes, config.analysis_timeout)
    rt.audit_config = parse_audit_config(pc_doc.spec, pc_doc) if "audit" in pc_doc.spec else None
    rt.recording_config = parse_recording_config(pc_doc.spec, pc_doc) if "recording" in pc_doc.spec else None
    if any(_names_connection(d, conn) for d in of_kind(docs, "AccessPolicy")):
        from pgwarden.policy import load_policies

        rt.policies = load_policies(docs)
    if any(_names_connection(d, conn) for d in of_kind(docs, "MaskingRule")):
        from pgwarden.masking import load_masking

        rt.masking = load_masking(docs)
    rt.approvals_config = pc_doc.spec.get("approvals")
    rt.identity_config = None
    if "identity" in pc_doc.spec:
        from pgwarden.identity.config import parse_identity_config

        rt.identity_config = parse_identity_config(pc_doc.spec, pc_doc)
    return rt


async def open_runtime(rt: Runtime, config: ProxyConfig) -> None:
    """Open the audit log, the approval backend and the masking catalog."""
    if rt.audit_config is not None:
        from pgwarden.audit.log import AuditLog
        from pgwarden.audit.sinks import build_sinks

        rt.audit = AuditLog(rt.audit_config, sinks=build_sinks(rt.audit_config))
        # An unwritable audit path does not stop the proxy: every statement is refused (PW004)
        # until the path works again, and /readyz says so.
        await rt.audit.open()
    if rt.recording_config is not None:
        from pgwarden.audit.recording import open_recorder, open_store

        rcfg = rt.recording_config
        store = open_store(rcfg)  # one per process: the folder's total cap spans all sessions

        def recorder(info: SessionInfo) -> Any:
            return open_recorder(rcfg, info.id, info.audit.base("session.start"), store)

        rt.recorder_factory = recorder
    if rt.approvals_config:
        from pgwarden.approvals import backend_from_config

        rt.approvals = backend_from_config(rt.approvals_config)
    if rt.masking is not None:
        await open_catalog(rt, config)
    if rt.identity_config is not None and rt.identity_config.accepts_tokens:
        from pgwarden.identity.authenticator import TokenAuthenticator

        rt.token_auth = TokenAuthenticator(rt.identity_config)


def catalog_connection(config: ProxyConfig) -> Any:
    """A side connection for reading the catalog, with the proxy's own upstream login."""
    import pg8000.native

    from pgwarden.proxy.upstream import ssl_context_for

    conn = config.connection
    user, password = config.upstream.resolve()
    kw: dict[str, Any] = {}
    if config.upstream_unix_socket:
        kw["unix_sock"] = f"{config.upstream_unix_socket.rstrip('/')}/.s.PGSQL.{conn.port}"
    else:
        kw.update(host=conn.host, port=conn.port, ssl_context=ssl_context_for(conn.ssl_mode, conn.ssl_root_cert))
    return pg8000.native.Connection(user, password=password, database=conn.database, timeout=30, **kw)


async def open_catalog(rt: Runtime, config: ProxyConfig) -> None:
    """The catalog masking plans against, read on a side connection with the proxy's login."""
    from pgwarden.masking import CatalogCache

    rt.catalog = CatalogCache(lambda: catalog_connection(config))
    try:
        await asyncio.to_thread(rt.catalog.refresh)
    except Exception as e:  # the database may be down: masking then treats every relation as unknown
        log.warning("could not read the catalog for masking (%s); every column is masked until it can", e)


async def close_runtime(rt: Runtime) -> None:
    if rt.tasks:
        await asyncio.wait(list(rt.tasks), timeout=10)
    if rt.approvals is not None:
        await rt.approvals.close()
    if rt.audit is not None:
        await rt.audit.close()
    if rt.token_auth is not None:
        await rt.token_auth.close()
    if rt.offload is not None:
        rt.offload.close()



def session_hooks(rt: Runtime, config: ProxyConfig) -> SessionHooks | None:
    """The factory of per-session gates the server calls after authentication."""
    if rt.policies is None:
        if config.default_action == "allow" and rt.audit is None and rt.recorder_factory is None and rt.masking is None:
            return None  # nothing to decide, record or mask: the lean relay
        if config.default_action == "deny":
            deny = DenyAll(rt.connection)

            def deny_all(info: SessionInfo, notify: Callable[[bytes], None]) -> tuple[Gate | None, Observer | None]:
                return deny, None

            return deny_all

    def hooks(info: SessionInfo, notify: Callable[[bytes], None]) -> tuple[Gate | None, Observer | None]:
        gate = SessionGate(rt, info, notify)
        gate.state.server_version = info.server_version  # the catalog names of this server's release
        return gate, gate

    return hooks
