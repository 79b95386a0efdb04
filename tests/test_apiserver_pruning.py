"""Every object pgwarden writes survives a real API server: custom resources are pruned,
defaulted and validated against the CRDs' structural schemas (`apiserver_model`), built-in kinds
are checked field by field against Kubernetes' own OpenAPI (kubernetes-validate, strict: an
unknown field is one the API server would drop)."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
from apiserver_model import Invalid, crds, merge_patch, patch_status, prune, store, update

from pgwarden.approvals import ApprovalSpec
from pgwarden.approvals.kubernetes import build_event, build_request, matches, outcome_of
from pgwarden.connection import parse_connection
from pgwarden.operator import approvals as ar
from pgwarden.operator import bundle, credentials, status
from pgwarden.operator import injection as inj
from pgwarden.operator.settings import InjectionSettings
from pgwarden.resources import document_from_object
from pgwarden.subjects import Identity, SubjectRef
from pgwarden.times import iso

CRDS = crds()
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
NS = "agents"
NOW = 1_790_000_000.0
AGENT = Identity(
    subject="system:serviceaccount:agents:cursor-agent",
    groups=("system:serviceaccounts",),
    service_account="agents/cursor-agent",
    method="pod",
)
ALICE = {"username": "alice@example.com", "groups": ["dba"]}
OPERATOR = {
    "username": "system:serviceaccount:pgwarden-system:pgwarden",
    "groups": ["system:serviceaccounts"],
}
POLICY = ar.ReviewPolicy(id=f"{NS}/orders", connection="orders-prod", reviewers=(SubjectRef(group="dba"),))


def approval_spec(
    params: tuple[str | None, ...] = ("42", None, "o'brien"), mode: str = "defer"
) -> ApprovalSpec:
    return ApprovalSpec(
        connection="orders-prod",
        requester=AGENT,
        workload={"namespace": NS, "pod": "cursor-agent-7d9f", "service_account": "cursor-agent"},
        statement="UPDATE orders SET note = $3 WHERE id = $1 AND owner IS NOT DISTINCT FROM $2",
        params=params,
        rule=f"{NS}/orders rule 2 (writes)",
        reviewers=(SubjectRef(group="dba"),),
        min_approvals=1,
        timeout=900,
        mode=mode,
    )


def stored_request(params: tuple[str | None, ...] = ("42", None, "o'brien")) -> dict[str, Any]:
    """Created by the proxy, stamped by the mutating webhook, stored by the API server."""
    body = build_request(approval_spec(params), "orders-prod-abc-123", NS, NOW)
    stamp = ar.mutate("CREATE", None, body, OPERATOR, POLICY, NOW, gateway=OPERATOR["username"])
    assert stamp.allowed, stamp.message
    stored, dropped = store(jsonpatch.apply_patch(body, stamp.json_patch(body)), CRDS["ApprovalRequest"])
    assert dropped == []
    return stored


class TestTheModel:
    SCHEMA = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "a": {"type": "string"},
                    "d": {"type": "string", "default": "x"},
                    "n": {"type": "string", "nullable": True},
                    "open": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                        "properties": {"inner": {"type": "object", "properties": {"k": {"type": "string"}}}},
                    },
                    "map": {
                        "type": "object",
                        "additionalProperties": {"type": "object", "properties": {"v": {"type": "string"}}},
                    },
                    "list": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"k": {"type": "string"}}},
                    },
                    "embedded": {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {}},
                },
            }
        },
    }

    def test_unknown_fields_are_dropped_silently(self) -> None:
        dropped: list[str] = []
        out = prune(
            {"spec": {"a": "1", "b": 2, "list": [{"k": "v", "z": 1}]}}, self.SCHEMA, "", dropped, root=True
        )
        assert out == {"spec": {"a": "1", "list": [{"k": "v"}]}}
        assert dropped == [".spec.b", ".spec.list[0].z"]

    def test_preserve_unknown_fields_keeps_unknown_but_prunes_what_it_specifies(self) -> None:
        out = prune({"spec": {"open": {"free": [1], "inner": {"k": "v", "junk": 1}}}}, self.SCHEMA, root=True)
        assert out == {"spec": {"open": {"free": [1], "inner": {"k": "v"}}}}

    def test_additional_properties_keep_keys_and_prune_values(self) -> None:
        out = prune({"spec": {"map": {"anything": {"v": "1", "w": "2"}}}}, self.SCHEMA, root=True)
        assert out == {"spec": {"map": {"anything": {"v": "1"}}}}

    def test_root_and_embedded_keep_type_meta_and_object_meta_only(self) -> None:
        obj = {
            "apiVersion": "a/v1",
            "kind": "K",
            "metadata": {"name": "n", "labels": {"a": "b"}, "bogus": 1},
            "spec": {
                "embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "x": 1}, "spec": {}}
            },
        }
        dropped: list[str] = []
        out = prune(obj, self.SCHEMA, "", dropped, root=True)
        assert out["metadata"] == {"name": "n", "labels": {"a": "b"}}
        assert out["spec"]["embedded"] == {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
        assert dropped == [".metadata.bogus", ".spec.embedded.metadata.x", ".spec.embedded.spec"]

    def test_null_is_dropped_unless_nullable(self) -> None:
        out = prune({"spec": {"a": None, "n": None}}, self.SCHEMA, root=True)
        assert out == {"spec": {"n": None}}

    def test_defaults_fill_missing_fields_and_validation_runs(self) -> None:
        crd = {"spec": {"versions": [{"storage": True, "schema": {"openAPIV3Schema": self.SCHEMA}}]}}
        stored, _ = store({"spec": {}}, crd)
        assert stored == {"spec": {"d": "x"}}
        with pytest.raises(Invalid, match="spec.a"):
            store({"spec": {"a": 1}}, crd)

    def test_status_subresource_takes_only_status(self) -> None:
        crd = CRDS["ApprovalRequest"]
        stored = stored_request()
        out, _ = patch_status(stored, {"spec": {"decision": "approved"}, "status": {"phase": "Pending"}}, crd)
        assert out["spec"] == stored["spec"] and out["status"] == {"phase": "Pending"}

    def test_merge_patch_null_deletes(self) -> None:
        assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None}}) == {"a": {"c": 2}}


class TestApprovalRequest:
    def test_the_proxys_request_is_stored_whole_with_its_parameters(self) -> None:
        """spec.params was pruned: reviewers never saw the bind values, and a deferred approval
        with parameters could never be consumed (`matches` compares them)."""
        body = build_request(approval_spec(), "orders-prod-abc-123", NS, NOW)
        stored, dropped = store(body, CRDS["ApprovalRequest"])
        assert dropped == []
        assert stored["spec"]["params"] == ["42", None, "o'brien"]
        assert stored["spec"]["parametersHash"] == approval_spec().params_hash
        assert matches(stored, approval_spec())

    def test_a_deferred_approval_with_parameters_is_consumable_after_the_api_server(self) -> None:
        crd = CRDS["ApprovalRequest"]
        stored = stored_request()
        # a reviewer's kubectl patch, through both webhooks, then the operator's status
        new = merge_patch(stored, {"spec": {"decision": "approved"}})
        m = ar.mutate("UPDATE", stored, new, ALICE, POLICY, NOW + 5)
        assert m.allowed, m.message
        new = jsonpatch.apply_patch(new, m.json_patch(new))
        v = ar.validate("UPDATE", stored, new, ALICE, POLICY, NOW + 5)
        assert v.allowed, v.message
        stored, dropped = store(new, crd)
        assert dropped == []
        for _ in range(2):
            change = ar.next_status(stored, NOW + 6)
            stored, dropped = patch_status(stored, {"status": dict(change.status)}, crd)
            assert dropped == []
        assert stored["status"]["phase"] == "Approved"
        assert stored["status"]["decidedBy"] == {"username": "alice@example.com", "groups": ["dba"]}
        assert outcome_of(stored) is not None and outcome_of(stored).state == "approved"  # type: ignore[union-attr]
        assert matches(stored, approval_spec(mode="defer"))

    @pytest.mark.parametrize("params", [(), ("1",), (None,), ("x" * 10000, "", None)])
    def test_any_parameter_list_survives(self, params: tuple[str | None, ...]) -> None:
        stored = stored_request(params)
        assert list(stored["spec"].get("params") or []) == list(params)
        assert matches(stored, approval_spec(params))

    @pytest.mark.parametrize("phase_path", ["executed", "expired", "two-approvals"])
    def test_every_status_the_operator_writes_is_kept(self, phase_path: str) -> None:
        crd = CRDS["ApprovalRequest"]
        stored = stored_request()
        policy = POLICY
        if phase_path == "two-approvals":
            policy = ar.ReviewPolicy(
                id=POLICY.id, connection=POLICY.connection, reviewers=POLICY.reviewers, min_approvals=2
            )
            new = merge_patch(stored, {"spec": {"decision": "approved"}})
            m = ar.mutate("UPDATE", stored, new, ALICE, policy, NOW + 1)
            assert m.allowed, m.message
            stored, dropped = store(jsonpatch.apply_patch(new, m.json_patch(new)), crd)
            assert dropped == []
        elif phase_path == "executed":
            new = merge_patch(stored, {"spec": {"decision": "approved"}})
            m = ar.mutate("UPDATE", stored, new, ALICE, policy, NOW + 1)
            stored, _ = store(jsonpatch.apply_patch(new, m.json_patch(new)), crd)
        when = NOW + (10_000 if phase_path == "expired" else 2)
        for step in range(3):
            change = ar.next_status(
                stored, when + step, executed_at=iso(when) if phase_path == "executed" else None
            )
            if not change.status:
                break
            before = merge_patch(stored, {"status": dict(change.status)})
            stored, dropped = patch_status(stored, {"status": dict(change.status)}, crd)
            assert dropped == [] and stored["status"] == before["status"]
        expected = {"executed": "Executed", "expired": "Expired", "two-approvals": "Pending"}[phase_path]
        assert stored["status"]["phase"] == expected
        if phase_path == "two-approvals":
            assert [a["username"] for a in stored["status"]["approvals"]] == ["alice@example.com"]

    def test_the_events_the_proxy_posts_are_valid_events(self) -> None:
        stored = stored_request()
        for name, reason in (
            (stored["metadata"]["name"] + ".executed", "Executed"),
            (stored["metadata"]["name"] + ".1a2b3c4d", "StatementCompleted"),
        ):
            ev = build_event(stored, name, reason, "the held statement runs now", "cursor-agent-7d9f", NOW)
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(ev, version, strict=True)


CONN_RAW = {
    "apiVersion": "pgwarden.dev/v1alpha1",
    "kind": "DatabaseConnection",
    "metadata": {"name": "orders-prod", "namespace": NS, "uid": "u-1", "generation": 3},
    "spec": {
        "host": "orders-db.prod.svc",
        "database": "orders",
        "adminSecretRef": {"name": "orders-db-admin"},
        "credentials": {"grantRoles": ["orders_reader"], "rotationInterval": "1h"},
    },
}
CONN = parse_connection(document_from_object(CONN_RAW))
POLICY_RAW = {
    "apiVersion": "pgwarden.dev/v1alpha1",
    "kind": "AccessPolicy",
    "metadata": {"name": "orders", "namespace": NS, "generation": 2},
    "spec": {
        "connectionRef": {"name": "orders-prod"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}],
        "approval": {"reviewers": [{"group": "dba"}]},
    },
}
MASKING_RAW = {
    "apiVersion": "pgwarden.dev/v1alpha1",
    "kind": "MaskingRule",
    "metadata": {"name": "pii", "namespace": NS, "generation": 1},
    "spec": {
        "connectionRef": {"name": "orders-prod"},
        "columns": [{"table": "public.customers", "column": "email", "strategy": "email"}],
    },
}


class TestStatuses:
    def test_connection_status_with_a_cleared_grace_period(self) -> None:
        crd = CRDS["DatabaseConnection"]
        stored, dropped = store(CONN_RAW, crd)
        assert dropped == []
        full = status.connection_status_example()
        stored, dropped = patch_status(stored, {"status": full}, crd)
        assert dropped == [] and stored["status"] == full
        # the reconcile clears graceEndsAt with null (merge patch: delete)
        stored, dropped = patch_status(stored, {"status": {"credentials": {"graceEndsAt": None}}}, crd)
        assert dropped == [] and "graceEndsAt" not in stored["status"]["credentials"]

    @pytest.mark.parametrize("raw", [POLICY_RAW, MASKING_RAW], ids=["AccessPolicy", "MaskingRule"])
    @pytest.mark.parametrize("valid", [True, False])
    def test_compiled_status(self, raw: dict[str, Any], valid: bool) -> None:
        crd = CRDS[raw["kind"]]
        stored, dropped = store(raw, crd)
        assert dropped == []
        body = status.compiled_status(
            [] if valid else ["spec.rules[0]: bad"],
            ["table x does not exist (yet?)"],
            "0123456789abcdef",
            2,
            None,
            valid,
        )
        stored, dropped = patch_status(stored, {"status": body}, crd)
        assert dropped == [] and stored["status"] == body

    @pytest.mark.parametrize("raw", [POLICY_RAW, MASKING_RAW], ids=["AccessPolicy", "MaskingRule"])
    def test_connection_not_found_status(self, raw: dict[str, Any]) -> None:
        crd = CRDS[raw["kind"]]
        stored, _ = store(raw, crd)
        body = {
            "phase": "Invalid",
            "conditions": status.merge_conditions(
                None,
                [
                    status.condition(
                        "Compiled", False, "ConnectionNotFound", "DatabaseConnection 'x' does not exist"
                    )
                ],
            ),
        }
        stored, dropped = patch_status(stored, {"status": body}, crd)
        assert dropped == [] and stored["status"] == body

    def test_kopf_bookkeeping_in_annotations_survives(self) -> None:
        obj = copy.deepcopy(POLICY_RAW)
        obj["metadata"]["annotations"] = {
            "pgwarden.dev/last-handled-configuration": "{}",
            "pgwarden.dev/compile": "{}",
        }
        obj["metadata"]["finalizers"] = ["pgwarden.dev/finalizer"]
        stored, dropped = store(obj, CRDS["AccessPolicy"])
        assert dropped == [] and stored["metadata"] == obj["metadata"]


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_example_is_stored_whole(kind: str) -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent / "examples"
    docs = [
        d
        for f in sorted(root.glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if isinstance(d, dict) and d.get("kind") == kind
    ]
    for doc in docs:
        _, dropped = store(doc, CRDS[kind])
        assert dropped == [], f"{kind}/{doc['metadata']['name']}: the API server would drop {dropped}"


class TestBuiltInObjects:
    @pytest.mark.parametrize("version", K8S_VERSIONS)
    def test_bundle_configmap_and_credentials_secret(self, version: str) -> None:
        result = bundle.compile_bundle(CONN_RAW, [POLICY_RAW, MASKING_RAW], CONN, InjectionSettings())
        cm = bundle.bundle_configmap(CONN, result, CONN_RAW)
        secret = credentials.credentials_secret(CONN, username="u", password="p", version=1, owner=CONN_RAW)
        for obj in (cm, secret):
            kubernetes_validate.validate(obj, version, strict=True)

    @pytest.mark.parametrize("version", K8S_VERSIONS)
    @pytest.mark.parametrize("mode", ["native", "container"])
    def test_the_injected_pod(self, version: str, mode: str) -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "agent",
                "namespace": NS,
                "annotations": {inj.ANNOTATION_INJECT: "orders-prod", inj.ANNOTATION_SIDECAR_MODE: mode},
            },
            "spec": {
                "serviceAccountName": "cursor-agent",
                "initContainers": [{"name": "migrate", "image": "m:1"}],
                "containers": [{"name": "agent", "image": "agent:1"}],
            },
        }
        out = inj.inject_pod(pod, inj.InjectionTarget.for_connection("orders-prod"), InjectionSettings())
        kubernetes_validate.validate(out, version, strict=True)


def test_the_crd_files_have_no_duplicate_keys() -> None:
    """`crds()` loads strictly; a key written twice would be silently replaced by YAML loaders."""
    from apiserver_model import ROOT, _StrictLoader

    assert set(crds()) == {"AccessPolicy", "ApprovalRequest", "DatabaseConnection", "MaskingRule"}
    with pytest.raises(Invalid, match="duplicate"):
        import yaml

        yaml.load("a: 1\na: 2\n", Loader=_StrictLoader)  # noqa: S506
    assert (ROOT / "charts" / "pgwarden" / "crds" / "approvalrequests.yaml").resolve() == (
        ROOT / "crds" / "approvalrequests.yaml"
    ).resolve()


class TestCelRules:
    """x-kubernetes-validations: the webhook's invariants hold even when it is not called."""

    def approved(self) -> dict[str, Any]:
        crd = CRDS["ApprovalRequest"]
        stored = stored_request()
        new = merge_patch(stored, {"spec": {"decision": "approved"}})
        m = ar.mutate("UPDATE", stored, new, ALICE, POLICY, NOW + 1)
        out, _ = update(stored, jsonpatch.apply_patch(new, m.json_patch(new)), crd)
        return out

    def test_a_decision_is_final(self) -> None:
        crd = CRDS["ApprovalRequest"]
        approved = self.approved()
        assert approved["spec"]["decision"] == "approved"
        for flip in ("denied", "pending"):
            with pytest.raises(Invalid, match="a decision is final"):
                update(approved, {"spec": {"decision": flip}}, crd)
        update(approved, {"metadata": {"labels": {"seen": "yes"}}}, crd)  # everything else: fine

    @pytest.mark.parametrize(
        "change",
        [
            {"statement": "DELETE FROM orders"},
            {"requester": {"subject": "system:serviceaccount:agents:someone-else"}},
            {"connectionRef": {"name": "other"}},
            {"policy": "lenient"},
            {"expiresAt": "2099-01-01T00:00:00Z"},
            {"mode": "wait"},
            {"parametersHash": "0" * 64},
        ],
    )
    def test_the_spec_is_immutable_but_for_the_decision(self, change: dict[str, Any]) -> None:
        with pytest.raises(Invalid, match="only spec.decision and spec.reason"):
            update(stored_request(), {"spec": change}, CRDS["ApprovalRequest"])

    def test_reason_and_decision_may_change_once(self) -> None:
        out, _ = update(
            stored_request(), {"spec": {"decision": "denied", "reason": "not today"}}, CRDS["ApprovalRequest"]
        )
        assert out["spec"]["reason"] == "not today"

    def test_every_compared_field_is_bounded_for_the_cost_estimator(self) -> None:
        """The API server refuses a CRD whose rules could cost too much; an unbounded string or
        list compared in a rule is what makes the estimate explode."""
        spec = apiserver_schema("ApprovalRequest")["properties"]["spec"]

        def bounded(node: dict[str, Any]) -> bool:
            if node.get("type") == "string":
                return "maxLength" in node or "enum" in node
            if node.get("type") == "array":
                return "maxItems" in node and bounded(node["items"])
            if node.get("type") == "object":
                return all(bounded(c) for c in (node.get("properties") or {}).values())
            return True

        rule = " ".join(r["rule"] for r in spec["x-kubernetes-validations"])
        for name, node in spec["properties"].items():
            if f"self.{name}" in rule:
                assert bounded(node), f"spec.{name} is compared in a CEL rule but not bounded"

    @pytest.mark.parametrize(
        "creds,ok",
        [
            ({}, True),  # defaults 1h / 2m
            ({"rotationInterval": "3m", "gracePeriod": "2m"}, True),
            ({"rotationInterval": "1h", "gracePeriod": "90s"}, False),  # kubelet needs 60-90 s
            ({"rotationInterval": "2m", "gracePeriod": "2m"}, False),  # not below the interval
            ({"rotationInterval": "30s", "gracePeriod": "2m"}, False),
        ],
    )
    def test_rotation_grace_period(self, creds: dict[str, Any], ok: bool) -> None:
        obj = copy.deepcopy(CONN_RAW)
        obj["spec"]["credentials"] = creds
        if ok:
            stored, _ = store(obj, CRDS["DatabaseConnection"])
            assert stored["spec"]["credentials"]["gracePeriod"]
        else:
            with pytest.raises(Invalid, match="gracePeriod|rotationInterval"):
                store(obj, CRDS["DatabaseConnection"])
        # the operator's own parser agrees
        from pgwarden.resources import ResourceError

        if ok:
            parse_connection(document_from_object(obj))
        else:
            with pytest.raises(ResourceError):
                parse_connection(document_from_object(obj))


