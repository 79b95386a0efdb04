"""A MaskingRule names a table that inherits from, or is a partition of, another: PostgreSQL returns
the child's rows when the parent is read, so the parent's column of that name carries the masked
values. The agent reads the parent it is allowed (`*.*`) by every route: masked, never in clear."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fix_proxy import AGENT_PASSWORD, AGENT_USER, ProxyHandle

from pgwarden.embedded import EmbeddedPostgres

API = "pgwarden.dev/v1alpha1"
POLICY = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
          "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"group": "ai-agents"}],
                   "rules": [{"action": "allow", "operations": ["select"], "tables": ["*.*"]}]}}
RULE = {"apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "pii"},
        "spec": {"connectionRef": {"name": "shop"},
                 "columns": [{"table": "public.customers", "column": "ssn", "strategy": "redact"}]}}


@pytest.fixture
def parent(pg: EmbeddedPostgres, make_proxy: Callable[..., ProxyHandle]) -> Iterator[tuple[ProxyHandle, list[str]]]:
    """public.customers inherits from public.parties, made before the proxy reads the catalog."""
    ssn_type = pg.psql("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                       "attrelid = 'public.customers'::regclass AND attname = 'ssn'", dbname="shop").strip()
    pg.psql(f"CREATE TABLE public.parties (ssn {ssn_type}); GRANT SELECT ON public.parties TO PUBLIC; "
            "ALTER TABLE public.customers INHERIT public.parties", dbname="shop")
    try:
        agent = {"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}
        proxy = make_proxy(extra=[POLICY, RULE], proxy_spec={"users": [agent]})
        yield proxy, pg.psql("SELECT ssn FROM public.customers", dbname="shop").split()
    finally:
        pg.psql("ALTER TABLE public.customers NO INHERIT public.parties; DROP TABLE public.parties", dbname="shop")


@pytest.mark.parametrize("sql", [
    "SELECT ssn FROM public.parties",
    "SELECT * FROM public.parties",
    "SELECT p.ssn AS x FROM parties p",
    "SELECT upper(ssn) FROM parties",
])
def test_reading_the_parent_of_a_masked_table_stays_masked(parent: Any, sql: str) -> None:
    proxy, ssns = parent
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        rows = conn.execute(sql).fetchall()
        prepared = conn.execute(sql, prepare=True).fetchall()
    shown = {str(v) for row in rows + prepared for v in row}
    assert len(rows) >= len(ssns) and not shown & set(ssns), rows


def test_a_filter_on_the_parents_masked_column_is_refused(parent: Any) -> None:
    proxy, ssns = parent
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="masked"):
        conn.execute("SELECT count(*) FROM parties WHERE ssn LIKE %s", (ssns[0][:3] + "%",))
