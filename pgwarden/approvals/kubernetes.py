"""The Kubernetes approval backend: an `ApprovalRequest` per statement, decided with kubectl.

The proxy only ever creates, reads, watches and deletes (= withdraws) ApprovalRequests; it
cannot update or patch them (RBAC, docs/approvals.md). Who decided is therefore never something
the proxy or the agent wrote: the operator's admission webhook stamps the approver from the API
server's `userInfo`, and the operator writes `status` (a subresource the agent cannot write).
The proxy trusts `status.phase` together with `spec.decision`, and re-checks that the object
still carries exactly the statement it asked about.

One-time use without update rights: executing an approval creates the Event
`<request>.executed` (create is atomic — a second claimant gets 409 Conflict); the operator
then moves the request to phase Executed, which outlives the Event's TTL.

The HTTP layer is the shared client (`pgwarden.k8s.client`: a base URL, a bearer token, a CA), so
tests run it against kmock's KubernetesEmulator and a pod runs it with its service account.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from pgwarden.approvals.model import (
    APPROVED,
    DENIED,
    EXPIRED,
    ApprovalSpec,
    Outcome,
    Preview,
    Ticket,
    kubectl_patch_command,
    parse_iso,
)
from pgwarden.approvals.notify import Notifier
from pgwarden.k8s.client import (
    IN_CLUSTER_DIR,
    ApiConfig,
    ApiError,
    Kube,
    in_cluster_namespace,
    in_cluster_server,
    path,
)
from pgwarden.k8s.names import (
    ANNOTATION_DECIDED_BY,
    API_VERSION,
    APPROVAL_REQUESTS,
    EXECUTED_EVENT_SUFFIX,
    LABEL_CONNECTION,
    LABEL_MANAGED_BY,
    LABEL_STATEMENT_HASH,
    MANAGED_BY_PROXY,
    Kind,
)
from pgwarden.times import iso

log = logging.getLogger("pgwarden.approvals.kubernetes")

PLURAL = APPROVAL_REQUESTS
KIND: Kind = "ApprovalRequest"
KubeError = ApiError  # what the API server answered; `status` is its HTTP code


@dataclass(frozen=True)
class KubeApi:
    """Where the API server is and how the proxy proves who it is."""

    server: str
    namespace: str = "default"
    token: str | None = None
    token_file: str | None = None  # re-read on every request: projected tokens rotate
    ca_file: str | None = None
    insecure: bool = False

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> KubeApi:
        """`approvals: {backend: kubernetes, namespace?, apiUrl?, tokenFile?, caFile?}`;
        without apiUrl, the pod's own service account (in-cluster)."""
        namespace = str(section.get("namespace") or os.environ.get("POD_NAMESPACE") or in_cluster_namespace()
                        or "default")
        url = section.get("apiUrl")
        if url:
            return cls(server=str(url).rstrip("/"), namespace=namespace, token_file=section.get("tokenFile"),
                       ca_file=section.get("caFile"), insecure=bool(section.get("insecureSkipTlsVerify", False)))
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not (host and port and (IN_CLUSTER_DIR / "token").exists()):
            raise ValueError("approvals.backend kubernetes: not running in a pod and no approvals.apiUrl given; "
                             "set apiUrl (and tokenFile), or use backend: local")
        return cls(server=in_cluster_server(host, port), namespace=namespace,
                   token_file=section.get("tokenFile") or str(IN_CLUSTER_DIR / "token"),
                   ca_file=section.get("caFile") or str(IN_CLUSTER_DIR / "ca.crt"))

    def config(self) -> ApiConfig:
        return ApiConfig(server=self.server, token=self.token, token_file=self.token_file, ca_file=self.ca_file,
                         insecure=self.insecure, default_namespace=self.namespace)


class KubeClient(Kube):
    """The shared client for one `KubeApi`; each request gives up after 30 s (watches run on)."""

    def __init__(self, api: KubeApi) -> None:
        super().__init__(api.config(), timeout=30)
        self.api = api


