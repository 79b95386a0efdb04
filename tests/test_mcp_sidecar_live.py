"""The MCP sidecar an annotated pod gets (pgwarden.dev/mcp), run as the container would run it.

The container's command line comes from the injection itself; it serves streamable HTTP on the
pod's loopback and reaches the proxy beside it as the pod's identity, with no token and no
password — so it can do nothing the agent could not do over the wire protocol.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

from mcp import Client

from pgwarden.operator import injection as inj
from pgwarden.operator.settings import InjectionSettings

API = "pgwarden.dev/v1alpha1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sidecar(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pgwarden.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the MCP sidecar exited: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("the MCP sidecar did not listen")


async def test_the_injected_mcp_sidecar_serves_the_gate_as_the_pods_identity(
    make_proxy: Any, pg: Any, monkeypatch: Any
) -> None:
    for name, value in (("POD_NAMESPACE", "agents"), ("POD_NAME", "cursor-agent-7d9f"),
                        ("SERVICE_ACCOUNT", "cursor-agent")):
        monkeypatch.setenv(name, value)  # the proxy sidecar's downward API (the proxy runs in this process)
    policy = {
        "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "cursor", "namespace": "agents"},
        "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"serviceAccount": "agents/cursor-agent"}],
                 "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}]},
    }
    proxy = make_proxy(extra=[policy], proxy_spec={"podIdentity": True, "users": []})
    mcp_port = free_port()
    settings = InjectionSettings(image="example.org/pgwarden-proxy:test", listen_host="127.0.0.1",
                                 listen_port=proxy.port)
    container = inj.mcp_container(inj.InjectionTarget.for_connection("shop"), settings, mcp_port, native=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POD_", "SERVICE_ACCOUNT"))}
    proc = await asyncio.to_thread(start_sidecar, container["args"], env)
    try:
        await asyncio.to_thread(wait_port, mcp_port, proc)
        mark = pg.log_position()
        async with Client(f"http://127.0.0.1:{mcp_port}/mcp") as client:
            rows = await client.call_tool("query", {"sql": "SELECT count(*) FROM orders"})
            denied = await client.call_tool("query", {"sql": "SELECT ssn FROM customers WHERE name = 'mcp-sidecar'"})
        assert rows.structured_content["rows"] == [[20]]
        assert denied.is_error and denied.structured_content["sqlstate"] == "42501"
        # decided by the rule whose only subject is the pod's service account
        assert "rule of agents/cursor " in denied.structured_content["message"]
        assert "mcp-sidecar" not in pg.log_since(mark)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
