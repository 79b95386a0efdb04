"""The approvals gateway: how a proxy sidecar files, watches and uses ApprovalRequests without
the agent's service account holding any right on pgwarden.dev resources.

Every container of a pod shares the pod's service account, so RBAC granted for the proxy is
granted to the agent too. Instead, the proxy presents its own projected token — audience
`pgwarden-operator` (InjectionSettings.token_audience), in a volume only the proxy mounts — to
this HTTPS endpoint of the operator. The operator asks the API server who that is (TokenReview
for exactly that audience) and makes the calls with its own identity, limited to:

- the caller's own namespace;
- CREATE: the request's `spec.requester` must name the caller (service account, and pod when the
  token is bound to one), pending, without the webhook's annotations;
- reads, watches, withdrawals (DELETE) and the "executed" / "completed" Events only for requests
  whose requester is the caller's service account.

The paths and answers are the Kubernetes API's own (a subset), so the proxy's Kubernetes client
(`pgwarden.approvals.kubernetes`) talks to the gateway unchanged: only its base URL, token and CA
differ. The rules are pure functions; `serve` is the aiohttp shell around them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from pgwarden.cache import BoundedCache
from pgwarden.identity.tokenreview import REVIEW_PATH, identity_from_review
from pgwarden.identity.tokens import TokenRejected
from pgwarden.k8s import client as kube
from pgwarden.k8s import names
from pgwarden.k8s.names import EXECUTED_EVENT_SUFFIX
from pgwarden.operator.approvals import MANAGED_ANNOTATIONS
from pgwarden.operator.runtime import Runtime
from pgwarden.operator.webhook_server import self_signed

log = logging.getLogger("pgwarden.operator.gateway")

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
PLURAL = names.APPROVAL_REQUESTS
EVENT_REASONS = ("Executed", "StatementCompleted")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class Refused(Exception):
    """The call is not allowed; `status` is the HTTP status the proxy gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Caller:
    """A proxy sidecar, as the API server authenticated its token."""

    namespace: str
    service_account: str  # the name, without namespace
    pod: str = ""  # the pod the token is bound to

    @property
    def account(self) -> str:
        return f"{self.namespace}/{self.service_account}"


# -- pure rules -------------------------------------------------------------------------------


def caller_from_review(status: Mapping[str, Any], audience: str) -> Caller:
    """A TokenReview status -> the calling sidecar; Refused(401) for anything else."""
    try:
        who = identity_from_review(status, (audience,))
    except TokenRejected as e:
        raise Refused(
            401, f"{e}; the pgwarden proxy presents its projected token (audience {audience})"
        ) from e
    if not who.service_account:
        raise Refused(
            401, f"{who.subject} is not a service account; only pgwarden proxy sidecars call the gateway"
        )
    namespace, _, name = who.service_account.partition("/")
    extra = ((status.get("user") or {}).get("extra") or {}).get(POD_NAME_EXTRA) or []
    pod = str(extra[0]) if isinstance(extra, list) and extra else ""
    if not pod:
        raise Refused(
            401, "the token is not bound to a pod; the proxy presents its projected service-account token"
        )
    return Caller(namespace=namespace, service_account=name, pod=pod)


def check_namespace(caller: Caller, namespace: str) -> None:
    if namespace != caller.namespace:
        raise Refused(
            403,
            f"{caller.account} may only use ApprovalRequests in its own namespace {caller.namespace}, "
            f"not {namespace}",
        )


def owned(caller: Caller, obj: Mapping[str, Any]) -> bool:
    """Is this request the caller's (same namespace, requester is the caller's service account)?"""
    meta = obj.get("metadata") or {}
    requester = (obj.get("spec") or {}).get("requester") or {}
    return meta.get("namespace") == caller.namespace and requester.get("serviceAccount") == caller.account