def collection_path(namespace: str) -> str:
    return path(API_VERSION, PLURAL, namespace)


def events_path(namespace: str) -> str:
    return path("v1", "events", namespace)


# -- pure builders / readers ------------------------------------------------------------------

def request_name(spec: ApprovalSpec) -> str:
    """DNS-1123, recognisable in `kubectl get`: <connection>-<hash prefix>-<random>."""
    return f"{spec.connection[:40].rstrip('-.')}-{spec.hash[:8]}-{secrets.token_hex(3)}"


def build_request(spec: ApprovalSpec, name: str, namespace: str, now: float) -> dict[str, Any]:
    """The ApprovalRequest object the proxy creates (decision: pending; the webhook refuses others)."""
    who = spec.requester
    wl = spec.workload
    pod = f"{wl.get('namespace', namespace)}/{wl['pod']}" if wl.get("pod") else ""
    # the proxy's own pod and service account (who files the request, which the operator's
    # gateway checks); the client's identity is `subject`
    sa = (f"{wl.get('namespace', namespace)}/{wl['service_account']}" if wl.get("service_account")
          else who.service_account)
    requester: dict[str, Any] = {"subject": who.subject, "groups": list(who.groups)}
    if who.issuer:
        requester["issuer"] = who.issuer
    if pod:
        requester["pod"] = pod
    if sa:
        requester["serviceAccount"] = sa
    ns_policy, _, policy_name = spec.policy_id.rpartition("/")
    spec_out: dict[str, Any] = {
        "connectionRef": {"name": spec.connection},
        "requester": requester,
        "statement": spec.statement,
        "statementHash": spec.hash,
        "parametersHash": spec.params_hash,
        "rule": spec.rule,
        "mode": spec.mode,
        "expiresAt": iso(now + spec.timeout),
        "decision": "pending",
    }
    if spec.params:
        spec_out["params"] = list(spec.params)
    if spec.preview is not None:
        spec_out["preview"] = spec.preview.to_json()
    if policy_name:
        spec_out["policy"] = policy_name if ns_policy in ("", namespace) else spec.policy_id
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY_PROXY,
                LABEL_CONNECTION: spec.connection,
                LABEL_STATEMENT_HASH: spec.hash[:63],
            },
        },
        "spec": spec_out,
    }


def matches(obj: Mapping[str, Any], spec: ApprovalSpec) -> bool:
    """Does this object carry exactly the statement, parameters, requester, connection (and
    policy) the proxy is about to run? The hash is a lookup key, not the proof."""
    s = obj.get("spec") or {}
    if s.get("statement") != spec.statement or s.get("parametersHash") != spec.params_hash:
        return False
    # the parameters the reviewer was shown, not only their hash: the agent's service account can
    # create a request whose `params` and `parametersHash` disagree
    if list(s.get("params") or []) != list(spec.params):
        return False
    requester = s.get("requester") or {}
    if requester.get("subject") != spec.requester.subject:
        return False
    if (requester.get("issuer") or "") != spec.requester.issuer:  # the same sub from another issuer
        return False
    if (s.get("connectionRef") or {}).get("name") != spec.connection:
        return False
    policy = s.get("policy") or ""
    if spec.policy_id and policy and spec.policy_id.rpartition("/")[2] != policy.rpartition("/")[2]:
        return False
    return True


