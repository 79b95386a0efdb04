"""The masking plans against a catalog snapshot read by a side connection; an agent allowed DDL
changes what a name means on the server. Each test redefines a view the agent may read so that a
clear column name (`name`) returns the masked SSN, then reads it by every route that could still
be planned against the view as it was: the next statement, the same text, a pipeline, an open
transaction, a statement prepared before the change (protocol and SQL level), another session.
The SSN must never come back in clear: masked, or refused."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fix_proxy import AGENT_PASSWORD, AGENT_USER, APP_USER, ProxyHandle

API = "pgwarden.dev/v1alpha1"
VIEW = "public.people"
CLEAR = f"CREATE OR REPLACE VIEW {VIEW} AS SELECT id, name FROM public.customers"
LEAKY = f"CREATE OR REPLACE VIEW {VIEW} AS SELECT id, ssn AS name FROM public.customers"


OFFICER = {"name": "officer", "password": "officer-pw", "groups": ["privacy-officers"]}


def documents() -> list[dict[str, Any]]:
    policy = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
              "spec": {"connectionRef": {"name": "shop"},
                       "subjects": [{"group": "ai-agents"}, {"group": "privacy-officers"}],
                       "rules": [{"action": "allow", "operations": ["select", "ddl"],
                                  "tables": ["public.customers", VIEW]}]}}
    rule = {"apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "pii"},
            "spec": {"connectionRef": {"name": "shop"},
                     "columns": [{"table": "public.customers", "column": "ssn", "strategy": "redact"}],
                     "exemptSubjects": [{"group": "privacy-officers"}]}}
    return [policy, rule]


@pytest.fixture
def shop(make_proxy: Callable[..., ProxyHandle]) -> Iterator[tuple[ProxyHandle, list[str]]]:
    """A proxy whose catalog knows `people` as a view of clear names; and every SSN in clear."""
    agent = {"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}
    proxy = make_proxy(extra=documents(), proxy_spec={"users": [agent, OFFICER]})
    proxy.pg.psql(f"DROP VIEW IF EXISTS {VIEW}", dbname="shop")
    with connect(proxy) as conn:
        conn.execute(CLEAR)
        settled(conn, "SELECT name FROM people WHERE id = 1")
    ssns = proxy.pg.psql("SELECT ssn FROM customers", dbname="shop").split()
    yield proxy, ssns
    proxy.pg.psql(f"DROP VIEW IF EXISTS {VIEW}", dbname="shop")


def connect(proxy: ProxyHandle, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), autocommit=True, **kw)


def settled(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> list[Any]:
    """The rows of `sql` once the proxy read the catalog again (until then a view it does not
    know has every column masked, and a WHERE on one is refused: it fails closed)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return conn.execute(sql, params).fetchall()
        except psycopg.errors.InsufficientPrivilege:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def assert_no_ssn(rows: list[Any], ssns: list[str]) -> None:
    shown = {str(v) for row in rows for v in row}
    assert rows and not shown & set(ssns), rows


def rows_or_refusal(run: Callable[[], list[Any]]) -> list[Any]:
    """What the agent got: rows, or [("refused",)] when the proxy refused the statement."""
    try:
        return run()
    except psycopg.errors.InsufficientPrivilege:
        return [("refused",)]


def test_the_next_statement_after_ddl(shop: Any) -> None:
    proxy, ssns = shop
    with connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute(LEAKY)
        assert_no_ssn(conn.execute("SELECT name FROM people WHERE id = 3").fetchall(), ssns)
        assert_no_ssn(conn.execute("SELECT name FROM people").fetchall(), ssns)


def test_the_same_text_as_the_ddl(shop: Any) -> None:
    proxy, ssns = shop
    with connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        cur = conn.execute(f"{LEAKY}; SELECT name FROM people")
        assert cur.nextset()
        assert_no_ssn(cur.fetchall(), ssns)


def test_a_pipeline_after_ddl(shop: Any) -> None:
    proxy, ssns = shop
    with connect(proxy) as conn:
        with conn.pipeline():  # decided before the change ran: planned as if no relation were known
            conn.execute(LEAKY)
            cur = conn.execute("SELECT name, %s::text AS asked FROM people", ("x",), prepare=False)
        assert_no_ssn(cur.fetchall(), ssns)
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            conn.execute(LEAKY)  # a WHERE on a column of a relation it does not know: refused
            conn.execute("SELECT name FROM people WHERE id > %s", (0,))
        # the change settled: read against the catalog as it left the view
        assert_no_ssn(conn.execute("SELECT name FROM people").fetchall(), ssns)


def test_an_open_transaction_after_ddl(shop: Any) -> None:
    """The side connection cannot see DDL that is not committed: until the transaction ends
    the session plans as if it knew no relation; after COMMIT, against the catalog read again."""
    proxy, ssns = shop
    with connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute("BEGIN")
        conn.execute(LEAKY)
        assert_no_ssn(rows_or_refusal(lambda: conn.execute("SELECT name FROM people").fetchall()), ssns)
        conn.execute("COMMIT")
        assert_no_ssn(conn.execute("SELECT name FROM people").fetchall(), ssns)


def test_a_statement_prepared_before_ddl(shop: Any) -> None:
    """PostgreSQL plans a prepared statement again when a view it reads changes; so does pgwarden."""
    proxy, ssns = shop
    with connect(proxy, prepare_threshold=0) as conn:
        sql = "SELECT name FROM people WHERE id > %s"
        conn.execute(sql, (0,), prepare=True).fetchall()
        conn.execute(LEAKY)
        assert_no_ssn(rows_or_refusal(lambda: conn.execute(sql, (0,), prepare=True).fetchall()), ssns)


