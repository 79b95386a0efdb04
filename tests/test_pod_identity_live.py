"""Sidecar mode: a container of the agent's pod is the pod's service account, with no password."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

API = "pgwarden.dev/v1alpha1"
POLICY = {
    "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "cursor", "namespace": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"serviceAccount": "agents/cursor-agent"}],
        "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}],
    },
}


@pytest.fixture
def sidecar(make_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    # what the injected sidecar gets from the downward API
    monkeypatch.setenv("POD_NAMESPACE", "agents")
    monkeypatch.setenv("POD_NAME", "cursor-agent-7d9f")
    monkeypatch.setenv("SERVICE_ACCOUNT", "cursor-agent")
    return make_proxy(extra=[POLICY], proxy_spec={"podIdentity": True, "users": []})


def test_the_agent_connects_without_a_password_as_its_service_account(sidecar: Any) -> None:
    env = {k: v for k, v in sidecar.env().items() if k != "PGPASSWORD"}
    out = subprocess.run(["psql", "-X", "-A", "-t", "-U", "whoever", "-c", "SELECT count(*) FROM orders"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "20"
    denied = subprocess.run(["psql", "-X", "-c", "SELECT count(*) FROM customers"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert "serviceAccount:agents/cursor-agent" in denied.stderr or "denied" in denied.stderr


def test_pod_identity_needs_the_downward_api(make_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("POD_NAMESPACE", "SERVICE_ACCOUNT", "POD_SERVICE_ACCOUNT", "PGWARDEN_POD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    proxy = make_proxy(extra=[POLICY], proxy_spec={"podIdentity": True, "users": []})
    env = {k: v for k, v in proxy.env().items() if k != "PGPASSWORD"}
    out = subprocess.run(["psql", "-X", "-c", "SELECT 1"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode != 0
    assert "downward API" in out.stderr
    assert os.environ.get("POD_NAMESPACE") is None
