"""Denied statements never reach PostgreSQL: the corpus's denied rows through the real proxy.

Each denied row is sent with a unique marker comment, once over the simple query protocol and
once as an extended-protocol Parse, and the server's statement log (log_statement=all) must not
contain the marker. Allowed controls prove the marker would have been logged.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
import yaml
from test_policy_corpus import CORPUS, DENIED
from test_policy_helpers import AGENTS_POLICY

POLICY_DOC = yaml.safe_load(AGENTS_POLICY.replace("subjects: [{group: agents}]", "subjects: [{group: ai-agents}]"))
# A NUL cannot be sent in a Query message at all; the client library refuses it.
LIVE_DENIED = [sql for sql in DENIED if "\x00" not in sql]
REVIEWED = [row[0] for row in CORPUS if row[1] == "review"][:5]


@pytest.fixture
def policy_proxy(make_proxy):
    return make_proxy(extra=[POLICY_DOC])


def _connect(proxy, simple: bool) -> psycopg.Connection:
    factory = psycopg.ClientCursor if simple else psycopg.Cursor
    return psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=factory, connect_timeout=10)


def _send_all(proxy, statements: list[str], simple: bool) -> dict[str, tuple[str, str | None]]:
    """Send each statement with a marker; return marker -> (statement, SQLSTATE or None)."""
    outcome: dict[str, tuple[str, str | None]] = {}
    conn = _connect(proxy, simple)
    try:
        for sql in statements:
            marker = f"pgw-live-{uuid.uuid4().hex}"
            text = f"{sql}\n-- {marker}"
            state = None
            try:
                conn.execute(text)
            except psycopg.Error as e:
                state = e.sqlstate
            outcome[marker] = (sql, state)
            if conn.closed or conn.broken:
                conn = _connect(proxy, simple)
    finally:
        conn.close()
    return outcome


@pytest.mark.parametrize("simple", [True, False], ids=["simple-query", "extended-parse"])
def test_denied_statements_never_reach_the_server(pg, policy_proxy, simple):
    mark = pg.log_position()
    outcome = _send_all(policy_proxy, LIVE_DENIED, simple)
    log = pg.log_since(mark)
    leaked = [sql for marker, (sql, _) in outcome.items() if marker in log]
    assert leaked == []
    wrong = {sql: state for sql, state in outcome.values() if state != "42501"}
    assert wrong == {}


def test_reviewed_statements_wait_outside_the_server(pg, policy_proxy):
    mark = pg.log_position()
    outcome = _send_all(policy_proxy, REVIEWED, simple=True)
    log = pg.log_since(mark)
    assert [sql for marker, (sql, _) in outcome.items() if marker in log] == []
    assert {state for _, state in outcome.values()} == {"PW001"}


def test_allowed_statements_do_reach_the_server(pg, policy_proxy):
    allowed = ["SELECT * FROM orders", "SELECT count(*) FROM customer_contacts", "BEGIN", "COMMIT",
               "SELECT relname FROM pg_class LIMIT 1", "SELECT 'DELETE FROM customers'"]
    mark = pg.log_position()
    outcome = _send_all(policy_proxy, allowed, simple=True)
    log = pg.log_since(mark)
    assert all(state is None for _, state in outcome.values()), outcome
    assert all(marker in log for marker in outcome)


def test_prepare_execute_through_the_proxy(pg, policy_proxy):
    conn = _connect(policy_proxy, simple=True)
    try:
        conn.execute("PREPARE o(int) AS SELECT status FROM orders WHERE id = $1")
        assert conn.execute("EXECUTE o(1)").fetchall()
        mark = pg.log_position()
        with pytest.raises(psycopg.Error) as e:
            conn.execute("PREPARE leak AS SELECT ssn FROM customers")
        assert e.value.sqlstate == "42501"
        with pytest.raises(psycopg.Error) as e:
            conn.execute("EXECUTE leak")
        assert e.value.sqlstate == "42501"
        assert "leak" not in pg.log_since(mark)
    finally:
        conn.close()
