"""Hot reload: the sidecar follows its mounted policy bundle; a broken bundle never falls open."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import yaml
from fix_proxy import ProxyHandle, proxy_documents

from pgwarden.proxy.main import start_proxy
from pgwarden.resources import load_documents

API = "pgwarden.dev/v1alpha1"


def policy(tables: list[str], operations: tuple[str, ...] = ("select",)) -> str:
    doc = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
           "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"group": "ai-agents"}],
                    "rules": [{"action": "allow", "operations": list(operations), "tables": tables}]}}
    return yaml.safe_dump(doc)


def wait_for(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def clear_names(proxy: ProxyHandle, ids: tuple[int, ...] = (1, 2, 3)) -> dict[int, tuple[str, str]]:
    """(upper(ssn), upper(name)) of these customers, read directly from the server."""
    out: dict[int, tuple[str, str]] = {}
    for n in ids:
        ssn, name = proxy.pg.psql(f"SELECT upper(ssn), upper(name) FROM customers WHERE id = {n}", dbname="shop").strip().split("|")
        out[n] = (ssn, name)
    return out


def catalog_read(read_name: Any, name: str) -> None:
    """Until the proxy has read the catalog, every column counts as masked (fail closed): wait
    until `read_name()` (a customer's upper(name) through the proxy) comes back as `name`."""
    wait_for(lambda: read_name() == name, "the catalog's first read")


@pytest.fixture
def bundle(pg: Any, proxy_thread: Any, tmp_path: Path) -> Any:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "proxy.yaml").write_text(proxy_documents(pg))
    (folder / "policy.yaml").write_text(policy(["public.orders"]))
    running = proxy_thread.call(start_proxy(load_documents([folder]), watch_paths=[str(folder)], reload_interval=0.1))
    handle = ProxyHandle(running=running, runner=proxy_thread, pg=pg)
    yield folder, handle
    handle.stop()


def sqlstate(conn: pg8000.native.Connection, sql: str) -> str | None:
    try:
        conn.run(sql)
        return None
    except pg8000.native.DatabaseError as e:
        return str(e.args[0]["C"])


def test_a_new_bundle_applies_to_open_sessions_and_a_broken_one_is_refused(bundle: Any) -> None:
    folder, proxy = bundle
    conn = pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password)
    assert sqlstate(conn, "SELECT count(*) FROM orders") is None
    assert sqlstate(conn, "SELECT count(*) FROM customers") == "42501"

    (folder / "policy.yaml").write_text(policy(["public.orders", "public.customers"]))
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    assert sqlstate(conn, "SELECT count(*) FROM customers") is None  # same session, new rules

    (folder / "policy.yaml").write_text(policy(["public.orders"], operations=("selectt",)))  # a typo
    wait_for(lambda: proxy.server.reload_status.error, "the refusal")
    assert "selectt" in proxy.server.reload_status.error
    assert sqlstate(conn, "SELECT count(*) FROM customers") is None  # the last good bundle stays

    (folder / "policy.yaml").write_text(policy(["public.customers"]))  # access to orders revoked
    wait_for(lambda: proxy.server.reload_status.generation == 2, "the second reload")
    assert sqlstate(conn, "SELECT count(*) FROM orders") == "42501"
    conn.close()


def test_a_statement_shape_decided_before_a_reload_is_decided_again_after_it(bundle: Any) -> None:
    """Texts that differ only in literals share one analysis, and the session keeps the decision
    for it: a reload that revokes the table denies the next text of the same shape in the same
    session (simple protocol, the path pgbench and psql take)."""
    import psycopg

    folder, proxy = bundle
    with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        for n in (1, 2):  # the second run finds the session's kept decision
            assert conn.execute(f"SELECT count(*) FROM orders WHERE id = {n}").fetchone() is not None
        (folder / "policy.yaml").write_text(policy(["public.customers"]))  # orders revoked
        wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM orders WHERE id = 3")
        assert conn.execute("SELECT count(*) FROM customers WHERE id = 3").fetchone() is not None


