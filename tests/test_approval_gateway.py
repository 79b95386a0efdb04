"""The approvals gateway: the proxy files and uses ApprovalRequests with its own projected token,
the agent's service account needs no pgwarden.dev permission, and no caller reaches another's.

The API server is kmock's KubernetesEmulator; its TokenReview reaction plays the API server's
authenticator (it knows which tokens it issued, for which audience and pod). The gateway is the
real aiohttp server over TLS; the proxy side is the real `KubernetesApprovals` client.
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock
import pytest
import yaml
from fix_emulator import advertise, client_for

from pgwarden.approvals import ApprovalSpec, KubeApi, KubeClient, KubernetesApprovals, backend_from_config
from pgwarden.approvals import kubernetes as kapprovals
from pgwarden.approvals.kubernetes import build_request, collection_path, events_path
from pgwarden.connection import parse_connection
from pgwarden.identity.tokenreview import REVIEW_PATH
from pgwarden.operator import approval_gateway as gw
from pgwarden.operator import approvals as ar
from pgwarden.operator import bundle
from pgwarden.operator.runtime import Runtime
from pgwarden.operator.settings import GatewaySettings, InjectionSettings, OperatorSettings
from pgwarden.resources import document_from_object
from pgwarden.subjects import Identity, SubjectRef

NS = "agents"
AUD = InjectionSettings().token_audience
ALICE = {"username": "alice@example.com", "groups": ["dba"]}
POLICY = ar.ReviewPolicy(id=f"{NS}/orders", connection="orders-prod", reviewers=(SubjectRef(group="dba"),))
# what the cluster issued: token -> (service account, pod or "", audiences)
ISSUED = {
    "proxy-a": ("agents/cursor-agent", "cursor-agent-7d9f", [AUD]),
    "agent-a": ("agents/cursor-agent", "cursor-agent-7d9f", ["pgwarden"]),  # the agent's own login token
    "proxy-b": ("agents/other-agent", "other-agent-1", [AUD]),
    "unbound": ("agents/cursor-agent", "", [AUD]),
}
AGENT = Identity(
    subject="system:serviceaccount:agents:cursor-agent",
    groups=("system:serviceaccounts",),
    service_account="agents/cursor-agent",
    method="pod",
)

pytestmark = pytest.mark.kmock(cls=kmock.KubernetesEmulator)


def review(request: Any) -> dict[str, Any]:
    spec = request.data["spec"]
    issued = ISSUED.get(spec["token"])
    status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
    if issued:
        sa, pod, auds = issued
        ok = sorted(set(auds) & set(spec.get("audiences") or []))
        ns, name = sa.split("/")
        user: dict[str, Any] = {
            "username": f"system:serviceaccount:{ns}:{name}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
        }
        if pod:
            user["extra"] = {gw.POD_NAME_EXTRA: [pod], "authentication.kubernetes.io/pod-uid": ["u-" + pod]}
        status = (
            {"authenticated": True, "user": user, "audiences": ok}
            if ok
            else {"authenticated": False, "error": "token audiences is invalid for the target audiences"}
        )
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


def approval(pod: str = "cursor-agent-7d9f", sa: str = "cursor-agent", mode: str = "wait") -> ApprovalSpec:
    return ApprovalSpec(
        connection="orders-prod",
        requester=AGENT,
        workload={"namespace": NS, "pod": pod, "service_account": sa},
        statement="DELETE FROM orders WHERE id = $1",
        params=("1",),
        rule=f"{NS}/orders rule 2",
        reviewers=(SubjectRef(group="dba"),),
        min_approvals=1,
        timeout=30,
        mode=mode,
    )


@pytest.fixture
async def gateway(kmock: Any, tmp_path: Path) -> Any:
    advertise(kmock)

    def reviewing(request: Any) -> dict[str, Any]:
        # a real API server never stores a TokenReview; the emulator would, and refuse the next (409)
        for key in [k for k in kmock.objects if k[0].plural == "tokenreviews"]:
            del kmock.objects[key]
        return review(request)

    kmock["post", REVIEW_PATH] << reviewing
    settings = OperatorSettings(gateway=GatewaySettings(enabled=True, addr="127.0.0.1", port=0))
    runtime = Runtime(settings, client_for(kmock))
    running = await gw.serve(runtime, ["localhost", "127.0.0.1"])
    (tmp_path / "ca.crt").write_text(running.ca_pem)
    yield running
    await running.stop()
    await runtime.kube.close()


def proxy(gateway: Any, tmp_path: Path, token: str = "proxy-a") -> KubernetesApprovals:
    (tmp_path / token).write_text(token + "\n")
    api = KubeApi(
        server=f"https://127.0.0.1:{gateway.port}",
        namespace=NS,
        token_file=str(tmp_path / token),
        ca_file=str(tmp_path / "ca.crt"),
    )
    return KubernetesApprovals(KubeClient(api), retry_delay=0.05)


async def raw(
    gateway: Any,
    tmp_path: Path,
    token: str,
    method: str,
    path: str,
    body: Any = None,
    params: dict[str, str] | None = None,
) -> tuple[int, Any]:
    import ssl

    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method,
            f"https://127.0.0.1:{gateway.port}{path}",
            json=body,
            params=params,
            ssl=ctx,
            headers={"Authorization": f"Bearer {token}"},
        ) as r,
    ):
        return r.status, await r.json(content_type=None)


async def decide(kmock: Any, name: str, decision: str) -> None:
    """A reviewer's kubectl patch straight to the API server, the webhook's stamp, the status."""
    url = str(kmock.url).rstrip("/") + f"{collection_path(NS)}/{name}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            old = await r.json()
        new = copy.deepcopy(old)
        new["spec"]["decision"] = decision
        res = ar.mutate("UPDATE", old, new, ALICE, POLICY, time.time())
        assert res.allowed, res.message
        stamped = jsonpatch.apply_patch(new, res.json_patch(new))
        async with s.patch(
            url,
            json={"spec": {"decision": decision}, "metadata": stamped["metadata"]},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            assert r.status < 400
            obj = await r.json()
        async with s.patch(
            url + "/status",
            json={"status": dict(ar.next_status(obj, time.time()).status)},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            assert r.status < 400


def requests_in(kmock: Any) -> list[dict[str, Any]]:
    return [o for (res, ns, _), o in kmock.objects.items() if res.plural == "approvalrequests" and ns == NS]


async def test_the_proxy_files_waits_and_claims_with_its_own_token(
    kmock: Any, gateway: Any, tmp_path: Path
) -> None:
    backend = proxy(gateway, tmp_path)
    try:
        ticket = await backend.create(approval())
        (obj,) = requests_in(kmock)
        assert obj["spec"]["requester"]["serviceAccount"] == "agents/cursor-agent"
        assert obj["spec"]["requester"]["pod"] == "agents/cursor-agent-7d9f"
        waiter = asyncio.create_task(backend.wait(ticket, 20))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await decide(kmock, ticket.name, "approved")
        out = await asyncio.wait_for(waiter, 10)
        assert (out.state, out.decided_by) == ("approved", "alice@example.com")
        ev = kmock.objects["v1/events", NS, ticket.name + ".executed"]
        assert ev["reason"] == "Executed" and ev["reportingInstance"] == "cursor-agent-7d9f"
        # one-time: a second claim of the same approval is refused by the API server (409)
        assert not await backend._claim(obj, "again")
        await backend.executed(ticket, "DELETE 1")
        assert any(
            name.startswith(ticket.name + ".") and name != ticket.name + ".executed"
            for res, _, name in kmock.objects
            if res.plural == "events"
        )
    finally:
        await backend.close()


async def test_a_deferred_approval_is_consumed_through_the_gateway(
    kmock: Any, gateway: Any, tmp_path: Path
) -> None:
    backend = proxy(gateway, tmp_path)
    try:
        ticket = await backend.create(approval(mode="defer"))
        await decide(kmock, ticket.name, "approved")
        used = await backend.consume(approval(mode="defer"))
        assert used is not None and used.name == ticket.name
        assert await backend.consume(approval(mode="defer")) is None  # one time
    finally:
        await backend.close()


async def test_the_agents_own_token_is_refused(kmock: Any, gateway: Any, tmp_path: Path) -> None:
    """The agent's login token (audience pgwarden) does not pass for its proxy."""
    body = build_request(approval(), "forged-1", NS, time.time())
    status, answer = await raw(gateway, tmp_path, "agent-a", "POST", collection_path(NS), body)
    assert status == 401 and "audience" in answer["message"]
    status, _ = await raw(gateway, tmp_path, "agent-a", "GET", collection_path(NS))
    assert status == 401
    assert requests_in(kmock) == []


