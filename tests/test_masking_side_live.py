"""Side channels through the live proxy: an attacker who may not read `customers.ssn` tries to
learn it anyway — from how many rows come back, which rows two relations share, whether a value
is NULL, or what an error message echoes.

For each channel the test plays the attacker's binary search for the SSN of customer 1 (the
shop seed's `123-45-6789`) and asserts that it fails: every question is refused (42501, naming
the masked column, and nothing reaches the server's statement log) or every answer is the same
whatever the guess. The secret never appears in any byte the client received. The MaskingRule is
the demo's without its detectors, so the rule alone must hold; `allowInPredicates` is off.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from fix_proxy import AGENT_PASSWORD, AGENT_USER, ProxyHandle, ProxyThread, proxy_documents
from masking_live_helpers import OFFICER_PASSWORD, OFFICER_USER, leaks, live_documents, officer_user
from proxy_helpers import superuser
from rawpg import RawConn, data_row, error_fields, msg
from test_masking_live import CLIENTS, Received, run_psql

from pgwarden.embedded import EmbeddedPostgres
from pgwarden.proxy.main import start_proxy
from pgwarden.resources import parse_documents

SECRET = "123-45-6789"  # customers.id = 1 in pgwarden/demo/shop.sql
# the secret in the other shapes an echo could take: digits only, the parser's fragments
FRAGMENTS = (SECRET, "123456789", "123-45", "-45-", "45-6789", "<123")
GUESSES = "public.ssn_guesses"


@pytest.fixture(scope="module")
def guesses(pg: EmbeddedPostgres) -> None:
    """A table of candidate SSNs the attacker may read freely, the right one among them."""
    with superuser(pg, "shop") as c:
        c.execute(f"DROP TABLE IF EXISTS {GUESSES}")
        c.execute(f"CREATE TABLE {GUESSES} (ssn text)")
        c.execute(
            f"INSERT INTO {GUESSES} SELECT format('%s-45-6789', 100 + g) FROM generate_series(0, 899) g"
        )
        c.execute(f"GRANT SELECT ON {GUESSES} TO shop_reader")


def start(pg: EmbeddedPostgres, runner: ProxyThread, *, allow_in_predicates: bool = False) -> ProxyHandle:
    docs = live_documents()
    docs[1]["spec"]["detectors"] = []  # the rule alone must hold
    docs[1]["spec"]["allowInPredicates"] = allow_in_predicates
    docs[0]["spec"]["rules"][0]["tables"].append(GUESSES)
    users = [{"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}, officer_user()]
    text = proxy_documents(pg, extra=docs, proxy_spec={"users": users})
    return ProxyHandle(running=runner.call(start_proxy(parse_documents(text))), runner=runner, pg=pg)


@pytest.fixture(scope="module")
def live(pg: EmbeddedPostgres, proxy_thread: ProxyThread, guesses: None) -> Iterator[ProxyHandle]:
    handle = start(pg, proxy_thread)
    yield handle
    handle.stop()


def no_secret(data: bytes | str) -> None:
    blob = (data.encode() if isinstance(data, str) else bytes(data)).lower()
    assert not leaks(blob), leaks(blob)
    for f in FRAGMENTS:
        assert f.encode() not in blob, f"{f!r} reached the client"


# -- the attacker ------------------------------------------------------------------------------------
@dataclass
class Channel:
    """A question whose honest answer tells whether the secret sorts before the guess `{g}`."""

    sql: str
    below: Callable[[list[tuple[str | None, ...]]], bool]  # the attacker's reading of the rows


def count_is(n: int) -> Callable[[list[tuple[str | None, ...]]], bool]:
    return lambda rows: bool(rows) and rows[0][0] == str(n)


def any_rows(rows: list[tuple[str | None, ...]]) -> bool:
    return bool(rows)


S1 = "(SELECT ssn FROM customers WHERE id = 1)"
CHANNELS: dict[str, Channel] = {
    "join-using": Channel(
        "SELECT count(*) FROM customers c JOIN (SELECT ssn FROM ssn_guesses "
        "WHERE ssn < '{g}') g USING (ssn) WHERE c.id = 1",
        count_is(1),
    ),
    "natural-join": Channel(
        "SELECT count(*) FROM (SELECT id, ssn FROM customers WHERE id = 1) c NATURAL JOIN "
        "(SELECT 1 AS id, ssn FROM ssn_guesses WHERE ssn < '{g}') g",
        count_is(1),
    ),
    "intersect": Channel(
        f"SELECT count(*) FROM ({S1} INTERSECT SELECT ssn FROM ssn_guesses WHERE ssn < '{{g}}') x",
        count_is(1),
    ),
    "except": Channel(
        f"SELECT count(*) FROM ({S1} EXCEPT SELECT ssn FROM ssn_guesses WHERE ssn < '{{g}}') x", count_is(0)
    ),
    "union": Channel(
        f"SELECT count(*) = (SELECT count(*) FROM ssn_guesses WHERE ssn < '{{g}}') FROM "
        f"({S1} UNION SELECT ssn FROM ssn_guesses WHERE ssn < '{{g}}') x",
        lambda rows: bool(rows) and rows[0][0] == "t",
    ),
    "group-by": Channel(
        f"SELECT count(*) FROM (SELECT ssn < '{{g}}' AS b FROM {S1} s UNION ALL SELECT true) t GROUP BY b",
        lambda rows: len(rows) == 1,
    ),
    "distinct": Channel(
        f"SELECT count(*) FROM (SELECT DISTINCT ssn < '{{g}}' FROM ({S1} UNION ALL SELECT '0') s) d",
        count_is(1),
    ),
    "generate-series-from": Channel(
        "SELECT count(*) FROM customers c, generate_series(1, ascii('{g}') - ascii(c.ssn)) s WHERE c.id = 1",
        lambda rows: bool(rows) and rows[0][0] != "0",
    ),
    "generate-series-select": Channel(
        "SELECT generate_series(1, ascii('{g}') - ascii(ssn)) FROM customers WHERE id = 1", any_rows
    ),
    "regexp-matches": Channel(
        "SELECT regexp_matches(ssn, '^[0-' || chr(ascii('{g}') - 1) || ']') FROM customers WHERE id = 1",
        any_rows,
    ),
    "exists": Channel(
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM customers WHERE id = 1 AND ssn < '{g}')", any_rows
    ),
    "in-subquery": Channel(
        "SELECT count(*) FROM customers WHERE id = 1 AND ssn IN "
        "(SELECT ssn FROM ssn_guesses WHERE ssn < '{g}')",
        count_is(1),
    ),
    "scalar-subquery": Channel(
        "SELECT (SELECT count(*) FROM customers WHERE id = 1 AND ssn < '{g}')", count_is(1)
    ),
    "filter": Channel("SELECT count(*) FILTER (WHERE ssn < '{g}') FROM customers WHERE id = 1", count_is(1)),
    "window-partition": Channel(
        f"SELECT count(*) OVER (PARTITION BY s < '{{g}}') FROM (SELECT ssn AS s FROM {S1} x "
        "UNION ALL SELECT '0') t",
        count_is(2),
    ),
    "window-order": Channel(
        f"SELECT n FROM (SELECT n, row_number() OVER (ORDER BY s) AS r FROM (SELECT 'secret' AS n, "
        f"ssn AS s FROM {S1} x UNION ALL SELECT 'guess', '{{g}}') t) u WHERE r = 1",
        lambda rows: rows == [("secret",)],
    ),
    "order-by-limit": Channel(
        f"SELECT n FROM (SELECT 'secret' AS n, ssn AS s FROM {S1} x UNION ALL "
        "SELECT 'guess', '{g}') t ORDER BY s LIMIT 1",
        lambda rows: rows == [("secret",)],
    ),
    "having": Channel("SELECT 1 FROM customers WHERE id = 1 HAVING max(ssn) < '{g}'", any_rows),
    "case-in-where": Channel(
        "SELECT 1 FROM customers WHERE id = 1 AND CASE WHEN ssn < '{g}' THEN true END", any_rows
    ),
    "limit": Channel(
        "SELECT 1 FROM customers LIMIT (SELECT (ssn < '{g}')::int FROM customers WHERE id = 1)", any_rows
    ),
    "array-agg-order": Channel(
        f"SELECT (array_agg(n ORDER BY s))[1] FROM (SELECT 'secret' AS n, ssn AS s FROM {S1} x "
        "UNION ALL SELECT 'guess', '{g}') t",
        lambda rows: rows == [("secret",)],
    ),
    # the NULL-ness of a derived value: allowed (no predicate), so its answer must never vary
    "nullif": Channel(
        "SELECT nullif((ssn < '{g}')::text, 'true') FROM customers WHERE id = 1",
        lambda rows: rows == [(None,)],
    ),
    "substring-null": Channel(
        "SELECT substring(ssn from '^[0-' || chr(ascii('{g}') - 1) || ']') FROM customers WHERE id = 1",
        lambda rows: rows != [(None,)],
    ),
}


def binary_search(
    h: ProxyHandle, pg: EmbeddedPostgres, ch: Channel, **login: str
) -> tuple[str, list[Received], str]:
    """Bisect the first digit of the SSN with the channel's question; returns (the digit the
    attacker concludes, every answer, what reached the server)."""
    lo, hi = 0, 10  # the digit is in [lo, hi)
    answers: list[Received] = []
    mark = pg.log_position()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = run_psql(h, ch.sql.format(g=mid), extra=("-v", "ON_ERROR_STOP=0"), **login)
        answers.append(got)
        if ch.below(got.rows):
            hi = mid
        else:
            lo = mid
    return str(lo), answers, pg.log_since(mark)


@pytest.mark.parametrize("channel", list(CHANNELS))
def test_the_binary_search_for_a_masked_value_fails(
    live: ProxyHandle, pg: EmbeddedPostgres, channel: str
) -> None:
    ch = CHANNELS[channel]
    digit, answers, server_log = binary_search(live, pg, ch)
    assert digit != SECRET[0], f"the attacker recovered the first digit through {channel}"
    refused = [a for a in answers if a.sqlstate]
    if refused:  # a predicate on the masked column: refused before the server saw it
        for a in refused:
            assert a.sqlstate == "42501", a.error
            assert "public.customers.ssn" in a.error and "masked" in a.error, a.error
            assert not a.rows
        assert "ssn" not in server_log.replace("ssn_guesses", ""), server_log
    else:  # allowed: the answer does not depend on the guess
        assert len({tuple(a.rows) for a in answers}) == 1, [a.rows for a in answers]
    assert len(refused) in (0, len(answers))
    for a in answers:
        no_secret(a.wire)


@pytest.mark.parametrize("channel", list(CHANNELS))
def test_each_channel_is_a_real_oracle_for_an_exempt_subject(
    live: ProxyHandle, pg: EmbeddedPostgres, channel: str
) -> None:
    """The control: for a privacy officer (exempt, sees clear values) the same search does recover
    the digit, so each question above is a working oracle and the masking is what stops it."""
    digit, answers, _ = binary_search(
        live, pg, CHANNELS[channel], user=OFFICER_USER, password=OFFICER_PASSWORD
    )
    assert not any(a.sqlstate for a in answers), [a.error for a in answers]
    assert digit == SECRET[0]


def test_the_same_search_works_on_a_clear_column(live: ProxyHandle, pg: EmbeddedPostgres) -> None:
    """The control: on a column no rule masks, the attacker's search does run on real answers."""
    digit, answers, _ = binary_search(
        live,
        pg,
        Channel(
            "SELECT count(*) FROM customers c JOIN (SELECT ssn AS name FROM ssn_guesses WHERE ssn < '{g}' "
            "UNION ALL SELECT 'Ada Lovelace' WHERE '{g}' > '1') g USING (name) WHERE c.id = 1",
            count_is(1),
        ),
    )
    assert not any(a.sqlstate for a in answers), [a.error for a in answers]
    assert digit == "1"


