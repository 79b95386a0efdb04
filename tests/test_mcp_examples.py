"""The Cursor and Claude Code configurations of docs/mcp.md work as written.

The Claude Code one is started the way Claude Code starts it (in the project folder, `${HOME}`
expanded) against a live proxy that runs the example policy and masking rule; only where the
proxy listens is added, since the test proxy is not on the example's port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import Client, StdioServerParameters

from pgwarden.cli import build_parser
from pgwarden.mcp.server import credential_source, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "mcp"


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{([A-Za-z]+)\}", lambda m: variables[m.group(1)], value)


def server_entry(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())["mcpServers"]["pgwarden"]


@pytest.mark.parametrize(
    ("name", "variables"),
    [
        ("cursor-mcp.json", {"workspaceFolder": str(ROOT), "userHome": "/home/dev"}),
        ("claude-code-mcp.json", {"HOME": "/home/dev"}),
    ],
)
def test_the_client_configurations_parse_and_load(
    name: str, variables: dict[str, str], monkeypatch: Any
) -> None:
    monkeypatch.chdir(ROOT)  # Claude Code starts project servers in the project folder
    entry = server_entry(name)
    assert entry["command"] == "pgwarden"
    args = build_parser().parse_args([expand(a, variables) for a in entry["args"]])
    assert args.verb == "mcp" and args.token_file == "/home/dev/.config/pgwarden/token"
    docs, view = load_config(args.config)  # the MaskingRule's hash key is not needed here
    assert view is not None and view.connection == "orders-prod"
    assert {d.kind for d in docs} >= {"ProxyConfig", "DatabaseConnection", "AccessPolicy", "MaskingRule"}


def test_the_token_file_is_read_for_every_connection_and_wins_over_the_variable(
    tmp_path: Path, monkeypatch: Any
) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    monkeypatch.setenv("PGWARDEN_TOKEN", "from-env")
    read = credential_source(str(token), "PGWARDEN_TOKEN")
    assert read() == "first"
    token.write_text("rotated\n")
    assert read() == "rotated"
    assert credential_source(None, "PGWARDEN_TOKEN")() == "from-env"
    monkeypatch.delenv("PGWARDEN_TOKEN")
    assert credential_source(None, "PGWARDEN_TOKEN")() is None  # pod identity: no password


def example(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    doc["spec"]["connectionRef"] = {"name": "shop"}
    return doc


async def test_the_claude_code_configuration_runs_as_written(
    make_proxy: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("PGWARDEN_MASKING_HASH_KEY", "k" * 32)  # the proxy's secret, not the agent's
    proxy = make_proxy(extra=[example("access-policy.yaml"), example("masking-rule.yaml")])
    home = tmp_path / "home"
    (home / ".config" / "pgwarden").mkdir(parents=True)
    (home / ".config" / "pgwarden" / "token").write_text(proxy.password)  # the development user's password
    entry = server_entry("claude-code-mcp.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGWARDEN_"))}
    # the console script pip installed; the module where scripts are not on PATH
    found = shutil.which(entry["command"])
    command = [found] if found else [sys.executable, "-m", "pgwarden.cli"]
    where = ["--host", proxy.host, "--port", str(proxy.port)]
    params = StdioServerParameters(
        command=command[0],
        args=command[1:] + [expand(a, {"HOME": str(home)}) for a in entry["args"]] + where,
        env={**env, "HOME": str(home)},
        cwd=str(ROOT),
    )
    async with Client(params) as client:
        tables = (await client.call_tool("list_tables", {"schema": "public"})).structured_content
        contacts = (
            await client.call_tool("describe_table", {"table": "customer_contacts"})
        ).structured_content
        rows = (
            await client.call_tool("query", {"sql": "SELECT name, email FROM customer_contacts ORDER BY id"})
        ).structured_content
        explained = (
            await client.call_tool("explain", {"sql": "DELETE FROM orders WHERE id = 1"})
        ).structured_content
    assert {t["name"] for t in tables["tables"]} == {
        "orders",
        "customer_contacts",
        "audit_scratch",
    }  # no-pii-table
    assert {c["column"]: c["masked"] for c in contacts["columns"]}["name"] is False
    assert rows["status"] == "ok" and rows["rows"][0][0] == "Ada Lovelace"
    assert "ada@example.com" not in json.dumps(rows)
    assert explained["decision"] == "review" and explained["approval"]["reviewers"] == ["group:dba"]
