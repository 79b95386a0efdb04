"""The whole approval loop with the real operator (kopf) against kmock's emulator, and the
ApprovalRequest webhooks over HTTPS with real AdmissionReview JSON.

The emulator does not call webhooks itself, so the test does what the API server would: it
sends the reviewer's update to the mutating webhook over HTTPS, applies the returned JSONPatch,
asks the validating webhook, and only then writes the object. The operator then writes the
status, and the proxy's held `wait` resolves."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import pytest
from fix_emulator import advertise, client_for, eventually
from test_operator_emulated import FAST, NS, operator

from pgwarden.approvals import ApprovalSpec, KubeApi, KubeClient, KubernetesApprovals
from pgwarden.approvals.kubernetes import collection_path
from pgwarden.embedded import free_port
from pgwarden.k8s import client as kube
from pgwarden.k8s.names import API_VERSION as PGW
from pgwarden.operator import approvals as ar
from pgwarden.operator.settings import WebhookSettings
from pgwarden.subjects import Identity, SubjectRef

pytestmark = pytest.mark.slow

AGENT = Identity(subject="system:serviceaccount:agents:cursor-agent", service_account="agents/cursor-agent",
                 method="tokenreview")
ALICE = {"username": "alice@example.com", "uid": "a", "groups": ["dba", "system:authenticated"]}
BOB = {"username": "bob@example.com", "uid": "b", "groups": ["dba", "system:authenticated"]}
MALLORY = {"username": "mallory@example.com", "uid": "m", "groups": ["developers", "system:authenticated"]}
AGENT_USER = {"username": AGENT.subject, "uid": "s", "groups": ["system:serviceaccounts"]}
RES = {"group": "pgwarden.dev", "version": "v1alpha1", "resource": "approvalrequests"}
KIND = {"group": "pgwarden.dev", "version": "v1alpha1", "kind": "ApprovalRequest"}


def policy(min_approvals: int = 1) -> dict[str, Any]:
    return {"apiVersion": "pgwarden.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "orders", "namespace": NS},
            "spec": {"connectionRef": {"name": "orders-prod"}, "subjects": [{"serviceAccount": "agents/cursor-agent"}],
                     "rules": [{"action": "review", "operations": ["delete"], "tables": ["public.orders"]}],
                     "approval": {"reviewers": [{"group": "dba"}], "minApprovals": min_approvals, "timeout": "5m"}}}


def review(operation: str, new: dict[str, Any], old: dict[str, Any] | None, user: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": KIND, "resource": RES, "requestKind": KIND,
                        "requestResource": RES, "name": new["metadata"]["name"], "namespace": NS,
                        "operation": operation, "userInfo": user, "object": new, "oldObject": old, "dryRun": False}}


def spec(mode: str = "wait") -> ApprovalSpec:
    return ApprovalSpec(connection="orders-prod", requester=AGENT, workload={"namespace": NS, "pod": "cursor-agent-1"},
                        statement="DELETE FROM orders WHERE id = 1", params=(), rule=f"{NS}/orders rule 1",
                        reviewers=(SubjectRef(group="dba"),), min_approvals=1, timeout=60, mode=mode)


async def _hooks(k: kube.Kube, kind: str) -> dict[str, Any] | None:
    cfg = await k.get(kube.path("admissionregistration.k8s.io/v1", kind, None, "pgwarden.dev"))
    hooks = [h for h in (cfg or {}).get("webhooks") or []
             if any("approvalrequests" in r["resources"] for r in h.get("rules") or [])]
    return hooks[0] if hooks else None


async def test_approval_loop_over_https(kmock: kmock.KubernetesEmulator, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGWARDEN_APPROVALS_CHECK_INTERVAL", "0.5")
    advertise(kmock)
    k = client_for(kmock)
    ca = tmp_path / "ca.pem"
    settings = replace(FAST, webhook=WebhookSettings(addr="127.0.0.1", host="127.0.0.1", port=free_port(),
                                                     cadump=str(ca), managed="pgwarden.dev"))
    await k.create(kube.path(PGW, "accesspolicies", NS), policy())
    proxy = KubernetesApprovals(KubeClient(KubeApi(server=str(kmock.url).rstrip("/"), namespace=NS)), retry_delay=0.1)
    async with operator(kmock, settings):
        mutating = await eventually(lambda: _hooks(k, "mutatingwebhookconfigurations"), what="mutating webhook")
        validating = await eventually(lambda: _hooks(k, "validatingwebhookconfigurations"), what="validating webhook")
        assert mutating["failurePolicy"] == "Fail" and validating["failurePolicy"] == "Fail"
        assert set(mutating["rules"][0]["operations"]) == {"CREATE", "UPDATE"}
        ctx = ssl.create_default_context(cafile=str(ca))

        async with aiohttp.ClientSession() as http:
            async def call(hook: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
                async with http.post(hook["clientConfig"]["url"], json=body, ssl=ctx) as resp:
                    assert resp.status == 200, await resp.text()
                    out = await resp.json()
                assert out["response"]["uid"] == body["request"]["uid"]
                return out["response"]  # type: ignore[no-any-return]

            async def api_server(old: dict[str, Any], new: dict[str, Any], user: dict[str, Any],
                                 operation: str = "UPDATE") -> tuple[dict[str, Any], dict[str, Any]]:
                """mutate -> apply JSONPatch -> validate, as the API server does."""
                r = await call(mutating, review(operation, new, old, user))
                if not r["allowed"]:
                    return new, r
                if "patch" in r:
                    new = jsonpatch.apply_patch(new, json.loads(base64.b64decode(r["patch"])))
                v = await call(validating, review(operation, new, old, user))
                return new, (v if not v["allowed"] else r)

            await asyncio.sleep(0.5)  # the policy index fills from the watch stream
            ticket = await proxy.create(spec())
            path = f"{collection_path(NS)}/{ticket.name}"
            created = await eventually(lambda: _phase(k, path, "Pending"), what="phase Pending")

            # CREATE: the creator is stamped; a request created already approved is refused
            fresh = copy.deepcopy(created)
            fresh["metadata"]["annotations"] = {}
            stamped, r = await api_server(None, fresh, AGENT_USER, "CREATE")  # type: ignore[arg-type]
            assert r["allowed"] and json.loads(stamped["metadata"]["annotations"][ar.CREATED_BY])["username"] == AGENT.subject
            pre = copy.deepcopy(fresh)
            pre["spec"]["decision"] = "approved"
            _, r = await api_server(None, pre, AGENT_USER, "CREATE")  # type: ignore[arg-type]
            assert not r["allowed"] and "created with spec.decision: pending" in r["status"]["message"]

            waiter = asyncio.create_task(proxy.wait(ticket, 30))

            def decided(obj: dict[str, Any], decision: str) -> dict[str, Any]:
                new = copy.deepcopy(obj)
                new["spec"]["decision"] = decision
                return new

            # self-approval, non-reviewer, forged approver annotation: refused over HTTPS
            _, r = await api_server(created, decided(created, "approved"), AGENT_USER)
            assert not r["allowed"] and r["status"]["code"] == 403
            assert "requested this statement and cannot decide it" in r["status"]["message"]
            _, r = await api_server(created, decided(created, "approved"), MALLORY)
            assert not r["allowed"] and "is not a reviewer under AccessPolicy agents/orders" in r["status"]["message"]
            forged = decided(created, "approved")
            forged["metadata"].setdefault("annotations", {})[ar.DECIDED_BY] = json.dumps({"username": "cto"})
            _, r = await api_server(created, forged, ALICE)
            assert not r["allowed"] and "set only by the pgwarden webhook" in r["status"]["message"]
            assert not waiter.done()

            # a reviewer: allowed, stamped from userInfo; the operator writes the status; the proxy goes on
            final, r = await api_server(created, decided(created, "approved"), ALICE)
            assert r["allowed"], r
            assert json.loads(final["metadata"]["annotations"][ar.DECIDED_BY])["username"] == "alice@example.com"
            await k.patch(path, {"spec": {"decision": "approved"},
                                 "metadata": {"annotations": final["metadata"]["annotations"]}})
            out = await asyncio.wait_for(waiter, 15)
            assert (out.state, out.decided_by) == ("approved", "alice@example.com")
            approved = await eventually(lambda: _phase(k, path, "Executed"), what="phase Executed")
            assert approved["status"]["decidedBy"]["username"] == "alice@example.com"

            # a decided request cannot flip
            _, r = await api_server(approved, decided(approved, "denied"), BOB)
            assert not r["allowed"] and "a decision is final" in r["status"]["message"]
            # no finalizer on requests: a proxy's withdrawal (DELETE) never waits for the operator
            assert not approved["metadata"].get("finalizers")
    await proxy.close()
    await k.close()


async def _phase(k: kube.Kube, path: str, phase: str) -> dict[str, Any] | None:
    obj = await k.get(path)
    return obj if obj and (obj.get("status") or {}).get("phase") == phase else None
