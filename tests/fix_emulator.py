"""Helpers for running the real operator (kopf) against kmock's KubernetesEmulator over HTTP.

Not a plugin: imported by the operator tests. The emulator advertises every resource kopf
discovers (our CRDs from crds/, CRDs themselves, events, pods, secrets, configmaps, workloads,
webhook configurations, kopf's peering resources), so kopf runs cluster-wide as in a cluster.
"""

from __future__ import annotations

import asyncio
import time
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
