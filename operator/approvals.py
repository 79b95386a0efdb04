"""ApprovalRequest rules in the cluster, as pure functions: admission and status.

Admission (the API server calls the mutating webhook, then the validating one):
- Who decided comes from the AdmissionReview's `userInfo` — what the API server authenticated —
  and is stamped by the mutating webhook into `pgwarden.dev/decided-by`. Nobody can set that
  annotation (or `pgwarden.dev/approved-by`, `pgwarden.dev/created-by`) themselves: an update that
  changes them is refused before the webhook would stamp anything.
- Reviewers are those of the AccessPolicy the request names in `spec.policy` (same namespace,
  same connection), looked up by the operator — never a list carried by the request, because the
  request is written by the agent's own service account.
- The requester (subject, service account, or the account that created the object) never decides.
- A decision is final: pending -> approved | denied, never back, never flipped.
- minApprovals > 1: each approval is recorded in `pgwarden.dev/approved-by`; the mutation keeps
  `spec.decision` at pending until the threshold of distinct reviewers is reached.
- Apart from the decision (and its reason), the spec is immutable.
The validating webhook re-checks the final object, so a misconfigured or skipped mutation
cannot let an unstamped decision through.

Status: `next_status` turns the object (and whether its approval was used) into the status the
operator writes, the Events to post, and whether to delete it after the retention period.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

from pgwarden.approvals.model import (
    Preview,
    describe_reviewers,
    identity_from_username,
    kubectl_patch_command,
    parse_iso,
    same_principal,
)
from pgwarden.k8s.merge import merge_into
from pgwarden.k8s.names import ANNOTATION_APPROVED_BY, ANNOTATION_CREATED_BY, ANNOTATION_DECIDED_BY
from pgwarden.resources import Document, ResourceError
from pgwarden.subjects import Identity, SubjectRef, parse_subjects
from pgwarden.times import iso

DECIDED_BY = ANNOTATION_DECIDED_BY
APPROVALS = ANNOTATION_APPROVED_BY
CREATED_BY = ANNOTATION_CREATED_BY
MANAGED_ANNOTATIONS = (DECIDED_BY, APPROVALS, CREATED_BY)
MUTABLE_SPEC = ("decision", "reason", "withoutPreview")
# preview states that leave the reviewer without a count: approving then is an explicit choice
UNMEASURED_PREVIEWS = ("failed", "timeout")
DECISIONS = ("approved", "denied")


@dataclass(frozen=True)
class ReviewPolicy:
    """The approval part of one AccessPolicy, as the webhook needs it."""

    id: str  # namespace/name
    connection: str
    reviewers: tuple[SubjectRef, ...]
    min_approvals: int = 1


def review_policy_from_object(obj: Mapping[str, Any]) -> ReviewPolicy | None:
    """From an AccessPolicy object; None if it names no reviewers (then nobody can decide)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    doc = Document(kind="AccessPolicy", name=str(meta.get("name", "")), namespace=str(meta.get("namespace") or "default"),
                   spec=spec)
    approval = spec.get("approval") or {}
    try:
        reviewers = parse_subjects(doc, approval.get("reviewers"), "spec.approval.reviewers")
    except ResourceError:
        return None
    if not reviewers:
        return None
    n = approval.get("minApprovals", 1)
    return ReviewPolicy(id=f"{doc.namespace}/{doc.name}", connection=str((spec.get("connectionRef") or {}).get("name", "")),
                        reviewers=reviewers, min_approvals=n if isinstance(n, int) and n >= 1 else 1)


