"""`pgwarden mcp` through a live proxy and PostgreSQL, with the official `mcp` client.

The MCP server is a client of the proxy, authenticated with a JWT (never a database password), so
every tool call is decided by the proxy's gate; the server's statement log proves what reached the
database, the audit log who asked. The behaviours an agent relies on run over each transport: the
server in-process, `pgwarden mcp` as a stdio subprocess, and streamable HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fix_proxy import proxy_documents
from jwt.algorithms import RSAAlgorithm
from mcp import Client, MCPError, StdioServerParameters

from pgwarden.errors import UserError
from pgwarden.mcp import gate as gate_module
from pgwarden.mcp.gate import GateSettings
from pgwarden.mcp.policyview import PolicyView
from pgwarden.mcp.server import POLICY_URI, build_server, parse_addr, serve_http
from pgwarden.resources import parse_documents

API = "pgwarden.dev/v1alpha1"
ISSUER = "https://login.example.test/realms/eng"
SUBJECT = "mcp-agent-7"
# the proxy namespaces an OIDC issuer's names (docs/identity.md): this issuer's prefix is "eng:"
PREFIX = "eng:"
IDENTITY = PREFIX + SUBJECT
SSNS = ("123-45-6789", "234-56-7890", "345-67-8901", "456-78-9012", "567-89-0123")
CARDS = ("4111111111111111", "5500005555555559")

POLICY = {
    "apiVersion": API,
    "kind": "AccessPolicy",
    "metadata": {"name": "mcp-agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": PREFIX + "ai-agents"}],
        "rules": [
            {
                "name": "read-shop",
                "action": "allow",
                "operations": ["select"],
                "tables": ["public.orders", "public.customers", "public.audit_scratch"],
            },
            {
                "name": "scratch-changes",
                "action": "review",
                "operations": ["insert", "update", "delete"],
                "tables": ["public.audit_scratch"],
            },
            {
                "name": "scratch-ids",
                "action": "allow",
                "operations": ["select", "update"],
                "tables": ["public.audit_scratch_id_seq"],
            },
        ],
        "defaultAction": "deny",
        "systemCatalogs": "read",
        "approval": {"reviewers": [{"group": "dba"}], "timeout": "30s", "mode": "wait"},
    },
}
MASKING = {
    "apiVersion": API,
    "kind": "MaskingRule",
    "metadata": {"name": "shop-pii"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "columns": [
            {"table": "public.customers", "column": "ssn", "strategy": "redact"},
            {"table": "public.customers", "column": "email", "strategy": "email"},
            {"table": "public.customers", "column": "card_number", "strategy": "last4"},
        ],
        "detectors": ["email", "us_ssn", "credit_card"],
    },
}


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_token(key: Any, **over: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "pgwarden",
        "sub": SUBJECT,
        "groups": ["ai-agents"],
        "iat": now,
        "exp": now + 600,
    }
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture
def approval_mode() -> str:
    return "wait"


@pytest.fixture
def gated(make_proxy: Any, pg: Any, tmp_path: Path, signing_key: Any, approval_mode: str) -> Any:
    jwk = RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwk.update(kid="k1", alg="RS256", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    spec = {
        "identity": {
            "oidc": [{"issuer": ISSUER, "audience": "pgwarden", "jwksFile": str(tmp_path / "jwks.json"),
                      "usernamePrefix": PREFIX, "groupsPrefix": PREFIX}]
        },
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "recording": {"dir": str(tmp_path / "rec")},
        # the reviewer CLI runs as this process's OS user; no agent runs here (see test_approvals_live)
        "approvals": {
            "backend": "local",
            "path": str(tmp_path / "approvals.db"),
            "allowProxyUserDecisions": True,
        },
    }
    policy = {
        **POLICY,
        "spec": {**POLICY["spec"], "approval": {**POLICY["spec"]["approval"], "mode": approval_mode}},
    }
    text = proxy_documents(pg, extra=[policy, MASKING], proxy_spec=spec)
    handle = make_proxy(yaml_text=text)
    handle.view = PolicyView.from_documents(
        parse_documents(text)
    )  # the proxy's own YAML, as --config gives it
    handle.config = tmp_path / "pgwarden.yaml"
    handle.config.write_text(text)
    return handle


def settings(proxy: Any, token: str, **over: Any) -> GateSettings:
    return GateSettings(
        host=proxy.host, port=proxy.port, database="shop", user=SUBJECT, credential=lambda: token, **over
    )


class Connector:
    """`async with connector as client`: an MCP client session to a server whose gate session uses the
    agent's JWT, over one transport: in-process, a `pgwarden mcp` subprocess on stdio, or streamable
    HTTP on loopback."""

    def __init__(self, proxy: Any, token: str, *, policies: bool, transport: str) -> None:
        self.proxy, self.token, self.policies, self.transport = proxy, token, policies, transport
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Client:
        view = self.proxy.view if self.policies else None
        if self.transport == "memory":
            client = Client(build_server(settings(self.proxy, self.token), view), raise_exceptions=True)
        elif self.transport == "stdio":
            where = (
                ["--config", str(self.proxy.config)]
                if self.policies
                else ["--host", self.proxy.host, "--database", "shop"]
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            client = Client(
                StdioServerParameters(
                    command=sys.executable,
                    args=[
                        "-m",
                        "pgwarden.cli",
                        "mcp",
                        *where,
                        "--port",
                        str(self.proxy.port),
                        "--user",
                        SUBJECT,
                    ],
                    env={**env, "PGWARDEN_TOKEN": self.token},
                )
            )
        else:
            port = await self._stack.enter_async_context(
                http_server(build_server(settings(self.proxy, self.token), view))
            )
            client = Client(f"http://127.0.0.1:{port}/mcp")
        return await self._stack.enter_async_context(client)

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.aclose()


@contextlib.asynccontextmanager
async def http_server(server: Any) -> AsyncIterator[int]:
    port = free_port()
    started: list[Any] = []
    task = asyncio.create_task(serve_http(server, "127.0.0.1", port, ready=started.append))
    try:
        while not (started and started[0].started):
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        yield port
    finally:
        if started:
            started[0].should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "memory")


TRANSPORTS = pytest.mark.parametrize("transport", ["memory", "stdio", "http"], indirect=True)


@pytest.fixture
def agent(gated: Any, signing_key: Any, transport: str) -> Connector:
    return Connector(gated, make_token(signing_key), policies=False, transport=transport)


@pytest.fixture
def planner_agent(gated: Any, signing_key: Any, transport: str) -> Connector:
    """The same, with the proxy's policies loaded (`pgwarden mcp --config`)."""
    return Connector(gated, make_token(signing_key), policies=True, transport=transport)


