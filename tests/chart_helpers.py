"""Helpers for the chart tests: find real helm, render the chart, index the manifests.

helm comes from PATH (`.ci/run` puts `../shared/tools/k8s-tools` there) or from that script
beside the checkout; tests skip with the reason when neither exists.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "pgwarden"
K8S_TOOLS = ROOT / ".." / "shared" / "tools" / "k8s-tools"
NAMESPACE = "pgwarden-system"
RELEASE = "pgw"

Manifest = dict[str, Any]


@functools.cache
def helm_binary() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    if K8S_TOOLS.exists():
        try:
            out = subprocess.run([str(K8S_TOOLS)], capture_output=True, text=True, timeout=300, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        candidate = Path(out.strip().splitlines()[-1]) / "helm" if out.strip() else None
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_helm() -> str:
    helm = helm_binary()
    if helm is None:
        pytest.skip("helm not found: not on PATH and ../shared/tools/k8s-tools is missing or failed")
    return helm


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    helm = require_helm()
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def set_args(values: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            out += ["--set", f"{key}={str(value).lower()}"]
        elif value is None or isinstance(value, list | dict | int | float):
            out += ["--set-json", f"{key}={json.dumps(value)}"]
        else:
            out += ["--set-string", f"{key}={value}"]
    return out


@functools.cache
def _render_cached(frozen: tuple[tuple[str, str], ...], include_crds: bool) -> str:
    values = {k: yaml.safe_load(v) for k, v in frozen}
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *set_args(values)]
    if include_crds:
        args.append("--include-crds")
    proc = run_helm(*args)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return proc.stdout


def render(values: Mapping[str, Any] | None = None, *, include_crds: bool = False) -> list[Manifest]:
    frozen = tuple(sorted((k, yaml.safe_dump(v)) for k, v in (values or {}).items()))
    text = _render_cached(frozen, include_crds)
    return [d for d in yaml.safe_load_all(text) if d]


def of_kind(docs: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def rules_of(role: Manifest) -> list[dict[str, Any]]:
    return list(role.get("rules") or [])


def grants(role: Manifest, group: str, resource: str) -> set[str]:
    """The verbs a Role/ClusterRole grants on group/resource (any resourceNames)."""
    verbs: set[str] = set()
    for rule in rules_of(role):
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            verbs.update(rule.get("verbs", []))
    return verbs
