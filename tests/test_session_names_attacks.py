"""The gate's picture of the session follows the server's, never its own guesses.

An agent makes the server skip or refuse a command that changes a name (PREPARE, DEALLOCATE,
Parse, Close, DECLARE, CLOSE) — by an error earlier in the same text, earlier in the same
extended batch, or a name that already exists — and then uses the name as if the change had
happened. Each test asserts what the client received and what reached the server's log: a
reviewed write never runs unapproved, a masked value never comes back in clear.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rawpg import (
    SYNC,
    Closed,
    PgError,
    RawConn,
    bind,
    close,
    data_row,
    describe,
    error_fields,
    execute,
    msg,
    parse,
)

API = "pgwarden.dev/v1alpha1"
SSNS = (b"123-45-6789", b"234-56-7890", b"345-67-8901")
POLICY = {
    "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [
            {"action": "allow", "operations": ["select"],
             "tables": ["public.orders", "public.customers", "public.audit_scratch"]},
            {"action": "review", "operations": ["delete", "update"], "tables": ["public.audit_scratch"]},
        ],
        "approval": {"reviewers": [{"group": "dba"}], "mode": "defer"},
    },
}
MASKING = {
    "apiVersion": API, "kind": "MaskingRule", "metadata": {"name": "pii"},
    "spec": {"connectionRef": {"name": "shop"},
             "columns": [{"table": "public.customers", "column": "ssn", "strategy": "redact"}]},
}


# -- the extended protocol, as an attacker writes it -------------------------------------------










FAIL = parse("SELECT 1/0", "boom") + bind("boom") + execute()  # an error the server reports at Execute


def answers(conn: RawConn, syncs: int = 1) -> tuple[list[list[bytes | None]], list[dict[str, str]], bytes]:
    """Rows, errors and every byte the client got, up to `syncs` ReadyForQuery messages."""
    rows: list[list[bytes | None]] = []
    errors: list[dict[str, str]] = []
    raw = b""
    for _ in range(syncs):
        for kind, payload in conn.until_ready():
            raw += kind + payload
            if kind == b"D":
                rows.append(data_row(payload))
            elif kind == b"E":
                errors.append(error_fields(payload))
    return rows, errors, raw


def fails_at_division(conn: RawConn, sql: str) -> None:
    """Run `sql`, whose first statement fails: the server skips the rest of the text."""
    with pytest.raises(PgError) as e:
        conn.simple(sql)
    assert e.value.sqlstate == "22012"


def no_ssn(data: bytes) -> None:
    for ssn in SSNS:
        assert ssn not in data, f"a masked value reached the client: {ssn!r}"


def scratch(pg: Any, payload: str) -> int:
    out = pg.psql(f"INSERT INTO audit_scratch (payload) VALUES ('{payload}') RETURNING id", dbname="shop")
    return int(next(line for line in out.splitlines() if line.strip().isdigit()).strip())


def left(pg: Any, payload: str) -> int:
    out = pg.psql(f"SELECT count(*) FROM audit_scratch WHERE payload = '{payload}'", dbname="shop")
    return int(next(line for line in out.splitlines() if line.strip().isdigit()).strip())


def ran_delete(pg: Any, mark: int) -> bool:
    return any(("delete" in line.lower() and ("statement:" in line or "execute" in line))
               for line in pg.log_since(mark).splitlines())


@pytest.fixture
def gated(make_proxy: Any, tmp_path: Path) -> Any:
    # the reviewer CLI below runs as this test process, the proxy's own OS user
    spec = {"approvals": {"backend": "local", "path": str(tmp_path / "approvals.db"), "allowProxyUserDecisions": True},
            "audit": {"path": str(tmp_path / "audit.jsonl")}}
    proxy = make_proxy(extra=[POLICY, MASKING], proxy_spec=spec)
    proxy.approvals_db = tmp_path / "approvals.db"
    proxy.audit_path = tmp_path / "audit.jsonl"
    return proxy


@pytest.fixture
def conn(gated: Any) -> Any:
    c = RawConn.login(gated.host, gated.port, gated.user, gated.password, "shop")
    yield c
    c.close()


@pytest.fixture
def masked_only(make_proxy: Any) -> Any:
    proxy = make_proxy(extra=[MASKING])  # no AccessPolicy: defaultAction allow, masking still applies
    c = RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, "shop")
    yield c
    c.close()


# -- SQL PREPARE / DEALLOCATE skipped by an earlier error in the same text ---------------------
def test_a_skipped_deallocate_and_prepare_cannot_swap_a_reviewed_body(conn: RawConn, pg: Any) -> None:
    rid = scratch(pg, "skip-dealloc")
    conn.simple(f"PREPARE x AS DELETE FROM audit_scratch WHERE id = {rid}")
    fails_at_division(conn, "SELECT 1/0; DEALLOCATE x; PREPARE x AS SELECT 1")
    mark = pg.log_position()
    conn.send(msg(b"Q", b"EXECUTE x\0"))
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"], errors  # still the DELETE: held for review
    assert "DELETE FROM audit_scratch" in errors[0]["M"] + errors[0].get("H", "") or "request" in errors[0]["M"]
    assert not ran_delete(pg, mark) and "EXECUTE x" not in pg.log_since(mark)
    assert left(pg, "skip-dealloc") == 1


def test_a_skipped_deallocate_cannot_unmask_a_prepared_select(conn: RawConn) -> None:
    conn.simple("PREPARE s AS SELECT ssn FROM customers ORDER BY id")
    fails_at_division(conn, "SELECT 1/0; DEALLOCATE s; PREPARE s AS SELECT 'clear'::text AS ssn")
    conn.send(msg(b"Q", b"EXECUTE s\0"))
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5  # the server ran the SSN body: masked as such
    no_ssn(raw)


def test_a_prepare_before_the_failing_statement_is_kept(conn: RawConn, pg: Any) -> None:
    with pytest.raises(PgError) as e:
        conn.simple("PREPARE y AS SELECT ssn FROM customers ORDER BY id; SELECT 1/0")
    assert e.value.sqlstate == "22012"
    # PREPARE is not transactional: y was confirmed before the error and stays, with its masks
    conn.send(msg(b"Q", b"EXECUTE y\0"))
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)


# -- protocol names skipped or refused inside an extended batch --------------------------------
def test_a_skipped_unnamed_parse_cannot_swap_a_reviewed_body(conn: RawConn, pg: Any) -> None:
    rid = scratch(pg, "skip-unnamed")
    conn.send(parse("DELETE FROM audit_scratch WHERE id = $1") + SYNC)  # parsing is harmless
    answers(conn)
    mark = pg.log_position()
    # the error at Execute makes the server skip the new unnamed Parse: the DELETE stays unnamed
    conn.send(FAIL + parse("SELECT 1") + SYNC)
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["22012"]
    conn.send(bind("", params=(str(rid).encode(),)) + execute() + SYNC)
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"], errors
    assert not ran_delete(pg, mark)
    assert left(pg, "skip-unnamed") == 1


def test_pipelined_batches_are_decided_only_after_the_server_answered(conn: RawConn, pg: Any) -> None:
    rid = scratch(pg, "pipelined")
    conn.send(parse("DELETE FROM audit_scratch WHERE id = $1") + SYNC)
    answers(conn)
    mark = pg.log_position()
    # the same attack in one write: the third batch must not be decided before the second ran
    conn.send(FAIL + parse("SELECT 1") + SYNC + bind("", params=(str(rid).encode(),)) + execute() + SYNC)
    _, errors, _ = answers(conn, syncs=2)
    assert [e["C"] for e in errors] == ["22012", "PW001"], errors
    assert not ran_delete(pg, mark)
    assert left(pg, "pipelined") == 1


def test_a_parse_of_an_existing_name_fails_and_keeps_the_old_plan(masked_only: RawConn) -> None:
    conn = masked_only
    conn.send(parse("SELECT ssn FROM customers ORDER BY id", "n") + SYNC)
    answers(conn)
    # 42P05: the server keeps the SSN body under n, and skips the rest of the batch
    conn.send(parse("SELECT 'clear'::text AS c", "n") + bind("n") + execute() + SYNC)
    _, errors, raw = answers(conn)
    assert [e["C"] for e in errors] == ["42P05"]
    conn.send(bind("n") + describe(b"P") + execute() + SYNC)
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)


def test_a_skipped_close_keeps_the_statement_and_its_masks(masked_only: RawConn) -> None:
    conn = masked_only
    conn.send(parse("SELECT ssn FROM customers ORDER BY id", "c1") + SYNC)
    answers(conn)
    conn.send(FAIL + close(b"S", "c1") + parse("SELECT 'clear'::text AS c", "c1") + SYNC)
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["22012"]
    conn.send(bind("c1") + describe(b"P") + execute() + SYNC)
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)


def test_a_failed_unnamed_parse_drops_the_old_unnamed_statement(masked_only: RawConn, pg: Any) -> None:
    conn = masked_only
    conn.send(parse("SELECT ssn FROM customers ORDER BY id") + SYNC)
    answers(conn)
    # a Parse that fails in analysis still drops the previous unnamed statement first
    conn.send(parse("SELECT * FROM no_such_table") + SYNC)
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["42P01"]
    mark = pg.log_position()
    conn.send(bind() + execute() + SYNC)
    rows, errors, raw = answers(conn)
    assert [e["C"] for e in errors] == ["42501"] and not rows  # refused here; nothing forwarded
    assert "customers" not in pg.log_since(mark)
    no_ssn(raw)


def test_a_refused_parse_also_drops_the_unnamed_statement(conn: RawConn, pg: Any) -> None:
    conn.send(parse("SELECT ssn FROM customers ORDER BY id") + SYNC)
    answers(conn)
    conn.send(parse("DROP TABLE orders", "d") + SYNC)  # refused by policy: the sentinel is an unnamed Parse
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["42501"]
    conn.send(bind() + execute() + SYNC)
    _, errors, raw = answers(conn)
    assert [e["C"] for e in errors] == ["42501"]
    no_ssn(raw)


# -- portals and SQL cursors share one namespace ------------------------------------------------
def test_a_sql_cursor_executed_as_a_protocol_portal_is_masked(conn: RawConn) -> None:
    conn.simple("BEGIN")
    conn.simple("DECLARE c CURSOR FOR SELECT id, ssn FROM customers ORDER BY id")
    conn.send(describe(b"P", "c") + execute("c") + SYNC)
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5 and rows[0][0] == b"1"
    no_ssn(raw)
    conn.simple("ROLLBACK")


def test_a_sql_cursor_executed_without_describe_never_passes_unplanned(conn: RawConn) -> None:
    conn.simple("BEGIN")
    conn.simple("DECLARE c2 CURSOR FOR SELECT ssn FROM customers ORDER BY id")
    conn.send(execute("c2") + SYNC)
    raw = b""
    with pytest.raises(Closed):  # the proxy ends the session rather than pass rows it cannot mask
        while True:
            kind, payload = conn.recv()
            raw += kind + payload
    assert b"Describe the statement or portal" in raw
    no_ssn(raw)


def test_an_unknown_portal_is_refused_and_nothing_reaches_the_server(conn: RawConn, pg: Any) -> None:
    mark = pg.log_position()
    conn.send(execute("nosuch") + SYNC)
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["42501"] and "nosuch" in errors[0]["M"]
    assert "nosuch" not in pg.log_since(mark)


def test_a_skipped_close_cannot_swap_a_cursor(conn: RawConn) -> None:
    conn.simple("BEGIN")
    conn.simple("DECLARE k CURSOR FOR SELECT ssn FROM customers ORDER BY id")
    conn.simple("SAVEPOINT s")
    fails_at_division(conn, "SELECT 1/0; CLOSE k; DECLARE k CURSOR FOR SELECT 'clear'::text AS ssn")
    conn.simple("ROLLBACK TO s")  # k is the SSN cursor again, usable
    conn.send(msg(b"Q", b"FETCH ALL FROM k\0"))
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)
    conn.simple("ROLLBACK")


def test_a_with_hold_cursor_survives_commit_with_its_plan(conn: RawConn) -> None:
    conn.simple("BEGIN")
    conn.simple("DECLARE h CURSOR WITH HOLD FOR SELECT ssn FROM customers ORDER BY id")
    conn.simple("COMMIT")
    fails_at_division(conn, "SELECT 1/0; CLOSE h; DECLARE h CURSOR WITH HOLD FOR SELECT 'clear'::text AS ssn")
    conn.send(describe(b"P", "h") + execute("h") + SYNC)
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)
    conn.simple("CLOSE h")


def test_psycopg_server_side_cursor_is_masked(gated: Any) -> None:
    dsn = f"host={gated.host} port={gated.port} dbname=shop user={gated.user} password={gated.password}"
    with psycopg.connect(dsn) as c, c.cursor(name="pii") as cur:
        cur.execute("SELECT id, ssn FROM customers ORDER BY id")
        rows = cur.fetchmany(2) + cur.fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    no_ssn(repr(rows).encode())


def test_a_portal_is_gone_after_its_transaction(conn: RawConn, pg: Any) -> None:
    conn.send(parse("SELECT ssn FROM customers ORDER BY id", "t1") + bind("t1", "p") + SYNC)
    answers(conn)  # the implicit transaction ended at Sync: portal p is gone on the server
    mark = pg.log_position()
    conn.send(execute("p") + SYNC)
    _, errors, raw = answers(conn)
    assert [e["C"] for e in errors] == ["42501"]
    assert pg.log_since(mark).count("execute") == 0
    no_ssn(raw)


# -- approvals bind to the body that runs -------------------------------------------------------
def _approve(db: Path) -> str:
    listed = subprocess.run([sys.executable, "-m", "pgwarden.cli", "approvals", "list", "--json", "--db", str(db)],
                            capture_output=True, text=True, timeout=60, check=True)
    pending = [r for r in json.loads(listed.stdout) if r["state"] == "pending"]
    assert len(pending) == 1, pending
    subprocess.run([sys.executable, "-m", "pgwarden.cli", "approvals", "approve", pending[0]["id"], "--as", "dba-alice",
                    "--db", str(db)], capture_output=True, text=True, timeout=60, check=True)
    return str(pending[0]["statement"])


def test_an_execute_approval_shows_and_binds_the_prepared_body(gated: Any, conn: RawConn, pg: Any) -> None:
    keep = scratch(pg, "swap-keep")
    conn.simple("PREPARE d(int) AS DELETE FROM audit_scratch WHERE id = $1")
    conn.send(msg(b"Q", f"EXECUTE d({keep})\0".encode()))
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"]
    shown = _approve(gated.approvals_db)
    assert f"EXECUTE d({keep})" in shown and "DELETE FROM audit_scratch WHERE id = $1" in shown
    # the agent swaps the body under the same name: the approval does not cover it
    conn.simple("DEALLOCATE d")
    conn.simple("PREPARE d(int) AS DELETE FROM audit_scratch WHERE id >= $1")
    mark = pg.log_position()
    conn.send(msg(b"Q", f"EXECUTE d({keep})\0".encode()))
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"]
    assert not ran_delete(pg, mark) and "EXECUTE d" not in pg.log_since(mark)
    assert left(pg, "swap-keep") == 1
    # the body the reviewer saw, with the arguments they saw, runs once
    conn.simple("DEALLOCATE d")
    conn.simple("PREPARE d(int) AS DELETE FROM audit_scratch WHERE id = $1")
    conn.send(msg(b"Q", f"EXECUTE d({keep})\0".encode()))
    _, errors, _ = answers(conn)
    assert not errors
    assert left(pg, "swap-keep") == 0
    events = [json.loads(x) for x in gated.audit_path.read_text().splitlines()]
    executed = [e for e in events if e.get("event") == "statement" and f"EXECUTE d({keep})" in e.get("statement", {}).get("text", json.dumps(e))]
    assert executed and all("WHERE id" in json.dumps(e) for e in executed)


def test_sql_fetch_of_a_protocol_portal_is_masked(conn: RawConn) -> None:
    conn.simple("BEGIN")
    conn.send(parse("SELECT ssn FROM customers ORDER BY id", "pf") + bind("pf", "pp") + SYNC)
    answers(conn)
    conn.send(msg(b"Q", b"FETCH ALL FROM pp\0"))
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)
    conn.simple("ROLLBACK")


def test_a_prepare_run_through_the_extended_protocol_is_decided_as_its_body(conn: RawConn, pg: Any) -> None:
    rid = scratch(pg, "ext-prepare")
    conn.send(parse(f"PREPARE xd AS DELETE FROM audit_scratch WHERE id = {rid}") + bind() + execute() + SYNC)
    _, errors, _ = answers(conn)
    assert not errors  # preparing is harmless; the name exists once that Execute completed
    mark = pg.log_position()
    conn.send(msg(b"Q", b"EXECUTE xd\0"))
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"]
    assert not ran_delete(pg, mark) and left(pg, "ext-prepare") == 1


def test_an_extended_deallocate_skipped_by_an_error_keeps_the_body(conn: RawConn, pg: Any) -> None:
    rid = scratch(pg, "ext-dealloc")
    conn.simple(f"PREPARE xe AS DELETE FROM audit_scratch WHERE id = {rid}")
    conn.send(FAIL + parse("DEALLOCATE xe") + bind() + execute() + SYNC)
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["22012"]
    with pytest.raises(PgError) as e:  # the gate still knows xe, so a new PREPARE of it is refused
        conn.simple("PREPARE xe AS SELECT 1")
    assert e.value.sqlstate == "42501" and "already prepared" in str(e.value.args[0])
    mark = pg.log_position()
    conn.send(msg(b"Q", b"EXECUTE xe\0"))
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"]
    assert not ran_delete(pg, mark) and left(pg, "ext-dealloc") == 1


def test_discard_all_skipped_or_run_the_registry_follows(masked_only: RawConn) -> None:
    conn = masked_only
    conn.send(parse("SELECT ssn FROM customers ORDER BY id", "dn") + SYNC)
    answers(conn)
    fails_at_division(conn, "SELECT 1/0; DISCARD ALL")  # skipped: dn stays, with its masks
    conn.send(parse("SELECT 'clear'::text AS c", "dn") + SYNC)
    assert [e["C"] for e in answers(conn)[1]] == ["42P05"]
    conn.send(bind("dn") + describe(b"P") + execute() + SYNC)
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)
    conn.simple("DISCARD ALL")  # run: dn is gone on the server and here
    conn.send(bind("dn") + execute() + SYNC)
    assert [e["C"] for e in answers(conn)[1]] == ["42501"]


# -- a Parse that names a statement or cursor is a pointer: decided again at every Bind ----------
def test_a_parsed_execute_is_decided_as_the_body_at_bind(conn: RawConn, pg: Any) -> None:
    rid = scratch(pg, "parsed-execute")
    conn.simple("PREPARE pe AS SELECT 1")
    conn.send(parse("EXECUTE pe", "runs_pe") + SYNC)  # a harmless body when parsed
    _, errors, _ = answers(conn)
    assert not errors
    conn.simple("DEALLOCATE pe")
    conn.simple(f"PREPARE pe AS DELETE FROM audit_scratch WHERE id = {rid}")  # swapped under the name
    mark = pg.log_position()
    conn.send(bind("runs_pe") + execute() + SYNC)
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"]  # reviewed as the DELETE it would run now
    assert not ran_delete(pg, mark) and left(pg, "parsed-execute") == 1


def test_a_parsed_fetch_is_masked_as_the_cursor_it_reads_at_bind(conn: RawConn) -> None:
    conn.simple("BEGIN")
    conn.simple("DECLARE fc CURSOR FOR SELECT 'clear'::text AS v FROM generate_series(1, 5)")
    conn.send(parse("FETCH ALL FROM fc", "fetch_fc") + SYNC)
    answers(conn)
    conn.simple("CLOSE fc")
    conn.simple("DECLARE fc CURSOR FOR SELECT ssn AS v FROM customers ORDER BY id")
    conn.send(bind("fetch_fc") + describe(b"P") + execute() + SYNC)
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)
    conn.simple("ROLLBACK")


def test_a_fetch_portal_whose_cursor_was_redeclared_after_bind_is_refused(conn: RawConn) -> None:
    """Bind "FETCH ALL FROM fc" while fc reads a clear value, then CLOSE fc and DECLARE fc over the
    masked column in the same batch, then Execute the portal: it was decided (and its rows planned)
    for the old cursor, so its Execute is refused, and no SSN comes back."""
    conn.simple("BEGIN")
    conn.simple("DECLARE fc CURSOR FOR SELECT 'clear'::text AS v FROM generate_series(1, 5)")
    conn.send(
        parse("FETCH ALL FROM fc", "fetch_fc") + bind("fetch_fc", "fx")
        + parse("CLOSE fc") + bind() + execute()
        + parse("DECLARE fc CURSOR FOR SELECT ssn AS v FROM customers ORDER BY id") + bind() + execute()
        + describe(b"P", "fx") + execute("fx") + SYNC
    )
    rows, errors, raw = answers(conn)
    assert [e["C"] for e in errors] == ["42501"] and "cursor 'fc'" in errors[0]["M"]
    assert rows == []
    no_ssn(raw)
    conn.simple("ROLLBACK")


def test_a_reviewer_sees_the_body_a_text_prepares_before_executing_it(gated: Any, conn: RawConn, pg: Any) -> None:
    rid = scratch(pg, "in-text")
    conn.simple(f"PREPARE it AS SELECT {rid}")
    conn.send(msg(b"Q", f"DEALLOCATE it; PREPARE it AS DELETE FROM audit_scratch WHERE id = {rid}; EXECUTE it\0".encode()))
    _, errors, _ = answers(conn)
    assert [e["C"] for e in errors] == ["PW001"]
    shown = _approve(gated.approvals_db)
    assert "-- pgwarden: it is prepared as:\n--   PREPARE it AS DELETE FROM audit_scratch" in shown
    assert f"SELECT {rid}" not in shown.split("-- pgwarden:")[1]
    assert left(pg, "in-text") == 1


def test_a_query_inside_an_open_batch_does_not_wait_forever(conn: RawConn) -> None:
    # the Query must wait for the server's word on q1, which the server gives only at Flush/Sync
    conn.send(parse("SELECT ssn FROM customers ORDER BY id", "q1") + msg(b"Q", b"SELECT 2\0"))
    kinds = b""
    for kind, _ in conn.until_ready():
        kinds += kind
    assert kinds.startswith(b"1") and kinds.endswith(b"Z")
    conn.send(bind("q1") + describe(b"P") + execute() + SYNC)
    rows, errors, raw = answers(conn)
    assert not errors and len(rows) == 5
    no_ssn(raw)