def data(res: Any) -> dict[str, Any]:
    """The structured result, checked against its one text part (the same JSON)."""
    assert len(res.content) == 1 and res.content[0].type == "text"
    assert json.loads(res.content[0].text) == json.loads(json.dumps(res.structured_content))
    return res.structured_content


def every_byte(res: Any) -> str:
    return json.dumps(res.model_dump(mode="json", by_alias=True))


def statements_ran(pg: Any, mark: int, marker: str) -> int:
    return sum(1 for line in pg.log_since(mark).splitlines() if "statement:" in line and marker in line)


def approvals(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgwarden.cli", "approvals", *args, "--db", str(tmp_path / "approvals.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- the tool list -----------------------------------------------------------------------------
@TRANSPORTS
async def test_the_tools_and_their_schemas(agent: Any) -> None:
    async with agent as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "query",
        "execute",
        "wait_for_approval",
        "list_schemas",
        "list_tables",
        "describe_table",
        "explain",
    }
    for t in tools.values():
        assert t.input_schema["type"] == "object" and t.input_schema["additionalProperties"] is False
        assert t.description and len(t.description) > 60
    assert tools["query"].input_schema["required"] == ["sql"]
    assert tools["query"].input_schema["properties"]["sql"]["maxLength"] == 65536
    assert tools["wait_for_approval"].input_schema["required"] == ["request"]
    assert tools["execute"].annotations.destructive_hint is True
    assert "held_for_approval" in tools["execute"].description


# -- reads -------------------------------------------------------------------------------------
@TRANSPORTS
async def test_a_read_returns_masked_rows_and_no_secret_in_any_part(agent: Any) -> None:
    async with agent as client:
        res = await client.call_tool(
            "query", {"sql": "SELECT id, name, ssn, email, card_number, notes FROM customers ORDER BY id"}
        )
    body = data(res)
    assert not res.is_error and body["status"] == "ok"
    assert [c["name"] for c in body["columns"]] == ["id", "name", "ssn", "email", "card_number", "notes"]
    assert body["rows"][0][0] == 1 and body["rows"][0][1] == "Ada Lovelace"
    assert body["rows"][0][4].endswith("1111") and body["rows"][0][4] != CARDS[0]
    everything = every_byte(res)
    for secret in (
        *SSNS,
        *CARDS,
        "ada@example.com",
        "grace@example.org",
    ):  # notes carry an e-mail: the detector masks it
        assert secret not in everything