@pytest.mark.parametrize(
    "question",
    [
        "SELECT nullif(left(ssn, 1), '{d}') FROM customers WHERE id = 1",
        "SELECT CASE left(ssn, 1) WHEN '{d}' THEN 'hit' END FROM customers WHERE id = 1",
        "SELECT substring(ssn from '^{d}') FROM customers WHERE id = 1",
        "SELECT to_jsonb(nullif(ssn, '{d}23-45-6789')) FROM customers WHERE id = 1",
        "SELECT max(ssn) FILTER (WHERE id = 1) || nullif(left(ssn, 1), '{d}') FROM customers WHERE id = 1 "
        "GROUP BY ssn, id",
    ],
)
def test_a_linear_search_through_null_ness_gets_the_same_answer_for_every_guess(
    live: ProxyHandle, question: str
) -> None:
    answers = [run_psql(live, question.format(d=d), extra=("-v", "ON_ERROR_STOP=0")) for d in range(10)]
    for a in answers:
        no_secret(a.wire)
    if all(a.sqlstate == "42501" for a in answers):
        return
    assert all(not a.sqlstate for a in answers), [a.error for a in answers]
    assert len({tuple(a.rows) for a in answers}) == 1, [a.rows for a in answers]
    assert answers[0].rows[0][0] is not None


