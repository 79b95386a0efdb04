"""DatabaseConnection: admin Secret -> PostgreSQL -> login roles -> credentials Secret -> status.

Runs on create/update/resume and on a timer (reconciliation against reality, not only on
changes). Errors are kopf TemporaryErrors (retried with a delay, reported in conditions and
Events); a spec the operator can never act on is a PermanentError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, MutableMapping
from typing import Any, TypeVar

import kopf

from pgwarden.connection import DatabaseConnection, parse_connection
from pgwarden.k8s import client as kube
from pgwarden.k8s.names import ANNOTATION_SKIP_ROLE_CLEANUP
from pgwarden.operator import bundle as bundle_mod
from pgwarden.operator import credentials, database, injection, status
from pgwarden.operator.handlers.admin import read_admin
from pgwarden.operator.handlers.policies import rebuild_bundle
from pgwarden.operator.rotation import Action, RotationSpec
from pgwarden.operator.runtime import Runtime, for_events
from pgwarden.resources import ResourceError, document_from_object
from pgwarden.times import iso

API_TIMEOUT = 30.0  # seconds for one API call made while the rotation lock is held
T = TypeVar("T")


def parse(body: Mapping[str, Any]) -> DatabaseConnection:
    raw = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body.get("metadata") or {}),
           "spec": dict(body.get("spec") or {})}
    try:
        conn = parse_connection(document_from_object(raw, source="DatabaseConnection"))
    except ResourceError as e:
        raise kopf.PermanentError(f"{e.field_path or 'spec'}: {e.problem}") from e
    if conn.admin_secret_ref is None:
        raise kopf.PermanentError("spec.adminSecretRef is required in a cluster: name a Secret with the keys username "
                                  "and password of a PostgreSQL role with CREATEROLE")
    return conn


def rotation_spec(conn: DatabaseConnection, runtime: Runtime) -> RotationSpec:
    scale = runtime.settings.rotation.time_scale
    return RotationSpec(interval=conn.credentials.rotation_interval * scale, grace=conn.credentials.grace_period * scale)


async def reconcile(
    body: Mapping[str, Any], patch: MutableMapping[str, Any], runtime: Runtime, logger: kopf.Logger,
) -> None:
    conn = parse(body)
    async with runtime.lock(conn.namespace, conn.name):
        await _reconcile_locked(conn, body, patch, runtime, logger)


async def _reconcile_locked(
    conn: DatabaseConnection, body: Mapping[str, Any], patch: MutableMapping[str, Any], runtime: Runtime,
    logger: kopf.Logger,
) -> None:
    generation = (body.get("metadata") or {}).get("generation")
    prev = (body.get("status") or {}).get("conditions")
    st: dict[str, Any] = patch.setdefault("status", {})
    st["observedGeneration"] = generation
    secret_path = kube.path("v1", "secrets", conn.namespace, conn.secret_name)
    loop = asyncio.get_running_loop()

    def on_loop(coro: Coroutine[Any, Any, T]) -> T:
        # the database pass runs in a thread; the API client lives on this loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(API_TIMEOUT)

    def read_secret_version() -> int | None:
        return credentials.secret_version(on_loop(runtime.kube.get(secret_path)))

    def publish(outcome: database.RotationOutcome) -> None:
        assert outcome.password is not None
        foreign = credentials.not_ours(on_loop(runtime.kube.get(secret_path)), body)
        if foreign:  # appeared since the check below: never overwrite it
            raise database.DatabaseProblem("SecretNotOwned", foreign)
        secret = credentials.credentials_secret(
            conn, username=outcome.plan.active, password=outcome.password, version=outcome.plan.version,
            sslrootcert=admin.sslrootcert, owner=body,
        )
        on_loop(runtime.kube.apply(kube.path("v1", "secrets", conn.namespace), secret))

    try:
        foreign = credentials.not_ours(await runtime.kube.get(secret_path), body)
        if foreign:
            raise database.DatabaseProblem("SecretNotOwned", foreign)
        admin = await read_admin(conn, runtime)
        # the Secret is read and written under the database's rotation lock (two replicas)
        outcome = await asyncio.to_thread(
            database.reconcile_roles, conn, admin, rotation_spec(conn, runtime), None,
            timeout=runtime.settings.connect_timeout, clock=runtime.clock,
            read_secret_version=read_secret_version, publish=publish,
        )
    except database.DatabaseProblem as e:
        reachable = (None if e.reason in ("AdminSecretInvalid", "SecretNotOwned")
                     else e.reason in ("GrantRoleMissing", "SQLFailed"))
        creds_cond = status.condition("CredentialsReady", False, e.reason, str(e), generation)
        reach = status.condition("Reachable", reachable, "Connected" if reachable else e.reason, str(e), generation)
        st["conditions"], st["phase"] = status.connection_conditions(prev, [reach, creds_cond], generation)
        kopf.warn(for_events(body), reason=e.reason, message=str(e))
        raise kopf.TemporaryError(str(e), delay=runtime.settings.rotation.retry_delay) from e

    plan = outcome.plan
    if plan.action is not Action.NONE:
        logger.info(f"credentials: {plan.action.value} ({plan.reason}); active role {plan.active}, version {plan.version}")
        kopf.info(for_events(body), reason=f"Credentials{plan.action.value.capitalize()}",
                  message=f"{plan.reason}: active role {plan.active}, version {plan.version}"
                  + (f"; {plan.retire} disabled and its sessions terminated" if plan.retire else ""))

    conds = [
        status.condition("Reachable", True, "Connected", f"PostgreSQL {outcome.server_version}", generation),
        status.condition("CredentialsReady", True, "Rotated" if plan.action is Action.ROTATE else "Current",
                         f"{plan.active} active, version {plan.version}", generation),
    ]
    creds_status: dict[str, Any] = {
        "secretName": conn.secret_name,
        "activeRole": plan.active,
        "version": plan.version,
        "nextRotationAt": iso(plan.next_rotation_at),
        "graceEndsAt": iso(plan.grace_ends_at) if plan.grace_ends_at else None,
    }
    if plan.activated_at:
        creds_status["rotatedAt"] = iso(plan.activated_at)
    if plan.action is not Action.NONE:
        creds_status["lastAction"] = plan.action.value
    st["serverVersion"] = outcome.server_version
    st["credentials"] = creds_status

    # the bundle follows the connection too (new connection, changed host/port, CA appeared)
    try:
        result = await rebuild_bundle(conn.namespace, conn.name, runtime, logger, connection_body=body, admin=admin)
    except kube.ApiError as e:
        result = None
        conds.append(status.condition("BundleReady", False, "ApiError", str(e), generation))
    if result is not None:
        conds.append(_bundle_condition(result, generation))
        if result.data is not None and result.published:
            st["bundle"] = {"configMapName": injection.bundle_configmap_name(conn.name), "digest": result.digest,
                            "updatedAt": iso(runtime.clock()),
                            "policies": sum(1 for k in result.reports if k[0] == "AccessPolicy"),
                            "maskingRules": sum(1 for k in result.reports if k[0] == "MaskingRule")}
    st["conditions"], st["phase"] = status.connection_conditions(prev, conds, generation)


def _bundle_condition(result: bundle_mod.BundleResult, generation: int | None) -> dict[str, Any]:
    if result.data is None or not result.published:
        return status.condition("BundleReady", False, result.reason, result.problem, generation)
    return status.condition("BundleReady", True, "Published", f"bundle {result.digest}", generation)


async def delete(body: Mapping[str, Any], runtime: Runtime, logger: kopf.Logger) -> None:
    """Finalizer: drop both login roles, then remove the Secret and the bundle ConfigMap."""
    try:
        conn = parse(body)
    except kopf.PermanentError:
        return  # never had roles we could have created
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    async with runtime.lock(conn.namespace, conn.name):
        if annotations.get(ANNOTATION_SKIP_ROLE_CLEANUP, "").lower() != "true":
            try:
                admin = await read_admin(conn, runtime)
                dropped = await asyncio.to_thread(database.drop_roles, conn, admin, timeout=runtime.settings.connect_timeout)
            except database.DatabaseProblem as e:
                msg = (f"{e} — the login roles could not be dropped; fix it, or annotate the DatabaseConnection "
                       f"{ANNOTATION_SKIP_ROLE_CLEANUP}=true to delete it and leave the roles behind")
                kopf.warn(for_events(body), reason=e.reason, message=msg)
                raise kopf.TemporaryError(msg, delay=runtime.settings.rotation.retry_delay) from e
            logger.info(f"dropped login roles: {', '.join(dropped) or 'none existed'}")
        for path in (kube.path("v1", "secrets", conn.namespace, conn.secret_name),
                     kube.path("v1", "configmaps", conn.namespace, injection.bundle_configmap_name(conn.name))):
            foreign = credentials.not_ours(await runtime.kube.get(path), body)
            if foreign:
                logger.warning(f"not deleting it: {foreign}")
            else:
                await runtime.kube.delete(path)
