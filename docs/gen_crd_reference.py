"""Generate docs/crd-reference.md from the CRDs' own OpenAPI schemas (crds/*.yaml).

    python docs/gen_crd_reference.py            # rewrite docs/crd-reference.md
    python docs/gen_crd_reference.py --check    # exit 1 if it is stale (tests/test_docs_crd_reference.py)

Every field of every kind, with its type, whether it is required, its default and the
constraints the API server enforces (enum, pattern, bounds, formats, list semantics), so the
reference cannot drift from what the cluster accepts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "crds"
OUT = ROOT / "docs" / "crd-reference.md"
KIND_ORDER = ("DatabaseConnection", "AccessPolicy", "MaskingRule", "ApprovalRequest")
SKIP_TOP = {"apiVersion", "kind", "metadata"}


def load_crds(folder: Path = CRDS) -> list[dict[str, Any]]:
    crds = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                doc["_file"] = f"crds/{path.name}"
                crds.append(doc)
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(crds, key=lambda c: (order.get(c["spec"]["names"]["kind"], 99), c["spec"]["names"]["kind"]))


def type_of(schema: Mapping[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    if "anyOf" in schema or "oneOf" in schema:
        alts = schema.get("anyOf") or schema.get("oneOf") or []
        kinds = sorted({type_of(a) for a in alts if type_of(a)})
        if kinds:
            return " or ".join(kinds)
    t = schema.get("type", "")
    if t == "array":
        inner = type_of(schema.get("items") or {})
        return f"array of {inner}" if inner else "array"
    if t == "object" and "additionalProperties" in schema and not schema.get("properties"):
        inner = type_of(schema["additionalProperties"]) if isinstance(schema["additionalProperties"], Mapping) else ""
        return f"map of {inner}" if inner else "map"
    return str(t or "any")


def constraints(schema: Mapping[str, Any]) -> list[str]:
    out = []
    target = schema.get("items") if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping) else None

    def add(s: Mapping[str, Any], prefix: str = "") -> None:
        if "enum" in s:
            out.append(prefix + "one of " + ", ".join(f"`{v}`" for v in s["enum"]))
        if "pattern" in s:
            out.append(prefix + f"pattern `{s['pattern']}`")
        if "format" in s:
            out.append(prefix + f"format {s['format']}")
        for key, word in (("minimum", "≥"), ("maximum", "≤")):
            if key in s:
                out.append(prefix + f"{word} {s[key]}")
        for key, word in (("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥"),
                          ("maxItems", "items ≤"), ("minProperties", "keys ≥"), ("maxProperties", "keys ≤")):
            if key in s:
                out.append(prefix + f"{word} {s[key]}")
        if s.get("x-kubernetes-list-type") in ("set", "map"):
            out.append(prefix + f"list type {s['x-kubernetes-list-type']}")
        if s.get("x-kubernetes-preserve-unknown-fields"):
            out.append(prefix + "free-form")
        for rule in s.get("x-kubernetes-validations") or []:
            out.append(prefix + f"rule: {rule.get('message') or rule.get('rule')}")

    add(schema)
    if target is not None:
        add(target, "each ")
    return out


def walk(schema: Mapping[str, Any], path: str, required: bool) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    yield path, schema, required
    node = schema
    suffix = ""
    if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping):
        node, suffix = schema["items"], "[]"
    props = node.get("properties") or {}
    req = set(node.get("required") or [])
    for name in props:
        yield from walk(props[name], f"{path}{suffix}.{name}", name in req)


def cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def fields_table(root: Mapping[str, Any], top: str) -> list[str]:
    sub = (root.get("properties") or {}).get(top)
    if not sub:
        return []
    rows = ["| field | type | required | default | constraints | description |", "|---|---|---|---|---|---|"]
    top_required = top in set(root.get("required") or [])
    for path, schema, required in walk(sub, top, top_required):
        default = f"`{yaml.safe_dump(schema['default'], default_flow_style=True).strip().removesuffix('...').strip()}`" \
            if "default" in schema else ""
        rows.append(f"| `{path}` | {cell(type_of(schema))} | {'yes' if required else ''} | {cell(default)} | "
                    f"{cell('; '.join(constraints(schema)))} | {cell(schema.get('description', ''))} |")
    return rows


def render(crds: list[dict[str, Any]]) -> str:
    lines = [
        "# CRD field reference",
        "",
        "<!-- Generated by docs/gen_crd_reference.py from crds/*.yaml. Do not edit by hand:",
        "     change the CRD, then run `python docs/gen_crd_reference.py` (tests fail when this file is stale). -->",
        "",
        "Every field the API server accepts, with the validation it enforces. The operator and the",
        "proxy check more (durations, table names, references between objects); their messages name",
        "the field with the same path as below. Guides: [install](install.md), [security](security.md),",
        "[operating](operating.md), [operator design](operator.md).",
        "",
        "| kind | group/version | scope | short names | file |",
        "|---|---|---|---|---|",
    ]
    for crd in crds:
        s = crd["spec"]
        versions = ", ".join(v["name"] for v in s["versions"] if v.get("served", True))
        lines.append(f"| [{s['names']['kind']}](#{s['names']['kind'].lower()}) | {s['group']}/{versions} | {s['scope']} | "
                     f"{', '.join(s['names'].get('shortNames') or [])} | `{crd['_file']}` |")
    for crd in crds:
        s = crd["spec"]
        kind = s["names"]["kind"]
        for v in s["versions"]:
            if not v.get("served", True):
                continue
            root = v["schema"]["openAPIV3Schema"]
            lines += ["", f"## {kind}", ""]
            lines.append(f"`apiVersion: {s['group']}/{v['name']}` · `kind: {kind}` · {s['scope'].lower()} · "
                         f"`kubectl get {s['names']['plural']}`"
                         + (f" (categories: {', '.join(s['names'].get('categories') or [])})"
                            if s["names"].get("categories") else ""))
            if root.get("description"):
                lines += ["", cell(root["description"])]
            subresources = sorted((v.get("subresources") or {}).keys())
            if subresources:
                lines += ["", "Subresources: " + ", ".join(f"`{x}`" for x in subresources) + "."]
            columns = v.get("additionalPrinterColumns") or []
            if columns:
                lines += ["", "`kubectl get` columns: " + ", ".join(
                    f"{c['name']} (`{c['jsonPath']}`)" + (" — wide" if c.get("priority") else "") for c in columns) + "."]
            for top in (p for p in (root.get("properties") or {}) if p not in SKIP_TOP):
                lines += ["", f"### {kind} `{top}`", ""]
                lines += fields_table(root, top)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/crd-reference.md is stale")
    args = parser.parse_args(argv)
    text = render(load_crds())
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/crd-reference.md is stale: run python docs/gen_crd_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