def test_a_masked_column_keeps_its_own_null_ness(live: ProxyHandle) -> None:
    """Documented: whether a customer has a phone number at all stays visible; its value does not."""
    got = run_psql(live, "SELECT id, phone, nullif(phone, 'x') FROM customers ORDER BY id")
    assert [r[1] is None for r in got.rows] == [False, False, False, True, True]
    assert all(r[2] == "[redacted]" for r in got.rows)  # derived: NULL or not, the same answer


# -- error and notice text -------------------------------------------------------------------------
ECHOES = {
    "cast-int": ("SELECT ssn::int FROM customers WHERE id = 1", "22P02"),
    # a server built without libxml (the PyPI wheel's 16 and 18) answers 0A000 before parsing
    "xmlparse-content": ("SELECT xmlparse(content '<' || ssn) FROM customers WHERE id = 1", ("2200N", "0A000")),
    "xmlparse-document": ("SELECT xmlparse(document ssn) FROM customers WHERE id = 1", ("2200M", "0A000")),
    "to-date": ("SELECT to_date(ssn, 'MM-DD-YYYY') FROM customers WHERE id = 1", "22008"),
    "json": ("SELECT ssn::json FROM customers WHERE id = 1", "22P02"),
    "jsonb-derived": ("SELECT ('[' || ssn)::jsonb FROM customers WHERE id = 1", "22P02"),
    "chr": ("SELECT chr(replace(ssn, '-', '')::int) FROM customers WHERE id = 1", "54000"),
    "date": ("SELECT ssn::date FROM customers WHERE id = 1", "22008"),
    "bit": ("SELECT substr(ssn, 2)::bit(3) FROM customers WHERE id = 1", "22P02"),
    "regclass": ("SELECT ssn::regclass FROM customers WHERE id = 1", "42P01"),
    "range": ("SELECT ('[' || ssn)::int4range FROM customers WHERE id = 1", "22P02"),
    "array": ("SELECT ('{' || ssn || '}')::int[] FROM customers WHERE id = 1", "22P02"),
    "in-a-cte": ("WITH x AS (SELECT ssn AS s FROM customers WHERE id = 1) SELECT s::numeric FROM x", "22P02"),
}


