"""Status bodies: conditions with typed reasons, observedGeneration and a phase (pure).

Condition types per kind (the CRD enumerates them):
- DatabaseConnection: Reachable, CredentialsReady, BundleReady, Ready
- AccessPolicy / MaskingRule: Valid, Compiled, Ready
- ApprovalRequest: Ready (in `pgwarden.operator.approvals.next_status`)
Every kind has `Ready`, so `kubectl wait --for=condition=Ready` works on each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pgwarden.times import iso

ConditionType = Literal["Reachable", "CredentialsReady", "BundleReady", "Valid", "Compiled", "Ready"]
ConnectionPhase = Literal["Pending", "Ready", "Degraded", "Error"]
# why the operator could not administer the database (DatabaseProblem.reason)
DatabaseReason = Literal[
    "Unreachable", "ConnectFailed", "TLSFailed", "AuthenticationFailed", "DatabaseMissing", "GrantRoleMissing",
    "SQLFailed", "AdminSecretInvalid", "SecretNotOwned",
]
# why a connection's bundle was not published (BundleResult.reason)
BundleReason = Literal["InvalidObjects", "ConfigMapNotOwned"]
# every reason a condition of a DatabaseConnection, AccessPolicy or MaskingRule can carry; `Ready`
# of a DatabaseConnection carries its phase
Reason = Literal[
    DatabaseReason, BundleReason, ConnectionPhase,
    "Connected", "Rotated", "Current", "Published", "ApiError",
    "Validated", "ValidationFailed", "Invalid", "InBundle", "NotInBundle", "ConnectionNotFound",
]


def condition(type_: ConditionType, ok: bool | None, reason: Reason, message: str = "", generation: int | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "type": type_,
        "status": "Unknown" if ok is None else ("True" if ok else "False"),
        "reason": reason,
        "message": message,
        "lastTransitionTime": iso(),
    }
    if generation is not None:
        c["observedGeneration"] = generation
    return c


def merge_conditions(previous: Iterable[Mapping[str, Any]] | None, updates: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace conditions by type; keep lastTransitionTime when the status did not change."""
    out = {c.get("type"): dict(c) for c in previous or [] if isinstance(c, Mapping)}
    for new in updates:
        old = out.get(new["type"])
        if old is not None and old.get("status") == new["status"] and old.get("lastTransitionTime"):
            new = {**new, "lastTransitionTime": old["lastTransitionTime"]}
        out[new["type"]] = new
    return [out[k] for k in sorted(out, key=str)]


def with_ready(conditions: list[dict[str, Any]], ok: bool, reason: Reason, message: str,
               generation: int | None = None) -> list[dict[str, Any]]:
    """The conditions plus the summary condition `Ready` (kept in order, transition time kept)."""
    return merge_conditions(conditions, [condition("Ready", ok, reason, message, generation)])


def connection_conditions(previous: Iterable[Mapping[str, Any]] | None, updates: Iterable[dict[str, Any]],
                          generation: int | None = None) -> tuple[list[dict[str, Any]], ConnectionPhase]:
    """Merged DatabaseConnection conditions with `Ready`, and the phase."""
    merged = merge_conditions(previous, updates)
    phase = connection_phase(merged)
    failing = [c for c in merged if c.get("type") != "Ready" and c.get("status") == "False"]
    message = "; ".join(f"{c['type']}: {c.get('message', '')}" for c in failing) or f"phase {phase}"
    return with_ready(merged, phase == "Ready", phase, message, generation), phase


def connection_phase(conditions: Iterable[Mapping[str, Any]]) -> ConnectionPhase:
    by = {c.get("type"): c.get("status") for c in conditions}
    if by.get("Reachable") == "False" or by.get("CredentialsReady") == "False":
        return "Error"
    if by.get("BundleReady") == "False":
        return "Degraded"
    if by.get("Reachable") == "True" and by.get("CredentialsReady") == "True":
        return "Ready"
    return "Pending"


def compiled_status(errors: list[str], warnings: list[str], digest: str | None, generation: int | None,
                    previous: Iterable[Mapping[str, Any]] | None, published: bool) -> dict[str, Any]:
    """Status of an AccessPolicy or MaskingRule after a bundle compilation."""
    valid = not errors
    conds = [
        condition("Ready", valid and published, "InBundle" if valid and published else ("Invalid" if not valid
                  else "NotInBundle"), "valid and in the published bundle" if valid and published else
                  "not in the sidecars' bundle: see the Valid and Compiled conditions", generation),
        condition("Valid", valid, "Validated" if valid else "ValidationFailed",
                  "; ".join(errors) if errors else ("; ".join(warnings) if warnings else "valid"), generation),
        condition("Compiled", valid and published, "InBundle" if valid and published else "NotInBundle",
                  f"in bundle {digest}" if valid and published else
                  "the connection's last good bundle stays in place until every object is valid", generation),
    ]
    out: dict[str, Any] = {
        "phase": "Valid" if valid else "Invalid",
        "observedGeneration": generation,
        "conditions": merge_conditions(previous, conds),
        "warnings": warnings,
        "errors": errors,
    }
    if digest and published:
        out["bundleDigest"] = digest
    return out


def connection_status_example() -> dict[str, Any]:
    """A fully populated DatabaseConnection status (used by the schema test)."""
    conds, phase = connection_conditions(None, [
        condition("Reachable", True, "Connected", "PostgreSQL 16.2", 3),
        condition("CredentialsReady", True, "Rotated", "pgw_c_b active, version 4", 3),
        condition("BundleReady", True, "Published", "2 policies, 1 masking rule", 3)], 3)
    return {
        "phase": phase,
        "observedGeneration": 3,
        "conditions": conds,
        "serverVersion": "16.2",
        "credentials": {"secretName": "c-pgwarden-credentials", "activeRole": "pgw_c_b", "version": 4,
                        "rotatedAt": iso(0), "nextRotationAt": iso(3600), "graceEndsAt": iso(120),
                        "lastAction": "rotate"},
        "bundle": {"configMapName": "c-pgwarden-bundle", "digest": "0123456789abcdef", "updatedAt": iso(0),
                   "policies": 2, "maskingRules": 1},
    }
