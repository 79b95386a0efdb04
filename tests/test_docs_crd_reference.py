"""docs/crd-reference.md is generated from the CRDs; it fails here when someone changes a CRD and
forgets `python docs/gen_crd_reference.py`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "gen_crd_reference.py"
REFERENCE = ROOT / "docs" / "crd-reference.md"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_crd_reference", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + "\n(run: python docs/gen_crd_reference.py)"


def leaf_paths(schema: Mapping[str, Any], path: str) -> Iterator[str]:
    yield path
    node, suffix = schema, ""
    if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping):
        node, suffix = schema["items"], "[]"
    for name, sub in (node.get("properties") or {}).items():
        yield from leaf_paths(sub, f"{path}{suffix}.{name}")


def test_every_field_of_every_crd_is_documented_with_its_constraints() -> None:
    text = REFERENCE.read_text()
    count = 0
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"]
        assert f"## {kind}" in text
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for top in ("spec", "status"):
            if top in root.get("properties", {}):
                for p in leaf_paths(root["properties"][top], top):
                    assert f"| `{p}` |" in text, f"{kind} {p} is missing from docs/crd-reference.md"
                    count += 1
    assert count > 50


def test_generator_renders_enums_defaults_and_required() -> None:
    gen = generator()
    crd = {
        "_file": "crds/x.yaml",
        "spec": {"group": "pgwarden.dev", "scope": "Namespaced",
                 "names": {"kind": "Thing", "plural": "things", "shortNames": ["th"]},
                 "versions": [{"name": "v1alpha1", "served": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "required": ["spec"], "properties": {"spec": {
                         "type": "object", "required": ["mode"], "properties": {
                             "mode": {"type": "string", "enum": ["a", "b"], "default": "a", "description": "How | why."},
                             "items": {"type": "array", "items": {"type": "object", "properties": {
                                 "n": {"type": "integer", "minimum": 1}}}}}}}}}}]},
    }
    out = gen.render([crd])
    assert "| `spec.mode` | string | yes | `a` | one of `a`, `b` | How \\| why. |" in out
    assert "| `spec.items[].n` | integer |  |  | ≥ 1 |  |" in out
    assert "| [Thing](#thing) | pgwarden.dev/v1alpha1 | Namespaced | th | `crds/x.yaml` |" in out
