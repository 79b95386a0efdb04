"""No AccessPolicy covers the connection and defaultAction is deny: every message that would run
something is refused with 42501, the extended protocol's Bind and Execute as much as Query and Parse.

An agent that skips Parse and sends Bind and Execute straight away (of the unnamed statement, of a
portal it never bound) gets the same refusal as for a Query, the session goes on, and nothing
reaches the server's log but the proxy's own sentinel."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fix_pg import SHOP_DB
from fix_proxy import AGENT_PASSWORD, AGENT_USER
from rawpg import SYNC, RawConn, bind, error_fields, execute, msg

REFUSAL = "no AccessPolicy covers connection 'shop', so every statement is denied"






@pytest.fixture
def conn(make_proxy: Any) -> Any:
    proxy = make_proxy(proxy_spec={"defaultAction": "deny"})
    c = RawConn.login(proxy.host, proxy.port, AGENT_USER, AGENT_PASSWORD, SHOP_DB)
    yield c
    c.close()


def errors_until_ready(conn: RawConn) -> list[dict[str, str]]:
    return [error_fields(payload) for kind, payload in conn.until_ready() if kind == b"E"]


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(bind() + execute() + SYNC, id="bind-and-execute-without-parse"),
        pytest.param(bind("s1", "p1") + execute("p1") + SYNC, id="bind-of-a-named-statement"),
        pytest.param(execute("c") + SYNC, id="execute-of-a-portal-never-bound"),
    ],
)
def test_extended_messages_without_a_parse_are_refused(conn: RawConn, pg: Any, batch: bytes) -> None:
    mark = pg.log_position()
    conn.send(batch)
    errors = errors_until_ready(conn)
    assert [(e["C"], e["M"]) for e in errors] == [("42501", REFUSAL)]
    assert "AccessPolicy" in errors[0]["H"]
    # the session goes on, and is refused again
    conn.send(msg(b"Q", b"SELECT ssn FROM customers\0"))
    assert [e["C"] for e in errors_until_ready(conn)] == ["42501"]
    # the server saw only the refusal sentinels, which fail in its parser: nothing ran
    ran = [line for line in pg.log_since(mark).splitlines() if re.search(r"LOG:\s+(statement|execute)", line)]
    assert ran == []