async def test_the_row_cap_returns_the_first_rows_and_says_so(gated: Any, signing_key: Any) -> None:
    async with Client(build_server(settings(gated, make_token(signing_key), max_rows=3))) as client:
        res = await client.call_tool("query", {"sql": "SELECT id FROM orders ORDER BY id"})
    body = data(res)
    assert body["rows"] == [[1], [2], [3]] and body["truncated"] is True
    assert "Only the first 3 rows" in body["notes"][0] and "17 more" in body["notes"][0]


async def test_the_catalog_tools_read_through_the_gate(agent: Any) -> None:
    async with agent as client:
        schemas = data(await client.call_tool("list_schemas", {}))
        tables = data(await client.call_tool("list_tables", {"schema": "public"}))
        orders = data(await client.call_tool("describe_table", {"table": "orders"}))
        missing = await client.call_tool("describe_table", {"table": "no_such'table"})
    assert {"schema": "public"} in schemas["schemas"]
    assert {"schema": "public", "name": "orders", "kind": "table"} in tables["tables"]
    assert {"schema": "public", "name": "customer_contacts", "kind": "view"} in tables["tables"]
    cols = {c["column"]: c for c in orders["columns"]}
    assert (
        cols["id"]["primary_key"] is True and cols["id"]["type"] == "integer" and not cols["id"]["nullable"]
    )
    assert cols["status"]["default"] == "'new'::text"
    assert missing.is_error and missing.structured_content["status"] == "not_found"


# -- refusals ----------------------------------------------------------------------------------
@TRANSPORTS
async def test_a_denied_statement_returns_the_rule_and_nothing_reaches_the_server(
    agent: Any, pg: Any
) -> None:
    mark = pg.log_position()
    async with agent as client:
        res = await client.call_tool(
            "execute", {"sql": "UPDATE customers SET notes = 'mcp-denied-marker' WHERE id = 1"}
        )
        after = await client.call_tool("query", {"sql": "SELECT count(*) FROM orders"})
    body = data(res)
    assert res.is_error and body["status"] == "refused" and body["kind"] == "denied"
    assert body["sqlstate"] == "42501" and body["retryable"] is False
    assert "mcp-agents" in body["message"] or "default" in body["message"]
    assert body["next_step"].startswith("Do not retry")
    assert statements_ran(pg, mark, "mcp-denied-marker") == 0
    assert data(after)["rows"] == [[20]]  # the session stays usable


