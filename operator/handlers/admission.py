"""Pod admission: inject the proxy into pods annotated `pgwarden.dev/inject: <connection>`.

Failure policy (the chart's, docs/operator.md): Fail, with matchConditions that send only
annotated, not yet injected pods — an annotated pod is not created while the operator is down,
and no other pod ever waits for it. kopf's self-managed configuration cannot express
matchConditions and stays Ignore (an uninjected pod still holds no database credentials).
Ephemeral containers of injected pods are checked by `validate_ephemeral`.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import kopf

from pgwarden.k8s import names
from pgwarden.operator import injection
from pgwarden.operator.runtime import Runtime, add_to_patch


def secret_name(connection: str, spec: Mapping[str, Any] | None) -> str:
    """The credentials Secret of a DatabaseConnection (spec.credentials.secretName or the default)."""
    creds = (spec or {}).get("credentials") or {}
    name = creds.get("secretName") if isinstance(creds, Mapping) else None
    return name if isinstance(name, str) and name else f"{connection}-pgwarden-credentials"


async def connection_secret(runtime: Runtime, namespace: str, connection: str) -> str | None:
    """The connection's credentials Secret; None if there is no such DatabaseConnection.

    From the watch stream's memory when this replica has it, else from the API: a standby
    replica (paused by kopf peering) watches nothing but still answers admission requests."""
    secret = runtime.connections.get((namespace, connection))
    if secret is not None:
        return secret
    try:
        obj = await runtime.read(names.DATABASE_CONNECTIONS, namespace, connection)
    except Exception as e:  # API down or forbidden: say so, do not guess
        raise kopf.AdmissionError(
            f"pgwarden cannot look up DatabaseConnection {namespace}/{connection}: {e}; try again", code=503) from e
    return secret_name(connection, obj.get("spec")) if obj is not None else None


async def target_for(runtime: Runtime, namespace: str, connection: str) -> injection.InjectionTarget:
    """The connection must exist in the pod's namespace (a pod can only mount local Secrets)."""
    secret = await connection_secret(runtime, namespace, connection)
    if secret is None:
        raise kopf.AdmissionError(
            f"pod annotation {names.ANNOTATION_INJECT}={connection}: there is no DatabaseConnection {connection!r} "
            f"in namespace {namespace}; create it there or fix the annotation", code=400)
    return injection.InjectionTarget.for_connection(connection, secret)


async def mutate_pod(body: Mapping[str, Any], patch: MutableMapping[str, Any], runtime: Runtime,
                     logger: kopf.Logger) -> None:
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    connection = injection.wants_injection(meta)
    if connection is None or injection.is_injected(meta, spec):
        return
    namespace = meta.get("namespace") or "default"
    target = await target_for(runtime, namespace, connection)
    try:
        injected = injection.inject_pod(body, target, runtime.settings.injection)
    except injection.InjectionError as e:
        raise kopf.AdmissionError(f"pgwarden cannot inject this pod: {e}", code=400) from e

    def replace(raw: MutableMapping[str, Any]) -> None:
        raw["metadata"], raw["spec"] = injected["metadata"], injected["spec"]

    patch.fns.append(replace)  # type: ignore[attr-defined]  # kopf.Patch: diffed into the JSON patch
    logger.info(f"injecting the pgwarden proxy for connection {connection}")


def validate_ephemeral(body: Mapping[str, Any]) -> None:
    """pods/ephemeralcontainers UPDATE: no debug container may reach the proxy's credentials."""
    try:
        injection.check_ephemeral_containers(body)
    except injection.InjectionError as e:
        raise kopf.AdmissionError(f"pgwarden refuses this ephemeral container: {e}", code=403) from e


def mutate_workload(body: Mapping[str, Any], patch: MutableMapping[str, Any]) -> None:
    """At creation, carry the workload's annotation into its pod template (Jobs' templates are
    immutable afterwards, so this is the only moment for them)."""
    carry = injection.carry_annotations_patch(body)
    if carry is not None:
        add_to_patch(patch, carry)
