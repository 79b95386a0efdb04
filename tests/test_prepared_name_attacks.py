"""Attacks through prepared-statement names shared by SQL PREPARE and the extended protocol.

PostgreSQL has one namespace for both: a protocol Bind may name a statement made by SQL
PREPARE, and SQL DEALLOCATE drops protocol-level statements. The proxy must never run a body
it did not decide (and mask) under a name it decided earlier.
"""

from __future__ import annotations

from typing import Any

import pytest
from rawpg import PgError, RawConn, data_row, error_fields, msg

API = "pgwarden.dev/v1alpha1"
POLICY = {
    "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [
            {"action": "allow", "operations": ["select"], "tables": ["public.orders", "public.customers"]},
            {"action": "review", "operations": ["delete"], "tables": ["public.orders"]},
        ],
        "approval": {"reviewers": [{"group": "dba"}], "mode": "defer"},
    },
}
MASKING = {
    "apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "pii"},
    "spec": {"connectionRef": {"name": "shop"},
             "columns": [{"table": "public.customers", "column": "ssn", "strategy": "redact"}]},
}


def bind_execute(name: str) -> bytes:
    bind = b"\0" + name.encode() + b"\0" + b"\0\0" + b"\0\0" + b"\0\0"  # portal "", no params, text results
    return msg(b"B", bind) + msg(b"E", b"\0" + b"\0\0\0\0") + msg(b"S")


def run_bound(conn: RawConn, name: str) -> tuple[list[list[bytes | None]], dict[str, str] | None]:
    conn.send(bind_execute(name))
    rows: list[list[bytes | None]] = []
    error = None
    for kind, payload in conn.until_ready():
        if kind == b"D":
            rows.append(data_row(payload))
        elif kind == b"E":
            error = error_fields(payload)
    return rows, error


@pytest.fixture
def conn(make_proxy: Any) -> Any:
    proxy = make_proxy(extra=[POLICY, MASKING])
    c = RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, "shop")
    yield c
    c.close()


def test_a_sql_prepared_delete_cannot_be_run_through_a_protocol_bind(conn: RawConn, pg: Any) -> None:
    conn.simple("PREPARE d AS DELETE FROM orders WHERE id = 3")  # preparing is harmless
    mark = pg.log_position()
    _, error = run_bound(conn, "d")  # ...but running it needs approval
    assert error is not None and error["C"] == "42501"
    assert "DELETE" not in pg.log_since(mark) and "execute d" not in pg.log_since(mark)
    assert conn.simple("SELECT count(*) FROM orders WHERE id = 3") == [[b"1"]]


def test_a_sql_prepared_select_cannot_skip_masking(conn: RawConn) -> None:
    conn.simple("PREPARE s AS SELECT ssn FROM customers ORDER BY id")
    rows, error = run_bound(conn, "s")
    assert error is not None and error["C"] == "42501"
    assert b"123-45-6789" not in repr(rows).encode()


def test_deallocate_and_prepare_again_cannot_swap_a_decided_body(conn: RawConn, pg: Any) -> None:
    # a protocol-level statement the proxy decided (a harmless SELECT)...
    parse = b"x\0SELECT 1\0\0\0"
    conn.send(msg(b"P", parse) + msg(b"S"))
    conn.until_ready()
    # ...dropped and re-made under the same name by SQL, with a body needing review
    conn.simple("DEALLOCATE x")
    conn.simple("PREPARE x AS DELETE FROM orders WHERE id = 4")
    mark = pg.log_position()
    _, error = run_bound(conn, "x")
    assert error is not None and error["C"] == "42501"
    assert "DELETE" not in pg.log_since(mark)
    with pytest.raises(PgError):  # and SQL EXECUTE still goes through review
        conn.simple("EXECUTE x")
    assert conn.simple("SELECT count(*) FROM orders WHERE id = 4") == [[b"1"]]


def test_without_a_policy_a_swapped_body_still_cannot_skip_masking(make_proxy: Any) -> None:
    proxy = make_proxy(extra=[MASKING])  # masking only; defaultAction allow
    with RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, "shop") as conn:
        conn.send(msg(b"P", b"x\0SELECT 1\0\0\0") + msg(b"S"))
        conn.until_ready()
        conn.simple("DEALLOCATE x")
        conn.simple("PREPARE x AS SELECT ssn FROM customers ORDER BY id")
        rows, error = run_bound(conn, "x")
        assert error is not None and error["C"] == "42501"
        assert b"123-45-6789" not in repr(rows).encode()