def outcome_of(obj: Mapping[str, Any]) -> Outcome | None:
    """The proxy's reading of a request: None while undecided. Approved needs both the
    operator's status and the (webhook-guarded) spec to agree."""
    status = obj.get("status") or {}
    phase = status.get("phase") or ""
    decision = (obj.get("spec") or {}).get("decision")
    by = status.get("decidedBy") or {}
    decided_by = by.get("username", "") if isinstance(by, Mapping) else str(by)
    if not decided_by:  # a denial can be read before the operator wrote status: the webhook's stamp
        try:
            stamp = json.loads(((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DECIDED_BY) or "{}")
            decided_by = str(stamp.get("username", "")) if isinstance(stamp, dict) else ""
        except ValueError:
            decided_by = ""
    reason = (obj.get("spec") or {}).get("reason") or ""
    if phase == "Approved" and decision == APPROVED:
        return Outcome(APPROVED, decided_by, reason)
    if phase == "Denied" or decision == DENIED:
        return Outcome(DENIED, decided_by, reason)
    if phase in ("Expired", "Executed"):
        return Outcome(EXPIRED, decided_by, f"the request is {phase.lower()}")
    return None


def build_event(obj: Mapping[str, Any], name: str, reason: str, message: str, reporter: str,
                now: float) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    ts = iso(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": meta.get("namespace")},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta.get("name"),
                           "namespace": meta.get("namespace"), "uid": meta.get("uid", "")},
        "reason": reason,
        "message": message[:1024],
        "type": "Normal",
        "source": {"component": "pgwarden-proxy"},
        "reportingComponent": "pgwarden-proxy",
        "reportingInstance": reporter or "pgwarden-proxy",
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
    }


# -- the backend ------------------------------------------------------------------------------