@pytest.mark.parametrize(
    "sql",
    [
        "COMMIT; DELETE FROM customers WHERE name = 'mcp-bypass-1'",
        "WITH d AS (DELETE FROM customers WHERE name = 'mcp-bypass-2' RETURNING id) SELECT * FROM d",
        "SELECT 1; UPDATE customers SET notes = 'mcp-bypass-3' WHERE id = 1",
    ],
)
async def test_bypasses_of_read_only_wrappers_are_decided_as_over_psql(
    gated: Any, signing_key: Any, pg: Any, sql: str
) -> None:
    token = make_token(signing_key)
    marker = sql.split("'")[1]
    mark = pg.log_position()
    async with Client(build_server(settings(gated, token))) as client:
        res = await client.call_tool("query", {"sql": sql})
    over_psql = await asyncio.to_thread(
        subprocess.run,
        ["psql", "-X", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        env=gated.env(PGUSER=SUBJECT, PGPASSWORD=token),
    )
    body = data(res)
    assert res.is_error and body["sqlstate"] == "42501"
    assert over_psql.returncode != 0 and body["message"] in over_psql.stderr
    assert statements_ran(pg, mark, marker) == 0


# -- approvals ---------------------------------------------------------------------------------
@TRANSPORTS
async def test_a_reviewed_write_is_held_then_runs_once_after_approval(
    planner_agent: Any, pg: Any, tmp_path: Path
) -> None:
    sql = "INSERT INTO audit_scratch (payload) VALUES ('mcp-approved-1')"
    mark = pg.log_position()
    async with planner_agent as client:
        held = data(await client.call_tool("execute", {"sql": sql}))
        assert held["status"] == "held_for_approval" and held["mode"] == "wait"
        request = held["request"]
        assert "wait_for_approval" in held["next_step"] and request in held["reviewer_hint"]
        assert held["reviewers"] == ["group:dba"] and "group:dba" in held["next_step"]
        # the held statement waits on its own connection; other calls go on meanwhile
        assert data(await client.call_tool("query", {"sql": "SELECT count(*) FROM orders"}))["rows"] == [[20]]
        pending = data(
            await client.call_tool("wait_for_approval", {"request": request, "timeout_seconds": 0})
        )
        assert pending["status"] == "pending"
        assert statements_ran(pg, mark, "mcp-approved-1") == 0
        decided = await asyncio.to_thread(approvals, tmp_path, "approve", request, "--as", "dba-alice")
        assert decided.returncode == 0, decided.stderr
        done = data(await client.call_tool("wait_for_approval", {"request": request, "timeout_seconds": 20}))
        again = data(await client.call_tool("wait_for_approval", {"request": request, "timeout_seconds": 0}))
    assert done["status"] == "ok" and done["row_count"] == 1 and done["request"] == request
    assert statements_ran(pg, mark, "mcp-approved-1") == 1
    assert again["status"] == "unknown_request"


@pytest.mark.parametrize("approval_mode", ["defer"])
@TRANSPORTS
async def test_a_deferred_write_runs_once_when_sent_again_after_approval(
    planner_agent: Any, pg: Any, tmp_path: Path
) -> None:
    sql = "INSERT INTO audit_scratch (payload) VALUES ('mcp-deferred-1')"
    mark = pg.log_position()
    async with planner_agent as client:
        first = await client.call_tool("execute", {"sql": sql})
        held = data(first)
        assert not first.is_error and held["status"] == "held_for_approval" and held["mode"] == "defer"
        assert "identical statement" in held["next_step"] and held["reviewers"] == ["group:dba"]
        waiting = data(
            await client.call_tool("wait_for_approval", {"request": held["request"], "timeout_seconds": 0})
        )
        assert waiting["status"] == "not_waiting"
        decided = await asyncio.to_thread(
            approvals, tmp_path, "approve", held["request"], "--as", "dba-alice"
        )
        assert decided.returncode == 0, decided.stderr
        ran = data(await client.call_tool("execute", {"sql": sql}))
        again = data(await client.call_tool("execute", {"sql": sql}))
    assert ran["status"] == "ok" and ran["row_count"] == 1
    assert again["status"] == "held_for_approval" and again["request"] != held["request"]  # once
    assert statements_ran(pg, mark, "mcp-deferred-1") == 1


async def test_a_write_the_reviewer_denies_never_runs(agent: Any, pg: Any, tmp_path: Path) -> None:
    mark = pg.log_position()
    async with agent as client:
        held = data(
            await client.call_tool(
                "execute", {"sql": "DELETE FROM audit_scratch WHERE payload = 'mcp-denied-2'"}
            )
        )
        await asyncio.to_thread(
            approvals, tmp_path, "deny", held["request"], "--as", "dba-bob", "--reason", "not today"
        )
        res = await client.call_tool("wait_for_approval", {"request": held["request"], "timeout_seconds": 20})
    body = data(res)
    assert res.is_error and body["kind"] == "approval_denied" and body["sqlstate"] == "PW002"
    assert "dba-bob" in body["message"] and "not today" in body["message"]
    assert statements_ran(pg, mark, "mcp-denied-2") == 0


@TRANSPORTS
async def test_the_audit_log_names_the_agent_and_the_tool_for_every_call(agent: Any, tmp_path: Path) -> None:
    async with agent as client:
        await client.call_tool("query", {"sql": "SELECT count(*) FROM orders WHERE status = 'mcp-audit'"})
        await client.call_tool("execute", {"sql": "DROP TABLE orders"})
        await client.call_tool("list_tables", {})
    recs = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    stmts = [r for r in recs if r["event"] == "statement"]
    by_sql = {r["sql"]: r for r in stmts}
    read = by_sql["/* pgwarden-mcp: query */ SELECT count(*) FROM orders WHERE status = 'mcp-audit'"]
    assert read["decision"]["action"] == "allow"
    assert by_sql["/* pgwarden-mcp: execute */ DROP TABLE orders"]["decision"]["action"] == "deny"
    assert any(r["sql"].startswith("/* pgwarden-mcp: list_tables */ SELECT") for r in stmts)
    for r in stmts:
        assert r["identity"]["subject"] == IDENTITY and r["identity"]["method"] == "jwt"
        assert r["applicationName"] == "pgwarden-mcp"
    deadline = time.monotonic() + 10  # the proxy writes a recording as its session ends
    recordings = ""
    while "pgwarden-mcp: query" not in recordings and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        recordings = "".join(f.read_text() for f in (tmp_path / "rec").glob("*.jsonl"))
    assert "/* pgwarden-mcp: query */ SELECT count(*) FROM orders" in recordings


# -- bad arguments -----------------------------------------------------------------------------
@TRANSPORTS
async def test_malformed_and_oversized_arguments_get_a_clear_error_and_the_session_stays_usable(
    agent: Any, pg: Any
) -> None:
    mark = pg.log_position()
    async with agent as client:
        missing = await client.call_tool("query", {})
        wrong = await client.call_tool("query", {"sql": 42})
        extra = await client.call_tool("execute", {"sql": "SELECT 1", "as_user": "postgres"})
        huge = await client.call_tool("query", {"sql": "SELECT '" + "x" * 70000 + "'"})
        bad_request = await client.call_tool(
            "wait_for_approval", {"request": "a b; DROP", "timeout_seconds": 9999}
        )
        unknown = await client.call_tool("drop_database", {})
        ok = await client.call_tool("query", {"sql": "SELECT 'still-here' AS s"})
    for res in (missing, wrong, extra, huge, bad_request, unknown):
        assert res.is_error and res.structured_content["status"] == "error"
    assert "'sql' is a required property" in missing.structured_content["errors"][0]
    assert "not of type 'string'" in wrong.structured_content["errors"][0]
    assert "as_user" in extra.structured_content["errors"][0]
    assert huge.structured_content["errors"] == ["sql: is longer than 65536 characters"]
    assert len(every_byte(huge)) < 2000  # the argument is not echoed back
    assert len(bad_request.structured_content["errors"]) == 2
    assert unknown.structured_content["kind"] == "unknown_tool"
    assert data(ok)["rows"] == [["still-here"]]
    assert "xxxxxxxxxx" not in pg.log_since(mark)


async def test_a_transaction_left_open_is_rolled_back(agent: Any) -> None:
    async with agent as client:
        opened = data(await client.call_tool("query", {"sql": "BEGIN; SELECT count(*) FROM orders"}))
        after = data(
            await client.call_tool(
                "query", {"sql": "SELECT pg_catalog.now() = pg_catalog.statement_timestamp() AS fresh"}
            )
        )
    assert any("rolled back" in n for n in opened["notes"])
    assert after["rows"] == [[True]]  # a new transaction: not inside the one left open


# -- transports --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_with_host(port: int, host: str) -> int:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp",
        data=body,
        method="POST",
        headers={
            "Host": host,
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def test_streamable_http_refuses_a_rebound_host(gated: Any, signing_key: Any) -> None:
    async with http_server(build_server(settings(gated, make_token(signing_key)))) as port:
        rebound = await asyncio.to_thread(post_with_host, port, "attacker.example:80")
        local = await asyncio.to_thread(post_with_host, port, f"127.0.0.1:{port}")
    assert rebound in (403, 421)  # a DNS-rebound page's Host is refused
    assert local not in (403, 421)


def test_http_is_served_on_loopback_only() -> None:
    assert parse_addr("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_addr("[::1]:8765") == ("::1", 8765)
    for addr in ("0.0.0.0:8765", "10.0.0.5:8765", "example.com:80", "8765"):
        with pytest.raises(UserError):
            parse_addr(addr)


async def test_stdio_subprocess_with_the_token_from_the_environment(
    gated: Any, signing_key: Any, pg: Any
) -> None:
    """`pgwarden mcp --config` with the proxy's own YAML (its listen port is 0 there: --port names it)."""
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "pgwarden.cli",
            "mcp",
            "--config",
            str(gated.config),
            "--port",
            str(gated.port),
            "--user",
            SUBJECT,
        ],
        env={**gated.env(), "PGPASSWORD": "", "PGWARDEN_TOKEN": make_token(signing_key)},
    )
    mark = pg.log_position()
    async with Client(params) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        res = await client.call_tool(
            "query", {"sql": "SELECT count(*) AS n FROM orders WHERE status <> 'mcp-stdio'"}
        )
        denied = await client.call_tool("execute", {"sql": "TRUNCATE customers /* mcp-stdio-denied */"})
        explained = await client.call_tool("explain", {"sql": "TRUNCATE customers"})
    assert "execute" in names
    assert data(explained)["decision"] == "deny"
    assert data(res)["rows"] == [[20]]
    assert denied.is_error and denied.structured_content["sqlstate"] == "42501"
    assert statements_ran(pg, mark, "mcp-stdio-denied") == 0


# -- with the policies (--config) ---------------------------------------------------------------
@TRANSPORTS
async def test_explain_gives_the_decision_without_running_the_statement(
    planner_agent: Any, agent: Any, pg: Any
) -> None:
    mark = pg.log_position()
    async with planner_agent as client:
        review = data(
            await client.call_tool(
                "explain", {"sql": "DELETE FROM audit_scratch WHERE payload = 'mcp-explain-1'"}
            )
        )
        deny = data(
            await client.call_tool(
                "explain", {"sql": "UPDATE customers SET notes = 'mcp-explain-2' WHERE id = 1"}
            )
        )
        allow = data(
            await client.call_tool(
                "explain", {"sql": "SELECT count(*) FROM orders WHERE status = 'mcp-explain-3'"}
            )
        )
    assert review["decision"] == "review" and "scratch-changes" in review["rule"]
    assert review["approval"]["reviewers"] == ["group:dba"]
    assert deny["decision"] == "deny" and deny["sqlstate"] == "42501"
    assert allow["decision"] == "allow" and "read-shop" in allow["rule"]
    assert review["identity"]["subject"] == IDENTITY and review["identity"]["method"] == "jwt"
    assert "Advisory" in review["note"]
    assert "mcp-explain" not in pg.log_since(mark)
    async with agent as client:  # started without --config: explain says what is missing
        res = await client.call_tool("explain", {"sql": "SELECT 1"})
    assert res.is_error and res.structured_content["kind"] == "no_policies"


@TRANSPORTS
async def test_a_table_without_access_is_not_listed_and_masked_columns_are_marked(planner_agent: Any) -> None:
    async with planner_agent as client:
        tables = data(await client.call_tool("list_tables", {"schema": "public"}))
        customers = data(await client.call_tool("describe_table", {"table": "customers"}))
        hidden = await client.call_tool("describe_table", {"table": "customer_contacts"})
    by_name = {t["name"]: t for t in tables["tables"]}
    assert set(by_name) == {"customers", "orders", "audit_scratch"}  # customer_contacts: no rule names it
    # customer_contacts at least (other tests of the session may have made more tables in public)
    assert any(n.endswith("tables or views you have no access to are not listed.") and int(n.split()[0]) >= 1
               for n in tables["notes"]), tables["notes"]
    assert by_name["orders"]["access"] == {
        "select": "allow",
        "insert": "deny",
        "update": "deny",
        "delete": "deny",
    }
    assert by_name["audit_scratch"]["access"]["insert"] == "review"
    masked = {c["column"]: c["masked"] for c in customers["columns"]}
    assert masked == {
        "id": False,
        "name": False,
        "email": "email",
        "ssn": "redact",
        "card_number": "last4",
        "phone": False,
        "notes": False,
        "created_at": False,
    }
    assert hidden.is_error and hidden.structured_content["status"] == "not_found"


@TRANSPORTS
async def test_the_policy_resource_says_what_the_agent_may_do(planner_agent: Any, agent: Any) -> None:
    async with planner_agent as client:
        listed = [str(r.uri) for r in (await client.list_resources()).resources]
        body = json.loads((await client.read_resource(POLICY_URI)).contents[0].text)
    assert listed == [POLICY_URI]
    assert body["identity"]["subject"] == IDENTITY and body["connection"] == "shop"
    (policy,) = body["policies"]
    assert policy["policy"] == "default/mcp-agents" and policy["defaultAction"] == "deny"
    assert [r["rule"] for r in policy["rules"]] == ["read-shop", "scratch-changes", "scratch-ids"]
    assert policy["approval"]["reviewers"] == ["group:dba"]
    assert {"table": "public.customers", "column": "ssn", "strategy": "redact"} in body["maskedColumns"]
    async with agent as client:
        bare = json.loads((await client.read_resource(POLICY_URI)).contents[0].text)
    assert bare["status"] == "unavailable"


@pytest.mark.parametrize("transport", ["memory", "stdio"], indirect=True)
async def test_ending_the_session_withdraws_a_held_request(agent: Any, pg: Any, tmp_path: Path) -> None:
    mark = pg.log_position()
    async with agent as client:
        held = data(
            await client.call_tool(
                "execute", {"sql": "DELETE FROM audit_scratch WHERE payload = 'mcp-withdrawn'"}
            )
        )
    requests = json.loads((await asyncio.to_thread(approvals, tmp_path, "list", "--all", "--json")).stdout)
    (request,) = [r for r in requests if r["id"] == held["request"]]
    assert request["state"] == "withdrawn"
    assert statements_ran(pg, mark, "mcp-withdrawn") == 0


async def test_several_statements_return_the_last_result_set(agent: Any) -> None:
    async with agent as client:
        body = data(await client.call_tool("query", {"sql": "SELECT 1 AS a; SELECT 'x' AS b, 2 AS c"}))
    assert [c["name"] for c in body["columns"]] == ["b", "c"] and body["rows"] == [["x", 2]]
    assert "2 result sets" in body["notes"][0]


async def test_held_statements_are_bounded(agent: Any, pg: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(gate_module, "MAX_HELD", 1)
    mark = pg.log_position()
    async with agent as client:
        held = data(
            await client.call_tool(
                "execute", {"sql": "DELETE FROM audit_scratch WHERE payload = 'mcp-held-1'"}
            )
        )
        over = await client.call_tool(
            "execute", {"sql": "DELETE FROM audit_scratch WHERE payload = 'mcp-held-2'"}
        )
    assert held["status"] == "held_for_approval"
    assert over.is_error and over.structured_content["kind"] == "too_many_held"
    assert "wait_for_approval" in over.structured_content["next_step"]
    assert "mcp-held-2" not in pg.log_since(mark)


async def test_a_call_the_client_gives_up_on_is_cancelled_and_the_session_goes_on(
    agent: Any, pg: Any
) -> None:
    slow = "SELECT count(*) FROM generate_series(1, 400000000) AS g WHERE g::text <> 'mcp-slow'"
    mark = pg.log_position()
    async with agent as client:
        with pytest.raises(MCPError, match="Timed out"):
            await client.call_tool("query", {"sql": slow}, read_timeout_seconds=0.5)
        started = time.monotonic()
        after = data(await client.call_tool("query", {"sql": "SELECT 'next' AS s"}))
    assert after["rows"] == [["next"]] and time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while "canceling statement due to user request" not in pg.log_since(mark) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert "canceling statement due to user request" in pg.log_since(mark)


async def test_in_an_injected_pod_the_pod_identity_needs_no_token(
    make_proxy: Any, pg: Any, monkeypatch: Any
) -> None:
    """The agent container's environment after injection: PGHOST/PGPORT at the sidecar, no password."""
    for name, value in (
        ("POD_NAMESPACE", "agents"),
        ("POD_NAME", "cursor-agent-7d9f"),
        ("SERVICE_ACCOUNT", "cursor-agent"),
    ):
        monkeypatch.setenv(name, value)  # the sidecar's downward API (the proxy runs in this process)
    policy = {
        "apiVersion": API,
        "kind": "AccessPolicy",
        "metadata": {"name": "cursor", "namespace": "agents"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"serviceAccount": "agents/cursor-agent"}],
            "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}],
        },
    }
    sidecar = make_proxy(extra=[policy], proxy_spec={"podIdentity": True, "users": []})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POD_", "SERVICE_ACCOUNT"))}
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "pgwarden.cli", "mcp", "--database", "shop", "--user", "cursor-agent"],
        env={**env, "PGHOST": sidecar.host, "PGPORT": str(sidecar.port)},
    )
    mark = pg.log_position()
    async with Client(params) as client:
        rows = data(await client.call_tool("query", {"sql": "SELECT count(*) FROM orders"}))
        denied = await client.call_tool("query", {"sql": "SELECT ssn FROM customers WHERE name = 'mcp-pod'"})
    assert rows["rows"] == [[20]]
    assert denied.is_error and denied.structured_content["sqlstate"] == "42501"
    # the rule of agents/cursor, whose only subject is the pod's service account, decided
    assert "rule of agents/cursor " in denied.structured_content["message"]
    assert "mcp-pod" not in pg.log_since(mark)