@pytest.mark.parametrize(
    "token,message", [("nonsense", "rejected the token"), ("unbound", "not bound to a pod")]
)
async def test_unknown_or_unbound_tokens_are_refused(
    kmock: Any, gateway: Any, tmp_path: Path, token: str, message: str
) -> None:
    status, answer = await raw(
        gateway,
        tmp_path,
        token,
        "POST",
        collection_path(NS),
        build_request(approval(), "x-1", NS, time.time()),
    )
    assert status == 401 and message in answer["message"]
    assert requests_in(kmock) == []


@pytest.mark.parametrize("pod,sa", [("other-agent-1", "cursor-agent"), ("cursor-agent-7d9f", "other-agent")])
async def test_create_must_name_the_caller(
    kmock: Any, gateway: Any, tmp_path: Path, pod: str, sa: str
) -> None:
    body = build_request(approval(pod=pod, sa=sa), "in-anothers-name-1", NS, time.time())
    status, answer = await raw(gateway, tmp_path, "proxy-a", "POST", collection_path(NS), body)
    assert status == 403 and "must be the caller" in answer["message"]
    assert requests_in(kmock) == []


async def test_create_cannot_carry_a_decision_or_webhook_stamps(
    kmock: Any, gateway: Any, tmp_path: Path
) -> None:
    body = build_request(approval(), "pre-approved-1", NS, time.time())
    body["spec"]["decision"] = "approved"
    status, _ = await raw(gateway, tmp_path, "proxy-a", "POST", collection_path(NS), body)
    assert status == 403
    body = build_request(approval(), "pre-stamped-1", NS, time.time())
    body["metadata"]["annotations"] = {ar.DECIDED_BY: '{"username": "alice@example.com"}'}
    status, _ = await raw(gateway, tmp_path, "proxy-a", "POST", collection_path(NS), body)
    assert status == 403
    assert requests_in(kmock) == []


