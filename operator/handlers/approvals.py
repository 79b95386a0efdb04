"""ApprovalRequest in the operator: admission webhooks, status, expiry, retention, Events.

Thin kopf registrations over the pure rules in `pgwarden.operator.approvals`:
- `pgwarden-approval-decide` (mutating) and `pgwarden-approval-check` (validating) on
  approvalrequests CREATE/UPDATE, failure policy Fail: without the operator nobody can decide,
  which fails closed (pending requests simply expire).
- The AccessPolicy a request names is read from the API for every decision (`review_policy`),
  never from memory that a paused replica could hold stale.
- Every watch event and a periodic sweep reconcile the status (`next_status`): Pending ->
  Approved/Denied (decidedBy copied from the stamped annotation) -> Executed (the proxy's
  `<name>.executed` Event), Expired past expiresAt, deleted after the retention period.

Call `register(registry, runtime)` from `pgwarden.operator.main.register`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import kopf

from pgwarden.k8s import client as kube
from pgwarden.k8s import names
from pgwarden.operator import approvals
from pgwarden.operator.runtime import Runtime, add_to_patch, for_events
from pgwarden.resources import parse_duration
from pgwarden.times import iso

APPROVAL_REQUESTS = (names.GROUP, names.VERSION, names.APPROVAL_REQUESTS)


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
            check_interval=_seconds(e.get("PGWARDEN_APPROVALS_CHECK_INTERVAL"), s.check_interval),
            retention=_seconds(e.get("PGWARDEN_APPROVALS_RETENTION"), s.retention),
        )


def _seconds(value: str | None, default: float) -> float:
    """'30s', '15m', '168h', or a bare number of seconds."""
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        return parse_duration(value)


async def review_policy(runtime: Runtime, obj: Mapping[str, Any] | None) -> approvals.ReviewPolicy | None:
    """The reviewers of the AccessPolicy a request names, read from the API every time.

    Decisions are rare and who may decide is the whole point: memory from the watch stream
    could be stale (a replica that was paused misses a deleted policy), so it is not used here."""
    key = approvals.policy_key(obj or {})
    if key is None:
        return None
    try:
        raw = await runtime.read(names.ACCESS_POLICIES, *key, fresh=True)
    except Exception as e:  # API down or forbidden: refuse (failurePolicy Fail), never guess
        raise kopf.AdmissionError(f"pgwarden cannot look up AccessPolicy {key[0]}/{key[1]}: {e}; try again",
                                  code=503) from e
    return approvals.review_policy_from_object(raw) if raw is not None else None


async def admit(kind: str, operation: str, old: Any, new: Any, userinfo: Mapping[str, Any],
                patch: MutableMapping[str, Any], warnings: list[str], runtime: Runtime) -> None:
    """Run one webhook's rule; raise kopf.AdmissionError (-> allowed: false) when it refuses."""
    old_raw = dict(old) if old is not None else None
    new_raw = dict(new) if new is not None else {}
    policy = await review_policy(runtime, old_raw if old_raw is not None else new_raw)
    fn = approvals.mutate if kind == "mutate" else approvals.validate
    res = fn(operation, old_raw, new_raw, userinfo, policy, runtime.clock(), gateway=runtime.settings.operator_username)
    if not res.allowed:
        raise kopf.AdmissionError(res.message, code=res.code)
    warnings.extend(res.warnings)
    if res.patch:
        add_to_patch(patch, res.patch)


async def reconcile(body: Mapping[str, Any], runtime: Runtime, settings: ApprovalSettings,
                    logger: kopf.Logger) -> None:
    meta = body.get("metadata") or {}
    ns, name = meta.get("namespace") or "default", meta.get("name")
    if not name or meta.get("deletionTimestamp"):
        return
    executed_at = None
    if (body.get("status") or {}).get("phase") == "Approved":
        ev = await runtime.kube.get(kube.path("v1", "events", ns, name + names.EXECUTED_EVENT_SUFFIX))
        if ev is not None:
            executed_at = ev.get("firstTimestamp") or ev.get("eventTime") or iso(runtime.clock())
    change = approvals.next_status(dict(body), runtime.clock(), executed_at=executed_at, retention=settings.retention)
    path = kube.path(names.API_VERSION, names.APPROVAL_REQUESTS, ns, name)
    if change.status:
        await runtime.kube.patch(path + "/status", {"status": dict(change.status)})
    for type_, reason, message in change.events:
        kopf.event(for_events(body), type=type_, reason=reason, message=message)
        logger.info(f"{reason}: {message}")
    if change.delete:
        logger.info(f"deleting {ns}/{name}: ended more than {settings.retention:g}s ago")
        await runtime.kube.delete(path)


async def sweep(runtime: Runtime, settings: ApprovalSettings, logger: kopf.Logger) -> None:
    """Expiry, execution and retention happen without any watch event: look at every request
    every `check_interval` (one list call per namespace watched)."""
    namespaces: list[str | None] = [*runtime.settings.namespaces] or [None]
    while True:
        await asyncio.sleep(settings.check_interval)
        for ns in namespaces:
            try:
                for obj in await runtime.kube.list(kube.path(names.API_VERSION, names.APPROVAL_REQUESTS, ns)):
                    await reconcile(obj, runtime, settings, logger)
            except Exception as e:  # a failed sweep is retried at the next interval
                logger.warning(f"approval sweep failed ({type(e).__name__}: {e}); retrying in {settings.check_interval:g}s")


def register(registry: kopf.OperatorRegistry, runtime: Runtime, settings: ApprovalSettings | None = None) -> None:
    ours = settings or ApprovalSettings.from_env()

    if runtime.settings.webhook.enabled:
        @kopf.on.mutate(*APPROVAL_REQUESTS, registry=registry, id="pgwarden-approval-decide",
                        operations=["CREATE", "UPDATE"], side_effects=False)
        # kopf passes operation, old and new to admission handlers (its WebhookFn type omits them)
        async def _decide(userinfo: kopf.UserInfo, patch: kopf.Patch, warnings: list[str],
                          operation: str = "", old: Any = None, new: Any = None, **_: Any) -> None:
            await admit("mutate", operation, old, new, userinfo, patch, warnings, runtime)

        @kopf.on.validate(*APPROVAL_REQUESTS, registry=registry, id="pgwarden-approval-check",
                          operations=["CREATE", "UPDATE"], side_effects=False)
        async def _check(userinfo: kopf.UserInfo, patch: kopf.Patch, warnings: list[str],
                         operation: str = "", old: Any = None, new: Any = None, **_: Any) -> None:
            await admit("validate", operation, old, new, userinfo, patch, warnings, runtime)

    @kopf.on.event(*APPROVAL_REQUESTS, registry=registry)
    async def _approval_event(event: kopf.RawEvent, body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        if event.get("type") in ("ADDED", "MODIFIED", None):
            await reconcile(body, runtime, ours, logger)

    # One sweep over all requests instead of a kopf.timer per object: kopf timers put a finalizer
    # on every request, which would make a proxy's withdrawal (DELETE) wait for the operator.
    sweeper: dict[str, asyncio.Task[None]] = {}

    @kopf.on.startup(registry=registry)
    async def _start_sweep(logger: kopf.Logger, **_: Any) -> None:
        sweeper["task"] = asyncio.create_task(sweep(runtime, ours, logger))

    @kopf.on.cleanup(registry=registry)
    async def _stop_sweep(**_: Any) -> None:
        task = sweeper.pop("task", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