def test_alternating_shapes_each_get_their_own_answer_from_the_session(bundle: Any) -> None:
    """The gate keeps what it read of the last statement's analysis, decision and plan (one set,
    for the next text of that shape): texts of three shapes in turn, the same session, each
    answered as its own, round after round (allowed and masked, denied, allowed unmasked)."""
    import psycopg

    folder, proxy = bundle
    (folder / "policy.yaml").write_text(policy(["public.customers", "public.orders"]))
    (folder / "masking.yaml").write_text(masking_rule(["ssn"]))
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    clear = clear_names(proxy)
    with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        catalog_read(lambda: conn.execute("SELECT upper(name) FROM customers WHERE id = 1").fetchone()[0], clear[1][1])
        for n in (1, 2, 3, 1, 2, 3):
            row = conn.execute(f"SELECT upper(ssn), upper(name) FROM customers WHERE id = {n}").fetchone()
            assert row is not None and row[0] != clear[n][0] and row[1] == clear[n][1], row  # ssn masked only
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"DELETE FROM orders WHERE id = {n + 1000}")  # only SELECT is allowed
            assert conn.execute(f"SELECT count(*) FROM orders WHERE id = {n}").fetchone() is not None


def masking_rule(columns: list[str]) -> str:
    doc = {"apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "pii"},
           "spec": {"connectionRef": {"name": "shop"},
                    "columns": [{"table": "public.customers", "column": c, "strategy": "redact"} for c in columns]}}
    return yaml.safe_dump(doc)


def test_a_shape_planned_before_a_masking_reload_is_planned_again_after_it(bundle: Any) -> None:
    """The session keeps the masking plan of the last statement shape; a MaskingRule that starts
    masking a column masks it in the next text of that shape, in the same session."""
    import psycopg

    folder, proxy = bundle
    (folder / "policy.yaml").write_text(policy(["public.customers"]))
    (folder / "masking.yaml").write_text(masking_rule(["ssn"]))
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        for n in (1, 2):  # the second text of the shape finds the session's kept plan
            row = conn.execute(f"SELECT ssn, name FROM customers WHERE id = {n}").fetchone()
            assert row is not None and row[1] and "-" not in row[0], row  # ssn masked, name clear
        (folder / "masking.yaml").write_text(masking_rule(["ssn", "name"]))
        wait_for(lambda: proxy.server.reload_status.generation == 2, "the second reload")
        clear = proxy.pg.psql("SELECT name FROM customers WHERE id = 3", dbname="shop").strip()
        row = conn.execute("SELECT ssn, name FROM customers WHERE id = 3").fetchone()
        assert row is not None and row[1] != clear, row  # the name is masked now


