"""AccessPolicy / MaskingRule -> the connection's bundle ConfigMap, and their statuses.

Any change to one of them recompiles the whole bundle of its connection: every object of that
connection is validated, and the ConfigMap is only replaced when all are valid (the last good
bundle stays otherwise). Each object's status says whether it is valid, in the bundle, and
which tables/columns the live catalog does not know.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf

from pgwarden.connection import DatabaseConnection, parse_connection
from pgwarden.k8s import client as kube
from pgwarden.k8s import names
from pgwarden.operator import bundle as bundle_mod
from pgwarden.operator import credentials, database, injection, status
from pgwarden.operator.handlers.admin import read_admin
from pgwarden.operator.runtime import Runtime
from pgwarden.resources import ResourceError, document_from_object

PLURALS: dict[str, names.Plural] = {"AccessPolicy": names.ACCESS_POLICIES, "MaskingRule": names.MASKING_RULES}


async def rebuild_bundle(
    namespace: str, connection: str, runtime: Runtime, logger: kopf.Logger, *,
    connection_body: Mapping[str, Any] | None = None, admin: database.AdminCredentials | None = None,
    exclude: tuple[str, str] | None = None,
) -> bundle_mod.BundleResult | None:
    """Recompile and publish the bundle of one connection; None when the connection does not exist."""
    k = runtime.kube
    body = connection_body or await k.get(kube.path(names.API_VERSION, names.DATABASE_CONNECTIONS, namespace, connection))
    objects = [o for plural in PLURALS.values() for o in await k.list(kube.path(names.API_VERSION, plural, namespace))]
    objects = [o for o in objects if bundle_mod.connection_of(o) == connection
               and (o.get("kind"), (o.get("metadata") or {}).get("name")) != exclude
               and not (o.get("metadata") or {}).get("deletionTimestamp")]
    if body is None:
        for o in objects:
            why = (f"DatabaseConnection {connection!r} does not exist in namespace {namespace}; create it "
                   "or fix spec.connectionRef.name")
            await _patch_status(runtime, o, {"phase": "Invalid", "conditions": status.merge_conditions(
                (o.get("status") or {}).get("conditions"),
                [status.condition("Compiled", False, "ConnectionNotFound", why),
                 status.condition("Ready", False, "ConnectionNotFound", why)])})
        return None
    try:
        conn = parse_connection(document_from_object({**body, "kind": "DatabaseConnection"}, source="DatabaseConnection"))
    except ResourceError:
        return None  # the connection's own handler reports that
    catalog = await _catalog(conn, runtime, admin, logger)
    result = bundle_mod.compile_bundle(body, objects, conn, runtime.settings.injection,
                                       has_ca=bool(admin and admin.sslrootcert), catalog=catalog,
                                       operator_ca=runtime.operator_ca)
    published = False
    if result.data is not None:
        cm_path = kube.path("v1", "configmaps", namespace, injection.bundle_configmap_name(connection))
        existing = await k.get(cm_path)
        desired = bundle_mod.bundle_configmap(conn, result, body)
        foreign = credentials.not_ours(existing, body)
        if foreign:
            result.published, result.reason, result.problem = False, "ConfigMapNotOwned", foreign
            logger.warning(f"bundle of {connection} not published: {foreign}")
        elif existing is None:
            await k.apply(kube.path("v1", "configmaps", namespace), desired)
            logger.info(f"bundle of {connection} published: {result.digest}")
        elif (drift := bundle_mod.configmap_drift(existing, desired)) is not None:
            # a new digest, or a hand edit (of any key, not only the digest): the compiled bundle wins
            await k.patch(cm_path, drift)
            logger.info(f"bundle of {connection} published: {result.digest}")
        published = result.published
    else:
        logger.warning(f"bundle of {connection} not updated: {result.problem}")
    for o in objects:
        meta = o.get("metadata") or {}
        kind, name = o.get("kind"), meta.get("name")
        report = result.reports.get((kind, name)) if isinstance(kind, str) and isinstance(name, str) else None
        if report is None:
            continue
        await _patch_status(runtime, o, status.compiled_status(
            report.errors, report.warnings, result.digest, meta.get("generation"),
            (o.get("status") or {}).get("conditions"), published))
    return result


async def _catalog(conn: DatabaseConnection, runtime: Runtime, admin: database.AdminCredentials | None,
                   logger: kopf.Logger) -> dict[str, set[str]] | None:
    """The live catalog for warnings; None (no warnings) when the database cannot be asked."""
    try:
        if admin is None:
            admin = await read_admin(conn, runtime)
        return await asyncio.to_thread(database.catalog_columns, conn, admin, timeout=runtime.settings.connect_timeout)
    except database.DatabaseProblem as e:
        logger.info(f"no catalog check for {conn.name}: {e}")
        return None


async def _patch_status(runtime: Runtime, obj: Mapping[str, Any], body: dict[str, Any]) -> None:
    meta = obj.get("metadata") or {}
    plural = PLURALS[str(obj.get("kind"))]
    url = kube.path(names.API_VERSION, plural, meta.get("namespace"), meta.get("name"), "status")
    await runtime.kube.patch(url, {"status": body})


async def on_change(body: Mapping[str, Any], runtime: Runtime, logger: kopf.Logger,
                    *, deleted: bool = False, old_connection: str | None = None) -> None:
    meta = body.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    exclude = (str(body.get("kind")), str(meta.get("name"))) if deleted else None
    connections = {c for c in (bundle_mod.connection_of(body), old_connection) if c}
    for connection in sorted(connections):
        async with runtime.lock(namespace, connection):
            await rebuild_bundle(namespace, connection, runtime, logger, exclude=exclude)