@dataclass(frozen=True)
class Admission:
    allowed: bool
    message: str = ""
    code: int = 200
    # merge-style changes to apply to the incoming object (mutating webhook only)
    patch: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def json_patch(self, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The RFC 6902 patch the API server applies (as kopf builds it from a merge patch)."""
        after = copy.deepcopy(dict(obj))
        merge_into(after, self.patch, none_deletes=True)
        return list(jsonpatch.JsonPatch.from_diff(dict(obj), after).patch)


def deny(message: str, code: int = 403) -> Admission:
    return Admission(False, message, code)


# -- helpers ----------------------------------------------------------------------------------

def _annotations(obj: Mapping[str, Any] | None) -> Mapping[str, str]:
    return ((obj or {}).get("metadata") or {}).get("annotations") or {}


def _spec(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (obj or {}).get("spec") or {}


def _name(obj: Mapping[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("name", "?"))


def userinfo_identity(userinfo: Mapping[str, Any]) -> Identity:
    return identity_from_username(str(userinfo.get("username") or ""), userinfo.get("groups") or ())


POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"


def requester_mismatch(obj: Mapping[str, Any], userinfo: Mapping[str, Any], gateway: str = "") -> str:
    """Why `userinfo` may not file this request in its requester's name ("" when it may).

    The operator's own account (`gateway`) files requests for proxies after checking their
    tokens; anyone else files only in their own name: a service account as
    `spec.requester.serviceAccount` (and, with a pod-bound token, as `spec.requester.pod`), any
    other user as `spec.requester.subject`."""
    username = str(userinfo.get("username") or "")
    if gateway and username == gateway:
        return ""
    req = _spec(obj).get("requester") or {}
    who = userinfo_identity(userinfo)
    if who.service_account:
        if req.get("serviceAccount") != who.service_account:
            return (f"spec.requester.serviceAccount must be the caller, {who.service_account}, not "
                    f"{req.get('serviceAccount')!r}")
        pods = ((userinfo.get("extra") or {}).get(POD_NAME_EXTRA)) or []
        ns = who.service_account.partition("/")[0]
        if pods and req.get("pod") != f"{ns}/{pods[0]}":
            return f"spec.requester.pod must be the caller's pod, {ns}/{pods[0]}, not {req.get('pod')!r}"
        return ""
    if req.get("subject") != username:
        return f"spec.requester.subject must be the caller, {username}, not {req.get('subject')!r}"
    return ""


def stamp(userinfo: Mapping[str, Any], at: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"username": str(userinfo.get("username") or ""), "groups": list(userinfo.get("groups") or [])}
    if at is not None:
        out["at"] = iso(at)
    return out


def read_approvals(obj: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    raw = _annotations(obj).get(APPROVALS)
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        return []
    return [a for a in data if isinstance(a, dict)] if isinstance(data, list) else []


def read_decided_by(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    raw = _annotations(obj).get(DECIDED_BY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def is_requester(obj: Mapping[str, Any] | None, who: Identity) -> bool:
    req = _spec(obj).get("requester") or {}
    if same_principal(who, str(req.get("subject") or ""), str(req.get("serviceAccount") or "")):
        return True
    creator = _annotations(obj).get(CREATED_BY)
    if creator:
        try:
            username = json.loads(creator).get("username", "")
        except (ValueError, AttributeError):
            username = ""
        if username and same_principal(who, username):
            return True
    return False


def policy_key(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, name) of the AccessPolicy the request names; only the request's own namespace."""
    ns = str(((obj.get("metadata") or {}).get("namespace")) or "default")
    ref = str(_spec(obj).get("policy") or "")
    if not ref:
        return None
    pns, _, pname = ref.rpartition("/")
    if pns and pns != ns:
        return None
    return ns, pname


def _expired(obj: Mapping[str, Any], now: float) -> str:
    expires = _spec(obj).get("expiresAt") or ((obj.get("status") or {}).get("expiresAt"))
    if (obj.get("status") or {}).get("phase") == "Expired":
        return str(expires or "its expiry time")
    if expires:
        try:
            if parse_iso(str(expires)) <= now:
                return str(expires)
        except ValueError:
            return "an unreadable time"
    return ""


def _spec_without_decision(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in _spec(obj).items() if k not in MUTABLE_SPEC}


# -- authorisation of one decision (shared by both webhooks) ----------------------------------

def authorize(old: Mapping[str, Any], new_decision: str, userinfo: Mapping[str, Any],
              policy: ReviewPolicy | None, now: float, *, without_preview: bool = False) -> Admission | None:
    """None when `userinfo` may move the request from pending to `new_decision`; else the refusal.
    `without_preview`: the reviewer said (spec.withoutPreview) they approve a write whose preview
    did not measure it."""
    name = _name(old)
    old_decision = _spec(old).get("decision") or "pending"
    if old_decision != "pending":
        by = (read_decided_by(old) or {}).get("username", "")
        return deny(f"ApprovalRequest {name} is already {old_decision}" + (f" by {by}" if by else "")
                    + "; a decision is final — the requester must run the statement again for a new request", 409)
    if new_decision not in DECISIONS:
        return deny(f"spec.decision must be approved or denied, not {new_decision!r}", 400)
    preview = _spec(old).get("preview")
    preview = preview if isinstance(preview, Mapping) else {}
    state = preview.get("state")
    if new_decision == "approved" and state in UNMEASURED_PREVIEWS and not without_preview:
        namespace = str((old.get("metadata") or {}).get("namespace", ""))
        return deny(
            f"the preview of ApprovalRequest {name} {'timed out' if state == 'timeout' else 'failed'}"
            f" ({preview.get('reason') or 'no reason given'}): nobody knows how many rows it changes. Read the "
            "statement, and approve with spec.withoutPreview if you accept that: kubectl patch approvalrequest "
            f"{name} -n {namespace} --type merge -p "
            "'{\"spec\":{\"decision\":\"approved\",\"withoutPreview\":true}}'", 400)
    who = userinfo_identity(userinfo)
    if not who.subject:
        return deny("the API server did not say who you are (no userInfo.username); refusing the decision")
    if is_requester(old, who):
        return deny(f"{who.subject} requested this statement and cannot decide it; ask another reviewer"
                    + (f" ({describe_reviewers(policy.reviewers)})" if policy else ""))
    expired = _expired(old, now)
    if expired:
        return deny(f"ApprovalRequest {name} expired at {expired}; the requester must run the statement again", 409)
    key = policy_key(old)
    if policy is None or key is None:
        ref = _spec(old).get("policy") or "(none)"
        return deny(f"ApprovalRequest {name} names AccessPolicy {ref}, which does not exist in this namespace or names "
                    "no reviewers; nobody can decide this request (it will expire)")
    conn = str((_spec(old).get("connectionRef") or {}).get("name", ""))
    if policy.connection and conn != policy.connection:
        return deny(f"AccessPolicy {policy.id} governs connection {policy.connection}, not {conn}; "
                    "nobody can decide this request (it will expire)")
    if not any(r.matches(who) for r in policy.reviewers):
        groups = ", ".join(who.groups) or "none"
        return deny(f"{who.subject} (groups: {groups}) is not a reviewer under AccessPolicy {policy.id}; reviewers: "
                    f"{describe_reviewers(policy.reviewers)}")
    return None


# -- the mutating webhook ---------------------------------------------------------------------

def mutate(operation: str, old: Mapping[str, Any] | None, new: Mapping[str, Any], userinfo: Mapping[str, Any],
           policy: ReviewPolicy | None, now: float, *, gateway: str = "") -> Admission:
    """Decide and stamp. CREATE: pending only, in the caller's own name (`requester_mismatch`;
    `gateway` is the operator's username), stamp the creator. UPDATE: see the module docstring."""
    new_ann = _annotations(new)
    if operation == "CREATE":
        forged = [a for a in MANAGED_ANNOTATIONS if a in new_ann]
        if forged:
            return deny(f"annotation {forged[0]} is set by the pgwarden webhook from the API server's identity "
                        "of the caller; remove it from the object")
        if (_spec(new).get("decision") or "pending") != "pending":
            return deny("an ApprovalRequest is created with spec.decision: pending; reviewers decide it afterwards")
        mismatch = requester_mismatch(new, userinfo, gateway)
        if mismatch:
            return deny(f"an ApprovalRequest is filed in the caller's own name: {mismatch}")
        return Admission(True, patch={"metadata": {"annotations": {CREATED_BY: json.dumps(stamp(userinfo, now))}}})
    if operation != "UPDATE" or old is None:
        return Admission(True)
    old_ann = _annotations(old)
    for a in MANAGED_ANNOTATIONS:
        if new_ann.get(a) != old_ann.get(a):
            return deny(f"annotation {a} is set only by the pgwarden webhook from the API server's identity of the "
                        "caller; patch spec.decision instead: "
                        f"{kubectl_patch_command(_name(old), str((old.get('metadata') or {}).get('namespace', '')))}")
    if _spec_without_decision(new) != _spec_without_decision(old):
        changed = sorted(k for k in set(_spec(new)) | set(_spec(old))
                         if k not in MUTABLE_SPEC and _spec(new).get(k) != _spec(old).get(k))
        return deny(f"only spec.decision and spec.reason of an ApprovalRequest may change (not spec.{changed[0]}); "
                    "the statement a reviewer approves is the one the proxy asked about", 400)
    old_decision = _spec(old).get("decision") or "pending"
    new_decision = _spec(new).get("decision") or "pending"
    if new_decision == old_decision:
        if _spec(new).get("reason") != _spec(old).get("reason"):
            return deny("spec.reason is written together with the decision", 400)
        if _spec(new).get("withoutPreview") != _spec(old).get("withoutPreview"):
            return deny("spec.withoutPreview is written together with the decision", 400)
        return Admission(True)  # labels, kopf's bookkeeping annotations, finalizers, …
    refusal = authorize(old, new_decision, userinfo, policy, now,
                        without_preview=_spec(new).get("withoutPreview") is True)
    if refusal is not None:
        return refusal
    assert policy is not None
    me = stamp(userinfo, now)
    if new_decision == "denied":
        return Admission(True, patch={"metadata": {"annotations": {DECIDED_BY: json.dumps(me)}}})
    votes = read_approvals(old)
    if any(v.get("username") == me["username"] for v in votes):
        left = policy.min_approvals - len(votes)
        return deny(f"{me['username']} already approved ApprovalRequest {_name(old)}; it needs {left} more "
                    "approval(s) from other reviewers", 409)
    votes = [*votes, me]
    annotations = {APPROVALS: json.dumps(votes)}
    if len(votes) < policy.min_approvals:
        left = policy.min_approvals - len(votes)
        msg = (f"approval {len(votes)} of {policy.min_approvals} recorded; {left} more needed from other reviewers "
               f"({describe_reviewers(policy.reviewers)})")
        return Admission(True, patch={"metadata": {"annotations": annotations}, "spec": {"decision": "pending"}},
                         warnings=(msg,))
    annotations[DECIDED_BY] = json.dumps(me)
    return Admission(True, patch={"metadata": {"annotations": annotations}})


# -- the validating webhook (sees the object after every mutation) ---------------------------

def validate(operation: str, old: Mapping[str, Any] | None, new: Mapping[str, Any], userinfo: Mapping[str, Any],
             policy: ReviewPolicy | None, now: float, *, gateway: str = "") -> Admission:
    new_ann = _annotations(new)
    username = str(userinfo.get("username") or "")
    if operation == "CREATE":
        if (_spec(new).get("decision") or "pending") != "pending" or DECIDED_BY in new_ann or APPROVALS in new_ann:
            return deny("an ApprovalRequest is created pending and without decision annotations")
        mismatch = requester_mismatch(new, userinfo, gateway)
        if mismatch:
            return deny(f"an ApprovalRequest is filed in the caller's own name: {mismatch}")
        creator = new_ann.get(CREATED_BY)
        if creator is None or _username(creator) != username:
            return deny(f"annotation {CREATED_BY} must be stamped by the pgwarden mutating webhook; "
                        "is the MutatingWebhookConfiguration installed?")
        return Admission(True)
    if operation != "UPDATE" or old is None:
        return Admission(True)
    old_ann = _annotations(old)
    if new_ann.get(CREATED_BY) != old_ann.get(CREATED_BY):
        return deny(f"annotation {CREATED_BY} cannot change")
    if _spec_without_decision(new) != _spec_without_decision(old):
        return deny("only spec.decision and spec.reason of an ApprovalRequest may change", 400)
    old_decision = _spec(old).get("decision") or "pending"
    new_decision = _spec(new).get("decision") or "pending"
    votes_changed = new_ann.get(APPROVALS) != old_ann.get(APPROVALS)
    decided_changed = new_ann.get(DECIDED_BY) != old_ann.get(DECIDED_BY)
    if not (votes_changed or decided_changed or new_decision != old_decision):
        if _spec(new).get("reason") != _spec(old).get("reason"):
            return deny("spec.reason is written together with the decision", 400)
        if _spec(new).get("withoutPreview") != _spec(old).get("withoutPreview"):
            return deny("spec.withoutPreview is written together with the decision", 400)
        return Admission(True)
    effective = new_decision if new_decision != "pending" else "approved"  # a partial approval
    refusal = authorize(old, effective, userinfo, policy, now,
                        without_preview=_spec(new).get("withoutPreview") is True)
    if refusal is not None:
        return refusal
    if votes_changed:
        before, after = read_approvals(old), read_approvals(new)
        if after[:-1] != before or not after or after[-1].get("username") != username:
            return deny(f"annotation {APPROVALS} may only gain the caller's own approval, stamped by the webhook")
    if new_decision != old_decision:
        decided = read_decided_by(new)
        if not decided_changed or decided is None or decided.get("username") != username:
            return deny(f"a decision must carry {DECIDED_BY} stamped by the pgwarden mutating webhook with the caller's "
                        "identity; is the MutatingWebhookConfiguration installed?")
        if new_decision == "approved" and policy is not None and len(read_approvals(new)) < policy.min_approvals:
            return deny(f"approved needs {policy.min_approvals} distinct reviewers", 409)
    elif decided_changed:
        return deny(f"annotation {DECIDED_BY} is stamped only together with a decision")
    return Admission(True)


def _username(raw: str) -> str:
    try:
        return str(json.loads(raw).get("username", ""))
    except (ValueError, AttributeError):
        return ""


def admit(review: Mapping[str, Any], policy: ReviewPolicy | None, now: float, *, mutating: bool,
          gateway: str = "") -> Admission:
    """The same decision from a raw AdmissionReview (what the API server sends)."""
    req = review.get("request") or {}
    fn = mutate if mutating else validate
    return fn(str(req.get("operation") or ""), req.get("oldObject"), req.get("object") or {},
              req.get("userInfo") or {}, policy, now, gateway=gateway)


# -- status -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StatusChange:
    status: Mapping[str, Any] = field(default_factory=dict)  # merge into .status; empty: nothing to write
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)
    delete: bool = False