def test_a_shape_planned_before_ddl_is_planned_again_against_the_new_catalog(bundle: Any) -> None:
    """The kept plan belongs to one catalog snapshot: after DDL (here another session's) points a
    view's column at a masked one, the next text of the same shape is masked (a plan kept from
    before would pass the SSN through as a clear `name`)."""
    import psycopg

    folder, proxy = bundle
    (folder / "policy.yaml").write_text(policy(["public.customers", "public.people"], operations=("select", "ddl")))
    (folder / "masking.yaml").write_text(masking_rule(["ssn"]))
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    ssn = proxy.pg.psql("SELECT ssn FROM customers WHERE id = 3", dbname="shop").strip()

    def read(conn: psycopg.Connection[Any], n: int) -> Any:
        """The row, once the catalog the DDL made stale is read again (until then an unknown
        view's columns count as masked, and a WHERE on them is refused: fail closed)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return conn.execute(f"SELECT name FROM people WHERE id = {n}").fetchone()
            except psycopg.errors.InsufficientPrivilege:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute("CREATE VIEW public.people AS SELECT id, name FROM public.customers")
        for n in (1, 2):  # the second text of the shape finds the session's kept plan
            row = read(conn, n)
            assert row is not None and row[0] and "-" not in row[0], row
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:  # the shape stays this session's last
            other.execute("CREATE OR REPLACE VIEW public.people AS SELECT id, ssn AS name FROM public.customers")
        row = read(conn, 3)
        assert row is not None and row[0] != ssn, row
    proxy.pg.psql("DROP VIEW public.people", dbname="shop")


def test_sessions_without_policy_are_closed_when_policy_arrives(bundle: Any) -> None:
    folder, proxy = bundle
    (folder / "policy.yaml").unlink()  # no policy: defaultAction allow, the lean relay
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    conn = pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password)
    assert sqlstate(conn, "SELECT count(*) FROM customers") is None
    (folder / "policy.yaml").write_text(policy(["public.orders"]))
    wait_for(lambda: proxy.server.reload_status.generation == 2, "the reload")
    with pytest.raises((pg8000.native.InterfaceError, pg8000.native.DatabaseError)):
        conn.run("SELECT count(*) FROM customers")  # the unpoliced session was ended
    fresh = pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password)
    assert sqlstate(fresh, "SELECT count(*) FROM customers") == "42501"
    fresh.close()


def test_a_statement_prepared_before_a_reload_is_decided_again_at_its_next_bind(bundle: Any) -> None:
    """A reload that revokes a table stops a statement prepared before it (PostgreSQL checks
    privileges when a prepared statement runs, not only when it is prepared)."""
    import psycopg

    folder, proxy = bundle
    sql = "SELECT count(*) FROM orders WHERE id > %s"
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        assert conn.execute(sql, (0,), prepare=True).fetchone() is not None
        (folder / "policy.yaml").write_text(policy(["public.customers"]))  # orders revoked
        wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql, (0,), prepare=True)
        (folder / "policy.yaml").write_text(policy(["public.orders"]))  # granted again
        wait_for(lambda: proxy.server.reload_status.generation == 2, "the second reload")
        assert conn.execute(sql, (0,), prepare=True).fetchone() is not None


def test_a_prepared_statement_run_again_is_masked_by_the_rule_of_the_moment(bundle: Any) -> None:
    """A prepared statement run over and over keeps its result's rewriter between runs (the relay
    holds the last one for the same plan and columns); a MaskingRule reload replans the statement
    at its next Bind, and that run is masked by the new rule, not by the kept rewriter."""
    import psycopg

    folder, proxy = bundle
    (folder / "policy.yaml").write_text(policy(["public.customers"]))
    (folder / "masking.yaml").write_text(masking_rule(["ssn"]))
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    names = dict(line.split("|", 1) for line in proxy.pg.psql("SELECT id, name FROM customers WHERE id <= 3",
                                                               dbname="shop").splitlines())
    sql = "SELECT ssn, name FROM customers WHERE id = %s"
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for n in (1, 2, 1):  # Bind/Execute of one prepared statement: the same plan and columns
            row = conn.execute(sql, (n,), prepare=True).fetchone()
            assert row is not None and "-" not in row[0] and row[1] == names[str(n)], row
        (folder / "masking.yaml").write_text(masking_rule(["ssn", "name"]))
        wait_for(lambda: proxy.server.reload_status.generation == 2, "the second reload")
        row = conn.execute(sql, (3,), prepare=True).fetchone()
        assert row is not None and "-" not in row[0] and row[1] != names["3"], row  # the name is masked now


@pytest.mark.parametrize("prepared", [False, True], ids=["simple", "prepared"])
def test_two_statements_with_the_same_columns_keep_their_own_masking(bundle: Any, prepared: bool) -> None:
    """The relay keeps the last result's rewriter for the same plan and the same (parsed once)
    columns. Two texts whose RowDescriptions are byte for byte the same (columns `v` and `w` of type
    text, no table behind them), the SSN in the first column of one and in the second of the
    other, run in turn: each is masked as its own plan says, never by the other's kept rewriter."""
    import psycopg

    folder, proxy = bundle
    (folder / "policy.yaml").write_text(policy(["public.customers"]))
    (folder / "masking.yaml").write_text(masking_rule(["ssn"]))
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    clear = clear_names(proxy)
    kwargs: dict[str, Any] = {"prepare_threshold": 0} if prepared else {"cursor_factory": psycopg.ClientCursor}
    with psycopg.connect(proxy.dsn(), autocommit=True, **kwargs) as conn:
        catalog_read(lambda: (conn.execute("SELECT upper(name) FROM customers WHERE id = 1").fetchone() or [""])[0],
                     clear[1][1])
        for n in (1, 2, 3, 1):
            ssn, name = clear[n]
            row = conn.execute("SELECT upper(ssn) AS v, upper(name) AS w FROM customers WHERE id = %s", (n,),
                               prepare=prepared).fetchone()
            assert row is not None and row[0] != ssn and "-" not in row[0] and row[1] == name, row
            row = conn.execute("SELECT upper(name) AS v, upper(ssn) AS w FROM customers WHERE id = %s", (n,),
                               prepare=prepared).fetchone()
            assert row is not None and row[0] == name and row[1] != ssn and "-" not in row[1], row