class KubernetesApprovals:
    """`ApprovalBackend` over ApprovalRequest custom resources."""

    def __init__(self, api: KubeClient, namespace: str | None = None, *, notifier: Notifier | None = None,
                 reporter: str = "", retry_delay: float = 1.0, clock: Any = time.time) -> None:
        self.client = api
        self.namespace = namespace or api.api.namespace
        self.notifier = notifier
        self.reporter = reporter or os.environ.get("POD_NAME", "")
        self.retry_delay = retry_delay
        self.clock = clock
        self._objects: dict[str, dict[str, Any]] = {}

    def _path(self, name: str = "") -> str:
        return path(API_VERSION, PLURAL, self.namespace, name or None)

    def _ticket(self, obj: Mapping[str, Any]) -> Ticket:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        name = meta["name"]
        expires = spec.get("expiresAt")
        return Ticket(id=name, name=name, expires_at=parse_iso(expires) if expires else 0.0,
                      approve_command=kubectl_patch_command(name, self.namespace, "approved"),
                      deny_command=kubectl_patch_command(name, self.namespace, "denied"),
                      namespace=self.namespace, preview=Preview.from_json(spec.get("preview")))

    async def create(self, spec: ApprovalSpec) -> Ticket:
        body = build_request(spec, request_name(spec), self.namespace, self.clock())
        try:
            obj = await self.client.request("POST", self._path(), body)
        except KubeError as e:
            hint = (" — the proxy's service account needs create/get/list/watch/delete on approvalrequests "
                    "(docs/approvals.md)" if e.status == 403 else "")
            raise KubeError(e.status, f"could not create the ApprovalRequest: {e}{hint}") from e
        obj = obj if isinstance(obj, dict) and obj.get("metadata") else body
        ticket = self._ticket(obj)
        self._objects[ticket.name] = obj
        if self.notifier is not None:
            self.notifier.notify(spec, ticket)
        return ticket

    async def wait(self, ticket: Ticket, timeout: float) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(timeout, ticket.expires_at - self.clock() if ticket.expires_at else timeout))
        try:
            while (remaining := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(remaining):
                        outcome = await self._watch_once(ticket, remaining)
                except TimeoutError:
                    break
                except (aiohttp.ClientError, KubeError, ValueError) as e:
                    log.info("watching %s: %s; retrying", ticket.name, e)
                    outcome = None
                    await asyncio.sleep(min(self.retry_delay, max(0.0, deadline - loop.time())))
                if outcome is not None:
                    return await self._settle(ticket, outcome)
            return Outcome(EXPIRED, "", "no decision before the timeout")
        except asyncio.CancelledError:
            await self.withdraw(ticket)
            raise

    async def _watch_once(self, ticket: Ticket, remaining: float) -> Outcome | None:
        params = {"fieldSelector": f"metadata.name={ticket.name}", "timeoutSeconds": str(max(1, int(remaining)))}
        async for event in self.client.watch(self._path(), params):
            obj = event.get("object") or {}
            if (obj.get("metadata") or {}).get("name") != ticket.name:
                continue
            if event.get("type") == "DELETED":
                return Outcome(EXPIRED, "", "the request was deleted")
            if event.get("type") == "ERROR":
                raise KubeError(int(obj.get("code") or 500), str(obj.get("message")))
            self._objects[ticket.name] = obj
            outcome = outcome_of(obj)
            if outcome is not None:
                return outcome
        # the server ended the watch (timeoutSeconds, restart): the caller watches again
        await asyncio.sleep(0)
        return None

    async def _settle(self, ticket: Ticket, outcome: Outcome) -> Outcome:
        if outcome.state != APPROVED:
            return outcome
        obj = self._objects.get(ticket.name) or {}
        if not await self._claim(obj, f"the held statement runs now (approved by {outcome.decided_by})"):
            return Outcome(EXPIRED, outcome.decided_by, "the approval was already used")
        return outcome

    async def _claim(self, obj: Mapping[str, Any], message: str) -> bool:
        """Atomically mark an approval as used: only one creator of `<name>.executed` wins."""
        name = (obj.get("metadata") or {}).get("name", "")
        event = build_event(obj, name + EXECUTED_EVENT_SUFFIX, "Executed", message, self.reporter, self.clock())
        try:
            await self.client.request("POST", events_path(self.namespace), event)
        except KubeError as e:
            if e.status == 409:
                return False
            log.error("could not record the use of approval %s (%s); refusing to run it — the proxy's service "
                      "account needs create on events", name, e)
            return False
        return True

    async def withdraw(self, ticket: Ticket) -> None:
        try:
            await self.client.request("DELETE", self._path(ticket.name))
        except KubeError as e:
            if e.status != 404:
                log.warning("could not withdraw %s: %s (it will expire at %s)", ticket.name, e, iso(ticket.expires_at))
        except aiohttp.ClientError as e:
            log.warning("could not withdraw %s: %s (it will expire at %s)", ticket.name, e, iso(ticket.expires_at))
        finally:
            self._objects.pop(ticket.name, None)

    async def consume(self, spec: ApprovalSpec) -> Ticket | None:
        data = await self.client.request("GET", self._path(), params={"labelSelector": f"{LABEL_STATEMENT_HASH}={spec.hash[:63]}"})
        now = self.clock()
        for obj in (data or {}).get("items") or []:
            s = obj.get("spec") or {}
            if s.get("mode") != "defer" or not matches(obj, spec):
                continue
            outcome = outcome_of(obj)
            if outcome is None or outcome.state != APPROVED:
                continue
            expires = s.get("expiresAt")
            if not expires or parse_iso(expires) <= now:
                continue
            if await self._claim(obj, f"deferred statement runs now (approved by {outcome.decided_by})"):
                # who approved goes into the audit chain before the statement is forwarded
                ticket = replace(self._ticket(obj), decided_by=outcome.decided_by)
                self._objects[ticket.name] = obj
                return ticket
        return None

    async def executed(self, ticket: Ticket, outcome_tag: str) -> None:
        obj = self._objects.pop(ticket.name, None) or {"metadata": {"name": ticket.name, "namespace": self.namespace}}
        event = build_event(obj, f"{ticket.name}.{secrets.token_hex(4)}", "StatementCompleted",
                            f"the approved statement completed: {outcome_tag}", self.reporter, self.clock())
        try:
            await self.client.request("POST", events_path(self.namespace), event)
        except (KubeError, aiohttp.ClientError) as e:
            log.warning("could not record the completion of %s: %s", ticket.name, e)

    async def close(self) -> None:
        if self.notifier is not None:
            await self.notifier.close()
        await self.client.close()
