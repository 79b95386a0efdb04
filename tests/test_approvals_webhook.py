"""The ApprovalRequest admission rules over real AdmissionReview requests (as the API server
sends them), and the status transitions the operator writes."""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any

import jsonpatch
import pytest

from pgwarden.operator import approvals as ar
from pgwarden.subjects import SubjectRef
from pgwarden.times import iso

NS = "agents"
NOW = time.time()
AGENT_SA = "system:serviceaccount:agents:cursor-agent"
ALICE = {"username": "alice@example.com", "uid": "1", "groups": ["dba", "system:authenticated"]}
BOB = {"username": "bob@example.com", "uid": "2", "groups": ["dba", "system:authenticated"]}
MALLORY = {"username": "mallory@example.com", "uid": "3", "groups": ["developers", "system:authenticated"]}
AGENT = {"username": AGENT_SA, "uid": "4", "groups": ["system:serviceaccounts", "system:serviceaccounts:agents"]}
POLICY = ar.ReviewPolicy(id=f"{NS}/orders", connection="orders-prod", reviewers=(SubjectRef(group="dba"),))
TWO = ar.ReviewPolicy(id=f"{NS}/orders", connection="orders-prod", reviewers=(SubjectRef(group="dba"),), min_approvals=2)


def request_obj(**spec_over: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pgwarden.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": "orders-prod-1a2b3c4d-abcdef", "namespace": NS, "uid": "u-1",
                     "annotations": {ar.CREATED_BY: json.dumps({"username": AGENT_SA, "groups": []})}},
        "spec": {"connectionRef": {"name": "orders-prod"},
                 "requester": {"subject": "cursor-agent", "groups": ["ai-agents"], "serviceAccount": "agents/cursor-agent",
                               "pod": "agents/cursor-agent-7d9f"},
                 "statement": "DELETE FROM orders WHERE id = 1", "statementHash": "ab" * 32, "policy": "orders",
                 "rule": "agents/orders rule 2", "mode": "wait", "expiresAt": iso(NOW + 600), "decision": "pending",
                 **spec_over},
        "status": {"phase": "Pending"},
    }


def review(operation: str, new: dict[str, Any], old: dict[str, Any] | None, user: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "pgwarden.dev", "version": "v1alpha1", "kind": "ApprovalRequest"},
            "resource": {"group": "pgwarden.dev", "version": "v1alpha1", "resource": "approvalrequests"},
            "requestKind": {"group": "pgwarden.dev", "version": "v1alpha1", "kind": "ApprovalRequest"},
            "requestResource": {"group": "pgwarden.dev", "version": "v1alpha1", "resource": "approvalrequests"},
            "name": new["metadata"]["name"], "namespace": NS, "operation": operation, "userInfo": user,
            "object": new, "oldObject": old, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions" if operation == "UPDATE" else "CreateOptions"},
        },
    }


