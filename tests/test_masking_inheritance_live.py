"""Tables in a hierarchy (inheritance, partitions), where a MaskingRule names one of them.

PostgreSQL returns a child's rows when the parent is read, so the parent's column of that name
carries the masked values: the agent reads the parent it is allowed (`*.*`) by every route, and
gets them masked. And its errors name the partition a row is in, not the table the rule names:
the agent provokes a not-null violation on a masked row, and the failing row is redacted."""

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


EVENTS_RULE = {"apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "pii"},
               "spec": {"connectionRef": {"name": "shop"},
                        "columns": [{"table": "public.events", "column": "ssn", "strategy": "redact"}]}}
WRITER = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
          "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"group": "ai-agents"}],
                   "rules": [{"action": "allow", "operations": ["select", "update", "insert"], "tables": ["*.*"]}]}}
SSN = "111-22-3333"


@pytest.fixture
def events(pg: EmbeddedPostgres, make_proxy: Callable[..., ProxyHandle]) -> Iterator[ProxyHandle]:
    """public.events, partitioned, its ssn masked by a rule on the parent; a row in events_1."""
    pg.psql("CREATE TABLE public.events (id int NOT NULL, ssn text, note text NOT NULL DEFAULT 'x') "
            "PARTITION BY LIST (id); CREATE TABLE public.events_1 PARTITION OF public.events FOR VALUES IN (1, 2); "
            f"INSERT INTO public.events VALUES (1, '{SSN}', 'n'); CREATE UNIQUE INDEX ON public.events_1 (ssn); "
            "GRANT ALL ON public.events, public.events_1 TO PUBLIC", dbname="shop")
    try:
        agent = {"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}
        yield make_proxy(extra=[WRITER, EVENTS_RULE], proxy_spec={"users": [agent]})
    finally:
        pg.psql("DROP TABLE public.events", dbname="shop")


@pytest.mark.parametrize("sql", [
    "UPDATE events SET note = NULL WHERE id = 1",     # PostgreSQL names the partition, events_1
    "UPDATE events_1 SET note = NULL WHERE id = 1",
    f"INSERT INTO events (id, ssn) VALUES (2, '{SSN}')",  # the unique key's value
])
def test_an_error_about_a_row_of_a_partition_does_not_show_its_masked_values(events: ProxyHandle, sql: str) -> None:
    with psycopg.connect(events.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as failed:
        conn.execute(sql)
    diag = failed.value.diag
    shown = " ".join(filter(None, (diag.message_primary, diag.message_detail, diag.message_hint, diag.context)))
    assert "[redacted]" in shown and SSN not in shown, shown
    assert diag.table_name == "events_1"  # the error still says where