async def test_another_namespace_is_refused(kmock: Any, gateway: Any, tmp_path: Path) -> None:
    body = build_request(approval(), "elsewhere-1", "prod", time.time())
    status, answer = await raw(gateway, tmp_path, "proxy-a", "POST", collection_path("prod"), body)
    assert status == 403 and "own namespace" in answer["message"]
    status, _ = await raw(gateway, tmp_path, "proxy-a", "GET", collection_path("prod"))
    assert status == 403


async def test_no_caller_reaches_anothers_requests(kmock: Any, gateway: Any, tmp_path: Path) -> None:
    """Another agent's proxy cannot list (with the literals), watch, withdraw or use a request."""
    backend = proxy(gateway, tmp_path)
    try:
        ticket = await backend.create(approval())
    finally:
        await backend.close()
    status, answer = await raw(gateway, tmp_path, "proxy-b", "GET", collection_path(NS))
    assert status == 200 and answer["items"] == []
    status, _ = await raw(
        gateway,
        tmp_path,
        "proxy-b",
        "GET",
        collection_path(NS),
        params={"watch": "true", "fieldSelector": f"metadata.name={ticket.name}"},
    )
    assert status == 403
    status, _ = await raw(gateway, tmp_path, "proxy-b", "GET", collection_path(NS), params={"watch": "true"})
    assert status == 403  # no namespace-wide watch for anyone
    status, _ = await raw(gateway, tmp_path, "proxy-b", "DELETE", f"{collection_path(NS)}/{ticket.name}")
    assert status == 403
    await decide(kmock, ticket.name, "approved")
    obj = kmock.objects["pgwarden.dev/v1alpha1/approvalrequests", NS, ticket.name]
    event = kapprovals.build_event(
        obj, ticket.name + ".executed", "Executed", "mine now", "other-agent-1", time.time()
    )
    status, _ = await raw(gateway, tmp_path, "proxy-b", "POST", events_path(NS), event)
    assert status == 403
    assert ("v1/events", NS, ticket.name + ".executed") not in kmock.objects
    assert len(requests_in(kmock)) == 1
    # its owner still can
    status, answer = await raw(gateway, tmp_path, "proxy-a", "GET", collection_path(NS))
    assert status == 200 and [o["metadata"]["name"] for o in answer["items"]] == [ticket.name]


