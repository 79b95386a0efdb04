"""Helpers for running the real operator (kopf) against kmock's KubernetesEmulator over HTTP.

Not a plugin: imported by the operator tests, and named as `kmock_cls` in pyproject.toml so the
`kmock` fixture serves `ApiServerEmulator`. The emulator advertises every resource kopf
discovers (our CRDs from crds/, CRDs themselves, events, pods, secrets, configmaps, workloads,
webhook configurations, kopf's peering resources), so kopf runs cluster-wide as in a cluster.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from pgwarden.k8s import client as kube

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

CORE = {
    "v1/pods": ("Pod", {"status"}),
    "v1/secrets": ("Secret", set()),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/events": ("Event", set()),
    "v1/namespaces": ("Namespace", set()),
    "apps/v1/deployments": ("Deployment", {"status"}),
    "apps/v1/statefulsets": ("StatefulSet", {"status"}),
    "apps/v1/daemonsets": ("DaemonSet", {"status"}),
    "batch/v1/jobs": ("Job", {"status"}),
    "batch/v1/cronjobs": ("CronJob", {"status"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", {"status"}),
    "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations": ("MutatingWebhookConfiguration", set()),
    "admissionregistration.k8s.io/v1/validatingwebhookconfigurations": ("ValidatingWebhookConfiguration", set()),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", set()),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", set()),
}
CLUSTER_SCOPED = {"v1/namespaces", "apiextensions.k8s.io/v1/customresourcedefinitions",
                  "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                  "admissionregistration.k8s.io/v1/validatingwebhookconfigurations", "kopf.dev/v1/clusterkopfpeerings"}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the fields an API server writes into every object it creates.

    kmock stores a created object as posted. A real API server gives it a fresh
    `metadata.uid`, a `creationTimestamp`, a `resourceVersion`, and a name from `generateName`.
    kopf keys its per-object memory (timers, retries, the live body its timers see) by uid: without
    one every DatabaseConnection shares one memory, and a timer of one connection patches the
    status of another. kmock's docs say to inherit for such server-side fields; this does only that.
    """

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.action == kmock.action.CREATE and request.subresource is None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta.setdefault("resourceVersion", "1")
        return await super()._handle(request)


def load_crds() -> list[dict[str, Any]]:
    return [doc for f in sorted((ROOT / "crds").glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text())]


def advertise(emulator: kmock.KubernetesEmulator) -> None:
    for key, (kind, subs) in CORE.items():
        emulator.resources[key] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), verbs=VERBS, subresources=subs,
                                                     namespaced=key not in CLUSTER_SCOPED)
    for crd in load_crds():
        spec = crd["spec"]
        names = spec["names"]
        emulator.resources[f"{spec['group']}/v1alpha1/{names['plural']}"] = kmock.ResourceInfo(
            kind=names["kind"], singular=names["singular"], verbs=VERBS, shortnames=set(names["shortNames"]),
            categories=set(names["categories"]), subresources={"status"}, namespaced=True)
        emulator.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = crd


# What kopf watches and the tests create: the four CRDs and the workloads the webhook injects into.
WATCHED = frozenset({"databaseconnections", "accesspolicies", "maskingrules", "approvalrequests",
                     "deployments", "statefulsets", "daemonsets", "jobs", "cronjobs"})


async def watches_subscribed(emulator: kmock.KubernetesEmulator, plurals: frozenset[str] = WATCHED,
                             timeout: float = 15.0) -> None:
    """Wait until a watch-stream is subscribed to new events of every kind in `plurals`.

    kmock 0.8 answers a watch by streaming a snapshot of the objects and only then subscribing
    to its event bus: an object created in between is in neither, and kopf never hears of it (a
    real API server resumes the watch from the list's resourceVersion, so nothing falls in a
    gap). On a loaded machine that gap lasts long enough for a test's next create to land in it,
    so tests create objects only once every watch is subscribed. The emulator has no public
    view of its subscribers; its per-resource buses are read here and nowhere else.
    """
    deadline = time.monotonic() + timeout
    while True:
        subscribed = {getattr(res, "plural", None) for res, bus in list(emulator._buses.items())
                      if bus.consumer_count}
        if plurals <= subscribed:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the operator's watch-streams never subscribed to {sorted(plurals - subscribed)}")
        await asyncio.sleep(0.02)


def client_for(emulator: kmock.KubernetesEmulator) -> kube.Kube:
    return kube.Kube(kube.ApiConfig(server=str(emulator.url).rstrip("/")))


async def eventually(fn: Callable[[], Awaitable[T | None]], timeout: float = 20.0, interval: float = 0.2,
                     what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
