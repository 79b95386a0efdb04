"""The CRDs load, are structural, and accept the examples (and what the operator writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pgwarden.k8s import names

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "crds"
KINDS = {"DatabaseConnection", "AccessPolicy", "MaskingRule", "ApprovalRequest"}


def load_crds() -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            out[doc["spec"]["names"]["kind"]] = doc
    return out


CRDS = load_crds()


def schema_of(kind: str) -> dict[str, Any]:
    (version,) = CRDS[kind]["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "$"):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")


def validate(kind: str, obj: dict[str, Any]) -> None:
    """The OpenAPI v3 schema as JSON Schema (kubernetes-specific x- keys are ignored)."""
    jsonschema.validate(obj, schema_of(kind), cls=jsonschema.Draft7Validator,
                        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def test_four_crds() -> None:
    assert set(CRDS) == KINDS


def test_code_names_the_crds_as_installed() -> None:
    """The group, version, kinds and plurals the proxy and the operator use are the CRDs' own."""
    assert set(names.KINDS) == set(CRDS)
    for kind, crd in CRDS.items():
        spec = crd["spec"]
        assert (spec["group"], spec["names"]["plural"]) == (names.GROUP, names.PLURALS[kind])
        assert [v["name"] for v in spec["versions"]] == [names.VERSION]


@pytest.mark.parametrize("kind", sorted(KINDS))
class TestCRD:
    def test_names_scope_category(self, kind: str) -> None:
        spec = CRDS[kind]["spec"]
        assert spec["group"] == "pgwarden.dev" and spec["scope"] == "Namespaced"
        assert CRDS[kind]["metadata"]["name"] == f"{spec['names']['plural']}.pgwarden.dev"
        assert "pgwarden" in spec["names"]["categories"] and spec["names"]["shortNames"]

    def test_status_subresource_and_columns(self, kind: str) -> None:
        (version,) = CRDS[kind]["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        assert any(c["name"] == "Age" for c in version["additionalPrinterColumns"])

    def test_structural(self, kind: str) -> None:
        for path, node in walk(schema_of(kind)):
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or node.get(
                "x-kubernetes-int-or-string"), f"{kind} {path} has no type"
            assert not {"$ref", "oneOf", "anyOf", "allOf", "not"} & set(node), f"{kind} {path} is not structural"
            if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
                assert path == "$.metadata" or node.get("x-kubernetes-preserve-unknown-fields"), \
                    f"{kind} {path}: an object without properties would be pruned empty"

    def test_status_has_conditions_and_observed_generation(self, kind: str) -> None:
        status = schema_of(kind)["properties"]["status"]["properties"]
        assert {"phase", "observedGeneration", "conditions"} <= set(status)
        cond = status["conditions"]["items"]["properties"]
        assert cond["status"]["enum"] == ["True", "False", "Unknown"]
        assert cond["type"]["enum"]  # typed condition types


def test_approval_printer_columns() -> None:
    (version,) = CRDS["ApprovalRequest"]["spec"]["versions"]
    names = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Statement", "Requester", "Phase", "Rows", "Age"]


def example_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in KINDS:
                out.append((f"{f.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


@pytest.mark.parametrize("name,doc", example_docs(), ids=[n for n, _ in example_docs()])
def test_examples_validate(name: str, doc: dict[str, Any]) -> None:
    validate(doc["kind"], doc)


def test_example_connection_exists() -> None:
    assert any(d["kind"] == "DatabaseConnection" for _, d in example_docs())


def conn(**creds: Any) -> dict[str, Any]:
    return {"apiVersion": "pgwarden.dev/v1alpha1", "kind": "DatabaseConnection", "metadata": {"name": "c"},
            "spec": {"host": "db", "adminSecretRef": {"name": "s"}, "credentials": creds}}


class TestValidationCatchesMistakes:
    @pytest.mark.parametrize("value", ["1h", "90s", "1h30m", "250ms"])
    def test_durations_ok(self, value: str) -> None:
        validate("DatabaseConnection", conn(rotationInterval=value))

    @pytest.mark.parametrize("value", ["1 hour", "10", "h", "-1m", ""])
    def test_durations_bad(self, value: str) -> None:
        with pytest.raises(jsonschema.ValidationError):
            validate("DatabaseConnection", conn(rotationInterval=value))

    def test_bad_ssl_mode(self) -> None:
        d = conn()
        d["spec"]["sslMode"] = "on"
        with pytest.raises(jsonschema.ValidationError):
            validate("DatabaseConnection", d)

    def test_missing_host(self) -> None:
        d = conn()
        del d["spec"]["host"]
        with pytest.raises(jsonschema.ValidationError, match="host"):
            validate("DatabaseConnection", d)

    def test_grant_role_pattern(self) -> None:
        with pytest.raises(jsonschema.ValidationError):
            validate("DatabaseConnection", conn(grantRoles=['x"; DROP ROLE y']))

    def test_policy_action_enum(self) -> None:
        d = {"spec": {"connectionRef": {"name": "c"}, "rules": [{"action": "maybe", "operations": ["select"]}]}}
        with pytest.raises(jsonschema.ValidationError):
            validate("AccessPolicy", d)

    def test_subject_one_key(self) -> None:
        d = {"spec": {"connectionRef": {"name": "c"}, "subjects": [{"group": "a", "user": "b"}]}}
        with pytest.raises(jsonschema.ValidationError):
            validate("AccessPolicy", d)

    def test_masking_strategy_enum(self) -> None:
        d = {"spec": {"connectionRef": {"name": "c"}, "columns": [{"table": "public.t", "column": "c", "strategy": "rot13"}]}}
        with pytest.raises(jsonschema.ValidationError):
            validate("MaskingRule", d)

    def test_approval_decision_enum(self) -> None:
        d = {"spec": {"connectionRef": {"name": "c"}, "statement": "DELETE", "requester": {"subject": "a"},
                      "decision": "yes please"}}
        with pytest.raises(jsonschema.ValidationError):
            validate("ApprovalRequest", d)


def test_operator_status_fits_the_schema() -> None:
    """What the handlers write into status must survive a real API server's pruning."""
    from pgwarden.operator import status as st

    body = st.connection_status_example()
    validate("DatabaseConnection", {"spec": conn()["spec"], "status": body})
