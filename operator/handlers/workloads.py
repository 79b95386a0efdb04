"""Annotated workloads: `kubectl annotate deployment X pgwarden.dev/inject=conn` after the fact.

The pod-template annotation is patched in, so Deployments/StatefulSets/DaemonSets roll out and a
CronJob's next Jobs are injected. A Job's template is immutable once created: its annotation is
carried at admission (`admission.mutate_workload`); later annotation changes only get an Event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from pgwarden.k8s import client as kube
from pgwarden.k8s import names
from pgwarden.operator import injection
from pgwarden.operator.runtime import Runtime, for_events

APIS = {"Deployment": ("apps/v1", "deployments"), "StatefulSet": ("apps/v1", "statefulsets"),
        "DaemonSet": ("apps/v1", "daemonsets"), "CronJob": ("batch/v1", "cronjobs"), "Job": ("batch/v1", "jobs")}


async def carry(body: Mapping[str, Any], runtime: Runtime, logger: kopf.Logger) -> None:
    patch = injection.carry_annotations_patch(body)
    if patch is None:
        return
    kind = str(body.get("kind"))
    meta = body.get("metadata") or {}
    if kind == "Job":
        kopf.warn(for_events(body), reason="TemplateImmutable",
                  message="a Job's pod template cannot change after creation: annotate the Job when creating it "
                          "(or its CronJob) so the pgwarden proxy is injected")
        return
    api, plural = APIS[kind]
    await runtime.kube.patch(kube.path(api, plural, meta.get("namespace"), meta.get("name")), patch)
    logger.info(f"carried {names.ANNOTATION_INJECT} into the pod template of {kind} {meta.get('name')}")