def next_status(obj: Mapping[str, Any], now: float, *, executed_at: str | None = None,
                retention: float = 86400.0) -> StatusChange:
    """Where the request stands now, from its spec, the webhook's annotations, the clock and
    whether the proxy recorded using the approval (`executed_at`, from the `.executed` Event)."""
    spec, status = _spec(obj), (obj.get("status") or {})
    phase = status.get("phase") or ""
    decision = spec.get("decision") or "pending"
    name = _name(obj)
    ns = str((obj.get("metadata") or {}).get("namespace", ""))
    decided = read_decided_by(obj)
    votes = read_approvals(obj)
    expires = spec.get("expiresAt")
    expires_at = parse_iso(expires) if expires else None
    out: dict[str, Any] = {}
    events: list[tuple[str, str, str]] = []

    if not phase:
        req = spec.get("requester") or {}
        out.update(phase="Pending", expiresAt=expires)
        events.append(("Normal", "Requested",
                       f"{req.get('subject', '?')} asks to run on {(spec.get('connectionRef') or {}).get('name', '?')}: "
                       f"{_short(spec.get('statement', ''))}{_preview_note(spec)} — approve: "
                       f"{kubectl_patch_command(name, ns)}"))
        phase = "Pending"
    if votes != list(status.get("approvals") or []) and votes:
        out["approvals"] = votes
        if phase == "Pending" and decision == "pending":
            events.append(("Normal", "ApprovalRecorded",
                           f"approval {len(votes)} recorded from {votes[-1].get('username', '?')}"))
    if phase == "Pending" and decision in DECISIONS:
        new_phase = "Approved" if decision == "approved" else "Denied"
        out.update(phase=new_phase, decidedAt=iso(now))
        if decided:
            out["decidedBy"] = {"username": decided.get("username", ""), "groups": decided.get("groups", [])}
        who = (decided or {}).get("username", "an unknown user")
        events.append(("Normal" if decision == "approved" else "Warning", new_phase, f"{new_phase.lower()} by {who}"
                       + (f": {spec['reason']}" if spec.get("reason") else "")))
        phase = new_phase
    if phase == "Approved" and executed_at:
        out.update(phase="Executed", executedAt=executed_at)
        events.append(("Normal", "Executed", "the approved statement was run by the proxy (one time)"))
        phase = "Executed"
    if phase in ("Pending", "Approved") and expires_at is not None and now >= expires_at:
        out.update(phase="Expired")
        events.append(("Warning", "Expired", "expired before a decision" if phase == "Pending"
                       else "approved but not used before it expired"))
        phase = "Expired"
    if out.get("phase") and out["phase"] != status.get("phase"):
        # `kubectl wait --for=condition=Ready approvalrequest/NAME`: Ready while approved and unused
        ready = {"type": "Ready", "status": "True" if phase == "Approved" else "False", "reason": phase,
                 "message": {"Pending": "waiting for a reviewer", "Approved": "approved; the proxy may run it once",
                             "Denied": "denied", "Executed": "the approved statement was run (one time)",
                             "Expired": "expired"}.get(phase, phase),
                 "lastTransitionTime": iso(now)}
        others = [c for c in status.get("conditions") or [] if isinstance(c, Mapping) and c.get("type") != "Ready"]
        out["conditions"] = [*others, ready]
    ended = _ended_at(status, out, expires_at)
    delete = phase in ("Denied", "Expired", "Executed") and ended is not None and now - ended >= retention and not out
    return StatusChange(out, tuple(events), delete)


def _ended_at(status: Mapping[str, Any], changes: Mapping[str, Any], expires_at: float | None) -> float | None:
    merged = {**status, **changes}
    stamps = [parse_iso(v) for v in (merged.get("executedAt"), merged.get("decidedAt")) if v]
    if merged.get("phase") == "Expired" and expires_at is not None:
        stamps.append(expires_at)
    return max(stamps) if stamps else None


def _preview_note(spec: Mapping[str, Any]) -> str:
    """What `kubectl describe` says of the request's preview (approval.preview: rows)."""
    preview = Preview.from_json(spec.get("preview"))
    if preview is None:
        return ""
    if preview.measured:
        return f" (preview: {preview.affected_rows} rows)"
    return f" (preview {preview.state}: read spec.preview before approving)"


def _short(text: str, width: int = 200) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= width else t[: width - 1] + "…"
