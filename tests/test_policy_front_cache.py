"""The lexical front of the constant-blind cache: a plain text that differs from an analysed one
only in its integer constants is decided without the parser, and only when no integer there
shapes the statement. Every answer it gives is held to a fresh analysis of the same text."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest
from pglast.parser import ParseError, parse_sql_json
from test_policy_corpus import CORPUS
from test_policy_helpers import agent

from pgwarden import compiled
from pgwarden.policy import SessionState, front
from pgwarden.policy import analysis as an

PATH = ("public",)

# integers the grammar keeps outside a literal, or whose value picks a type or makes an error
SHAPING = [
    "FETCH 5 FROM c",
    "MOVE 3 IN c",
    "FETCH FORWARD 2 FROM c",
    "SELECT 1::float(10)",
    "SELECT 1::float(30)",
    "SELECT ARRAY[1]::int[5]",
    "CREATE SEQUENCE s INCREMENT 5",
    "CREATE TABLE t (a int) WITH (fillfactor = 70)",
    "ALTER TABLE orders ALTER COLUMN id SET STATISTICS 100",
    "CREATE TABLE p1 PARTITION OF p FOR VALUES WITH (MODULUS 4, REMAINDER 1)",
    "VACUUM (PARALLEL 2) orders",
    "ALTER ROLE agent CONNECTION LIMIT 3",
]
# integers that are only literal values
PLAIN = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
    "SELECT * FROM orders WHERE id = 7 LIMIT 5 OFFSET 10",
    "SELECT * FROM orders ORDER BY 1",
    "SELECT 1e-5, 2e+7",
    "SELECT pg_sleep(5)",
    "SET statement_timeout = 5000",
    "SELECT a[1:2] FROM orders",
    "SELECT * FROM generate_series(1, 10)",
    "EXECUTE p(5)",
    "SELECT x::numeric(10,2), y::varchar(20), z::timestamp(3) FROM orders",
    "UPDATE orders SET total_cents = total_cents - 5 WHERE id = -3",
    "SELECT * FROM orders WHERE id IN (1, 2, 3) AND total_cents BETWEEN 10 AND 20",
    "SELECT * FROM orders WHERE id = ANY (ARRAY[1, 2]) AND customer_id NOT IN (5, 6)",
]


def fresh(sql: str) -> an.Analysis:
    """The analysis with no cache at all: parse, walk."""
    try:
        tree = json.loads(parse_sql_json(sql))
    except ParseError as e:
        return an.Analysis(error=str(e))
    return an.Analysis(statements=tuple(an.analyze_statement(raw.get("stmt", {}), PATH)
                                        for raw in tree.get("stmts", ())))


def variants(sql: str) -> list[str]:
    """`sql` with its integer runs replaced: all by one value, and each by a different one."""
    out = [front.INTEGER_RUN.sub(v, sql) for v in ("0", "2", "7", "24", "25", "53", "54", "999999999")]
    counter = itertools.count(3)
    out.append(front.INTEGER_RUN.sub(lambda _: str(next(counter)), sql))
    return [v for v in out if v != sql]


def same(got: an.Analysis, want: an.Analysis) -> bool:
    return (got.error is None) == (want.error is None) and got.statements == want.statements


def in_domain(sql: str) -> bool:
    return an.front_key(sql) not in (None, sql)


CASES = [row[0] for row in CORPUS if in_domain(row[0])] + SHAPING + PLAIN


@pytest.mark.parametrize("sql", CASES)
def test_a_text_differing_only_in_integers_gets_what_a_fresh_analysis_says(sql: str) -> None:
    an.analyze(sql, PATH)  # files the shape when it may be
    for v in variants(sql):
        assert same(an.analyze(v, PATH), fresh(v)), v


@pytest.mark.parametrize("sql", SHAPING)
def test_an_integer_that_shapes_the_statement_is_never_blanked(sql: str) -> None:
    an.analyze(sql, PATH)
    assert an._FRONT_CACHE.get((an.front_key(sql), PATH, 0)) in (None, False)


def test_an_in_list_with_longer_numbers_shares_the_analysis() -> None:
    """PostgreSQL 18 records where an IN list and an ARRAY[...] begin and end: positions, blanked."""
    a = an.analyze("SELECT * FROM orders WHERE id IN (1, 2) AND customer_id = ANY (ARRAY[3, 4])", PATH)
    b = an.analyze("SELECT * FROM orders WHERE id IN (100, 2000) AND customer_id = ANY (ARRAY[30000, 4])", PATH)
    assert a is b


def test_a_new_number_needs_no_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    first = an.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", PATH)

    def no_parser(_: str) -> str:
        raise AssertionError("parsed")

    monkeypatch.setattr(an, "parse_sql_json", no_parser)
    assert an.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 777;", PATH) is first
    assert an.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", PATH) is first


@pytest.mark.parametrize(
    ("warm", "attack"),
    [
        # digits in a name are part of the name
        ("SELECT * FROM orders WHERE id = 1", "SELECT * FROM orders1 WHERE id = 1"),
        # a non-ASCII name, a quoted name, a comment, a dollar quote, a string: outside the domain
        ("SELECT * FROM orders WHERE id = 1", "SELECT * FROM ordersé1 WHERE id = 1"),
        ("SELECT * FROM orders WHERE id = 1", 'SELECT * FROM "customers" WHERE id = 1'),
        ("SELECT * FROM orders WHERE id = 1", "SELECT * FROM orders WHERE id = 1 /* 2 */; SELECT * FROM customers"),
        ("SELECT * FROM orders WHERE id = 1", "SELECT * FROM orders WHERE id = $$1$$; SELECT * FROM customers"),
        # a NUL in the text never stands in for a blanked number
        ("SELECT * FROM orders WHERE id = 1", "SELECT * FROM orders WHERE id = \x00"),
    ],
)
def test_a_text_outside_the_domain_is_analysed_on_its_own(warm: str, attack: str) -> None:
    an.analyze(warm, PATH)
    assert same(an.analyze(attack, PATH), fresh(attack) if "\x00" not in attack else an.Analysis(error="NUL"))


def test_a_float_precision_past_the_limit_is_refused_after_a_valid_one() -> None:
    """float(p) picks float4 or float8 by p, and refuses p > 53: the shape is never shared."""
    decide: Callable[[str], str] = lambda sql: agent().decide(sql, SessionState()).action  # noqa: E731
    assert decide("SELECT 1::float(10)") == "allow"
    refused = agent().decide("SELECT 1::float(99)", SessionState())
    assert refused.action == "deny" and "does not parse" in " ".join(refused.reasons)


def test_the_integer_runs_blanked_are_those_the_plain_pattern_finds() -> None:
    """The front's pattern starts at a digit (fast) and looks back from there; it blanks exactly
    the runs of the pattern written plainly: 1-9 digits, no name character or dot either side."""
    import random
    import re

    plain = re.compile(r"(?<![A-Za-z0-9_.])[0-9]{1,9}(?![A-Za-z0-9_.])")
    edges = ["7", "t1", "1t", "x_1", "1.5", ".5", "5.", "1e5", "123456789", "1234567890", "a 12 b", "(3)",
             "9,8", "=42;", "-1", "+1", "_9", "9_", "12345678901 2", "0x1F"]
    rng = random.Random(14)
    alphabet = "0123456789" * 3 + "abzAEZ_. ,()=+-*<>;\n\t"
    texts = edges + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(20000)]
    for text in texts:
        assert front.INTEGER_RUN.sub("\x00", text) == plain.sub("\x00", text), text
        # the scanner the compiled front uses finds exactly the pattern's runs
        runs = front.integer_runs(text)
        assert runs == [i for m in plain.finditer(text) for i in m.span()], text
        assert front.split_runs_at(text, runs) == plain.split(text), text
    assert front.COMPILED == compiled.is_compiled(front)  # the compiled build scans; run as Python, the pattern


@pytest.mark.parametrize("sql", CASES)
def test_the_gates_compiled_lookup_answers_as_the_analysis_does(sql: str) -> None:
    """The proxy's gate asks `front.filed` first (compiled, no parse) and `analyze` only when it
    has no answer: whatever it answers for a variant is what a fresh analysis of that variant says,
    and a shape an integer shapes is never answered there."""
    from pgwarden.policy.front import filed

    an.analyze(sql, PATH)
    answered = 0
    for v in variants(sql):
        known = filed(v, PATH, 0)
        if sql in SHAPING:
            assert known is None, v
        elif known is not None:
            answered += 1
            assert known is an.analyze(v, PATH) and same(known, fresh(v)), v
    if sql in PLAIN and not sql.startswith("SET "):  # a SET's value is read by the decision: never blind
        assert answered == len(list(variants(sql))), sql  # only literal integers: answered without the parser


def test_the_compiled_lookup_leaves_what_it_does_not_know_to_the_analysis() -> None:
    from pgwarden.policy.front import MAX_FRONT_TEXT, filed

    an.analyze("SELECT total_cents FROM orders WHERE id = 41", PATH)
    assert filed("SELECT total_cents FROM orders WHERE id = 42", PATH, 0) is not None
    assert filed("SELECT total_cents FROM orders WHERE id = 42", ("other",), 0) is None  # another search_path
    assert filed("SELECT total_cents FROM orders WHERE id = 42", PATH, 17) is None  # another server version
    assert filed("SELECT total_cents FROM orders WHERE id = '42'", PATH, 0) is None  # a quote: outside the domain
    assert filed("SELECT total_cents FROM orders WHERE id = 42 -- x", PATH, 0) is None  # a comment
    long = "SELECT total_cents FROM orders WHERE id = 42" + " " * MAX_FRONT_TEXT
    an.analyze(long, PATH)
    assert filed(long, PATH, 0) is None  # too long to be cached at all