def patched(old: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """What `kubectl patch … --type merge -p '{"spec": {...}}'` sends as the new object."""
    new = copy.deepcopy(old)
    new["spec"].update(spec)
    return new


def through_api_server(old: dict[str, Any], new: dict[str, Any], user: dict[str, Any],
                       policy: ar.ReviewPolicy | None = POLICY) -> tuple[dict[str, Any], ar.Admission]:
    """Mutating webhook, its JSON patch applied, then the validating webhook — the API server's order."""
    m = ar.admit(review("UPDATE", new, old, user), policy, NOW, mutating=True)
    if not m.allowed:
        return new, m
    final = jsonpatch.apply_patch(new, m.json_patch(new))
    v = ar.admit(review("UPDATE", final, old, user), policy, NOW, mutating=False)
    return final, v if not v.allowed else ar.Admission(True, warnings=m.warnings)


def test_reviewer_approval_is_stamped_from_userinfo() -> None:
    old = request_obj()
    final, res = through_api_server(old, patched(old, decision="approved"), ALICE)
    assert res.allowed, res.message
    assert final["spec"]["decision"] == "approved"
    stamped = json.loads(final["metadata"]["annotations"][ar.DECIDED_BY])
    assert stamped["username"] == "alice@example.com" and stamped["groups"] == ALICE["groups"]
    ops = ar.admit(review("UPDATE", patched(old, decision="approved"), old, ALICE), POLICY, NOW, mutating=True)
    assert {op["path"] for op in ops.json_patch(patched(old, decision="approved"))} == {
        "/metadata/annotations/pgwarden.dev~1decided-by", "/metadata/annotations/pgwarden.dev~1approved-by"}


def test_self_approval_rejected() -> None:
    old = request_obj()
    # the agent's service account (the creator), and a user whose name is the requester subject
    for me in (AGENT, {"username": "cursor-agent", "groups": ["dba"]}):
        _, res = through_api_server(old, patched(old, decision="approved"), me)
        assert not res.allowed and res.code == 403
        assert "requested this statement and cannot decide it" in res.message


def test_non_reviewer_rejected() -> None:
    old = request_obj()
    _, res = through_api_server(old, patched(old, decision="approved"), MALLORY)
    assert not res.allowed and "mallory@example.com (groups: developers, system:authenticated) is not a reviewer" in res.message
    assert "group:dba" in res.message


def test_unknown_policy_nobody_decides() -> None:
    old = request_obj(policy="lax")
    _, res = through_api_server(old, patched(old, decision="approved"), ALICE, policy=None)
    assert not res.allowed and "names AccessPolicy lax, which does not exist" in res.message
    other_ns = request_obj(policy="elsewhere/orders")
    assert ar.policy_key(other_ns) is None


def test_forged_approver_annotation_rejected() -> None:
    old = request_obj()
    new = patched(old, decision="approved")
    new["metadata"]["annotations"][ar.DECIDED_BY] = json.dumps({"username": "cto@example.com", "groups": ["dba"]})
    _, res = through_api_server(old, new, ALICE)
    assert not res.allowed and "pgwarden.dev/decided-by is set only by the pgwarden webhook" in res.message
    # even without touching the decision
    only = copy.deepcopy(old)
    only["metadata"]["annotations"][ar.APPROVALS] = json.dumps([{"username": "bob@example.com"}])
    _, res = through_api_server(old, only, ALICE)
    assert not res.allowed
    # and at creation
    created = request_obj()
    created["metadata"]["annotations"] = {ar.DECIDED_BY: "{}"}
    res = ar.admit(review("CREATE", created, None, AGENT), POLICY, NOW, mutating=True)
    assert not res.allowed


def test_validating_webhook_refuses_unstamped_decision() -> None:
    """If the mutation were skipped, the validating webhook still refuses the decision."""
    old = request_obj()
    res = ar.admit(review("UPDATE", patched(old, decision="approved"), old, ALICE), POLICY, NOW, mutating=False)
    assert not res.allowed and "stamped by the pgwarden mutating webhook" in res.message


def test_decided_request_cannot_flip() -> None:
    old = request_obj()
    approved, res = through_api_server(old, patched(old, decision="approved"), ALICE)
    assert res.allowed
    for decision in ("denied", "pending"):
        _, res = through_api_server(approved, patched(approved, decision=decision), BOB)
        assert not res.allowed and res.code == 409
        assert "already approved by alice@example.com; a decision is final" in res.message


def test_spec_other_than_decision_is_immutable() -> None:
    old = request_obj()
    _, res = through_api_server(old, patched(old, decision="approved", statement="DELETE FROM orders"), ALICE)
    assert not res.allowed and "not spec.statement" in res.message


def test_expired_request_cannot_be_decided() -> None:
    old = request_obj(expiresAt=iso(NOW - 1))
    _, res = through_api_server(old, patched(old, decision="approved"), ALICE)
    assert not res.allowed and "expired at" in res.message


def test_min_approvals_two_distinct_reviewers() -> None:
    old = request_obj()
    first, res = through_api_server(old, patched(old, decision="approved"), ALICE, TWO)
    assert res.allowed and first["spec"]["decision"] == "pending"
    assert "approval 1 of 2 recorded; 1 more needed" in res.warnings[0]
    assert ar.DECIDED_BY not in first["metadata"]["annotations"]
    _, again = through_api_server(first, patched(first, decision="approved"), ALICE, TWO)
    assert not again.allowed and "alice@example.com already approved" in again.message
    second, res = through_api_server(first, patched(first, decision="approved"), BOB, TWO)
    assert res.allowed and second["spec"]["decision"] == "approved"
    votes = [v["username"] for v in json.loads(second["metadata"]["annotations"][ar.APPROVALS])]
    assert votes == ["alice@example.com", "bob@example.com"]
    assert json.loads(second["metadata"]["annotations"][ar.DECIDED_BY])["username"] == "bob@example.com"


def test_deny_by_one_reviewer_is_final_even_with_min_approvals() -> None:
    old = request_obj()
    final, res = through_api_server(old, patched(old, decision="denied", reason="not today"), ALICE, TWO)
    assert res.allowed and final["spec"]["decision"] == "denied"


def test_unrelated_updates_pass() -> None:
    old = request_obj()
    new = copy.deepcopy(old)
    new["metadata"]["annotations"]["pgwarden.dev/last-handled-configuration"] = "{}"
    new["metadata"]["labels"] = {"team": "orders"}
    _, res = through_api_server(old, new, {"username": "system:serviceaccount:pgwarden:operator", "groups": []})
    assert res.allowed


def test_create_is_pending_and_stamps_the_creator() -> None:
    new = request_obj()
    new["metadata"]["annotations"] = {}
    res = ar.admit(review("CREATE", new, None, AGENT), POLICY, NOW, mutating=True)
    assert res.allowed
    final = jsonpatch.apply_patch(new, res.json_patch(new))
    assert json.loads(final["metadata"]["annotations"][ar.CREATED_BY])["username"] == AGENT_SA
    assert ar.admit(review("CREATE", final, None, AGENT), POLICY, NOW, mutating=False).allowed
    pre = request_obj(decision="approved")
    pre["metadata"]["annotations"] = {}
    res = ar.admit(review("CREATE", pre, None, AGENT), POLICY, NOW, mutating=True)
    assert not res.allowed and "created with spec.decision: pending" in res.message


OPERATOR_USER = "system:serviceaccount:pgwarden-system:pgwarden"


@pytest.mark.parametrize("user,requester,why", [
    (AGENT, {"serviceAccount": "agents/other-agent", "pod": "agents/other-agent-1"}, "serviceAccount must be the caller"),
    ({**AGENT, "extra": {ar.POD_NAME_EXTRA: ["cursor-agent-7d9f"]}}, {"pod": "agents/other-agent-1"},
     "pod must be the caller's pod"),
    (MALLORY, {"subject": "alice@example.com", "serviceAccount": ""}, "subject must be the caller"),
    ({"username": OPERATOR_USER, "groups": []}, {}, "serviceAccount must be the caller"),  # gateway not configured
])
def test_create_only_in_the_callers_own_name(user: dict[str, Any], requester: dict[str, Any], why: str) -> None:
    """Both webhooks refuse a request filed in someone else's name (a forged requester would make
    the real requester unable to decide, or pin a statement on another agent)."""
    new = request_obj()
    new["metadata"]["annotations"] = {}
    new["spec"]["requester"] = {**new["spec"]["requester"], **requester}
    for mutating in (True, False):
        res = ar.admit(review("CREATE", new, None, user), POLICY, NOW, mutating=mutating)
        assert not res.allowed and why in res.message, res.message


def test_create_by_the_operators_gateway_in_a_proxys_name() -> None:
    new = request_obj()
    new["metadata"]["annotations"] = {}
    gateway = {"username": OPERATOR_USER, "groups": ["system:serviceaccounts"]}
    res = ar.admit(review("CREATE", new, None, gateway), POLICY, NOW, mutating=True, gateway=OPERATOR_USER)
    assert res.allowed, res.message
    final = jsonpatch.apply_patch(new, res.json_patch(new))
    assert ar.admit(review("CREATE", final, None, gateway), POLICY, NOW, mutating=False, gateway=OPERATOR_USER).allowed
    # a pod-bound agent token in its own name passes as well
    agent = {**AGENT, "extra": {ar.POD_NAME_EXTRA: ["cursor-agent-7d9f"]}}
    assert ar.admit(review("CREATE", new, None, agent), POLICY, NOW, mutating=True).allowed


# -- status -----------------------------------------------------------------------------------

def test_status_story() -> None:
    obj = request_obj()
    obj["status"] = {}
    ch = ar.next_status(obj, NOW)
    assert ch.status["phase"] == "Pending" and ch.events[0][1] == "Requested"
    assert "kubectl patch approvalrequest orders-prod-1a2b3c4d-abcdef -n agents" in ch.events[0][2]
    obj["status"] = dict(ch.status)
    assert ar.next_status(obj, NOW).status == {}
    approved, _ = through_api_server(obj, patched(obj, decision="approved"), ALICE)
    ch = ar.next_status(approved, NOW)
    assert ch.status["phase"] == "Approved"
    assert ch.status["decidedBy"] == {"username": "alice@example.com", "groups": ALICE["groups"]}
    approved["status"] = {**approved["status"], **ch.status}
    ch = ar.next_status(approved, NOW, executed_at=iso(NOW))
    assert ch.status["phase"] == "Executed"
    approved["status"] = {**approved["status"], **ch.status}
    assert not ar.next_status(approved, NOW + 10, retention=3600).delete
    assert ar.next_status(approved, NOW + 3601, retention=3600).delete


@pytest.mark.parametrize("decision", ["pending", "approved"])
def test_expiry(decision: str) -> None:
    obj = request_obj(expiresAt=iso(NOW - 5), decision=decision)
    obj["status"] = {"phase": "Pending" if decision == "pending" else "Approved"}
    ch = ar.next_status(obj, NOW)
    assert ch.status["phase"] == "Expired" and ch.events[-1][1] == "Expired"