def extended(h: ProxyHandle, sql: str) -> tuple[bytes, dict[str, str]]:
    """The raw wire client: Parse / Bind / Describe / Execute / Sync, every byte it received."""
    conn = RawConn.login(h.host, h.port, AGENT_USER, AGENT_PASSWORD, h.dbname)
    tap = bytearray()
    try:
        conn.send(
            msg(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))
            + msg(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
            + msg(b"D", b"P\0")
            + msg(b"E", b"\0" + struct.pack("!i", 0))
            + msg(b"S")
        )
        err: dict[str, str] = {}
        for kind, payload in conn.until_ready():
            tap += kind + payload
            if kind == b"E":
                err = error_fields(payload)
            elif kind == b"D":
                data_row(payload)
    finally:
        conn.close()
    return bytes(tap), err


@pytest.mark.parametrize("case", list(ECHOES))
def test_error_text_keeps_no_value_of_a_masked_column(live: ProxyHandle, case: str) -> None:
    sql, state = ECHOES[case]
    states = state if isinstance(state, tuple) else (state,)
    for client in ("psql", "psycopg-binary", "asyncpg-binary"):
        got = CLIENTS[client](live, sql)
        assert got.sqlstate in states, (client, got.error)
        assert "pgwarden redacted the values" in got.error and "public.customers.ssn" in got.error, got.error
        no_secret(got.wire)
        no_secret(got.error)
    wire, err = extended(live, sql)
    assert err.get("C") in states, err
    assert "pgwarden redacted" in err["M"]
    assert all(err.get(k) in (None, "[redacted]") for k in ("D", "W", "H", "q")), err
    no_secret(wire)


