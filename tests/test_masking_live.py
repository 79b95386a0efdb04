"""Masking through the live proxy: no seeded secret reaches a client, whatever the query's shape.

The adversarial corpus of issue 5, run by real clients — psql (simple protocol, text), psycopg 3
(extended protocol, text and binary results) and asyncpg (binary results, named statements) —
through a `WireTap`, a TCP forwarder that records every byte the proxy sent. The assertions are
on those raw bytes (and on psql's stdout / the drivers' decoded values): none of the secrets
the shop seed put in `customers` (emails, SSNs, card and phone numbers, also without separators,
hex-encoded, base64-encoded or reversed) may appear. Unmasked columns must arrive intact.

The rule is the demo's (email: email, ssn: redact, card_number: last4, phone: partial, detectors
email / us_ssn / credit_card / phone, derived: redact, exemptSubjects privacy-officers); the
AccessPolicy lets the agents read the shop and write customers / audit_scratch, so it is the
masking, not the policy, that stands between them and the values.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from fix_proxy import AGENT_PASSWORD, AGENT_USER, ProxyHandle, ProxyThread, proxy_documents
from masking_live_helpers import (
    OFFICER_PASSWORD,
    OFFICER_USER,
    WireTap,
    leaks,
    live_documents,
    officer_user,
    seeded_names,
    server_messages,
)
from proxy_helpers import superuser

from pgwarden.cli import main
from pgwarden.embedded import EmbeddedPostgres
from pgwarden.proxy.main import start_proxy
from pgwarden.resources import parse_documents

# Free text with secrets in it, in a table no MaskingRule names: only the detectors stand guard.
NOTES_TABLE = "public.masking_live_notes"
NOTES = [
    (1, "reach me at kj@example.com"),
    (2, "SSN 456-78-9012 on file"),
    (3, "card 6011000000000004 exp 12/29"),
    (4, "call +1 415 555 0102 after 5pm"),
    (5, "nothing to see here"),
]


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def notes_table(pg: EmbeddedPostgres) -> None:
    with superuser(pg, "shop") as c:
        c.execute(f"DROP TABLE IF EXISTS {NOTES_TABLE}")
        c.execute(f"CREATE TABLE {NOTES_TABLE} (id int PRIMARY KEY, body text)")
        c.cursor().executemany(f"INSERT INTO {NOTES_TABLE} VALUES (%s, %s)", NOTES)
        c.execute(f"GRANT SELECT ON {NOTES_TABLE} TO shop_reader")


def start(pg: EmbeddedPostgres, runner: ProxyThread, *, derived: str = "redact", detectors: bool = True,
          spec: dict[str, Any] | None = None) -> ProxyHandle:
    docs = live_documents(derived=derived)
    if not detectors:
        docs[1]["spec"]["detectors"] = []
    docs[0]["spec"]["rules"][0]["tables"].append(NOTES_TABLE)
    users = [{"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}, officer_user()]
    text = proxy_documents(pg, extra=docs, proxy_spec={"users": users, **(spec or {})})
    running = runner.call(start_proxy(parse_documents(text)))
    return ProxyHandle(running=running, runner=runner, pg=pg)


@pytest.fixture(scope="module")
def live(pg: EmbeddedPostgres, proxy_thread: ProxyThread, notes_table: None) -> Iterator[ProxyHandle]:
    handle = start(pg, proxy_thread)
    yield handle
    handle.stop()


# -- clients ---------------------------------------------------------------------------------
@dataclass
class Received:
    """What one client got for one statement: the bytes the proxy sent, and what the client made of them."""

    wire: bytes
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    error: str = ""  # SQLSTATE and message text(s), as the client reported them
    sqlstate: str = ""
    shown: str = ""  # what the user sees: psql's output, or the repr of the driver's values

    def clear(self) -> None:
        """No seeded secret in any form, in the wire bytes or in what the client shows."""
        assert not leaks(self.wire), f"secrets on the wire: {leaks(self.wire)}"
        assert not leaks(self.shown), f"secrets shown to the user: {leaks(self.shown)}\n{self.shown[:2000]}"
        assert not leaks(self.error), f"secrets in the error: {self.error}"


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    return str(v)


PSQL_NULL = "<null>"


def run_psql(h: ProxyHandle, *commands: str, user: str = AGENT_USER, password: str = AGENT_PASSWORD,
             extra: tuple[str, ...] = ()) -> Received:
    tap = WireTap(h.host, h.port)
    try:
        args = ["psql", "-X", "-q", "-A", "-t", "-F", "\x1f", "-P", f"null={PSQL_NULL}", "-v", "ON_ERROR_STOP=1", *extra]
        for c in commands:
            args += ["-c", c]
        env = h.env(PGPORT=str(tap.port), PGUSER=user, PGPASSWORD=password)
        r = subprocess.run(args, capture_output=True, env=env, timeout=60, check=False)
        wire = tap.received()
    finally:
        tap.close()
    out = r.stdout.decode("utf-8", "replace")
    rows = [tuple(None if v == PSQL_NULL else v for v in line.split("\x1f")) for line in out.splitlines() if line]
    err = r.stderr.decode("utf-8", "replace")
    state = next((p.get("C", "") for k, p in _error_fields(wire)), "")
    return Received(wire + r.stdout + r.stderr, rows, err, state, out + err)


def _error_fields(wire: bytes) -> list[tuple[bytes, dict[str, str]]]:
    out = []
    for kind, payload in server_messages(wire):
        if kind in (b"E", b"N") and payload[:1] in b"SVCMDHPWqsctdnFLR":
            fields = {chr(p[0]): p[1:].decode("utf-8", "replace") for p in payload.rstrip(b"\0").split(b"\0") if p}
            if "C" in fields:
                out.append((kind, fields))
    return out


def _psycopg_error(e: psycopg.Error) -> str:
    d = e.diag
    return " | ".join(str(x) for x in (d.sqlstate, d.message_primary, d.message_detail, d.message_hint,
                                        d.context, d.internal_query) if x)


def run_psycopg(h: ProxyHandle, sql: str, *, binary: bool = False, user: str = AGENT_USER,
                password: str = AGENT_PASSWORD, prepare: bool | None = None) -> Received:
    tap = WireTap(h.host, h.port)
    rows: list[tuple[str | None, ...]] = []
    shown, err, state = "", "", ""
    try:
        with psycopg.connect(h.dsn(port=tap.port, user=user, password=password), autocommit=True) as conn:
            cur = conn.cursor(binary=binary)
            try:
                cur.execute(sql, prepare=prepare)
                if cur.description is not None:
                    values = cur.fetchall()
                    shown = repr(values)
                    rows = [tuple(_text(v) for v in r) for r in values]
            except psycopg.Error as e:
                err, state = _psycopg_error(e), e.sqlstate or ""
        wire = tap.received()
    finally:
        tap.close()
    return Received(wire, rows, err, state, shown)


def run_asyncpg(h: ProxyHandle, sql: str, *, user: str = AGENT_USER, password: str = AGENT_PASSWORD) -> Received:
    tap = WireTap(h.host, h.port)

    async def go() -> Received:
        conn = await asyncpg.connect(host=h.host, port=tap.port, user=user, password=password,
                                     database=h.dbname, ssl=False)
        try:
            values = [tuple(r.values()) for r in await conn.fetch(sql)]
            return Received(b"", [tuple(_text(v) for v in r) for r in values], shown=repr(values))
        except asyncpg.PostgresError as e:
            fields = " | ".join(str(x) for x in (e.sqlstate, e.args[0] if e.args else "", getattr(e, "detail", None),
                                                 getattr(e, "hint", None), getattr(e, "context", None)) if x)
            return Received(b"", error=fields, sqlstate=e.sqlstate or "")
        finally:
            await conn.close()

    try:
        got = asyncio.run(go())
        got.wire = tap.received()
    finally:
        tap.close()
    return got


CLIENTS: dict[str, Callable[[ProxyHandle, str], Received]] = {
    "psql": lambda h, sql: run_psql(h, sql),
    "psycopg-text": lambda h, sql: run_psycopg(h, sql),
    "psycopg-binary": lambda h, sql: run_psycopg(h, sql, binary=True),
    "asyncpg-binary": run_asyncpg,
}


def _json_text(v: str | None) -> Any:
    """jsonb as a JSON document (psql, asyncpg) or already decoded (psycopg)."""
    try:
        return json.loads(v) if v is not None else None
    except ValueError:
        return v


def direct(pg: EmbeddedPostgres, sql: str) -> list[tuple[str | None, ...]]:
    """The same statement on the server as its superuser: what the clear columns must read."""
    with superuser(pg, "shop") as c:
        return [tuple(_text(v) for v in r) for r in c.execute(sql).fetchall()]


# -- the corpus: every shape a masked value can take on its way out ------------------------------
SHAPES: dict[str, str] = {
    # direct references
    "columns": "SELECT id, name, email, ssn, card_number, phone FROM customers ORDER BY id",
    "aliases": 'SELECT email AS contact, c.ssn AS "ID", c.card_number AS x, phone AS name FROM customers c',
    "star": "SELECT * FROM customers ORDER BY id",
    "qualified-star": "SELECT c.*, o.total_cents FROM customers c JOIN orders o ON o.customer_id = c.id",
    "composite-field": "SELECT (c).email, (c).ssn FROM (SELECT c FROM customers c) s",
    "view": "SELECT * FROM customer_contacts ORDER BY id",
    "cte": "WITH x AS (SELECT id, email AS e, ssn FROM customers) SELECT * FROM x ORDER BY id",
    "recursive-cte": "WITH RECURSIVE r(e, n) AS (SELECT card_number, 1 FROM customers "
                     "UNION ALL SELECT e, n + 1 FROM r WHERE n < 2) SELECT e, n FROM r",
    "subquery": "SELECT s, i FROM (SELECT ssn AS s, id AS i FROM customers) q ORDER BY i",
    "scalar-subquery": "SELECT (SELECT email FROM customers WHERE id = 1), (SELECT ssn FROM customers LIMIT 1)",
    "lateral": "SELECT u FROM customers c, LATERAL (SELECT c.phone AS u) l",
    "union": "SELECT name FROM customers UNION ALL SELECT email FROM customers UNION ALL SELECT ssn FROM customers",
    # expressions, casts, aggregates
    "functions": "SELECT upper(email), lower(ssn), reverse(card_number), replace(phone, ' ', ''), "
                 "substr(ssn, 1, 3) || substr(ssn, 5, 2) || substr(ssn, 8), initcap(email) FROM customers",
    "operators": "SELECT 'x' || email, ssn || '', card_number || phone, email = email FROM customers",
    "format": "SELECT format('%s/%s', email, ssn), concat_ws(',', card_number, phone), "
              "translate(ssn, '-', '') FROM customers",
    "case": "SELECT CASE WHEN id > 0 THEN email ELSE ssn END, coalesce(phone, card_number) FROM customers",
    "casts": "SELECT ssn::varchar(20), card_number::numeric, replace(ssn, '-', '')::bigint, "
             "email::bytea, email::name, ssn::char(11), card_number::text FROM customers",
    "encodings": "SELECT convert_to(email, 'UTF8'), encode(convert_to(ssn, 'UTF8'), 'base64'), "
                 "encode(card_number::bytea, 'hex'), to_hex(replace(ssn, '-', '')::int) FROM customers",
    "aggregates": "SELECT max(ssn), min(email), array_agg(card_number), count(DISTINCT phone), "
                  "json_object_agg(name, ssn), jsonb_object_agg(email, phone) FROM customers",
    "string_agg": "SELECT string_agg(email, ','), string_agg(ssn || ':' || card_number, ';') FROM customers",
    "window": "SELECT id, lag(ssn) OVER (ORDER BY id), first_value(email) OVER () FROM customers",
    "arrays": "SELECT ARRAY[email, ssn], (ARRAY[card_number, phone])[2] FROM customers",
    # JSON builders and whole rows
    "json_agg": "SELECT json_agg(email), jsonb_agg(c), json_agg(c.*) FROM customers c",
    "json_build": "SELECT json_build_object('e', email, 's', ssn), jsonb_build_array(card_number, phone), "
                  "json_build_object(name, phone) FROM customers",
    "row_to_json": "SELECT row_to_json(c), row_to_json(ROW(c.email, c.ssn)) FROM customers c",
    "to_jsonb": "SELECT to_jsonb(c), to_jsonb(c.*), to_json(c.card_number) FROM customers c",
    "whole-row": "SELECT c, ROW(c.email, c.ssn), c::text FROM customers c",
    "whole-row-of-view": "SELECT v, row_to_json(v) FROM customer_contacts v",
    "json-path": "SELECT jsonb_path_query_first(to_jsonb(c), '$.ssn'), to_jsonb(c) ->> 'email' FROM customers c",
    # free text: values hidden in columns no rule names
    "notes-column": "SELECT id, name, notes FROM customers ORDER BY id",
    "free-text-table": f"SELECT id, body FROM {NOTES_TABLE} ORDER BY id",
    "free-text-in-json": f"SELECT json_agg(n) FROM {NOTES_TABLE} n",
}


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_no_seeded_secret_reaches_the_client(live: ProxyHandle, shape: str, client: str) -> None:
    got = CLIENTS[client](live, SHAPES[shape])
    assert not got.error, got.error
    assert got.rows, "the statement returned rows"
    got.clear()


# -- unmasked columns arrive intact ------------------------------------------------------------
@pytest.mark.parametrize("client", list(CLIENTS))
def test_clear_columns_arrive_intact_beside_masked_ones(live: ProxyHandle, pg: EmbeddedPostgres, client: str) -> None:
    sql = ("SELECT o.id, o.total_cents, o.status, c.id, c.name, c.email, c.ssn, c.card_number "
           "FROM orders o JOIN customers c ON c.id = o.customer_id ORDER BY o.id")
    got = CLIENTS[client](live, sql)
    got.clear()
    expected = direct(pg, sql)
    assert [r[:5] for r in got.rows] == [r[:5] for r in expected]
    masked = {r[3]: r[5:] for r in got.rows}
    assert masked["1"] == ("a***@example.com", "[redacted]", "****1111")
    assert masked["2"] == ("g***@example.org", "[redacted]", "****5559")


@pytest.mark.parametrize("client", list(CLIENTS))
def test_types_that_cannot_carry_a_masked_form_become_null(live: ProxyHandle, client: str) -> None:
    got = CLIENTS[client](live, "SELECT id, card_number::numeric, replace(ssn, '-', '')::bigint, "
                                "to_jsonb(email), name FROM customers ORDER BY id")
    got.clear()
    assert [r[0] for r in got.rows] == ["1", "2", "3", "4", "5"]
    assert all(r[1] is None and r[2] is None for r in got.rows)
    assert {_json_text(r[3]) for r in got.rows} == {"[redacted]"}
    assert [r[4] for r in got.rows] == seeded_names()


@pytest.mark.parametrize("client", list(CLIENTS))
def test_detectors_mask_only_the_secret_inside_free_text(live: ProxyHandle, client: str) -> None:
    got = CLIENTS[client](live, f"SELECT id, body FROM {NOTES_TABLE} ORDER BY id")
    got.clear()
    body = dict((r[0], r[1]) for r in got.rows)
    assert body["5"] == "nothing to see here"
    assert body["1"] is not None and body["1"].startswith("reach me at ")
    got = CLIENTS[client](live, "SELECT id, notes FROM customers ORDER BY id")
    got.clear()
    notes = dict((r[0], r[1]) for r in got.rows)
    assert notes["1"] == "prefers email" and notes["4"] == "VIP"
    assert notes["2"] is not None and notes["2"].startswith("call ") and notes["2"].endswith(" after 5pm")


# -- COPY ---------------------------------------------------------------------------------------
COPIES = {
    "table-text": "COPY customers TO STDOUT",
    "table-csv": "COPY customers TO STDOUT WITH (FORMAT csv, HEADER)",
    "columns-csv": "COPY customers (id, email, ssn, notes) TO STDOUT CSV",
    "query-text": "COPY (SELECT id, upper(email), ssn || '!', row_to_json(c) FROM customers c) TO STDOUT",
    "query-csv": "COPY (SELECT * FROM customer_contacts) TO STDOUT (FORMAT csv, FORCE_QUOTE *)",
    "view-query": "COPY (SELECT c, card_number FROM customers c) TO STDOUT (FORMAT csv, DELIMITER ';')",
    "free-text": f"COPY {NOTES_TABLE} TO STDOUT CSV",
}


@pytest.mark.parametrize("copy", list(COPIES))
def test_copy_to_stdout_is_masked_for_psql(live: ProxyHandle, copy: str) -> None:
    got = run_psql(live, COPIES[copy])
    assert not got.error, got.error
    got.clear()
    assert got.shown.strip()


@pytest.mark.parametrize("copy", list(COPIES))
def test_copy_to_stdout_is_masked_for_psycopg(live: ProxyHandle, copy: str) -> None:
    tap = WireTap(live.host, live.port)
    try:
        with psycopg.connect(live.dsn(port=tap.port), autocommit=True) as conn:
            with conn.cursor().copy(COPIES[copy]) as cp:
                data = b"".join(bytes(chunk) for chunk in cp)
        wire = tap.received()
    finally:
        tap.close()
    assert data
    assert not leaks(wire) and not leaks(data), leaks(data)


def test_psql_backslash_copy_writes_masked_text_and_csv_files(live: ProxyHandle, tmp_path: Path) -> None:
    text_file, csv_file = tmp_path / "c.txt", tmp_path / "c.csv"
    got = run_psql(live, rf"\copy customers to '{text_file}'",
                   rf"\copy (SELECT id, name, email, ssn, notes FROM customers ORDER BY id) to '{csv_file}' csv header")
    assert not got.error, got.error
    got.clear()
    assert not leaks(text_file.read_bytes()) and not leaks(csv_file.read_bytes())
    rows = list(csv.reader(io.StringIO(csv_file.read_text())))
    assert rows[0] == ["id", "name", "email", "ssn", "notes"]
    assert [r[:2] for r in rows[1:]] == [[str(i), n] for i, n in enumerate(seeded_names(), 1)]
    assert rows[1][2:4] == ["a***@example.com", "[redacted]"] and rows[1][4] == "prefers email"
    assert len(text_file.read_text().splitlines()) == 5


@pytest.mark.parametrize("sql", [
    "COPY customers TO STDOUT (FORMAT binary)",
    "COPY (SELECT email FROM customers) TO STDOUT WITH (FORMAT binary)",
    "COPY customer_contacts TO STDOUT (FORMAT binary)",
])
def test_binary_copy_of_masked_data_is_refused(live: ProxyHandle, pg: EmbeddedPostgres, sql: str) -> None:
    mark = pg.log_position()
    got = run_psql(live, sql)
    assert got.sqlstate == "42501", got.error
    got.clear()
    assert "FORMAT binary" not in pg.log_since(mark)
    with psycopg.connect(live.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.cursor().copy(sql) as cp:
                for _ in cp:
                    pass


def test_text_copy_with_a_custom_null_string_is_refused(live: ProxyHandle, pg: EmbeddedPostgres) -> None:
    """Text COPY does not escape a value equal to the NULL string: `NULL '123-45-6789'` would let
    row 1's SSN through as "NULL" and so confirm the guess. CSV quotes such a value: allowed."""
    guess = "COPY (SELECT id, ssn FROM customers ORDER BY id) TO STDOUT (NULL '123-45-6789')"
    mark = pg.log_position()
    got = run_psql(live, guess)
    assert got.sqlstate == "42501" and "NULL" in got.error, got.error
    assert not got.rows and "TO STDOUT" not in pg.log_since(mark)
    got = run_psql(live, "COPY (SELECT id, ssn FROM customers ORDER BY id) TO STDOUT (FORMAT csv, NULL '123-45-6789')")
    assert not got.error, got.error
    assert got.rows[0] == ('1,"[redacted]"',)