def check_create(caller: Caller, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The ApprovalRequest to create on the caller's behalf; Refused when it names someone else."""
    check_namespace(caller, namespace)
    if body.get("kind") != "ApprovalRequest" or not isinstance(body.get("spec"), Mapping):
        raise Refused(400, "the body must be an ApprovalRequest with a spec")
    out = json.loads(json.dumps(body))
    meta = out.setdefault("metadata", {})
    if meta.get("namespace") not in (None, namespace):
        raise Refused(403, f"metadata.namespace {meta.get('namespace')} is not {namespace}")
    meta["namespace"] = namespace
    for key in ("ownerReferences", "finalizers"):
        if meta.get(key):
            raise Refused(403, f"metadata.{key} cannot be set through the gateway")
    forged = [a for a in MANAGED_ANNOTATIONS if a in (meta.get("annotations") or {})]
    if forged:
        raise Refused(403, f"annotation {forged[0]} is set by the pgwarden webhook, not by the requester")
    spec = out["spec"]
    requester = spec.get("requester") or {}
    if requester.get("serviceAccount") != caller.account:
        raise Refused(
            403,
            f"spec.requester.serviceAccount must be the caller, {caller.account}, not "
            f"{requester.get('serviceAccount')!r}",
        )
    if requester.get("pod") != f"{caller.namespace}/{caller.pod}":
        raise Refused(
            403,
            f"spec.requester.pod must be the caller's pod, {caller.namespace}/{caller.pod}, not "
            f"{requester.get('pod')!r}",
        )
    if (spec.get("decision") or "pending") != "pending":
        raise Refused(403, "an ApprovalRequest is created pending; reviewers decide it")
    return out  # type: ignore[no-any-return]


def check_event(
    caller: Caller, namespace: str, body: Mapping[str, Any], request: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The Event to post: `<request>.executed` (the one-time claim) or `<request>.<hex>`
    (completion), only on the caller's own request, rebuilt from the stored request."""
    check_namespace(caller, namespace)
    name = str((body.get("metadata") or {}).get("name") or "")
    involved = body.get("involvedObject") or {}
    target = str(involved.get("name") or "")
    if request is None or not owned(caller, request) or (request.get("metadata") or {}).get("name") != target:
        raise Refused(403, f"{caller.account} may only record Events on its own ApprovalRequests")
    reason = body.get("reason")
    if reason not in EVENT_REASONS:
        raise Refused(403, f"reason must be one of {', '.join(EVENT_REASONS)}")
    if reason == "Executed" and name != target + EXECUTED_EVENT_SUFFIX:
        raise Refused(403, f"the claim of {target} is the Event {target}{EXECUTED_EVENT_SUFFIX}")
    if (
        not name.startswith(target + ".")
        or not _NAME.fullmatch(name)
        or (reason != "Executed" and name == target + EXECUTED_EVENT_SUFFIX)
    ):
        raise Refused(403, f"Event name {name!r} does not belong to {target}")
    meta = request.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {
            "apiVersion": request.get("apiVersion", names.API_VERSION),
            "kind": "ApprovalRequest",
            "name": target,
            "namespace": namespace,
            "uid": meta.get("uid", ""),
        },
        "reason": reason,
        "message": str(body.get("message") or "")[:1024],
        "type": "Normal",
        "source": {"component": "pgwarden-proxy"},
        "reportingComponent": "pgwarden-proxy",
        "reportingInstance": caller.pod,
        "firstTimestamp": body.get("firstTimestamp"),
        "lastTimestamp": body.get("lastTimestamp"),
        "count": 1,
    }


def watched_name(params: Mapping[str, str]) -> str:
    """The proxy watches one request by name; anything broader is refused."""
    selector = params.get("fieldSelector", "")
    if not selector.startswith("metadata.name=") or "," in selector:
        raise Refused(403, "watch one ApprovalRequest: fieldSelector=metadata.name=<name>")
    return request_name(selector.removeprefix("metadata.name="))


def request_name(name: str) -> str:
    """An object name as the API server allows it; anything else (`..`, `/`, `?`) never reaches a
    path the operator requests with its own credentials."""
    if not _NAME.fullmatch(name):
        raise Refused(400, f"{name!r} is not an ApprovalRequest name")
    return name


# -- the HTTP shell ---------------------------------------------------------------------------


def _status(code: int, message: str) -> web.Response:
    reason = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists"}
    return web.json_response(
        {
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "message": message,
            "reason": reason.get(code, "InternalError"),
            "code": code,
        },
        status=code,
    )


class Gateway:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.audience = runtime.settings.injection.token_audience
        # sha256(token) -> (monotonic deadline, caller): one TokenReview per token per TTL
        self.review_ttl = runtime.settings.gateway.review_cache_seconds
        self._reviews: BoundedCache[str, tuple[float, Caller]] = BoundedCache(4096)

    async def caller(self, request: web.Request) -> Caller:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise Refused(401, "no bearer token; the pgwarden proxy presents its projected token")
        token = auth[7:].strip()
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self._reviews.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            review = await self.runtime.kube.create(REVIEW_PATH, body)
        except kube.ApiError as e:
            raise Refused(503, f"the operator cannot review the token now ({e}); try again") from e
        caller = caller_from_review(review.get("status") or {}, self.audience)
        self._reviews.put(key, (time.monotonic() + self.review_ttl, caller))
        return caller

    async def webhook_problem(self) -> str:
        """Why the admission webhook port is not serving TLS ("" when it is): readiness covers
        both servers, since the API server needs the webhook and the sidecars the gateway."""
        wh = self.runtime.settings.webhook
        if not wh.enabled:
            return ""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the handshake is the check; the API server verifies the CA
        host = "127.0.0.1" if wh.addr in ("0.0.0.0", "::", "") else wh.addr
        try:
            async with asyncio.timeout(2):
                _, writer = await asyncio.open_connection(host, wh.port, ssl=ctx)
            writer.close()
        except (OSError, TimeoutError, ssl.SSLError) as e:
            return f"the webhook port {wh.port} does not complete a TLS handshake: {e}"
        return ""

    def _collection(self, namespace: str) -> str:
        return kube.path(names.API_VERSION, PLURAL, namespace)

    async def create(self, caller: Caller, namespace: str, body: Any) -> web.StreamResponse:
        obj = check_create(caller, namespace, body if isinstance(body, Mapping) else {})
        created = await self.runtime.kube.create(self._collection(namespace), obj)
        log.info(
            "ApprovalRequest %s/%s filed for %s (pod %s)",
            namespace,
            (created.get("metadata") or {}).get("name"),
            caller.account,
            caller.pod,
        )
        return web.json_response(created, status=201)

    async def list(self, caller: Caller, namespace: str, params: Mapping[str, str]) -> web.StreamResponse:
        check_namespace(caller, namespace)
        items = await self.runtime.kube.list(self._collection(namespace), params.get("labelSelector") or None)
        return web.json_response(
            {
                "apiVersion": names.API_VERSION,
                "kind": "ApprovalRequestList",
                "metadata": {},
                "items": [o for o in items if owned(caller, o)],
            }
        )

    async def watch(
        self, caller: Caller, namespace: str, params: Mapping[str, str], request: web.Request
    ) -> web.StreamResponse:
        check_namespace(caller, namespace)
        name = watched_name(params)
        current = await self.runtime.kube.get(f"{self._collection(namespace)}/{name}")
        if current is not None and not owned(caller, current):
            raise Refused(403, f"ApprovalRequest {name} is not filed by {caller.account}")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        upstream = {"fieldSelector": f"metadata.name={name}"}
        if params.get("timeoutSeconds"):
            upstream["timeoutSeconds"] = params["timeoutSeconds"]
        async for event in self.runtime.kube.watch(self._collection(namespace), upstream):
            obj = event.get("object") or {}
            if event.get("type") != "ERROR" and not owned(caller, obj):
                continue
            await resp.write(json.dumps(event).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def delete(self, caller: Caller, namespace: str, name: str) -> web.StreamResponse:
        check_namespace(caller, namespace)
        path = f"{self._collection(namespace)}/{request_name(name)}"
        current = await self.runtime.kube.get(path)
        if current is None:
            raise Refused(404, f"ApprovalRequest {name} not found")
        if not owned(caller, current):
            raise Refused(403, f"ApprovalRequest {name} is not filed by {caller.account}")
        await self.runtime.kube.delete(path)
        return web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Success"})

    async def event(self, caller: Caller, namespace: str, body: Any) -> web.StreamResponse:
        body = body if isinstance(body, Mapping) else {}
        target = str((body.get("involvedObject") or {}).get("name") or "")
        request = (
            await self.runtime.kube.get(f"{self._collection(namespace)}/{target}")
            if _NAME.fullmatch(target)
            else None
        )
        event = check_event(caller, namespace, body, request)
        try:
            created = await self.runtime.kube.create(kube.path("v1", "events", namespace), event)
        except kube.Conflict:
            raise Refused(409, f"Event {event['metadata']['name']} already exists") from None
        return web.json_response(created, status=201)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                caller = await self.caller(request)
                ns, name = request.match_info["ns"], request.match_info.get("name", "")
                kind = request.match_info["kind"]
                params = dict(request.query)
                if kind == "events":
                    if request.method != "POST" or name:
                        raise Refused(405, "the gateway only creates Events")
                    return await self.event(caller, ns, await _json(request))
                if request.method == "POST" and not name:
                    return await self.create(caller, ns, await _json(request))
                if request.method == "GET" and not name:
                    if params.get("watch") in ("true", "1"):
                        return await self.watch(caller, ns, params, request)
                    return await self.list(caller, ns, params)
                if request.method == "DELETE" and name:
                    return await self.delete(caller, ns, name)
                raise Refused(405, f"{request.method} {request.path} is not offered by the approvals gateway")
            except Refused as e:
                log.warning("approvals gateway refused %s %s: %s", request.method, request.path, e.message)
                return _status(e.status, e.message)
            except kube.ApiError as e:
                return _status(e.status, str(e))

        async def readyz(_: web.Request) -> web.StreamResponse:
            problem = await self.webhook_problem()
            return web.Response(status=503 if problem else 200, text=problem or "ok")

        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_get("/readyz", readyz)
        base = f"/apis/{names.API_VERSION}/namespaces/{{ns}}/{{kind:{PLURAL}}}"
        for route in (base, base + "/{name}", "/api/v1/namespaces/{ns}/{kind:events}"):
            app.router.add_route("*", route, handle)
        return app


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:
        raise Refused(400, "the body is not JSON") from e


@dataclass
class RunningGateway:
    runner: web.AppRunner
    port: int
    ca_pem: str
    reloader: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self.reloader is not None:
            self.reloader.cancel()
            await asyncio.gather(self.reloader, return_exceptions=True)
        await self.runner.cleanup()


def _files_digest(*paths: str | None) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p:
            try:
                h.update(Path(p).read_bytes())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()


async def reload_on_change(runtime: Runtime, ctx: ssl.SSLContext, interval: float) -> None:
    """Renewed certificates (cert-manager, a chart upgrade) reach the mounted Secret after a
    kubelet sync: load them into the serving context, so new handshakes present them without a
    restart. A half-written pair is retried at the next look."""
    gw = runtime.settings.gateway
    seen = _files_digest(gw.certfile, gw.pkeyfile, gw.cafile)
    while True:
        await asyncio.sleep(interval)
        now = _files_digest(gw.certfile, gw.pkeyfile, gw.cafile)
        if now == seen:
            continue
        try:
            ctx.load_cert_chain(gw.certfile or "", gw.pkeyfile)
            runtime.operator_ca = await asyncio.to_thread(Path(gw.cafile or gw.certfile or "").read_text)
        except (OSError, ssl.SSLError, ValueError) as e:
            log.warning(
                "approvals gateway: the renewed certificate does not load yet (%s); keeping the old one", e
            )
            continue
        seen = now
        log.info("approvals gateway: serving the renewed certificate")


def tls_material(runtime: Runtime, hostnames: list[str]) -> tuple[ssl.SSLContext, str]:
    """(server context, CA PEM the sidecars trust): the configured certificate, or a fresh
    self-signed one (its own CA)."""
    gw = runtime.settings.gateway
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if gw.certfile and gw.pkeyfile:
        ctx.load_cert_chain(gw.certfile, gw.pkeyfile)
        return ctx, Path(gw.cafile or gw.certfile).read_text()
    cert, key = self_signed(hostnames)
    with tempfile.TemporaryDirectory() as d:  # ssl loads keys from files only
        (Path(d) / "c.pem").write_bytes(cert)
        (Path(d) / "k.pem").write_bytes(key)
        ctx.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))
    return ctx, cert.decode()


async def serve(runtime: Runtime, hostnames: list[str] | None = None) -> RunningGateway:
    """Start the gateway on settings.gateway.addr:port (port 0: any free port)."""
    gw = runtime.settings.gateway
    names = hostnames or [h for h in (runtime.settings.webhook.host, "localhost", "127.0.0.1") if h]
    ctx, ca = tls_material(runtime, names)
    runtime.operator_ca = ca
    # a watch whose proxy went away must end its upstream watch too: cancel handlers on disconnect
    runner = web.AppRunner(Gateway(runtime).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, gw.addr, gw.port, ssl_context=ctx)
    await site.start()
    server = getattr(site, "_server", None)
    port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else gw.port
    log.info("approvals gateway on https://%s:%s", gw.addr, port)
    reloader = None
    if gw.certfile and gw.pkeyfile:
        reloader = asyncio.get_running_loop().create_task(reload_on_change(runtime, ctx, gw.reload_interval))
    return RunningGateway(runner, port, ca, reloader)