def test_errors_of_predicates_are_masked_when_predicates_are_allowed(
    pg: EmbeddedPostgres, proxy_thread: ProxyThread, guesses: None
) -> None:
    """With allowInPredicates the masked column may sit in WHERE only; the result is clear, and the
    error its cast raises must still be masked (the plan reads the column, if not its result)."""
    h = start(pg, proxy_thread, allow_in_predicates=True)
    try:
        sql = "SELECT count(*) FROM customers WHERE id = 1 AND ssn::int > 0"
        for client in CLIENTS:
            got = CLIENTS[client](h, sql)
            assert got.sqlstate == "22P02", got.error
            assert "pgwarden redacted the values" in got.error
            no_secret(got.wire)
        wire, err = extended(h, "SELECT count(*) FROM customers WHERE id = 1 AND ssn::json IS NOT NULL")
        assert err.get("C") == "22P02" and err.get("W") == "[redacted]", err
        no_secret(wire)
        # the predicates themselves run: allowInPredicates is the administrator's choice
        assert run_psql(h, "SELECT count(*) FROM customers WHERE ssn < '2'").rows == [("1",)]
    finally:
        h.stop()


def test_errors_of_statements_without_masked_columns_keep_their_detail(live: ProxyHandle) -> None:
    """Not redacted in full: DETAIL and CONTEXT stay (the quoted input of a value-printing message
    is still replaced, and detectors, where configured, scrub the text)."""
    got = run_psql(live, "SELECT name::int FROM customers WHERE id = 1")
    assert got.sqlstate == "22P02" and "invalid input syntax for type integer" in got.error
    assert "pgwarden redacted" not in got.error
    got = run_psql(live, "SELECT status::json FROM orders WHERE id = 1")
    assert "JSON data, line 1: new" in got.error, got.error
    assert "pgwarden redacted" not in got.error


# -- COPY ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["'OFF'", "'False'", "0", "false"])
def test_copy_with_header_switched_off_masks_the_first_row(live: ProxyHandle, header: str) -> None:
    got = run_psql(
        live, f"COPY (SELECT id, ssn FROM customers ORDER BY id) TO STDOUT (FORMAT csv, HEADER {header})"
    )
    assert not got.error, got.error
    assert got.rows[0] == ('1,"[redacted]"',)
    no_secret(got.wire)


def test_copy_encoding_is_refused(live: ProxyHandle, pg: EmbeddedPostgres) -> None:
    mark = pg.log_position()
    got = run_psql(live, "COPY customers TO STDOUT (FORMAT csv, ENCODING 'SJIS')")
    assert got.sqlstate == "42501" and "ENCODING" in got.error and "UTF8" in got.error, got.error
    assert "SJIS" not in pg.log_since(mark)
    got = run_psql(
        live, "COPY (SELECT id, ssn FROM customers ORDER BY id) TO STDOUT (FORMAT csv, ENCODING 'utf-8')"
    )
    assert not got.error and got.rows[0] == ('1,"[redacted]"',), got.error


def test_errors_of_prepared_statements_and_cursors_are_redacted_in_full(live: ProxyHandle) -> None:
    """The body runs at EXECUTE / FETCH, not at PREPARE / DECLARE: their errors are masked with it."""
    got = run_psql(
        live,
        "PREPARE p AS SELECT to_date(ssn, 'YYYY-MM-DD') FROM customers WHERE id = 1",
        "EXECUTE p",
        extra=("-v", "ON_ERROR_STOP=0"),
    )
    assert got.sqlstate.startswith("22") and "pgwarden redacted the values" in got.error, got.error
    no_secret(got.wire)
    got = run_psql(
        live,
        "BEGIN; DECLARE c CURSOR FOR SELECT ssn::json FROM customers WHERE id = 1",
        "FETCH 1 FROM c",
        extra=("-v", "ON_ERROR_STOP=0"),
    )
    assert got.sqlstate == "22P02" and "pgwarden redacted the values" in got.error, got.error
    no_secret(got.wire)