# -- prepared statements and cursors ---------------------------------------------------------------
def test_sql_level_cursors_declare_and_fetch(live: ProxyHandle) -> None:
    got = run_psql(
        live,
        "BEGIN; DECLARE c1 CURSOR FOR SELECT id, email, ssn FROM customers ORDER BY id; "
        "FETCH 2 FROM c1; FETCH ALL FROM c1; CLOSE c1; COMMIT",
        "DECLARE h CURSOR WITH HOLD FOR SELECT c, card_number, name FROM customers c ORDER BY id",
        "FETCH NEXT FROM h",
        "MOVE FORWARD 1 IN h",
        "FETCH ALL FROM h",
        "CLOSE h",
    )
    assert not got.error, got.error
    got.clear()
    assert [r[0] for r in got.rows[:5]] == ["1", "2", "3", "4", "5"]
    assert got.rows[0][1:] == ("a***@example.com", "[redacted]")
    assert [r[2] for r in got.rows[5:]] == [n for i, n in enumerate(seeded_names()) if i != 1]


def test_a_refused_redeclaration_does_not_unmask_the_cursor_it_left_in_place(pg: EmbeddedPostgres,
                                                                            proxy_thread: ProxyThread,
                                                                            notes_table: None) -> None:
    """`DECLARE c` again fails on the server (the name exists), so `c` still reads SSNs; the proxy must
    not believe the second declaration. Without detectors, so lineage alone must hold."""
    h = start(pg, proxy_thread, detectors=False)
    try:
        got = run_psql(h, "BEGIN; DECLARE c CURSOR FOR SELECT ssn, name FROM customers ORDER BY id; SAVEPOINT s",
                       "DECLARE c CURSOR FOR SELECT name, name FROM customers",
                       "ROLLBACK TO s; FETCH ALL FROM c; COMMIT", extra=("-v", "ON_ERROR_STOP=0"))
        assert "already exists" in got.error
        got.clear()
        assert got.rows == [("[redacted]", n) for n in seeded_names()]
        got = run_psql(h, "PREPARE q AS SELECT email FROM customers", "PREPARE q AS SELECT name FROM customers",
                       "EXECUTE q", extra=("-v", "ON_ERROR_STOP=0"))
        got.clear()
        assert len(got.rows) == 5
    finally:
        h.stop()