def test_prepared_statements_run_on_after_a_reload_with_binary_results_masked(bundle: Any) -> None:
    """asyncpg prepares statements once per connection (named, described) and asks for binary
    results at every Bind. After a MaskingRule reload each statement is decided again at its next
    Bind: every one of them runs on (the older ones were refused as "already prepared": deciding
    their Parse again met their own names), and each masks the newly ruled column. The proxy keeps
    a statement's fields with the Bind's formats between runs, and with them the row rewriter:
    two statements with the same columns, the SSN in a different one of each, stay masked by
    their own plans run after run."""
    import asyncpg

    folder, proxy = bundle
    (folder / "policy.yaml").write_text(policy(["public.customers"]))
    (folder / "masking.yaml").write_text(masking_rule(["ssn"]))
    wait_for(lambda: proxy.server.reload_status.generation == 1, "the reload")
    clear = clear_names(proxy)

    async def go() -> None:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=proxy.user, password=proxy.password,
                                     database="shop", ssl=False)
        try:
            name_of = await conn.prepare("SELECT upper(name) FROM customers WHERE id = 1")
            for _ in range(300):  # the catalog's first read (until then every column counts as masked)
                if await name_of.fetchval() == clear[1][1]:
                    break
                await asyncio.sleep(0.05)
            ssn_first = await conn.prepare("SELECT upper(ssn) AS v, upper(name) AS w FROM customers WHERE id = $1")
            ssn_second = await conn.prepare("SELECT upper(name) AS v, upper(ssn) AS w FROM customers WHERE id = $1")
            for n in (1, 2, 3, 1):
                ssn, name = clear[n]
                a, b = await ssn_first.fetchrow(n), await ssn_second.fetchrow(n)
                assert a is not None and a["v"] != ssn and "-" not in a["v"] and a["w"] == name, a
                assert b is not None and b["v"] == name and b["w"] != ssn and "-" not in b["w"], b
            (folder / "masking.yaml").write_text(masking_rule(["ssn", "name"]))
            await asyncio.to_thread(wait_for, lambda: proxy.server.reload_status.generation == 2, "the second reload")
            ssn, name = clear[2]
            a, b = await ssn_first.fetchrow(2), await ssn_second.fetchrow(2)
            assert a is not None and a["v"] != ssn and a["w"] != name, a  # the name is masked now
            assert b is not None and b["v"] != name and b["w"] != ssn, b
            assert await name_of.fetchval() != clear[1][1]  # the oldest statement runs on, masked
        finally:
            await conn.close()

    asyncio.run(go())
