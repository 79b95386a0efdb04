"""What the API server does to a custom resource before it stores it: pruning, defaulting and
OpenAPI validation against the CRD's structural schema. No API server runs on these machines.

Rules, from "Extend the Kubernetes API with CustomResourceDefinitions" (kubernetes.io/docs/tasks/
extend-kubernetes/custom-resources/custom-resource-definitions: "Field pruning", "Controlling
pruning", "Defaulting", "Defaulting and Nullable", "Embedded resources"):

- Fields a structural schema does not specify are dropped (pruned) on create, update, patch and
  on the status subresource, silently — the client gets no error.
- `x-kubernetes-preserve-unknown-fields: true` keeps unknown fields at that node; fields it does
  specify are still pruned recursively.
- `additionalProperties` keeps every key and prunes each value with its schema.
- At the root and at `x-kubernetes-embedded-resource: true`, apiVersion, kind and metadata are
  always kept; metadata keeps only ObjectMeta's fields (it is decoded into ObjectMeta).
- A `null` value of an object field is dropped unless the field is `nullable: true` (before
  defaulting); a null array item that is not nullable fails validation instead.
- `default` fills missing fields after pruning, also inside arrays and new objects.
- A merge patch (RFC 7386) is applied first, then the result is pruned; a status-subresource
  write keeps only `.status` of the request and everything else of the stored object.
- `x-kubernetes-validations` ("Validation rules"): each CEL rule is evaluated with `self` bound to
  its node after defaulting; a rule that names `oldSelf` is a transition rule, evaluated only on
  updates where the old object has that node. A false rule is a 422 with the rule's message.
  CEL is interpreted by cel-python (celpy), with the Kubernetes `duration()` it shares.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
_ALWAYS = ("apiVersion", "kind", "metadata")


class Invalid(Exception):
    """The API server would answer 422 Unprocessable Entity."""


class _StrictLoader(yaml.SafeLoader):
    """kubectl and the API server's strict field validation refuse a key given twice; PyYAML
    would silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        if dupes:
            raise Invalid(f"duplicate field(s) {sorted(map(str, dupes))} at line {node.start_mark.line + 1}")
        return super().construct_mapping(node, deep=deep)


def crds(root: Path = ROOT / "crds") -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(root.glob("*.yaml")):
        for doc in yaml.load_all(f.read_text(), Loader=_StrictLoader):  # noqa: S506 - a SafeLoader
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc
    return out


def schema_of(crd: Mapping[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def prune(
    value: Any,
    schema: Mapping[str, Any],
    path: str = "",
    dropped: list[str] | None = None,
    *,
    root: bool = False,
) -> Any:
    """A pruned copy of `value`; the paths of what was dropped are appended to `dropped`."""
    dropped = [] if dropped is None else dropped
    if isinstance(value, list):
        items = schema.get("items")
        return [
            prune(v, items, f"{path}[{i}]", dropped) if isinstance(items, Mapping) else copy.deepcopy(v)
            for i, v in enumerate(value)
        ]
    if not isinstance(value, Mapping):
        return copy.deepcopy(value)
    props: Mapping[str, Any] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    embedded = root or bool(schema.get("x-kubernetes-embedded-resource"))
    out: dict[str, Any] = {}
    for key, child in value.items():
        where = f"{path}.{key}"
        if embedded and key == "metadata" and isinstance(child, Mapping):
            out[key] = _prune_meta(child, where, dropped)
            continue
        if embedded and key in _ALWAYS:
            out[key] = copy.deepcopy(child)
            continue
        sub = props.get(key)
        if sub is None and isinstance(additional, Mapping):
            sub = additional
        if sub is None:
            if preserve or additional is True:
                out[key] = copy.deepcopy(child)
            else:
                dropped.append(where)
            continue
        if child is None and not sub.get("nullable"):
            dropped.append(where)
            continue
        out[key] = prune(child, sub, where, dropped)
    return out


def _prune_meta(meta: Mapping[str, Any], path: str, dropped: list[str]) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        if k in OBJECT_META_FIELDS:
            out[k] = copy.deepcopy(v)
        else:
            dropped.append(f"{path}.{k}")
    return out


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(v, schema["items"]) for v in value]
    if not isinstance(value, dict):
        return value
    for key, sub in (schema.get("properties") or {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = apply_defaults(value[key], sub)
    additional = schema.get("additionalProperties")
    if isinstance(additional, Mapping):
        for key in list(value):
            if key not in (schema.get("properties") or {}):
                value[key] = apply_defaults(value[key], additional)
    return value


def to_json_schema(schema: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema: nullable and int-or-string become types;
    the x- extensions are left for jsonschema to ignore."""
    if isinstance(schema, list):
        return [to_json_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: to_json_schema(v) for k, v in schema.items() if k != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def validate(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    try:
        jsonschema.validate(
            obj,
            to_json_schema(schema),
            cls=jsonschema.Draft7Validator,
            format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
        )
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path)
        raise Invalid(f"{where}: {e.message}") from e


def check_rules(value: Any, old: Any, schema: Mapping[str, Any], path: str = "") -> None:
    """Evaluate every x-kubernetes-validations rule below `schema` (old: the stored object)."""
    import celpy

    if value is None:
        return
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations") or []:
        text = rule["rule"]
        if "oldSelf" in text and old is None:
            continue  # a transition rule: only on updates that had this node
        activation: dict[str, Any] = {"self": celpy.json_to_cel(value)}
        if old is not None:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = env.program(env.compile(text)).evaluate(activation)
        if isinstance(result, Exception) or not bool(result):
            raise Invalid(f"{path or '<root>'}: {rule.get('message') or 'failed rule: ' + text}")
    if isinstance(value, Mapping):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, child in value.items():
            sub = props.get(key, additional if isinstance(additional, Mapping) else None)
            if sub is not None:
                check_rules(child, old.get(key) if isinstance(old, Mapping) else None, sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            check_rules(item, None, schema["items"], f"{path}[{i}]")


def store(
    obj: Mapping[str, Any], crd: Mapping[str, Any], old: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """What a create (or, with the stored `old`, an update) leaves in etcd: (stored object,
    dropped paths)."""
    schema = schema_of(crd)
    dropped: list[str] = []
    stored = apply_defaults(prune(obj, schema, "", dropped, root=True), schema)
    validate(stored, schema)
    check_rules(stored, old, schema)
    return stored, dropped


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(copy.deepcopy(target)) if isinstance(target, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def patch_status(
    stored: Mapping[str, Any], patch: Mapping[str, Any], crd: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """A merge patch through the status subresource: only `.status` of the result is taken."""
    merged = merge_patch(stored, patch)
    result = copy.deepcopy(dict(stored))
    if "status" in merged:
        result["status"] = merged["status"]
    else:
        result.pop("status", None)
    return store(result, crd, stored)


def update(
    stored: Mapping[str, Any], patch: Mapping[str, Any], crd: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """A merge patch of the main resource (kubectl patch --type merge): status is kept as stored."""
    merged = merge_patch(stored, {k: v for k, v in patch.items() if k != "status"})
    if "status" in stored:
        merged["status"] = copy.deepcopy(stored["status"])
    return store(merged, crd, stored)