class TestReadyConditions:
    """`kubectl wait --for=condition=Ready` works on every kind."""

    def test_approval_request_is_ready_while_approved_and_unused(self) -> None:
        crd = CRDS["ApprovalRequest"]
        stored = TestCelRules().approved()
        for executed in (None, iso(NOW + 3)):
            change = ar.next_status(stored, NOW + 2, executed_at=executed)
            stored, dropped = patch_status(stored, {"status": dict(change.status)}, crd)
            assert dropped == []
            (ready,) = [c for c in stored["status"]["conditions"] if c["type"] == "Ready"]
            if stored["status"]["phase"] == "Approved":
                assert ready["status"] == "True"
        assert (
            stored["status"]["phase"] == "Executed"
            and ready["status"] == "False"
            and ready["reason"] == "Executed"
        )

    def test_connection_policy_and_masking_rule_report_ready(self) -> None:
        conds = status.connection_status_example()["conditions"]
        assert {"type": "Ready", "status": "True"}.items() <= next(
            c for c in conds if c["type"] == "Ready"
        ).items()
        failing, phase = status.connection_conditions(
            None, [status.condition("Reachable", False, "ConnectFailed", "no")]
        )
        assert phase == "Error" and next(c for c in failing if c["type"] == "Ready")["status"] == "False"
        for valid in (True, False):
            body = status.compiled_status([] if valid else ["bad"], [], "d", 1, None, valid)
            ready = next(c for c in body["conditions"] if c["type"] == "Ready")
            assert ready["status"] == ("True" if valid else "False")


def apiserver_schema(kind: str) -> dict[str, Any]:
    from apiserver_model import schema_of

    return schema_of(CRDS[kind])