def test_a_sql_prepare_before_ddl(shop: Any) -> None:
    proxy, ssns = shop
    with connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute("PREPARE p AS SELECT name FROM people")
        conn.execute("EXECUTE p").fetchall()
        conn.execute(LEAKY)
        assert_no_ssn(rows_or_refusal(lambda: conn.execute("EXECUTE p").fetchall()), ssns)


def test_another_session_prepared_before_the_ddl(shop: Any) -> None:
    """One agent, two connections: the second prepared its statements before the first changed
    the view; they run after the change."""
    proxy, ssns = shop
    sql = "SELECT name FROM people WHERE id > %s"
    with connect(proxy, prepare_threshold=0) as other, connect(proxy, cursor_factory=psycopg.ClientCursor) as sql_other:
        other.execute(sql, (0,), prepare=True).fetchall()
        sql_other.execute("PREPARE q AS SELECT name FROM people")
        with connect(proxy) as changer:
            changer.execute(LEAKY)
        assert_no_ssn(rows_or_refusal(lambda: other.execute(sql, (0,), prepare=True).fetchall()), ssns)
        assert_no_ssn(rows_or_refusal(lambda: sql_other.execute("EXECUTE q").fetchall()), ssns)
        assert_no_ssn(rows_or_refusal(lambda: sql_other.execute("SELECT name FROM people").fetchall()), ssns)


def test_the_view_back_to_clear_names_reads_in_clear_again(shop: Any) -> None:
    """Failing closed is not failing for good: once the catalog is read again the clear view is
    clear again, in the session that changed it."""
    proxy, ssns = shop
    with connect(proxy, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute(LEAKY)
        conn.execute(CLEAR)
        names = proxy.pg.psql("SELECT name FROM customers ORDER BY id", dbname="shop").splitlines()
        assert [r[0] for r in settled(conn, "SELECT name FROM people ORDER BY id")] == names


def test_a_change_by_a_subject_nothing_is_masked_for(shop: Any) -> None:
    """An exempt subject (a privacy officer) redefines the view through the proxy: the agents'
    sessions, which are masked, read through the change masked."""
    proxy, ssns = shop
    with connect(proxy, cursor_factory=psycopg.ClientCursor) as agent:
        assert agent.execute("SELECT name FROM people WHERE id = 1").fetchall()
        with psycopg.connect(proxy.dsn(user=OFFICER["name"], password=OFFICER["password"]), autocommit=True) as officer:
            officer.execute(LEAKY)
            assert set(ssns) & {r[0] for r in officer.execute("SELECT name FROM people").fetchall()}  # clear for them
        assert_no_ssn(agent.execute("SELECT name FROM people").fetchall(), ssns)


def test_a_prepared_schema_change_run_again_in_a_transaction(shop: Any) -> None:
    """The change itself prepared, settled once, and run again (Bind/Execute only) inside a
    transaction: the rest of that transaction is planned as if no relation were known."""
    proxy, ssns = shop
    with connect(proxy, prepare_threshold=0) as conn:
        conn.execute(LEAKY, prepare=True)
        conn.execute(CLEAR)
        settled(conn, "SELECT name FROM people WHERE id = 1")
        conn.execute("BEGIN")
        conn.execute(LEAKY, prepare=True)
        # masked at once (not left to wait for a catalog read that the open change blocks)
        assert_no_ssn(conn.execute("SELECT name FROM people").fetchall(), ssns)
        conn.execute("COMMIT")
        assert_no_ssn(conn.execute("SELECT name FROM people").fetchall(), ssns)


MOVES = [
    "ALTER TABLE public.customers SET SCHEMA scratch",
    "ALTER TABLE public.customers RENAME TO clients",
]


@pytest.mark.parametrize("move", MOVES)
def test_a_masked_table_cannot_be_moved_out_of_its_rule(make_proxy: Callable[..., ProxyHandle], move: str) -> None:
    """A MaskingRule names its tables. An agent allowed DDL and reads everywhere (`*.*`), whose
    database role owns the table, moves it to another name, then reads the SSNs there: the move
    is refused (42501, naming the rule) and never reaches the database."""
    wide = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
            "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"group": "ai-agents"}],
                     "rules": [{"action": "allow", "operations": ["select", "ddl"], "tables": ["*.*"]}]}}
    agent = {"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}
    proxy = make_proxy(extra=[wide, documents()[1]], proxy_spec={"users": [agent]})
    owner = proxy.pg.psql("SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'customers'",
                          dbname="shop").strip()
    proxy.pg.psql(f"CREATE SCHEMA IF NOT EXISTS scratch; GRANT ALL ON SCHEMA scratch TO PUBLIC; "
                  f"ALTER TABLE public.customers OWNER TO {APP_USER}", dbname="shop")
    ssns = proxy.pg.psql("SELECT ssn FROM customers", dbname="shop").split()
    try:
        with connect(proxy) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="masking rule .*pii"):
                conn.execute(move)
            where = proxy.pg.psql("SELECT schemaname || '.' || tablename FROM pg_tables WHERE tablename IN "
                                  "('customers', 'clients')", dbname="shop").split()
            assert where == ["public.customers"]  # nothing reached the database
            assert_no_ssn(conn.execute("SELECT ssn FROM public.customers").fetchall(), ssns)
    finally:
        proxy.pg.psql("ALTER TABLE IF EXISTS scratch.customers SET SCHEMA public; "
                      "ALTER TABLE IF EXISTS public.clients RENAME TO customers", dbname="shop")
        proxy.pg.psql(f"ALTER TABLE public.customers OWNER TO {owner}", dbname="shop")
