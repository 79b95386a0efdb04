"""ApprovalRequest in the operator: admission webhooks, status, expiry, retention, Events.

Thin kopf registrations over the pure rules in `pgwarden.operator.approvals`:
- `pgwarden-approval-decide` (mutating) and `pgwarden-approval-check` (validating) on
  approvalrequests CREATE/UPDATE, failure policy Fail: without the operator nobody can decide,
  which fails closed (pending requests simply expire).
- An index of AccessPolicies' reviewers, so the webhook answers from memory.
- Every watch event and a periodic timer reconcile the status (`next_status`): Pending ->
  Approved/Denied (decidedBy copied from the stamped annotation) -> Executed (the proxy's
  `<name>.executed` Event), Expired past expiresAt, deleted after the retention period.

Call `register(registry, runtime)` from `pgwarden.operator.main.register`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import kopf
from pgwarden.operator import approvals, kube
from pgwarden.operator.runtime import Runtime

from pgwarden.resources import parse_duration

APPROVAL_REQUESTS = ("pgwarden.dev", "v1alpha1", "approvalrequests")
POLICIES = ("pgwarden.dev", "v1alpha1", "accesspolicies")


@dataclass(frozen=True)
class ApprovalSettings:
    """How the operator looks after ApprovalRequests."""

    # how often every request is looked at (expiry, execution) even when nothing changes
    check_interval: float = 15.0
    # decided / expired / executed requests are deleted this long after they ended
    retention: float = 7 * 86400.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApprovalSettings:
        e = os.environ if env is None else env
        s = cls()
        return cls(
            check_interval=parse_duration(e.get("PGWARDEN_APPROVALS_CHECK_INTERVAL", s.check_interval)),
            retention=parse_duration(e.get("PGWARDEN_APPROVALS_RETENTION", s.retention)),
        )


def lookup(index: Any, obj: Mapping[str, Any] | None) -> approvals.ReviewPolicy | None:
    key = approvals.policy_key(obj or {})
    if key is None or index is None:
        return None
    store = index.get(key)
    return next(iter(store), None) if store is not None else None


def _merge(dst: MutableMapping[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping):
            _merge(dst.setdefault(k, {}), v)
        else:
            dst[k] = v


def admit(kind: str, operation: str, old: Any, new: Any, userinfo: Mapping[str, Any], index: Any,
          patch: MutableMapping[str, Any], warnings: list[str], runtime: Runtime) -> None:
    """Run one webhook's rule; raise kopf.AdmissionError (-> allowed: false) when it refuses."""
    old_raw = dict(old) if old is not None else None
    new_raw = dict(new) if new is not None else {}
    policy = lookup(index, old_raw if old_raw is not None else new_raw)
    fn = approvals.mutate if kind == "mutate" else approvals.validate
    res = fn(operation, old_raw, new_raw, userinfo, policy, runtime.clock())
    if not res.allowed:
        raise kopf.AdmissionError(res.message, code=res.code)
    warnings.extend(res.warnings)
    if res.patch:
        _merge(patch, res.patch)


async def reconcile(body: Mapping[str, Any], runtime: Runtime, settings: ApprovalSettings,
                    logger: logging.Logger | logging.LoggerAdapter) -> None:
    meta = body.get("metadata") or {}
    ns, name = meta.get("namespace") or "default", meta.get("name")
    if not name or meta.get("deletionTimestamp"):
        return
    executed_at = None
    if (body.get("status") or {}).get("phase") == "Approved":
        ev = await runtime.kube.get(kube.path("v1", "events", ns, name + approvals.EXECUTED_EVENT_SUFFIX))
        if ev is not None:
            executed_at = ev.get("firstTimestamp") or ev.get("eventTime") or approvals.iso(runtime.clock())
    change = approvals.next_status(dict(body), runtime.clock(), executed_at=executed_at, retention=settings.retention)
    path = kube.path(kube.PGW, "approvalrequests", ns, name)
    if change.status:
        await runtime.kube.patch(path + "/status", {"status": dict(change.status)})
    for type_, reason, message in change.events:
        kopf.event(dict(body), type=type_, reason=reason, message=message)
        logger.info(f"{reason}: {message}")
    if change.delete:
        logger.info(f"deleting {ns}/{name}: ended more than {settings.retention:g}s ago")
        await runtime.kube.delete(path)


def register(registry: kopf.OperatorRegistry, runtime: Runtime, settings: ApprovalSettings | None = None) -> None:
    ours = settings or ApprovalSettings.from_env()

    @kopf.index(*POLICIES, registry=registry)
    def pgwarden_review_policies(body: kopf.Body, **_: Any) -> dict[tuple[str, str], approvals.ReviewPolicy]:
        p = approvals.review_policy_from_object(dict(body))
        if p is None:
            return {}
        ns, _, name = p.id.partition("/")
        return {(ns, name): p}

    if runtime.settings.webhook.enabled:
        @kopf.on.mutate(*APPROVAL_REQUESTS, registry=registry, id="pgwarden-approval-decide",
                        operations=["CREATE", "UPDATE"], side_effects=False)
        def _decide(operation: str, old: Any, new: Any, userinfo: Mapping[str, Any], patch: kopf.Patch,
                    warnings: list[str], pgwarden_review_policies: kopf.Index[Any, Any], **_: Any) -> None:
            admit("mutate", operation, old, new, userinfo, pgwarden_review_policies, patch, warnings, runtime)

        @kopf.on.validate(*APPROVAL_REQUESTS, registry=registry, id="pgwarden-approval-check",
                          operations=["CREATE", "UPDATE"], side_effects=False)
        def _check(operation: str, old: Any, new: Any, userinfo: Mapping[str, Any], patch: kopf.Patch,
                   warnings: list[str], pgwarden_review_policies: kopf.Index[Any, Any], **_: Any) -> None:
            admit("validate", operation, old, new, userinfo, pgwarden_review_policies, patch, warnings, runtime)

    @kopf.on.event(*APPROVAL_REQUESTS, registry=registry)
    async def _approval_event(event: Mapping[str, Any], body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        if event.get("type") in ("ADDED", "MODIFIED", None):
            await reconcile(body, runtime, ours, logger)

    @kopf.timer(*APPROVAL_REQUESTS, registry=registry, id="approval-clock", interval=ours.check_interval)
    async def _approval_clock(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        await reconcile(body, runtime, ours, logger)