async def test_events_are_only_the_claim_and_the_completion(kmock: Any, gateway: Any, tmp_path: Path) -> None:
    backend = proxy(gateway, tmp_path)
    try:
        ticket = await backend.create(approval())
    finally:
        await backend.close()
    obj = kmock.objects["pgwarden.dev/v1alpha1/approvalrequests", NS, ticket.name]
    for name, reason in (
        (ticket.name + ".claimed", "Executed"),
        (ticket.name + ".executed", "Approved"),
        ("unrelated", "StatementCompleted"),
    ):
        event = kapprovals.build_event(obj, name, reason, "m", "p", time.time())
        status, _ = await raw(gateway, tmp_path, "proxy-a", "POST", events_path(NS), event)
        assert status == 403, (name, reason)
    assert not [k for k in kmock.objects if k[0].plural == "events"]


async def test_a_pod_without_an_automounted_token_files_requests(
    kmock: Any, gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """automountServiceAccountToken: false (CIS 5.1.6): the sidecar's configuration names only
    the gateway, its projected token and the gateway's CA — nothing under
    /var/run/secrets/kubernetes.io, no KUBERNETES_SERVICE_HOST."""
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(kapprovals, "IN_CLUSTER_DIR", tmp_path / "no-automount")
    conn_raw = {
        "apiVersion": "pgwarden.dev/v1alpha1",
        "kind": "DatabaseConnection",
        "metadata": {"name": "orders-prod", "namespace": NS},
        "spec": {"host": "db", "adminSecretRef": {"name": "admin"}},
    }
    settings = InjectionSettings(approvals_url=f"https://127.0.0.1:{gateway.port}")
    result = bundle.compile_bundle(
        conn_raw, [], parse_connection(document_from_object(conn_raw)), settings, operator_ca=gateway.ca_pem
    )
    assert result.data is not None and result.data["operator-ca.crt"] == gateway.ca_pem
    section = yaml.safe_load(result.data["proxy.yaml"])["spec"]["approvals"]
    assert section == {
        "backend": "kubernetes",
        "namespace": NS,
        "apiUrl": settings.approvals_url,
        "tokenFile": "/etc/pgwarden/token",
        "caFile": "/etc/pgwarden/operator-ca.crt",
    }
    # the sidecar's paths, relocated to this test's folder
    (tmp_path / "token").write_text("proxy-a")
    (tmp_path / "operator-ca.crt").write_text(result.data["operator-ca.crt"])
    backend = backend_from_config(
        {**section, "tokenFile": str(tmp_path / "token"), "caFile": str(tmp_path / "operator-ca.crt")}
    )
    assert isinstance(backend, KubernetesApprovals)
    try:
        ticket = await backend.create(approval())
        assert [o["metadata"]["name"] for o in requests_in(kmock)] == [ticket.name]
    finally:
        await backend.close()


def test_caller_from_review_needs_the_audience_a_service_account_and_a_pod() -> None:
    ok = {
        "authenticated": True,
        "audiences": [AUD],
        "user": {"username": "system:serviceaccount:agents:a", "extra": {gw.POD_NAME_EXTRA: ["a-1"]}},
    }
    assert gw.caller_from_review(ok, AUD) == gw.Caller("agents", "a", "a-1")
    for broken in (
        {**ok, "audiences": ["pgwarden"]},
        {**ok, "audiences": None},
        {**ok, "user": {"username": "alice", "extra": {gw.POD_NAME_EXTRA: ["a-1"]}}},
        {**ok, "user": {"username": "system:serviceaccount:agents:a"}},
        {"authenticated": False},
    ):
        with pytest.raises(gw.Refused) as e:
            gw.caller_from_review(broken, AUD)
        assert e.value.status == 401


async def test_readiness_needs_both_the_gateway_and_the_webhook_port(kmock: Any, tmp_path: Path) -> None:
    """The operator's readiness probe (HTTPS, /readyz on the gateway) fails while the admission
    webhook port does not complete a TLS handshake, so the Service sends no admission there."""
    import ssl

    from pgwarden.embedded import free_port
    from pgwarden.operator.settings import WebhookSettings
    from pgwarden.operator.webhook_server import self_signed

    advertise(kmock)
    port = free_port()
    settings = OperatorSettings(
        gateway=GatewaySettings(enabled=True, addr="127.0.0.1", port=0),
        webhook=WebhookSettings(addr="127.0.0.1", port=port),
    )
    runtime = Runtime(settings, client_for(kmock))
    running = await gw.serve(runtime, ["localhost", "127.0.0.1"])
    probe = ssl.create_default_context()
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE  # kubelet does not verify either
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{running.port}/readyz", ssl=probe) as r:
                assert r.status == 503 and f"webhook port {port}" in await r.text()
            cert, key = self_signed(["127.0.0.1"])
            (tmp_path / "c.pem").write_bytes(cert)
            (tmp_path / "k.pem").write_bytes(key)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
            webhook = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port, ssl=ctx)
            try:
                async with s.get(f"https://127.0.0.1:{running.port}/readyz", ssl=probe) as r:
                    assert r.status == 200, await r.text()
            finally:
                webhook.close()
                await webhook.wait_closed()
    finally:
        await running.stop()
        await runtime.kube.close()


