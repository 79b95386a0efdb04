"""Writes bound to their effect: one that changes more rows than allowed is undone (PW005).

Through the live proxy with psql (simple protocol), psycopg (extended protocol with parameters)
and the raw wire client. Every refusal is checked on the server itself: the table is unchanged,
and the statement ran only inside a transaction or savepoint the proxy rolled back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from fix_pg import APP_USER
from rawpg import SYNC, RawConn, bind, close, data_row, describe, error_fields, execute, msg, parse, query

from pgwarden.compiled import is_compiled
from pgwarden.proxy import gate as gate_module

API = "pgwarden.dev/v1alpha1"
ROWS = "1|a|10\n2|a|20\n3|a|30\n4|b|40\n5|b|50"


def policy(limit: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "AccessPolicy",
        "metadata": {"name": "agents"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"group": "ai-agents"}],
            "rules": [
                {
                    "action": "allow",
                    "operations": ["select", "insert", "update", "delete", "merge", "truncate"],
                    "tables": ["public.guard_items", "public.guard_pairs"],
                }
            ],
            "limits": {"maxAffectedRows": limit, "statementTimeout": "30s"},
        },
    }


@pytest.fixture
def items(pg: Any) -> Any:
    pg.psql(
        "DROP TABLE IF EXISTS guard_items, guard_pairs;"
        "CREATE TABLE guard_items (id int PRIMARY KEY, grp text NOT NULL, v int NOT NULL CHECK (v >= 0),"
        " note text NOT NULL DEFAULT 'secret-note');"
        "INSERT INTO guard_items VALUES (1,'a',10),(2,'a',20),(3,'a',30),(4,'b',40),(5,'b',50);"
        "CREATE TABLE guard_pairs (id int PRIMARY KEY,"
        " peer int REFERENCES guard_pairs (id) DEFERRABLE INITIALLY DEFERRED);"
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON guard_items, guard_pairs TO {APP_USER};",
        dbname="shop",
    )
    return pg


@pytest.fixture
def proxy(make_proxy: Any, items: Any, tmp_path: Path) -> Any:
    p = make_proxy(extra=[policy()], proxy_spec={"audit": {"path": str(tmp_path / "audit.jsonl")}})
    p.audit_path = tmp_path / "audit.jsonl"
    return p


def table(pg: Any) -> str:
    return pg.psql("SELECT id, grp, v FROM guard_items ORDER BY id", dbname="shop").strip()


def outcomes(path: Path) -> list[dict[str, Any]]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in recs if r.get("event") == "statement.outcome"]


def connect(proxy: Any, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), **kw)


# -- simple protocol (psql) ------------------------------------------------------------------
def test_psql_update_of_too_many_rows_is_undone(proxy: Any, pg: Any) -> None:
    mark = pg.log_position()
    out = proxy.psql("-c", "UPDATE guard_items SET v = v + 1 WHERE grp = 'a'")
    assert out.returncode != 0
    assert "UPDATE changed 3 rows, more than the 2 allowed by limits.maxAffectedRows" in out.stderr
    assert "it was undone" in out.stderr and "HINT" in out.stderr
    assert table(pg) == ROWS
    log = pg.log_since(mark)
    # it ran only inside the proxy's own transaction, which was rolled back
    assert log.index("statement: BEGIN") < log.index("UPDATE guard_items") < log.index("statement: ROLLBACK")
    assert "COMMIT" not in log
    rec = [r for r in outcomes(proxy.audit_path) if r.get("sqlstate") == "PW005"]
    assert len(rec) == 1 and rec[0]["undone"] is True and rec[0]["tag"] == "UPDATE 3" and rec[0]["rows"] == 3


def test_psql_delete_within_the_limit_runs_with_its_tag_and_rows(proxy: Any, pg: Any) -> None:
    out = proxy.psql("-A", "-t", "-c", "DELETE FROM guard_items WHERE grp = 'b' RETURNING id, v")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4|40", "5|50", "DELETE", "2"]
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30"
    assert not [r for r in outcomes(proxy.audit_path) if r.get("undone")]


def test_psql_refusal_inside_a_transaction_keeps_it_usable(proxy: Any, pg: Any) -> None:
    script = (
        "BEGIN;\n"
        "INSERT INTO guard_items VALUES (10, 'c', 1);\n"
        "DELETE FROM guard_items WHERE grp = 'a';\n"
        "INSERT INTO guard_items VALUES (11, 'c', 2);\n"
        "COMMIT;\n"
    )
    mark = pg.log_position()
    out = proxy.psql("-v", "ON_ERROR_STOP=0", input=script)
    assert "DELETE changed 3 rows, more than the 2 allowed" in out.stderr
    assert "current transaction is aborted" not in out.stderr
    # the refused DELETE rolled back to the savepoint; both INSERTs around it were committed
    assert table(pg) == ROWS + "\n10|c|1\n11|c|2"
    log = pg.log_since(mark)
    assert "SAVEPOINT pgwarden_guard" in log and "ROLLBACK TO SAVEPOINT pgwarden_guard" in log


def test_psql_write_that_fails_on_its_own_gives_the_server_error(proxy: Any, pg: Any) -> None:
    out = proxy.psql("-c", "UPDATE guard_items SET v = -1 WHERE id = 1")
    assert out.returncode != 0 and "guard_items_v_check" in out.stderr and "PW005" not in out.stderr
    script = "BEGIN;\nUPDATE guard_items SET v = -1 WHERE id = 1;\nSELECT 1;\nROLLBACK;\nSELECT 'after';\n"
    out = proxy.psql("-v", "ON_ERROR_STOP=0", "-A", "-t", input=script)
    # as without the guard: the transaction is failed until the client rolls it back
    assert "guard_items_v_check" in out.stderr and "current transaction is aborted" in out.stderr
    assert out.stdout.split()[-1] == "after"
    assert table(pg) == ROWS


def test_psql_commit_that_fails_gives_its_error(proxy: Any, pg: Any) -> None:
    out = proxy.psql("-c", "INSERT INTO guard_pairs VALUES (1, 99)")  # checked at COMMIT (deferred)
    assert out.returncode != 0 and "guard_pairs_peer_fkey" in out.stderr, out.stderr
    assert pg.psql("SELECT count(*) FROM guard_pairs", dbname="shop").strip() == "0"


def test_multi_statement_text_with_a_guarded_write_is_refused(proxy: Any, pg: Any) -> None:
    mark = pg.log_position()
    out = proxy.psql("-c", "SELECT 1; DELETE FROM guard_items WHERE id = 1")
    assert out.returncode != 0 and "Send the write alone" in out.stderr
    out = proxy.psql("-c", "WITH d AS (DELETE FROM guard_items RETURNING id) SELECT count(*) FROM d")
    assert out.returncode != 0 and "no data-modifying WITH" in out.stderr
    out = proxy.psql("-c", "EXPLAIN ANALYZE DELETE FROM guard_items")
    assert out.returncode != 0 and "Send the write alone" in out.stderr
    out = proxy.psql("-c", "COPY guard_items FROM STDIN", input="9\tc\t1\n\\.\n")
    assert out.returncode != 0 and "not COPY" in out.stderr
    out = proxy.psql("-c", "TRUNCATE guard_items")  # the rule allows it; the limit cannot count it
    assert out.returncode != 0 and "not TRUNCATE" in out.stderr
    assert "guard_items" not in pg.log_since(mark)
    assert table(pg) == ROWS


def test_prepared_write_run_by_execute_is_guarded(proxy: Any, pg: Any) -> None:
    script = "PREPARE d(text) AS DELETE FROM guard_items WHERE grp = $1;\nEXECUTE d('a');\nEXECUTE d('b');\n"
    out = proxy.psql("-v", "ON_ERROR_STOP=0", input=script)
    assert "DELETE changed 3 rows" in out.stderr
    assert "DELETE 2" in out.stdout
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30"


def test_psql_merge_is_counted(proxy: Any, pg: Any) -> None:
    merge = "MERGE INTO guard_items t USING (SELECT 'a' AS grp) s ON t.grp = s.grp WHEN MATCHED THEN UPDATE SET v = 0"
    out = proxy.psql("-c", merge)
    assert "MERGE changed 3 rows, more than the 2 allowed" in out.stderr
    assert table(pg) == ROWS
    out = proxy.psql("-c", merge.replace("'a'", "'b'"))
    assert out.returncode == 0 and "MERGE 2" in out.stdout, out.stderr
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30\n4|b|0\n5|b|0"


# -- extended protocol (psycopg with parameters) ----------------------------------------------
def test_psycopg_update_of_too_many_rows_is_undone(proxy: Any, pg: Any) -> None:
    with connect(proxy, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("UPDATE guard_items SET v = v + %s WHERE grp = %s", (1, "a"))
        assert e.value.sqlstate == "PW005"
        assert "UPDATE changed 3 rows, more than the 2 allowed" in str(e.value)
        assert table(pg) == ROWS
        cur = conn.execute("DELETE FROM guard_items WHERE grp = %s RETURNING id, v", ("b",))
        assert cur.fetchall() == [(4, 40), (5, 50)]
        assert cur.statusmessage == "DELETE 2" and cur.rowcount == 2
        assert conn.execute("SELECT count(*) FROM guard_items").fetchone() == (3,)
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30"


def test_psycopg_refusal_inside_a_transaction_keeps_it_usable(proxy: Any, pg: Any) -> None:
    with connect(proxy) as conn:  # not autocommit: psycopg opens a transaction
        conn.execute("INSERT INTO guard_items VALUES (%s, %s, %s)", (10, "c", 1))
        with pytest.raises(psycopg.Error) as e:
            conn.execute("DELETE FROM guard_items WHERE grp = %s", ("a",))
        assert e.value.sqlstate == "PW005"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("INSERT INTO guard_items VALUES (%s, %s, %s)", (11, "c", 2))
        assert conn.execute("UPDATE guard_items SET v = v + %s WHERE grp = %s", (1, "c")).rowcount == 2
        conn.commit()
    assert table(pg) == ROWS + "\n10|c|2\n11|c|3"


def test_psycopg_executemany_is_all_or_nothing(proxy: Any, pg: Any) -> None:
    with connect(proxy, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.cursor().executemany(
                "UPDATE guard_items SET v = v + %s WHERE grp = %s", [(1, "b"), (1, "a")]
            )
        assert e.value.sqlstate == "PW005"
        assert table(pg) == ROWS  # the first UPDATE (2 rows, allowed) went with the refused one
        conn.cursor().executemany("UPDATE guard_items SET v = v + %s WHERE id = %s", [(1, 1), (1, 4)])
    assert table(pg) == "1|a|11\n2|a|20\n3|a|30\n4|b|41\n5|b|50"


def test_psycopg_write_that_fails_on_its_own(proxy: Any, pg: Any) -> None:
    with connect(proxy, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE guard_items SET v = %s WHERE id = %s", (-1, 1))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT v FROM guard_items WHERE id = %s", (1,)).fetchone() == (10,)
    with connect(proxy) as conn:
        conn.execute("INSERT INTO guard_items VALUES (%s, %s, %s)", (10, "c", 1))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE guard_items SET v = %s WHERE id = %s", (-1, 1))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        conn.execute("INSERT INTO guard_items VALUES (%s, %s, %s)", (12, "c", 1))
        conn.commit()
    assert table(pg) == ROWS + "\n12|c|1"


def test_psycopg_commit_that_fails_gives_its_error(proxy: Any, pg: Any) -> None:
    with connect(proxy, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO guard_pairs VALUES (%s, %s)", (1, 99))
        assert conn.execute("SELECT count(*) FROM guard_pairs").fetchone() == (0,)
        # the failed COMMIT left none of the proxy's own names behind: the next guarded write runs
        ids = [r[0] for r in conn.execute("DELETE FROM guard_items WHERE id = %s RETURNING id", (1,))]
        assert ids == [1]
        assert conn.execute("SELECT count(*) FROM guard_items WHERE id = 1").fetchone() == (0,)


def test_asyncpg_guarded_writes(proxy: Any, pg: Any) -> None:
    async def go() -> None:
        conn = await proxy.asyncpg()
        try:
            with pytest.raises(asyncpg.PostgresError) as e:
                await conn.execute("DELETE FROM guard_items WHERE grp = $1", "a")
            assert e.value.sqlstate == "PW005"
            async with conn.transaction():
                await conn.execute("INSERT INTO guard_items (id, grp, v) VALUES ($1, $2, $3)", 10, "c", 1)
                with pytest.raises(asyncpg.PostgresError):
                    await conn.execute("UPDATE guard_items SET v = $1 WHERE grp = $2", 0, "a")
                rows = await conn.fetch("DELETE FROM guard_items WHERE grp = $1 RETURNING id", "b")
                assert [r["id"] for r in rows] == [4, 5]
        finally:
            await conn.close()

    asyncio.run(go())
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30\n10|c|1"


def test_returning_rows_of_a_guarded_write_are_still_masked(make_proxy: Any, items: Any, pg: Any) -> None:
    masking = {
        "apiVersion": API,
        "kind": "MaskingRule",
        "metadata": {"name": "notes"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "columns": [{"table": "public.guard_items", "column": "note", "strategy": "redact"}],
        },
    }
    proxy = make_proxy(extra=[policy(), masking])
    out = proxy.psql("-A", "-t", "-c", "UPDATE guard_items SET v = v + 1 WHERE id = 1 RETURNING id, note")
    assert out.returncode == 0, out.stderr
    assert "secret-note" not in out.stdout and out.stdout.startswith("1|")
    with connect(proxy, autocommit=True) as conn:
        cur = conn.execute("DELETE FROM guard_items WHERE grp = %s RETURNING note", ("b",))
        assert len(cur.fetchall()) == 2
        cur = conn.execute("UPDATE guard_items SET v = v WHERE id = %s RETURNING note", (2,))
        assert cur.fetchone() != ("secret-note",)


def test_a_cancel_during_a_guarded_write_undoes_it(proxy: Any, pg: Any) -> None:
    marker = f"guard-cancel-{time.time_ns()}"

    def running() -> bool:
        sql = (
            f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
        )
        return pg.psql(sql, dbname="shop").strip() != "0"

    with connect(proxy, autocommit=True) as conn:

        def cancel() -> None:
            deadline = time.time() + 20
            while not running() and time.time() < deadline:
                time.sleep(0.05)
            conn.cancel_safe()

        timer = threading.Thread(target=cancel)
        timer.start()
        try:
            mark = pg.log_position()
            with pytest.raises(psycopg.errors.QueryCanceled) as e:
                conn.execute(
                    f"UPDATE guard_items SET v = 0 WHERE id = %s AND pg_sleep(20) IS NOT NULL /* {marker} */",
                    (1,),
                )
        finally:
            timer.join()
        # the server cancelled it (not a held statement withdrawn), and the proxy rolled it back
        assert "nothing was forwarded" not in str(e.value)
        assert "pgwarden_guard: ROLLBACK" in pg.log_since(mark)
        assert conn.execute("SELECT v FROM guard_items WHERE id = %s", (1,)).fetchone() == (10,)
    assert table(pg) == ROWS


# -- the raw wire: pipelined batches and reserved names ---------------------------------------












def run(sql: str, *params: str, name: str = "") -> bytes:
    return (
        parse(sql, name) + bind(name, params=tuple(p.encode() for p in params)) + describe(b"P") + execute()
    )


def answers(conn: RawConn, syncs: int = 1) -> list[tuple[str, Any]]:
    """What the client got up to `syncs` ReadyForQuery: ("row", values), ("tag", text),
    ("error", sqlstate), ("ready", status)."""
    out: list[tuple[str, Any]] = []
    for _ in range(syncs):
        for kind, payload in conn.until_ready():
            if kind == b"D":
                out.append(("row", [v.decode() if v is not None else None for v in data_row(payload)]))
            elif kind == b"C":
                out.append(("tag", payload[:-1].decode()))
            elif kind == b"E":
                out.append(("error", error_fields(payload)["C"]))
            elif kind == b"Z":
                out.append(("ready", payload.decode()))
    return out


@pytest.fixture
def conn(proxy: Any) -> Any:
    c = RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, "shop")
    yield c
    c.close()


def test_a_failing_guarded_query_reports_its_error_once(conn: RawConn, pg: Any) -> None:
    """A guarded write that fails on its own (a CHECK constraint) in a simple Query: the client
    gets that one error and ReadyForQuery, as without the proxy, and nothing changed."""
    before = table(pg)
    conn.send(query("UPDATE guard_items SET v = -1 WHERE id = 1"))
    assert answers(conn) == [("error", "23514"), ("ready", "I")]
    assert table(pg) == before


def test_an_execute_whose_prepared_statement_was_replaced_after_bind_is_refused(conn: RawConn, pg: Any) -> None:
    """Bind "EXECUTE p" while p is a SELECT, then DEALLOCATE p and PREPARE p AS DELETE in the same
    batch, then Execute the portal: the server would run the new p, which nobody decided (and no
    guard bounds). The Execute is refused and nothing is deleted."""
    conn.simple("PREPARE p AS SELECT id FROM guard_items WHERE id = 1")
    before = table(pg)
    conn.send(
        parse("EXECUTE p", "s1") + bind("s1", "x")
        + parse("DEALLOCATE p") + bind() + execute()
        + parse("PREPARE p AS DELETE FROM guard_items") + bind() + execute()
        + execute("x") + SYNC
    )
    got = answers(conn)
    assert ("error", "42501") in got and got[-1] == ("ready", "I")
    assert table(pg) == before


def test_pipelined_batch_with_a_guarded_execute_between_other_statements(conn: RawConn, pg: Any) -> None:
    # one batch: the refused write fails it like any error (the rest is skipped, nothing changed)
    conn.send(
        run("SELECT count(*) FROM guard_items")
        + run("UPDATE guard_items SET v = v + $1::int WHERE grp = $2", "1", "a")
        + run("SELECT 'skipped'")
        + SYNC
    )
    assert answers(conn) == [("row", ["5"]), ("tag", "SELECT 1"), ("error", "PW005"), ("ready", "I")]
    assert table(pg) == ROWS
    # three batches sent at once: only the middle one is refused
    conn.send(
        run("SELECT 'one'")
        + SYNC
        + run("DELETE FROM guard_items WHERE grp = $1 RETURNING id", "a")
        + SYNC
        + run("SELECT 'three'")
        + SYNC
    )
    assert answers(conn, 3) == [
        ("row", ["one"]),
        ("tag", "SELECT 1"),
        ("ready", "I"),
        ("error", "PW005"),
        ("ready", "I"),
        ("row", ["three"]),
        ("tag", "SELECT 1"),
        ("ready", "I"),
    ]
    assert table(pg) == ROWS
    # within the limit: the rows and tag arrive in place, and the batch goes on
    conn.send(
        run("SELECT 'before'")
        + run("DELETE FROM guard_items WHERE grp = $1 RETURNING id", "b")
        + run("SELECT count(*) FROM guard_items")
        + SYNC
    )
    assert answers(conn) == [
        ("row", ["before"]),
        ("tag", "SELECT 1"),
        ("row", ["4"]),
        ("row", ["5"]),
        ("tag", "DELETE 2"),
        ("row", ["3"]),
        ("tag", "SELECT 1"),
        ("ready", "I"),
    ]
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30"


def test_a_batch_outside_a_transaction_still_commits_all_or_nothing(conn: RawConn, pg: Any) -> None:
    # the guarded write was within the limit, a later statement of the batch fails: without the
    # proxy the batch's implicit transaction would roll back as one, and so it does
    conn.send(run("DELETE FROM guard_items WHERE grp = $1", "b") + run("SELECT 1/0") + SYNC)
    assert answers(conn) == [("tag", "DELETE 2"), ("error", "22012"), ("ready", "I")]
    assert table(pg) == ROWS
    # two guarded writes in one batch: the second is over the limit, the first is undone with it
    conn.send(
        run("DELETE FROM guard_items WHERE grp = $1", "b")
        + run("UPDATE guard_items SET v = 0 WHERE grp = $1", "a")
        + run("SELECT 'skipped'")
        + SYNC
    )
    assert answers(conn) == [("tag", "DELETE 2"), ("error", "PW005"), ("ready", "I")]
    assert table(pg) == ROWS
    # both within the limit: committed together at Sync
    conn.send(
        run("DELETE FROM guard_items WHERE id = $1", "4")
        + run("UPDATE guard_items SET v = 0 WHERE id = $1", "1")
        + SYNC
    )
    assert answers(conn) == [("tag", "DELETE 1"), ("tag", "UPDATE 1"), ("ready", "I")]
    assert table(pg) == "1|a|0\n2|a|20\n3|a|30\n5|b|50"


def test_a_simple_query_inside_a_batch_after_a_guarded_write_ends_the_session(conn: RawConn, pg: Any) -> None:
    conn.send(run("DELETE FROM guard_items WHERE grp = $1", "b") + msg(b"Q", b"SELECT 1\0"))
    assert conn.read_error()["M"].startswith("a simple Query inside an extended batch after a guarded write")
    assert conn.at_eof()
    assert table(pg) == ROWS  # the open transaction died with the session


def test_the_clients_prepared_statements_and_portals_are_untouched(conn: RawConn, pg: Any) -> None:
    # the unnamed statement and a named one, prepared once, run again and again: the proxy's own
    # commands go under reserved names and never replace or close them
    conn.send(
        parse("UPDATE guard_items SET v = v + 1 WHERE grp = $1")
        + parse("UPDATE guard_items SET v = v + 1 WHERE grp = $1", "u1")
        + parse("SELECT v FROM guard_items WHERE id = $1", "s1")
        + SYNC
    )
    assert answers(conn) == [("ready", "I")]
    for _ in range(2):
        conn.send(bind("", params=(b"b",)) + execute() + bind("s1", params=(b"4",)) + execute() + SYNC)
        got = answers(conn)
        assert got[0] == ("tag", "UPDATE 2") and got[-1] == ("ready", "I"), got
    conn.send(bind("", params=(b"a",)) + execute() + SYNC)
    assert answers(conn) == [("error", "PW005"), ("ready", "I")]
    conn.simple("BEGIN")  # a Query drops the unnamed statement (as PostgreSQL does): named ones stay
    conn.send(
        bind("u1", "p1", params=(b"b",))
        + bind("s1", "p2", params=(b"5",))
        + execute("p1")
        + execute("p2")
        + SYNC
    )
    assert answers(conn) == [
        ("tag", "UPDATE 2"),
        ("row", ["52"]),
        ("tag", "SELECT 1"),
        ("ready", "T"),
    ]  # p2 was bound first
    conn.simple("COMMIT")
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30\n4|b|43\n5|b|53"


def test_a_protocol_execute_of_a_sql_prepared_write_is_guarded(conn: RawConn, pg: Any) -> None:
    conn.simple("PREPARE d(text) AS DELETE FROM guard_items WHERE grp = $1")
    conn.send(parse("EXECUTE d('a')") + bind() + execute() + SYNC)
    assert answers(conn) == [("error", "PW005"), ("ready", "I")]
    assert table(pg) == ROWS
    conn.send(parse("EXECUTE d('b')") + bind() + execute() + SYNC)
    assert answers(conn) == [("tag", "DELETE 2"), ("ready", "I")]
    assert table(pg) == "1|a|10\n2|a|20\n3|a|30"


def test_batch_that_opens_a_transaction_uses_a_savepoint(conn: RawConn, pg: Any) -> None:
    conn.send(
        run("BEGIN")
        + run("INSERT INTO guard_items VALUES (10, 'c', 1)")
        + run("DELETE FROM guard_items WHERE grp = $1", "a")
        + SYNC
    )
    assert answers(conn) == [("tag", "BEGIN"), ("tag", "INSERT 0 1"), ("error", "PW005"), ("ready", "T")]
    conn.send(run("INSERT INTO guard_items VALUES (11, 'c', 2)") + run("COMMIT") + SYNC)
    assert answers(conn) == [("tag", "INSERT 0 1"), ("tag", "COMMIT"), ("ready", "I")]
    assert table(pg) == ROWS + "\n10|c|1\n11|c|2"


def test_guarded_execute_after_commit_in_the_same_batch_is_refused(conn: RawConn, pg: Any) -> None:
    conn.simple("BEGIN")
    mark = pg.log_position()
    conn.send(run("COMMIT") + run("DELETE FROM guard_items WHERE id = $1", "1") + SYNC)
    assert answers(conn) == [("tag", "COMMIT"), ("error", "42501"), ("ready", "I")]
    assert "DELETE" not in pg.log_since(mark)
    assert table(pg) == ROWS


def test_guarded_execute_with_a_row_limit_is_refused(conn: RawConn, pg: Any) -> None:
    mark = pg.log_position()
    conn.send(
        parse("DELETE FROM guard_items WHERE id = 1 RETURNING id") + bind() + execute(max_rows=1) + SYNC
    )
    assert answers(conn) == [("error", "42501"), ("ready", "I")]
    assert "DELETE" not in pg.log_since(mark)
    assert table(pg) == ROWS


@pytest.mark.parametrize(
    "attack",
    [
        parse("SELECT 1", "pgwarden_guard") + SYNC,
        parse("SELECT 1", "pgwarden_guard_x") + SYNC,
        close(b"S", "pgwarden_guard") + SYNC,
        close(b"P", "pgwarden_guard") + SYNC,
        describe(b"S", "pgwarden_guard") + SYNC,
        parse("SELECT 1", "s") + bind("s", "pgwarden_guard") + SYNC,
        execute("pgwarden_guard") + SYNC,
    ],
)
def test_reserved_protocol_names_are_refused(conn: RawConn, pg: Any, attack: bytes) -> None:
    mark = pg.log_position()
    conn.send(attack)
    got = answers(conn)
    assert ("error", "42501") in got and got[-1] == ("ready", "I")
    assert "pgwarden_guard" not in pg.log_since(mark)


@pytest.mark.parametrize(
    "sql",
    [
        "SAVEPOINT pgwarden_guard",
        'SAVEPOINT U&"pgwarden\\005fguard"',
        "RELEASE SAVEPOINT pgwarden_guard",
        "ROLLBACK TO SAVEPOINT pgwarden_guard",
        "DECLARE pgwarden_guard CURSOR FOR SELECT 1",
        "PREPARE pgwarden_guard AS SELECT 1",
        "DEALLOCATE pgwarden_guard",
        "CLOSE pgwarden_guard",
    ],
)
def test_reserved_sql_names_are_refused(conn: RawConn, pg: Any, sql: str) -> None:
    conn.simple("BEGIN")
    mark = pg.log_position()
    conn.send(msg(b"Q", sql.encode() + b"\0"))
    got = answers(conn)
    assert ("error", "42501") in got
    assert "guard" not in pg.log_since(mark)


# -- an approval's guard (the request's own limit) -------------------------------------------
REVIEWED = {
    "apiVersion": API,
    "kind": "AccessPolicy",
    "metadata": {"name": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [
            {"action": "allow", "operations": ["select"], "tables": ["public.guard_items"]},
            {"action": "review", "operations": ["delete"], "tables": ["public.guard_items"]},
        ],
        "approval": {"reviewers": [{"group": "dba"}], "mode": "defer"},
    },
}


def approve(db: Path) -> str:
    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "pgwarden.cli", "approvals", *args, "--db", str(db)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    pending = [r for r in json.loads(cli("list", "--json")) if r["state"] == "pending"]
    assert len(pending) == 1, pending
    cli("approve", pending[0]["id"], "--as", "dba-alice")
    return str(pending[0]["id"])


@pytest.mark.skipif(is_compiled(gate_module), reason="patches SessionGate._review, which a compiled (mypyc) build "
                    "calls natively: this test runs on the pure-Python build (the editable install)")
def test_an_approved_write_is_held_to_the_limit_its_approval_carries(
    make_proxy: Any, items: Any, pg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the approval carries the count the reviewer saw (here 2, as a preview would have shown)
    from pgwarden.proxy.gate import SessionGate
    from pgwarden.proxy.relay import AffectedGuard

    review = SessionGate._review

    async def bound_review(self: Any, ctx: Any, *args: Any, **kw: Any) -> Any:
        verdict = await review(self, ctx, *args, **kw)
        if verdict.error is None:
            verdict.guard = AffectedGuard(limit=2, source=f"request {ctx.approval_id}")
        return verdict

    monkeypatch.setattr(SessionGate, "_review", bound_review)
    db = tmp_path / "approvals.db"
    spec = {
        "approvals": {"backend": "local", "path": str(db), "allowProxyUserDecisions": True},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    proxy = make_proxy(extra=[REVIEWED], proxy_spec=spec)
    sql = "DELETE FROM guard_items WHERE grp = 'a'"
    assert "approval required" in proxy.psql("-c", sql).stderr
    rid = approve(db)
    pg.psql("INSERT INTO guard_items VALUES (6, 'a', 60)", dbname="shop")  # grown since the review
    mark = pg.log_position()
    out = proxy.psql("-c", sql)
    assert f"DELETE changed 4 rows, more than the 2 approved by request {rid}; it was undone" in out.stderr
    assert "data changed since the request was reviewed" in out.stderr
    assert "statement: ROLLBACK" in pg.log_since(mark)
    assert pg.psql("SELECT count(*) FROM guard_items WHERE grp = 'a'", dbname="shop").strip() == "4"
    recs = outcomes(tmp_path / "audit.jsonl")
    assert [r["tag"] for r in recs if r.get("undone")] == ["DELETE 4"]
    # the approval was used (once): running it again files a new request with the current count
    listed = subprocess.run(
        [sys.executable, "-m", "pgwarden.cli", "approvals", "list", "--all", "--json", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert [r["state"] for r in json.loads(listed) if r["id"] == rid] == ["executed"]
