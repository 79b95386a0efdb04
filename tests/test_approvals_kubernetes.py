"""The Kubernetes backend against kmock's KubernetesEmulator: the proxy's side creates the
ApprovalRequest, the test decides it through the API as a reviewer would (`kubectl patch`), and
plays the parts no emulator has — the webhook's stamp (`operator.approvals.mutate`) and the
operator's status (`operator.approvals.next_status`) — with the operator's own functions."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import aiohttp
import jsonpatch
import kmock
import pytest
from fix_emulator import advertise

from pgwarden.approvals import ApprovalSpec, KubeApi, KubeClient, KubernetesApprovals
from pgwarden.approvals.kubernetes import collection_path
from pgwarden.operator import approvals as ar
from pgwarden.subjects import Identity, SubjectRef

NS = "agents"
AGENT = Identity(subject="system:serviceaccount:agents:cursor-agent", groups=("system:serviceaccounts",),
                 service_account="agents/cursor-agent", method="tokenreview")
ALICE = {"username": "alice@example.com", "groups": ["dba"]}
POLICY = ar.ReviewPolicy(id=f"{NS}/orders", connection="orders-prod", reviewers=(SubjectRef(group="dba"),))

pytestmark = pytest.mark.kmock(cls=kmock.KubernetesEmulator)


def spec(mode: str = "wait", statement: str = "DELETE FROM orders WHERE id = $1", params: tuple[str | None, ...] = ("1",),
         timeout: float = 30) -> ApprovalSpec:
    return ApprovalSpec(connection="orders-prod", requester=AGENT,
                        workload={"namespace": NS, "pod": "cursor-agent-7d9f", "service_account": "cursor-agent"},
                        statement=statement, params=params, rule=f"{NS}/orders rule 2 (writes)",
                        reviewers=(SubjectRef(group="dba"),), min_approvals=1, timeout=timeout, mode=mode)


@pytest.fixture
async def backend(kmock: Any) -> Any:
    advertise(kmock)
    b = KubernetesApprovals(KubeClient(KubeApi(server=str(kmock.url).rstrip("/"), namespace=NS)), retry_delay=0.05)
    yield b
    await b.close()


async def api(kmock: Any, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, str(kmock.url).rstrip("/") + path, json=body) as r:
        assert r.status < 400, await r.text()
        return await r.json()


async def decide(kmock: Any, name: str, decision: str, user: dict[str, Any] = ALICE) -> dict[str, Any]:
    """kubectl patch by a reviewer; the webhook's stamp; then the operator's status patch."""
    path = f"{collection_path(NS)}/{name}"
    old = await api(kmock, "GET", path)
    new = copy.deepcopy(old)
    new["spec"]["decision"] = decision
    res = ar.mutate("UPDATE", old, new, user, POLICY, time.time())
    assert res.allowed, res.message
    stamped = jsonpatch.apply_patch(new, res.json_patch(new))
    await api(kmock, "PATCH", path, {"spec": {"decision": decision},
                                     "metadata": {"annotations": stamped["metadata"]["annotations"]}})
    obj = await api(kmock, "GET", path)
    change = ar.next_status(obj, time.time())
    await api(kmock, "PATCH", path + "/status", {"status": dict(change.status)})
    return await api(kmock, "GET", path)


async def test_create_watch_approve(kmock: Any, backend: KubernetesApprovals) -> None:
    s = spec()
    ticket = await backend.create(s)
    obj = kmock.objects["pgwarden.dev/v1alpha1/approvalrequests", NS, ticket.name]
    assert obj["spec"]["decision"] == "pending"
    assert obj["spec"]["statement"] == s.statement and obj["spec"]["statementHash"] == s.hash
    assert obj["spec"]["requester"] == {"subject": AGENT.subject, "groups": list(AGENT.groups),
                                        "pod": f"{NS}/cursor-agent-7d9f", "serviceAccount": "agents/cursor-agent"}
    assert obj["spec"]["policy"] == "orders" and obj["spec"]["mode"] == "wait"
    assert ticket.approve_command == (f"kubectl patch approvalrequest {ticket.name} -n {NS} --type merge "
                                      """-p '{"spec":{"decision":"approved"}}'""")
    waiter = asyncio.create_task(backend.wait(ticket, 20))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await decide(kmock, ticket.name, "approved")
    out = await asyncio.wait_for(waiter, 10)
    assert (out.state, out.decided_by) == ("approved", "alice@example.com")
    # one-time: the use is recorded atomically as an Event the operator turns into phase Executed
    ev = kmock.objects["v1/events", NS, ticket.name + ".executed"]
    assert ev["involvedObject"]["name"] == ticket.name and ev["reason"] == "Executed"
    await backend.executed(ticket, "DELETE 1")


async def test_denied(kmock: Any, backend: KubernetesApprovals) -> None:
    ticket = await backend.create(spec())
    waiter = asyncio.create_task(backend.wait(ticket, 20))
    await asyncio.sleep(0.1)
    obj = await decide(kmock, ticket.name, "denied")
    assert obj["status"]["phase"] == "Denied"
    out = await asyncio.wait_for(waiter, 10)
    assert (out.state, out.decided_by) == ("denied", "alice@example.com")
    assert ("v1/events", NS, ticket.name + ".executed") not in kmock.objects


async def test_timeout_expires(kmock: Any, backend: KubernetesApprovals) -> None:
    ticket = await backend.create(spec())
    out = await backend.wait(ticket, 0.3)
    assert out.state == "expired"


async def test_status_alone_is_not_an_approval(kmock: Any, backend: KubernetesApprovals) -> None:
    """status.phase Approved without the webhook-guarded spec.decision does not release anything."""
    ticket = await backend.create(spec())
    await api(kmock, "PATCH", f"{collection_path(NS)}/{ticket.name}/status", {"status": {"phase": "Approved"}})
    out = await backend.wait(ticket, 0.4)
    assert out.state == "expired"


async def test_cancel_withdraws(kmock: Any, backend: KubernetesApprovals) -> None:
    ticket = await backend.create(spec())
    waiter = asyncio.create_task(backend.wait(ticket, 20))
    await asyncio.sleep(0.2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    listing = await api(kmock, "GET", collection_path(NS))
    assert [o["metadata"]["name"] for o in listing["items"]] == []


async def test_defer_one_time(kmock: Any, backend: KubernetesApprovals) -> None:
    s = spec(mode="defer")
    assert await backend.consume(s) is None
    ticket = await backend.create(s)
    assert await backend.consume(s) is None  # pending
    await decide(kmock, ticket.name, "approved")
    assert await backend.consume(spec(mode="defer", params=("2",))) is None
    used = await backend.consume(s)
    assert used is not None and used.name == ticket.name
    assert "alice" in used.decided_by  # the gate writes who approved into the audit chain
    assert await backend.consume(s) is None  # the .executed Event exists: one time only
    # a second proxy (another replica, same service account) cannot use it either
    other = KubernetesApprovals(KubeClient(backend.client.api))
    try:
        assert await other.consume(s) is None
    finally:
        await other.close()


async def test_forged_request_with_our_hash_is_not_consumed(kmock: Any, backend: KubernetesApprovals) -> None:
    """An object that claims our statement hash but shows the reviewer another statement."""
    s = spec(mode="defer")
    ticket = await backend.create(spec(mode="defer", statement="SELECT 1", params=()))
    path = f"{collection_path(NS)}/{ticket.name}"
    await api(kmock, "PATCH", path, {"metadata": {"labels": {"pgwarden.dev/statement-hash": s.hash[:63]}},
                                     "spec": {"statementHash": s.hash}})
    await decide(kmock, ticket.name, "approved")
    assert await backend.consume(s) is None


async def test_notification_is_sent_in_the_background(kmock: Any, backend: KubernetesApprovals) -> None:
    from aiohttp import web

    from pgwarden.approvals import Notifier

    got: list[dict[str, Any]] = []
    attempts = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return web.Response(status=503)  # the first try fails: retried with back-off
        got.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    backend.notifier = Notifier(first_delay=0.05)
    try:
        s = spec()
        s = type(s)(**{**s.__dict__, "notify_url": f"http://127.0.0.1:{port}/hook"})
        ticket = await backend.create(s)  # returns before the webhook was reached
        assert got == []
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        assert attempts == 2 and got[0]["parse"] == "none" and got[0]["link_names"] is False
        text = got[0]["text"]
        assert ticket.name in text and "DELETE FROM orders WHERE id = $1" in text and ticket.approve_command in text
        assert json.dumps(got[0])  # Slack-compatible JSON body
    finally:
        await runner.cleanup()


async def test_forged_parameters_hash_is_not_consumed(kmock: Any, backend: KubernetesApprovals) -> None:
    """The agent's service account can create requests itself: one that shows the reviewer the
    parameters ("1",) but carries the hash of ("2",) must not release the statement with ("2",)."""
    from pgwarden.approvals.model import params_hash

    real = spec(mode="defer", params=("2",))
    ticket = await backend.create(spec(mode="defer", params=("1",)))
    path = f"{collection_path(NS)}/{ticket.name}"
    await api(kmock, "PATCH", path, {"metadata": {"labels": {"pgwarden.dev/statement-hash": real.hash[:63]}},
                                     "spec": {"statementHash": real.hash, "parametersHash": params_hash(("2",))}})
    obj = await decide(kmock, ticket.name, "approved")
    assert obj["spec"]["params"] == ["1"] and obj["status"]["phase"] == "Approved"
    assert await backend.consume(real) is None
