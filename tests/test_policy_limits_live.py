"""Policy limits through the live proxy: an agent cannot dump a whole table or run forever."""

from __future__ import annotations

from typing import Any

import pg8000.native
import pytest

API = "pgwarden.dev/v1alpha1"


def limited_policy(**limits: Any) -> dict[str, Any]:
    return {
        "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "limited"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"group": "ai-agents"}],
            "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.orders"]}],
            "limits": limits,
        },
    }


def connect(proxy: Any) -> pg8000.native.Connection:
    return pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password)


def test_max_rows_stops_the_result_with_a_clear_error(make_proxy: Any) -> None:
    proxy = make_proxy(extra=[limited_policy(maxRows=5)])
    conn = connect(proxy)
    assert len(conn.run("SELECT id FROM orders ORDER BY id LIMIT 5")) == 5  # at the limit: fine
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run("SELECT * FROM orders")
    assert e.value.args[0]["C"] == "54000"
    assert "maxRows" in e.value.args[0]["M"]
    assert conn.run("SELECT count(*) FROM orders") == [[20]]  # the session carries on
    conn.close()


def test_max_rows_applies_to_copy_out(make_proxy: Any) -> None:
    proxy = make_proxy(extra=[limited_policy(maxRows=3)])
    out = proxy.psql("-c", "COPY orders TO STDOUT")
    assert out.returncode != 0
    assert "maxRows" in out.stderr
    assert len(out.stdout.splitlines()) <= 3


def test_statement_timeout_is_pinned_for_the_session(make_proxy: Any) -> None:
    proxy = make_proxy(extra=[limited_policy(statementTimeout="1s")])
    conn = connect(proxy)
    assert conn.run("SHOW statement_timeout") == [["1s"]]
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run("SELECT pg_sleep(5)")
    assert e.value.args[0]["C"] == "57014"
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run("SET statement_timeout = 0")  # lifting the limit is refused
    assert e.value.args[0]["C"] == "42501"
    assert conn.run("SHOW statement_timeout") == [["1s"]]
    conn.close()