async def test_a_renewed_certificate_is_served_without_a_restart(kmock: Any, tmp_path: Path) -> None:
    """cert-manager renews the serving certificate under the same CA; the Secret volume changes
    and the gateway presents the new certificate to the next sidecar, which still trusts it."""
    import datetime as dt
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from pgwarden.operator.webhook_server import self_signed

    ca_pem, ca_key_pem = self_signed(["pgwarden-webhook-ca"])
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)

    def leaf(serial: int) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw")]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )  # type: ignore[arg-type]
        (tmp_path / "tls.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    (tmp_path / "ca.crt").write_bytes(ca_pem)
    leaf(1001)
    advertise(kmock)
    settings = OperatorSettings(
        gateway=GatewaySettings(
            enabled=True,
            addr="127.0.0.1",
            port=0,
            certfile=str(tmp_path / "tls.crt"),
            pkeyfile=str(tmp_path / "tls.key"),
            cafile=str(tmp_path / "ca.crt"),
            reload_interval=0.1,
        )
    )
    runtime = Runtime(settings, client_for(kmock))
    running = await gw.serve(runtime)
    assert runtime.operator_ca == ca_pem.decode()

    async def served_serial() -> int:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))  # what the sidecar trusts
        _, writer = await asyncio.open_connection("127.0.0.1", running.port, ssl=ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der).serial_number

    try:
        assert await served_serial() == 1001
        leaf(1002)
        deadline = time.monotonic() + 5
        while await served_serial() != 1002:
            assert time.monotonic() < deadline, "the renewed certificate was not picked up"
            await asyncio.sleep(0.1)
    finally:
        await running.stop()
        await runtime.kube.close()


def test_the_events_the_gateway_writes_are_valid_events() -> None:
    """Built-in kind: checked against Kubernetes' own OpenAPI (strict: no field the API server drops)."""
    import kubernetes_validate

    caller = gw.Caller("agents", "cursor-agent", "cursor-agent-7d9f")
    request = build_request(approval(), "orders-prod-abc-1", NS, time.time())
    request["metadata"]["uid"] = "u-1"
    for name, reason in (
        ("orders-prod-abc-1.executed", "Executed"),
        ("orders-prod-abc-1.1a2b3c4d", "StatementCompleted"),
    ):
        body = kapprovals.build_event(request, name, reason, "m", "ignored", time.time())
        event = gw.check_event(caller, NS, body, request)
        assert event["reportingInstance"] == "cursor-agent-7d9f"
        for version in ("1.29.0", kubernetes_validate.utils.latest_version()):
            kubernetes_validate.validate(event, version, strict=True)


async def test_a_name_that_is_a_path_never_reaches_the_api(kmock: Any, gateway: Any, tmp_path: Path) -> None:
    """`..` in a watched or withdrawn name would make the operator request another object with its
    own credentials (and tell the caller whether it exists)."""
    for name in ("../../../../../api/v1/namespaces/kube-system/secrets/admin", "x?watch=true", "a/b"):
        status, answer = await raw(
            gateway, tmp_path, "proxy-a", "GET", collection_path(NS),
            params={"watch": "true", "fieldSelector": f"metadata.name={name}"},
        )
        assert status == 400 and "is not an ApprovalRequest name" in answer["message"], (name, status, answer)