TOKENS_TABLE = "public.masking_live_tokens"
TOKEN = "'tok_ABCDEFGHIJKL'"


@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_custom_detector_with_a_backreference_masks_what_it_finds(pg: EmbeddedPostgres, proxy_thread: ProxyThread,
                                                                    client: str) -> None:
    """A custom regex that refers to its own group (`\\1`), after a detector with groups of its own.
    Inside the combined row prefilter `\\1` named the other detector's group, the branch never
    matched, and the row was relayed as it came: the token reached the agent."""
    with superuser(pg, "shop") as c:
        c.execute(f"DROP TABLE IF EXISTS {TOKENS_TABLE}")
        c.execute(f"CREATE TABLE {TOKENS_TABLE} (id int PRIMARY KEY, body text)")
        c.execute(f"INSERT INTO {TOKENS_TABLE} VALUES (1, %s), (2, 'no token here')", (f"key {TOKEN} here",))
        c.execute(f"GRANT SELECT ON {TOKENS_TABLE} TO shop_reader")
    docs = live_documents()
    docs[1]["spec"]["detectors"] = ["email", {"name": "api_key", "regex": "(sk|pk)_live_[A-Za-z0-9]{16}"},
                                    {"name": "quoted_token", "regex": "(['\"])tok_[A-Za-z0-9]{12}\\1"}]
    docs[0]["spec"]["rules"][0]["tables"].append(TOKENS_TABLE)
    users = [{"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}]
    text = proxy_documents(pg, extra=docs, proxy_spec={"users": users})
    h = ProxyHandle(running=proxy_thread.call(start_proxy(parse_documents(text))), runner=proxy_thread, pg=pg)
    try:
        got = CLIENTS[client](h, f"SELECT id, body FROM {TOKENS_TABLE} ORDER BY id")
        assert not got.error, got.error
        assert got.rows == [("1", "key [redacted:quoted_token] here"), ("2", "no token here")]
        assert b"tok_ABCDEFGHIJKL" not in got.wire and "tok_ABCDEFGHIJKL" not in got.shown
    finally:
        h.stop()


def test_binary_cursor_rows_are_masked(live: ProxyHandle) -> None:
    got = run_psql(live, "BEGIN; DECLARE b BINARY CURSOR FOR SELECT id, email, ssn, phone FROM customers; "
                         "FETCH ALL FROM b; COMMIT")
    assert not got.error, got.error
    got.clear()


def test_sql_level_prepare_and_execute(live: ProxyHandle) -> None:
    got = run_psql(
        live,
        "PREPARE p1(int) AS SELECT id, email, ssn, upper(card_number) FROM customers WHERE id > $1 ORDER BY id",
        "EXECUTE p1(0)",
        "PREPARE p2 AS SELECT row_to_json(c) FROM customers c; EXECUTE p2; DEALLOCATE p2",
    )
    assert not got.error, got.error
    got.clear()
    assert got.rows[0] == ("1", "a***@example.com", "[redacted]", "[redacted]")


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_prepared_and_server_side_cursors(live: ProxyHandle, binary: bool) -> None:
    tap = WireTap(live.host, live.port)
    seen: list[Any] = []
    try:
        with psycopg.connect(live.dsn(port=tap.port)) as conn:
            for _ in range(3):  # the third run executes a named server-side prepared statement
                seen += conn.cursor(binary=binary).execute(
                    "SELECT id, email, ssn, card_number FROM customers WHERE id > %s", (0,), prepare=True).fetchall()
            with conn.cursor(name="srv", binary=binary) as cur:  # DECLARE … CURSOR + FETCH
                cur.execute("SELECT id, email, to_jsonb(c) FROM customers c ORDER BY id")
                seen += cur.fetchmany(2) + cur.fetchall()
        wire = tap.received()
    finally:
        tap.close()
    assert not leaks(wire) and not leaks(repr(seen)), leaks(repr(seen))
    assert [r[0] for r in seen[-5:]] == [1, 2, 3, 4, 5]


def test_asyncpg_prepared_statements_and_portal_cursors(live: ProxyHandle) -> None:
    tap = WireTap(live.host, live.port)

    async def go() -> list[Any]:
        conn = await asyncpg.connect(host=live.host, port=tap.port, user=AGENT_USER, password=AGENT_PASSWORD,
                                     database=live.dbname, ssl=False)
        try:
            out: list[Any] = []
            stmt = await conn.prepare("SELECT id, email, ssn, phone FROM customers WHERE id >= $1 ORDER BY id")
            out += await stmt.fetch(1)
            out.append(await stmt.fetchrow(2))
            async with conn.transaction():
                cur = await conn.cursor("SELECT id, c, card_number FROM customers c ORDER BY id")
                out += await cur.fetch(2)
                out += await cur.fetch(10)
                out += [r async for r in conn.cursor("SELECT email, row_to_json(c) FROM customers c", prefetch=2)]
            return out
        finally:
            await conn.close()

    try:
        rows = asyncio.run(go())
        wire = tap.received()
    finally:
        tap.close()
    assert not leaks(wire) and not leaks(repr(rows)), leaks(repr(rows))
    assert rows[0]["email"] == "a***@example.com" and rows[0]["ssn"] == "[redacted]"
    assert [r["id"] for r in rows[6:11]] == [1, 2, 3, 4, 5]


# -- error and notice text ----------------------------------------------------------------------
FAILING = {
    "cast-to-int": ("SELECT ssn::int FROM customers", "22P02"),
    "cast-out-of-range": ("SELECT card_number::int FROM customers", "22003"),
    "cast-derived": ("SELECT ('x' || email)::int FROM customers", "22P02"),
    "cast-to-date": ("SELECT ssn::date FROM customers", "22"),
    "cast-to-json": ("SELECT email::json FROM customers", "22P02"),
    "cast-to-uuid": ("SELECT phone::uuid FROM customers WHERE id = 1", "22P02"),
    "cast-whole-row": ("SELECT c::text::int FROM customers c", "22P02"),
    "cast-aggregate": ("SELECT string_agg(ssn, ',')::numeric FROM customers", "22P02"),
    "regclass": ("SELECT email::regclass FROM customers", "3F000"),
    "regtype": ("SELECT ssn::regtype FROM customers", "42"),
    "view-cast": ("SELECT email::int FROM customer_contacts", "22P02"),
    "cte-cast": ("WITH x AS (SELECT card_number AS n FROM customers) SELECT n::smallint FROM x", "22003"),
    "not-null-failing-row": ("UPDATE customers SET name = NULL WHERE id = 1", "23502"),
}


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("case", list(FAILING))
def test_error_text_never_prints_a_secret(live: ProxyHandle, case: str, client: str) -> None:
    sql, state = FAILING[case]
    got = CLIENTS[client](live, sql)
    assert got.error, "the statement fails on the server"
    assert got.sqlstate.startswith(state), got.error
    got.clear()


@pytest.mark.parametrize("client", list(CLIENTS))
def test_unique_violation_detail_hides_the_existing_key(live: ProxyHandle, pg: EmbeddedPostgres, client: str) -> None:
    """The agent guesses an email; the server's DETAIL would confirm it with `Key (email)=(…)`."""
    sql = ("INSERT INTO customers (name, email, ssn, card_number) "
           "VALUES ('Dup', 'grace@example.org', '000-00-0000', '0')")
    got = CLIENTS[client](live, sql)
    assert got.sqlstate == "23505", got.error
    assert "customers_email_key" in got.error
    detail = [f for k, f in _error_fields(got.wire) if f.get("C") == "23505"]
    assert detail and all(not leaks(f.get("D", "") + f.get("M", "")) for f in detail), detail
    assert not leaks(got.error)
    assert direct(pg, "SELECT count(*) FROM customers WHERE name = 'Dup'") == [("0",)]


# -- writes that would move a masked value -----------------------------------------------------------
MOVES = {
    "insert-select": "INSERT INTO audit_scratch(payload) SELECT email FROM customers",
    "insert-select-derived": "INSERT INTO audit_scratch(payload) SELECT upper(ssn) || card_number FROM customers",
    "insert-values-subquery": "INSERT INTO audit_scratch(payload) VALUES ((SELECT ssn FROM customers WHERE id = 1))",
    "insert-from-cte": "WITH x AS (SELECT phone FROM customers) INSERT INTO audit_scratch(payload) SELECT phone FROM x",
    "insert-whole-row": "INSERT INTO audit_scratch(payload) SELECT c::text FROM customers c",
    "update-set-ssn": "UPDATE customers SET notes = ssn",
    "update-set-derived": "UPDATE customers SET notes = 'card ' || card_number WHERE id = 2",
    "update-from": "UPDATE audit_scratch a SET payload = c.email FROM customers c WHERE a.id = c.id",
    "insert-customers-copy": "INSERT INTO customers (name, email, ssn, card_number) "
                             "SELECT name, 'x' || email, ssn, card_number FROM customers",
}


@pytest.mark.parametrize("move", list(MOVES))
def test_writes_that_move_masked_values_are_denied_and_never_run(live: ProxyHandle, pg: EmbeddedPostgres,
                                                                  move: str) -> None:
    sql = MOVES[move]
    before = direct(pg, "SELECT count(*), max(id) FROM audit_scratch"), direct(pg, "SELECT id, notes FROM customers ORDER BY id")
    for client in ("psql", "psycopg-text"):
        mark = pg.log_position()
        got = CLIENTS[client](live, sql)
        assert got.sqlstate == "42501", got.error
        assert "mask" in got.error
        log = pg.log_since(mark)
        assert sql not in log and "audit_scratch" not in log and "SET notes" not in log, log
    after = direct(pg, "SELECT count(*), max(id) FROM audit_scratch"), direct(pg, "SELECT id, notes FROM customers ORDER BY id")
    assert after == before


def test_returning_a_masked_column_is_masked(live: ProxyHandle) -> None:
    for client in CLIENTS:
        got = CLIENTS[client](live, "UPDATE customers SET name = name WHERE id = 1 RETURNING id, name, email, ssn")
        assert not got.error, got.error
        got.clear()
        assert got.rows == [("1", "Ada Lovelace", "a***@example.com", "[redacted]")]


# -- allowInPredicates: false (the default) ----------------------------------------------------------
ORACLES = {
    "where-like": "SELECT id FROM customers WHERE ssn LIKE '1%'",
    "where-derived": "SELECT id FROM customers WHERE length(email) > 14",
    "order-by": "SELECT id FROM customers ORDER BY email",
    "join-on": "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id AND c.card_number LIKE '4%'",
    "group-by": "SELECT count(*) FROM customers GROUP BY phone",
    "case-when": "SELECT id, CASE WHEN ssn LIKE '1%' THEN 1 ELSE 0 END FROM customers",
    "in-subquery": "SELECT id FROM customers WHERE id IN (SELECT id FROM customers WHERE email LIKE 'a%')",
    "view-where": "SELECT id FROM customer_contacts WHERE email LIKE 'a%'",
    "cte-where": "WITH x AS (SELECT id, ssn FROM customers) SELECT id FROM x WHERE ssn > '2'",
    "having": "SELECT name FROM customers GROUP BY name HAVING max(ssn) > '3'",
    "aggregate-order-by": "SELECT mode() WITHIN GROUP (ORDER BY email) FROM customers",
    # duplicate elimination and set-returning functions decide rows by the values too
    "intersect-except": "(SELECT card_number FROM customers INTERSECT SELECT card_number FROM customers) "
                        "EXCEPT SELECT name FROM customers",
    "union": "SELECT name FROM customers UNION SELECT ssn FROM customers",
    "jsonb_each": "SELECT u.* FROM customers c, LATERAL jsonb_each_text(to_jsonb(c)) u",
    "json-path-rows": "SELECT jsonb_path_query(to_jsonb(c), '$.ssn') FROM customers c",
    "unnest": "SELECT unnest(ARRAY[card_number, phone]) FROM customers",
}


@pytest.mark.parametrize("oracle", list(ORACLES))
def test_masked_columns_in_predicates_are_denied_by_default(live: ProxyHandle, pg: EmbeddedPostgres,
                                                             oracle: str) -> None:
    sql = ORACLES[oracle]
    for client in CLIENTS:
        mark = pg.log_position()
        got = CLIENTS[client](live, sql)
        assert got.sqlstate == "42501", (client, got.error)
        assert not got.rows
        assert sql not in pg.log_since(mark)


# -- exemptSubjects -------------------------------------------------------------------------------
def test_exempt_subjects_see_clear_values(live: ProxyHandle) -> None:
    """Also the positive control: the same instruments do find the secrets when they are there."""
    sql = "SELECT id, email, ssn, card_number, upper(email), row_to_json(c) FROM customers c WHERE ssn LIKE '1%'"
    got = run_psql(live, sql, user=OFFICER_USER, password=OFFICER_PASSWORD)
    assert not got.error, got.error
    assert got.rows[0][:4] == ("1", "ada@example.com", "123-45-6789", "4111111111111111")
    assert leaks(got.wire) and leaks(got.shown)
    got = run_psycopg(live, sql, binary=True, user=OFFICER_USER, password=OFFICER_PASSWORD)
    assert got.rows[0][:3] == ("1", "ada@example.com", "123-45-6789") and leaks(got.wire)
    got = run_asyncpg(live, sql, user=OFFICER_USER, password=OFFICER_PASSWORD)
    assert got.rows[0][:3] == ("1", "ada@example.com", "123-45-6789") and leaks(got.wire)
    notes = run_psql(live, f"SELECT body FROM {NOTES_TABLE} WHERE id = 2", user=OFFICER_USER,
                     password=OFFICER_PASSWORD)
    assert notes.rows == [("SSN 456-78-9012 on file",)]


# -- the rule without an AccessPolicy ----------------------------------------------------------------
def test_masking_applies_without_an_access_policy(make_proxy: Callable[..., ProxyHandle]) -> None:
    """defaultAction allow and no AccessPolicy (development): the MaskingRule still masks."""
    h = make_proxy(extra=live_documents()[1:])
    for client in CLIENTS:
        got = CLIENTS[client](h, SHAPES["star"])
        assert not got.error, got.error
        got.clear()
        assert [r[1] for r in got.rows] == seeded_names()
    got = run_psql(h, "SELECT ssn::int FROM customers")
    assert got.sqlstate == "22P02"
    got.clear()
    assert run_psql(h, MOVES["insert-select"]).sqlstate == "42501"


# -- derived: deny ---------------------------------------------------------------------------------
def test_derived_deny_refuses_expressions_and_still_masks_direct_columns(pg: EmbeddedPostgres,
                                                                          proxy_thread: ProxyThread,
                                                                          notes_table: None) -> None:
    h = start(pg, proxy_thread, derived="deny")
    try:
        for sql in (SHAPES["functions"], SHAPES["string_agg"], SHAPES["casts"], SHAPES["json_build"]):
            got = run_psql(h, sql)
            assert got.sqlstate == "42501", (sql, got.error)
            got.clear()
        got = run_asyncpg(h, SHAPES["cte"])
        assert not got.error, got.error
        got.clear()
    finally:
        h.stop()


# -- recordings and replay ---------------------------------------------------------------------------
def test_recorded_sessions_and_replay_never_contain_a_secret(pg: EmbeddedPostgres, proxy_thread: ProxyThread,
                                                              notes_table: None, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Recordings hold rows and errors as the agent saw them: masked. So does `pgwarden replay`."""
    recordings = tmp_path / "recordings"
    h = start(pg, proxy_thread, spec={"audit": {"path": str(tmp_path / "audit.jsonl")},
                                      "recording": {"dir": str(recordings)}})
    try:
        for name in ("columns", "star", "functions", "row_to_json", "notes-column", "free-text-table", "view"):
            for client in CLIENTS:
                CLIENTS[client](h, SHAPES[name]).clear()
        for client in CLIENTS:
            CLIENTS[client](h, FAILING["cast-to-int"][0]).clear()
            CLIENTS[client](h, FAILING["not-null-failing-row"][0]).clear()
        run_psql(h, COPIES["table-csv"]).clear()
        run_psql(h, "BEGIN; DECLARE c CURSOR FOR SELECT * FROM customers; FETCH ALL FROM c; COMMIT").clear()
    finally:
        h.stop()
    files = sorted(recordings.glob("*.jsonl"))
    assert len(files) == 4 * 9 + 2
    blob = b"".join(f.read_bytes() for f in files)
    assert b"a***@example.com" in blob, "the recordings hold the rows as the agent saw them"
    assert b"invalid input syntax for type integer" in blob and b"Failing row contains" in blob, \
        "the recordings hold the errors as the agent saw them"
    assert not leaks(blob), leaks(blob)
    audit = (tmp_path / "audit.jsonl").read_bytes()
    assert b"22P02" in audit and b"23502" in audit, "the audit log has the failed statements' outcomes"
    assert not leaks(audit), leaks(audit)
    for f in files:
        for extra in ([], ["--json"]):
            assert main(["replay", *extra, str(f)]) == 0
            shown = capsys.readouterr()
            assert shown.out and not leaks(shown.out + shown.err), (f.name, leaks(shown.out))
    r = subprocess.run(["pgwarden", "replay", str(files[0])] if shutil.which("pgwarden") else
                       [sys.executable, "-m", "pgwarden.cli", "replay", str(files[0])],
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout, r.stderr
    assert not leaks(r.stdout + r.stderr)
