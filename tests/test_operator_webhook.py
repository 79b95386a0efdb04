"""The pod admission webhook over HTTPS, as the API server calls it: kopf's webhook server with
certificates the operator made, the MutatingWebhookConfiguration the operator keeps in the
(emulated) cluster, and real AdmissionReview JSON."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import pytest
from fix_emulator import advertise, client_for, eventually
from test_operator_emulated import FAST, NS, admin_secret, connection, operator

from pgwarden.embedded import free_port
from pgwarden.k8s import client as kube
from pgwarden.k8s.names import API_VERSION as PGW
from pgwarden.operator import injection
from pgwarden.operator.settings import WebhookSettings
from pgwarden.times import iso

pytestmark = pytest.mark.slow


def review(obj: dict[str, Any], resource: tuple[str, str, str] = ("", "v1", "pods"), kind: str = "Pod") -> dict[str, Any]:
    group, version, plural = resource
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": plural},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": plural},
            "namespace": NS,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def agent_pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "cursor-agent-7d9f", "namespace": NS, "annotations": annotations or {}},
            "spec": {"serviceAccountName": "cursor-agent", "containers": [{"name": "agent", "image": "agent:1"}]}}


async def test_pod_admission_over_https(kmock: kmock.KubernetesEmulator, pg: Any, tmp_path: Path) -> None:
    advertise(kmock)
    k = client_for(kmock)
    ca = tmp_path / "ca.pem"
    settings = replace(FAST, webhook=WebhookSettings(addr="127.0.0.1", host="127.0.0.1", port=free_port(),
                                                     cadump=str(ca), managed="pgwarden.dev"))
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="orders-prod"))
    async with operator(kmock, settings):
        # the operator registered itself with the API server, CA bundle included
        cfg_path = kube.path("admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations", None, "pgwarden.dev")
        cfg = await eventually(lambda: _with_webhooks(k.get(cfg_path)), what="MutatingWebhookConfiguration")
        hooks = {h["name"].split(".")[0]: h for h in cfg["webhooks"]}
        pod_hook = next(h for h in cfg["webhooks"] if any("pods" in r["resources"] for r in h["rules"]))
        assert pod_hook["failurePolicy"] == "Ignore" and pod_hook["sideEffects"] == "None"
        assert base64.b64decode(pod_hook["clientConfig"]["caBundle"]) == ca.read_bytes()
        assert hooks  # one per handler
        url = pod_hook["clientConfig"]["url"]
        assert url.startswith("https://127.0.0.1:")

        ctx = ssl.create_default_context(cafile=str(ca))  # verify like the API server does
        async with aiohttp.ClientSession() as http:
            async def admit(obj: dict[str, Any], hook_url: str = url, **kw: Any) -> dict[str, Any]:
                async with http.post(hook_url, json=review(obj, **kw), ssl=ctx) as resp:
                    assert resp.status == 200, await resp.text()
                    body = await resp.json()
                assert body["kind"] == "AdmissionReview"
                return body["response"]

            # annotated: the patch turns the pod into exactly what `pgwarden inject` prints
            pod = agent_pod({injection.ANNOTATION_INJECT: "orders-prod"})
            await asyncio.sleep(0.5)  # the connection index fills from the watch stream
            r = await admit(pod)
            assert r["allowed"] is True and r["patchType"] == "JSONPatch", r
            ops = json.loads(base64.b64decode(r["patch"]))
            mutated = jsonpatch.apply_patch(copy.deepcopy(pod), ops)
            target = injection.InjectionTarget.for_connection("orders-prod")
            assert mutated == injection.inject_pod(pod, target, settings.injection)
            assert mutated["spec"]["initContainers"][0]["restartPolicy"] == "Always"
            assert mutated["metadata"]["annotations"][injection.ANNOTATION_INJECTED] == "orders-prod"

            # not annotated: allowed untouched
            r = await admit(agent_pod())
            assert r["allowed"] is True and "patch" not in r

            # already injected: left alone
            r = await admit(mutated)
            assert r["allowed"] is True and "patch" not in r

            # unknown connection: refused with the next step
            r = await admit(agent_pod({injection.ANNOTATION_INJECT: "nope"}))
            assert r["allowed"] is False
            assert "no DatabaseConnection 'nope' in namespace agents" in r["status"]["message"]

            # an agent container mounting the credentials: refused
            leaky = agent_pod({injection.ANNOTATION_INJECT: "orders-prod"})
            leaky["spec"]["volumes"] = [{"name": "creds", "secret": {"secretName": "orders-prod-pgwarden-credentials"}}]
            leaky["spec"]["containers"][0]["volumeMounts"] = [{"name": "creds", "mountPath": "/creds"}]
            r = await admit(leaky)
            assert r["allowed"] is False and "only the pgwarden proxy may hold them" in r["status"]["message"]

            # a Job created with the annotation gets it in its (immutable) pod template
            job_hook = next(h for h in cfg["webhooks"] if any("jobs" in r["resources"] for r in h["rules"]))
            job = {"apiVersion": "batch/v1", "kind": "Job",
                   "metadata": {"name": "ci", "namespace": NS, "annotations": {injection.ANNOTATION_INJECT: "orders-prod"}},
                   "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "ci", "image": "c"}]}}}}
            r = await admit(job, job_hook["clientConfig"]["url"], resource=("batch", "v1", "jobs"), kind="Job")
            patched = jsonpatch.apply_patch(job, json.loads(base64.b64decode(r["patch"])))
            assert patched["spec"]["template"]["metadata"]["annotations"] == {injection.ANNOTATION_INJECT: "orders-prod"}

            # as the API server sends a ReplicaSet's pod: no name yet (generateName), and a dry run
            generated = agent_pod({injection.ANNOTATION_INJECT: "orders-prod"})
            del generated["metadata"]["name"]
            generated["metadata"]["generateName"] = "cursor-agent-7d9f-"
            dry = review(generated)
            dry["request"]["dryRun"] = True
            dry["request"].pop("name", None)
            async with http.post(url, json=dry, ssl=ctx) as resp:
                r = (await resp.json())["response"]
            assert r["allowed"] is True
            mutated = jsonpatch.apply_patch(copy.deepcopy(generated), json.loads(base64.b64decode(r["patch"])))
            assert mutated["spec"]["initContainers"][0]["name"] == injection.PROXY_CONTAINER

            # kubectl debug on the injected pod: an UPDATE of pods/ephemeralcontainers with oldObject
            vcfg_path = kube.path("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", None,
                                  "pgwarden.dev")
            vcfg = await eventually(lambda: _with_webhooks(k.get(vcfg_path)), what="ValidatingWebhookConfiguration")
            eph_hook = next(h for h in vcfg["webhooks"]
                            if any("pods/ephemeralcontainers" in r["resources"] for r in h["rules"]))
            assert eph_hook["rules"][0]["operations"] == ["UPDATE"]

            async def debug(target: str) -> dict[str, Any]:
                new = copy.deepcopy(mutated)
                new["metadata"]["name"] = "cursor-agent-7d9f-x1"
                new["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox",
                                                        "targetContainerName": target}]
                rv = review(new)
                rv["request"].update(operation="UPDATE", subResource="ephemeralcontainers", name="cursor-agent-7d9f-x1",
                                     oldObject={**mutated, "metadata": {**mutated["metadata"],
                                                                        "name": "cursor-agent-7d9f-x1"}},
                                     options={"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"})
                rv["request"]["requestSubResource"] = "ephemeralcontainers"
                async with http.post(eph_hook["clientConfig"]["url"], json=rv, ssl=ctx) as resp:
                    assert resp.status == 200
                    return (await resp.json())["response"]

            r = await debug(injection.PROXY_CONTAINER)
            assert r["allowed"] is False and "targets pgwarden-proxy" in r["status"]["message"]
            r = await debug("agent")
            assert r["allowed"] is True
    await k.close()


async def test_annotated_deployment_gets_its_template_annotated(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    advertise(kmock)
    k = client_for(kmock)
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "cursor-agent", "namespace": NS, "resourceVersion": "1",
                               "annotations": {injection.ANNOTATION_INJECT: "orders-prod"}},
                  "spec": {"template": {"metadata": {"labels": {"app": "cursor-agent"}},
                                        "spec": {"containers": [{"name": "agent", "image": "a"}]}}}}
    async with operator(kmock):
        await k.create(kube.path("apps/v1", "deployments", NS), deployment)

        async def template_annotations() -> dict[str, str] | None:
            d = await k.get(kube.path("apps/v1", "deployments", NS, "cursor-agent"))
            return (((d or {}).get("spec") or {}).get("template") or {}).get("metadata", {}).get("annotations")

        ann = await eventually(template_annotations, what="pod template annotation")
        assert ann == {injection.ANNOTATION_INJECT: "orders-prod"}
    await k.close()


async def _with_webhooks(aw: Any) -> Any:
    cfg = await aw
    return cfg if cfg and cfg.get("webhooks") else None



async def test_a_standby_replica_answers_admission_from_the_api(kmock: kmock.KubernetesEmulator,
                                                                 tmp_path: Path) -> None:
    """Two replicas sit behind the webhook Service, so the one kopf peering paused gets about half
    of the admission requests. It watches nothing: its memory of connections and reviewers stays
    empty. It must still inject (with the connection's own Secret) and still decide approvals
    from the policy's reviewers, by reading the objects from the API."""
    import datetime

    from test_approvals_webhook import ALICE, MALLORY, request_obj
    from test_approvals_webhook import review as approval_review

    from pgwarden.operator import approvals as ar

    advertise(kmock)
    k = client_for(kmock)
    # another replica, alive and of higher priority: this operator starts paused
    now = datetime.datetime.now(datetime.UTC).isoformat()
    await k.create(kube.path("kopf.dev/v1", "clusterkopfpeerings"),
                   {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "pgwarden"},
                    "status": {"the-active-replica": {"priority": 2**31, "lifetime": 600, "lastseen": now}}})
    conn = {"apiVersion": PGW, "kind": "DatabaseConnection",
            "metadata": {"name": "orders-prod", "namespace": NS, "resourceVersion": "1", "generation": 1},
            "spec": {"host": "orders-db.prod.svc", "database": "orders", "adminSecretRef": {"name": "admin"},
                     "credentials": {"grantRoles": ["orders_reader"], "secretName": "orders-creds"}}}
    await k.create(kube.path(PGW, "databaseconnections", NS), conn)
    await k.create(kube.path(PGW, "accesspolicies", NS), {
        "apiVersion": PGW, "kind": "AccessPolicy", "metadata": {"name": "orders", "namespace": NS},
        "spec": {"connectionRef": {"name": "orders-prod"}, "subjects": [{"serviceAccount": "agents/cursor-agent"}],
                 "rules": [{"action": "review", "operations": ["delete"], "tables": ["public.orders"]}],
                 "approval": {"reviewers": [{"group": "dba"}]}}})
    ca = tmp_path / "ca.pem"
    port = free_port()
    settings = replace(FAST, peering_name="pgwarden", peering_priority=1,
                       webhook=WebhookSettings(addr="127.0.0.1", host="127.0.0.1", port=port, cadump=str(ca),
                                               managed=None))
    async with operator(kmock, settings, standby=True) as runtime:
        await asyncio.sleep(1.5)
        # paused: nothing reconciled, nothing remembered
        stored = await k.get(kube.path(PGW, "databaseconnections", NS, "orders-prod"))
        assert stored is not None and not stored["metadata"].get("finalizers")
        assert runtime.connections == {}
        ctx = ssl.create_default_context(cafile=str(ca))
        base = f"https://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
                async with http.post(base + path, json=body, ssl=ctx) as resp:
                    assert resp.status == 200, await resp.text()
                    return (await resp.json())["response"]  # type: ignore[no-any-return]

            pod = agent_pod({injection.ANNOTATION_INJECT: "orders-prod"})
            r = await call("/pgwarden-inject", review(pod))
            assert r["allowed"] is True and r["patchType"] == "JSONPatch", r
            mutated = jsonpatch.apply_patch(copy.deepcopy(pod), json.loads(base64.b64decode(r["patch"])))
            target = injection.InjectionTarget.for_connection("orders-prod", "orders-creds")
            assert mutated == injection.inject_pod(pod, target, settings.injection)

            r = await call("/pgwarden-inject", review(agent_pod({injection.ANNOTATION_INJECT: "nope"})))
            assert r["allowed"] is False and "no DatabaseConnection 'nope'" in r["status"]["message"]

            # a reviewer of the policy approves; someone else cannot
            # expiring from now: this runs against the operator's real clock, and the module's NOW was
            # taken when test_approvals_webhook was imported, possibly more than ten minutes ago
            old = request_obj(expiresAt=iso(time.time() + 600))
            new = copy.deepcopy(old)
            new["spec"]["decision"] = "approved"
            r = await call("/pgwarden-approval-decide", approval_review("UPDATE", new, old, ALICE))
            assert r["allowed"] is True, r
            stamped = jsonpatch.apply_patch(new, json.loads(base64.b64decode(r["patch"])))
            assert json.loads(stamped["metadata"]["annotations"][ar.DECIDED_BY])["username"] == ALICE["username"]
            r = await call("/pgwarden-approval-check", approval_review("UPDATE", stamped, old, ALICE))
            assert r["allowed"] is True, r
            r = await call("/pgwarden-approval-decide", approval_review("UPDATE", new, old, MALLORY))
            assert r["allowed"] is False, r

            # a policy that does not exist is not guessed: nobody can decide
            orphan_old = request_obj(policy="gone", expiresAt=iso(time.time() + 600))
            orphan_new = copy.deepcopy(orphan_old)
            orphan_new["spec"]["decision"] = "approved"
            r = await call("/pgwarden-approval-decide", approval_review("UPDATE", orphan_new, orphan_old, ALICE))
            assert r["allowed"] is False, r
        assert runtime.connections == {}, "the standby must not have started watching"
    await k.close()


