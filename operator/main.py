"""`pgwarden operator`: every kopf registration in one thin module.

The handlers live in `handlers/` as typed functions; this module only wires kopf's arguments to
them. `register()` takes the registry and the runtime explicitly, so tests run the real
operator with their own settings (tiny rotation intervals) against kmock's emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from dataclasses import replace
from typing import Any

import kopf

from pgwarden.k8s import names
from pgwarden.k8s.client import Kube, load_api_config
from pgwarden.operator import approval_gateway
from pgwarden.operator.handlers import admission, approvals, connection, policies, workloads
from pgwarden.operator.runtime import Runtime
from pgwarden.operator.settings import OperatorSettings
from pgwarden.operator.webhook_server import WebhookServer

CONNECTIONS = (names.GROUP, names.VERSION, names.DATABASE_CONNECTIONS)
POLICIES = (names.GROUP, names.VERSION, names.ACCESS_POLICIES)
MASKING = (names.GROUP, names.VERSION, names.MASKING_RULES)
WORKLOADS = (("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"), ("apps", "v1", "daemonsets"),
             ("batch", "v1", "cronjobs"), ("batch", "v1", "jobs"))
INJECT_PRESENT = {names.ANNOTATION_INJECT: kopf.PRESENT}


def configure_kopf(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """kopf's own settings, derived from ours."""
    # keep kopf's bookkeeping in annotations: a structural CRD status would prune status.kopf
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.KOPF_ANNOTATIONS_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=names.KOPF_ANNOTATIONS_PREFIX,
                                                                            key="last-handled-configuration")
    settings.persistence.finalizer = names.FINALIZER
    settings.posting.level = logging.INFO
    if ours.peering_name:
        settings.peering.name = ours.peering_name
        settings.peering.mandatory = True
        settings.peering.clusterwide = not ours.namespaces
        # kopf pauses *every* operator that sees a peer of its own priority: replicas must differ,
        # and the highest one is the active one
        settings.peering.priority = (ours.peering_priority if ours.peering_priority is not None
                                     else random.SystemRandom().randrange(1, 2**31))
    wh = ours.webhook
    if wh.enabled:
        settings.admission.server = WebhookServer(
            addr=wh.addr, port=wh.port, host=wh.host, certfile=wh.certfile, pkeyfile=wh.pkeyfile, cafile=wh.cafile,
            cadump=wh.cadump,
        )
        settings.admission.managed = wh.managed


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    ours = runtime.settings

    @kopf.on.startup(registry=registry)
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, ours)

    @kopf.on.login(registry=registry)
    def _login(**_: Any) -> kopf.ConnectionInfo:
        c = runtime.kube.config
        return kopf.ConnectionInfo(server=c.server, token=c.bearer_token(), ca_path=c.ca_file, certificate_path=c.cert_file,
                                   private_key_path=c.key_file, insecure=c.insecure,
                                   default_namespace=c.default_namespace)

    gateway: dict[str, approval_gateway.RunningGateway] = {}

    # before any handler compiles a bundle: the bundles carry the gateway's CA
    @kopf.on.startup(registry=registry)
    async def _start_gateway(**_: Any) -> None:
        if ours.gateway.enabled:
            gateway["running"] = await approval_gateway.serve(runtime)

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(**_: Any) -> None:
        if "running" in gateway:
            await gateway.pop("running").stop()
        await runtime.kube.close()

    # -- DatabaseConnection ---------------------------------------------------------------
    # the webhook needs the connections of each namespace without an API call per pod (kopf's
    # indexes are not passed to admission handlers, so the watch stream feeds a plain dict; a
    # standby replica, which watches nothing, reads what it lacks from the API)
    @kopf.on.event(*CONNECTIONS, registry=registry)
    def _track(event: kopf.RawEvent, namespace: str | None, name: str, spec: Any, **_: Any) -> None:
        if event.get("type") == "DELETED":
            runtime.connections.pop((namespace or "", name), None)
        else:
            runtime.connections[(namespace or "", name)] = admission.secret_name(name, spec)

    @kopf.on.resume(*CONNECTIONS, registry=registry, id="reconcile")
    @kopf.on.create(*CONNECTIONS, registry=registry, id="reconcile")
    @kopf.on.update(*CONNECTIONS, registry=registry, id="reconcile", field="spec")
    async def _connection(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
        await connection.reconcile(body, patch, runtime, logger)

    @kopf.timer(*CONNECTIONS, registry=registry, id="rotate", interval=ours.rotation.check_interval,
                initial_delay=ours.rotation.check_interval)
    async def _rotate(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
        await connection.reconcile(body, patch, runtime, logger)

    @kopf.on.delete(*CONNECTIONS, registry=registry, id="cleanup")
    async def _connection_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        await connection.delete(body, runtime, logger)

    # -- AccessPolicy / MaskingRule -> bundle -----------------------------------------------
    for resource in (POLICIES, MASKING):
        @kopf.on.resume(*resource, registry=registry, id="compile")
        @kopf.on.create(*resource, registry=registry, id="compile")
        @kopf.on.update(*resource, registry=registry, id="compile", field="spec")
        async def _compile(body: kopf.Body, old: Any, logger: kopf.Logger, **_: Any) -> None:
            previous = ((old or {}).get("connectionRef") or {}).get("name") if isinstance(old, dict) else None
            await policies.on_change(body, runtime, logger, old_connection=previous)

        @kopf.on.delete(*resource, registry=registry, id="compile-on-delete", optional=True)
        async def _compile_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
            await policies.on_change(body, runtime, logger, deleted=True)

    # -- injection ------------------------------------------------------------------------
    if ours.webhook.enabled:
        @kopf.on.mutate("", "v1", "pods", registry=registry, id="pgwarden-inject", operations=["CREATE"],
                        ignore_failures=True, side_effects=False)
        async def _inject(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
            await admission.mutate_pod(body, patch, runtime, logger)

        # failure policy Fail (chart): `kubectl debug` on an injected pod waits for the operator
        @kopf.on.validate("", "v1", "pods", registry=registry, id="pgwarden-ephemeral", subresource="ephemeralcontainers",
                          operations=["UPDATE"], side_effects=False)
        def _ephemeral(body: kopf.Body, **_: Any) -> None:
            admission.validate_ephemeral(body)

        for group, version, plural in WORKLOADS:
            @kopf.on.mutate(group, version, plural, registry=registry, id="pgwarden-carry", operations=["CREATE"],
                            ignore_failures=True, side_effects=False)
            def _carry_at_admission(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
                admission.mutate_workload(body, patch)

    # later annotations on existing workloads roll out through a template patch
    for group, version, plural in WORKLOADS if ours.carry_annotations else ():
        @kopf.on.resume(group, version, plural, registry=registry, id="pgwarden-carry", annotations=INJECT_PRESENT)
        @kopf.on.create(group, version, plural, registry=registry, id="pgwarden-carry", annotations=INJECT_PRESENT)
        @kopf.on.update(group, version, plural, registry=registry, id="pgwarden-carry", annotations=INJECT_PRESENT,
                        field="metadata.annotations")
        async def _carry(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
            await workloads.carry(body, runtime, logger)

    # -- ApprovalRequest: admission webhooks, status, expiry, retention -----------------------
    approvals.register(registry, runtime)


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    s = OperatorSettings.from_env()
    if getattr(args, "namespace", None):
        s = replace(s, namespaces=tuple(args.namespace))
    if getattr(args, "standalone", False):
        s = replace(s, peering_name=None)
    return s


async def run(runtime: Runtime, *, liveness: str | None = None, stop_flag: asyncio.Event | None = None,
              ready_flag: asyncio.Event | None = None) -> None:
    registry = kopf.OperatorRegistry()
    register(registry, runtime)
    s = runtime.settings
    await kopf.operator(
        registry=registry,
        clusterwide=not s.namespaces,
        namespaces=list(s.namespaces),
        standalone=s.peering_name is None,
        peering_name=s.peering_name,
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    runtime = Runtime(settings_from_args(args), Kube(load_api_config()))
    asyncio.run(run(runtime, liveness=getattr(args, "liveness", None)))
    return 0
