"""What the proxy's session registry assumes about PostgreSQL, checked against the server itself.

proxy/session.py changes a name only when the server confirms the command that changes it. That
is right only if the server behaves as the table there says; these tests talk to PostgreSQL
directly (no proxy) and pin each case, so a server version that behaves otherwise fails here
first.
"""

from __future__ import annotations

from typing import Any

import pytest
from fix_pg import APP_PASSWORD, APP_USER, SHOP_DB
from rawpg import PgError, RawConn, data_row, error_fields, msg
from test_session_names_attacks import SYNC, bind, close, describe, execute, parse


@pytest.fixture
def direct(pg: Any) -> Any:
    c = RawConn.login(pg.host, pg.port, APP_USER, APP_PASSWORD, SHOP_DB)
    yield c
    c.close()


def kinds_and_errors(conn: RawConn, syncs: int = 1) -> tuple[bytes, list[str], list[list[bytes | None]]]:
    kinds = b""
    codes: list[str] = []
    rows: list[list[bytes | None]] = []
    for _ in range(syncs):
        for kind, payload in conn.until_ready():
            kinds += kind
            if kind == b"E":
                codes.append(error_fields(payload)["C"])
            elif kind == b"D":
                rows.append(data_row(payload))
    return kinds, codes, rows


def test_a_failing_unnamed_parse_drops_the_previous_unnamed_statement(direct: RawConn) -> None:
    direct.send(parse("SELECT 1") + SYNC)
    kinds_and_errors(direct)
    direct.send(parse("SELECT * FROM no_such_table") + SYNC)
    assert kinds_and_errors(direct)[1] == ["42P01"]
    direct.send(bind() + execute() + SYNC)
    assert kinds_and_errors(direct)[1] == ["26000"]  # unnamed prepared statement does not exist


def test_a_skipped_unnamed_parse_leaves_the_previous_one(direct: RawConn) -> None:
    direct.send(parse("SELECT 'old'") + SYNC)
    kinds_and_errors(direct)
    direct.send(parse("SELECT 1/0", "f") + bind("f") + execute() + parse("SELECT 'new'") + SYNC)
    assert kinds_and_errors(direct)[1] == ["22012"]
    direct.send(bind() + execute() + SYNC)
    assert kinds_and_errors(direct)[2] == [[b"old"]]


def test_a_query_drops_the_unnamed_statement(direct: RawConn) -> None:
    direct.send(parse("SELECT 1") + SYNC)
    kinds_and_errors(direct)
    direct.simple("SELECT 2")
    direct.send(bind() + execute() + SYNC)
    assert kinds_and_errors(direct)[1] == ["26000"]


def test_a_query_after_an_extended_error_is_ignored_until_sync(direct: RawConn) -> None:
    direct.send(parse("SELECT 1/0", "g") + bind("g") + execute() + msg(b"Q", b"PREPARE q AS SELECT 1\0") + SYNC)
    kinds, codes, _ = kinds_and_errors(direct)
    assert codes == ["22012"] and kinds.count(b"Z") == 1  # the Query got no answer at all
    with pytest.raises(PgError) as e:
        direct.simple("EXECUTE q")
    assert e.value.sqlstate == "26000"


def test_a_parse_of_an_existing_name_fails_and_keeps_the_old_body(direct: RawConn) -> None:
    direct.send(parse("SELECT 'old'", "n") + SYNC)
    kinds_and_errors(direct)
    direct.send(parse("SELECT 'new'", "n") + SYNC)
    assert kinds_and_errors(direct)[1] == ["42P05"]
    direct.send(bind("n") + execute() + SYNC)
    assert kinds_and_errors(direct)[2] == [[b"old"]]


def test_close_of_an_unknown_name_succeeds(direct: RawConn) -> None:
    direct.send(close(b"S", "never-made") + close(b"P", "never-made") + SYNC)
    kinds, codes, _ = kinds_and_errors(direct)
    assert codes == [] and kinds == b"33Z"


def test_deallocate_all_drops_protocol_statements_but_not_the_unnamed_one(direct: RawConn) -> None:
    direct.send(parse("SELECT 'named'", "d1") + parse("SELECT 'unnamed'") + SYNC)
    kinds_and_errors(direct)
    direct.send(msg(b"Q", b"DEALLOCATE ALL\0"))  # a Query: it also drops the unnamed statement
    kinds_and_errors(direct)
    direct.send(bind("d1") + execute() + SYNC)
    assert kinds_and_errors(direct)[1] == ["26000"]


def test_a_prepare_before_a_failing_statement_stays(direct: RawConn) -> None:
    with pytest.raises(PgError):
        direct.simple("PREPARE kept AS SELECT 'kept'; SELECT 1/0")
    assert direct.simple("EXECUTE kept") == [[b"kept"]]


def test_portals_end_with_the_transaction_and_with_hold_cursors_survive_commit(direct: RawConn) -> None:
    direct.send(parse("SELECT 1", "p1") + bind("p1", "portal") + SYNC)
    kinds_and_errors(direct)
    direct.send(execute("portal") + SYNC)
    assert kinds_and_errors(direct)[1] == ["34000"]  # the implicit transaction ended at Sync
    direct.simple("BEGIN")
    direct.simple("DECLARE held CURSOR WITH HOLD FOR SELECT 'held'")
    direct.simple("DECLARE plain CURSOR FOR SELECT 'plain'")
    direct.simple("COMMIT")
    assert direct.simple("FETCH ALL FROM held") == [[b"held"]]
    with pytest.raises(PgError) as e:
        direct.simple("FETCH ALL FROM plain")
    assert e.value.sqlstate == "34000"


def test_sql_fetch_reads_a_protocol_portal_and_execute_reads_a_cursor(direct: RawConn) -> None:
    # one namespace: why the proxy masks FETCH of a name it does not know as a cursor, and plans
    # a protocol Execute of a cursor with the cursor's DECLARE
    direct.simple("BEGIN")
    direct.send(parse("SELECT 'via portal'", "p2") + bind("p2", "pp") + SYNC)
    kinds_and_errors(direct)
    assert direct.simple("FETCH ALL FROM pp") == [[b"via portal"]]
    direct.simple("DECLARE cc CURSOR FOR SELECT 'via cursor'")
    direct.send(describe(b"P", "cc") + execute("cc") + SYNC)
    assert kinds_and_errors(direct)[2] == [[b"via cursor"]]
    direct.simple("ROLLBACK")


def test_a_cursor_of_a_rolled_back_savepoint_is_gone(direct: RawConn) -> None:
    direct.simple("BEGIN")
    direct.simple("SAVEPOINT s")
    direct.simple("DECLARE sp CURSOR FOR SELECT 1")
    direct.simple("ROLLBACK TO s")
    with pytest.raises(PgError) as e:  # so a later DECLARE of the name succeeds: confirmed, it replaces
        direct.simple("FETCH ALL FROM sp")
    assert e.value.sqlstate == "34000"
    direct.simple("ROLLBACK")