async def test_api_lookups_are_reused_briefly() -> None:
    """A burst of pod creations on a standby replica costs one GET per connection; a connection
    created a moment later is seen once the short cache expires; API errors are not cached."""
    from pgwarden.operator.handlers import admission
    from pgwarden.operator.runtime import Runtime

    class FakeKube:
        def __init__(self) -> None:
            self.gets: list[str] = []
            self.objects: dict[str, dict[str, Any]] = {}
            self.fail = False

        async def get(self, path: str) -> dict[str, Any] | None:
            self.gets.append(path)
            if self.fail:
                raise kube.ApiError(503, "unavailable")
            return self.objects.get(path)

    fake = FakeKube()
    runtime = Runtime(replace(FAST, lookup_cache_seconds=0.3), fake)  # type: ignore[arg-type]
    path = kube.path(PGW, "databaseconnections", NS, "orders-prod")
    assert await admission.connection_secret(runtime, NS, "orders-prod") is None
    fake.objects[path] = {"spec": {"credentials": {"secretName": "orders-creds"}}}
    for _ in range(5):
        assert await admission.connection_secret(runtime, NS, "orders-prod") is None  # cached miss
    assert len(fake.gets) == 1
    await asyncio.sleep(0.35)
    assert await admission.connection_secret(runtime, NS, "orders-prod") == "orders-creds"
    assert len(fake.gets) == 2
    # the watch stream's memory wins, without an API call
    runtime.connections[(NS, "orders-prod")] = "from-watch"
    assert await admission.connection_secret(runtime, NS, "orders-prod") == "from-watch"
    assert len(fake.gets) == 2
    # an API failure refuses the pod with the reason, and is asked again next time
    fake.fail = True
    import kopf

    with pytest.raises(kopf.AdmissionError, match="cannot look up DatabaseConnection agents/other"):
        await admission.connection_secret(runtime, NS, "other")
    with pytest.raises(kopf.AdmissionError):
        await admission.connection_secret(runtime, NS, "other")
    assert len(fake.gets) == 4
