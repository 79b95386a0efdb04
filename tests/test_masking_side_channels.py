"""Side channels, decided by the pure masking engine: row membership and count, NULL-ness, error
text, COPY options, and the ITIN shape. The live attacks are in test_masking_side_live.py."""

import json

import pytest
from masking_helpers import masking, shop_catalog

from pgwarden.masking import Field, build_data_row, parse_data_row
from pgwarden.masking.detectors import DetectorSet, builtin
from pgwarden.masking.lineage import copy_bool, copy_options

CAT = shop_catalog()
SM = masking()
LAX = masking(allow=True)


def plan_of(sql, sm=SM):
    return sm.plan(sql, CAT)


def refused(sql, sm=SM):
    plan = plan_of(sql, sm)
    assert plan.error is not None, f"not refused: {sql}"
    assert plan.error.sqlstate == "42501"
    return plan.error.message


# -- row membership and row count depend on a masked value: a predicate ---------------------------
MEMBERSHIP = {
    "join-using": (
        "SELECT count(*) FROM customers JOIN (VALUES ('123-45-6789')) g(ssn) USING (ssn)",
        "JOIN … USING",
    ),
    "natural-join": ("SELECT count(*) FROM customers NATURAL JOIN (SELECT '1' AS ssn) g", "NATURAL JOIN"),
    "natural-join-spread": ("SELECT count(*) FROM customers NATURAL JOIN unknown_guesses", "NATURAL JOIN"),
    "union": ("SELECT ssn FROM customers UNION SELECT '123-45-6789'", "UNION"),
    "intersect": (
        "SELECT count(*) FROM (SELECT ssn FROM customers INTERSECT SELECT '123-45-6789') x",
        "INTERSECT",
    ),
    "intersect-all": ("SELECT ssn FROM customers INTERSECT ALL SELECT '1'", "INTERSECT ALL"),
    "except": ("SELECT '123-45-6789' EXCEPT SELECT ssn FROM customers", "EXCEPT"),
    "except-whole-row": ("SELECT c FROM customers c EXCEPT SELECT c FROM customers c WHERE id = 1", "EXCEPT"),
    "distinct": ("SELECT count(*) FROM (SELECT DISTINCT substr(ssn, 1, 1) FROM customers) d", "DISTINCT"),
    "distinct-on": ("SELECT DISTINCT ON (ssn) id FROM customers", "DISTINCT ON"),
    "group-by-expr": ("SELECT count(*) FROM customers GROUP BY ssn < '5'", "GROUP BY"),
    "group-by-position": ("SELECT ssn < '5', count(*) FROM customers GROUP BY 1", "GROUP BY"),
    "grouping-sets": ("SELECT count(*) FROM customers GROUP BY GROUPING SETS ((ssn), ())", "GROUP BY"),
    "srf-select-list": (
        "SELECT generate_series(1, ascii(ssn)) FROM customers WHERE id = 1",
        "generate_series",
    ),
    "srf-from": ("SELECT count(*) FROM customers c, generate_series(1, ascii(c.ssn)) g", "generate_series"),
    "srf-lateral": (
        "SELECT count(*) FROM customers c, LATERAL regexp_matches(c.ssn, '^1') m",
        "regexp_matches",
    ),
    "srf-rows-from": (
        "SELECT count(*) FROM customers c, ROWS FROM (string_to_table(c.ssn, '-')) t",
        "string_to_table",
    ),
    "srf-regexp-select": ("SELECT regexp_matches(ssn, '^1') FROM customers", "regexp_matches"),
    "srf-jsonpath": (
        "SELECT jsonb_path_query(to_jsonb(c), '$.ssn ? (@ starts with \"1\")') FROM customers c",
        "jsonb_path_query",
    ),
    "xmltable": (
        "SELECT count(*) FROM customers c, XMLTABLE('/a' PASSING xmlparse(content c.ssn) COLUMNS x text) t",
        "XMLTABLE",
    ),
    "exists": ("SELECT EXISTS (SELECT 1 FROM customers WHERE ssn < '5')", "WHERE"),
    "exists-correlated": (
        "SELECT id FROM orders o WHERE EXISTS (SELECT 1 FROM customers c "
        "WHERE c.id = o.customer_id AND c.ssn < '5')",
        "WHERE",
    ),
    "in-list": ("SELECT count(*) FROM customers WHERE ssn IN ('123-45-6789')", "WHERE"),
    "in-subquery-select-list": ("SELECT (SELECT count(*) FROM customers WHERE ssn < '5')", "WHERE"),
    "scalar-subquery-limit": ("SELECT (SELECT id FROM customers ORDER BY ssn LIMIT 1)", "ORDER BY"),
    "filter": ("SELECT count(*) FILTER (WHERE ssn < '5') FROM customers", "FILTER"),
    "window-partition": ("SELECT count(*) OVER (PARTITION BY ssn < '5') FROM customers", "PARTITION BY"),
    "window-order": ("SELECT row_number() OVER (ORDER BY ssn) FROM customers", "window ORDER BY"),
    "named-window": ("SELECT rank() OVER w FROM customers WINDOW w AS (ORDER BY ssn)", "window ORDER BY"),
    "window-frame": (
        "SELECT sum(id) OVER (ORDER BY id ROWS BETWEEN ascii(ssn) PRECEDING AND CURRENT ROW) FROM customers",
        "frame offset",
    ),
    "order-limit": ("SELECT id FROM customers ORDER BY ssn LIMIT 1", "ORDER BY"),
    "offset": ("SELECT id FROM customers OFFSET ascii(ssn) - 48", "OFFSET"),
    "having": ("SELECT count(*) FROM customers HAVING max(ssn) < '5'", "HAVING"),
    "case-in-where": ("SELECT id FROM customers WHERE CASE WHEN ssn < '5' THEN true END", "CASE WHEN"),
    "case-in-select": ("SELECT CASE WHEN ssn < '5' THEN 1 END FROM customers", "CASE WHEN"),
    "count-distinct-order": ("SELECT array_agg(id ORDER BY ssn) FROM customers", "ORDER BY"),
    "recursive-union": (
        "WITH RECURSIVE r(s) AS (SELECT ssn FROM customers UNION SELECT s FROM r) SELECT count(*) FROM r",
        "UNION",
    ),
    "delete-returning-where": (
        "DELETE FROM audit_scratch a USING customers c WHERE c.ssn = a.payload",
        "WHERE",
    ),
}


@pytest.mark.parametrize("case", list(MEMBERSHIP))
def test_constructs_that_compare_masked_values_are_predicates(case):
    sql, words = MEMBERSHIP[case]
    message = refused(sql)
    assert words in message, message
    assert "masked" in message


@pytest.mark.parametrize("case", ["join-using", "union", "intersect", "distinct", "srf-from", "filter"])
def test_allow_in_predicates_permits_them_and_masks_the_values(case):
    plan = plan_of(MEMBERSHIP[case][0], LAX)
    assert plan.error is None, plan.error
    assert plan.touches_masked


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT ssn FROM customers UNION ALL SELECT '123-45-6789'",
        "SELECT DISTINCT name FROM customers",
        "SELECT * FROM orders JOIN customers USING (id)",
        "SELECT id FROM customers INTERSECT SELECT customer_id FROM orders",
        "SELECT count(*), count(ssn), max(ssn), min(email) FROM customers",
        "SELECT g FROM generate_series(1, 3) g",
        "SELECT unnest(ARRAY[1, 2]) FROM customers",
        "SELECT count(*) OVER (PARTITION BY name ORDER BY id) FROM customers",
    ],
)
def test_comparisons_of_clear_values_stay_allowed(sql):
    plan = plan_of(sql)
    assert plan.error is None, plan.error


def test_aggregates_that_return_values_are_masked():
    plan = plan_of("SELECT min(ssn), max(email), count(DISTINCT ssn), array_agg(card_number) FROM customers")
    assert [c.action for c in plan[0].columns] == ["derived"] * 4


# -- what a plan read, for its errors ----------------------------------------------------------------
@pytest.mark.parametrize(
    "sql, touches",
    [
        ("SELECT count(*) FROM customers WHERE ssn < '5'", True),  # only a predicate
        ("SELECT id FROM customers ORDER BY email", True),
        ("SELECT 1 FROM customers c WHERE length(c::text) > 3", True),
        ("SELECT id, name FROM customers WHERE id = 1", False),
        ("SELECT count(*) FROM customers", False),
        ("SELECT total_cents FROM orders", False),
    ],
)
def test_plan_says_whether_it_reads_a_masked_column(sql, touches):
    plan = plan_of(sql, LAX)
    assert plan.error is None
    assert plan.touches_masked is touches
    assert plan.masks_anything is (touches or bool(LAX.detectors))
    if touches:
        assert any("public.customers." in s for s in plan.masked_sources)


# -- NULL-ness -------------------------------------------------------------------------------------
def f(name, type_oid=25, fmt=0):
    return Field(name, 0, 0, type_oid, -1, -1, fmt)


def test_a_derived_value_does_not_show_whether_it_is_null():
    """nullif(ssn, guess) is NULL exactly when the guess is right: the client must not tell."""
    plan = plan_of(
        "SELECT id, ssn, nullif(ssn, '123-45-6789'), substring(ssn from '^1'), "
        "to_json(nullif(ssn, 'x')), nullif(ssn, 'x')::jsonb, ssn::int FROM customers"
    )
    fields = [f("id", 23), f("ssn"), f("n"), f("s"), f("j", 114), f("jb", 3802, 1), f("i", 23)]
    rw = plan.bind(0, fields)
    for derived in (None, b"123-45-6789"):
        jb = None if derived is None else b'\x01"x"'
        js = None if derived is None else b'"x"'
        out = parse_data_row(rw.rewrite(build_data_row([b"1", None, derived, derived, js, jb, None])))
        assert out[:4] == [b"1", None, b"[redacted]", b"[redacted]"]  # the column itself: NULL stays NULL
        assert json.loads(out[4]) == "[redacted]"
        assert out[5][:1] == b"\x01" and json.loads(out[5][1:]) == "[redacted]"
        assert out[6] is None  # an integer cannot carry a mask: always NULL, NULL or not


@pytest.mark.parametrize(
    "copy, null_line, value_line",
    [
        ("COPY (SELECT id, nullif(ssn, 'x') FROM customers) TO STDOUT", b"1\t\\N\n", b"1\t123-45-6789\n"),
        ("COPY (SELECT id, nullif(ssn, 'x') FROM customers) TO STDOUT CSV", b"1,\n", b"1,123-45-6789\n"),
    ],
)
def test_copy_hides_the_null_ness_of_derived_values(copy, null_line, value_line):
    rw = plan_of(copy).bind(0, [])
    assert rw.copy_data(null_line) == rw.copy_data(value_line)
    direct = plan_of(copy.replace("nullif(ssn, 'x')", "ssn")).bind(0, [])
    assert direct.copy_data(null_line) == null_line  # a masked column's NULL stays NULL


# -- error text ------------------------------------------------------------------------------------
SECRET = "123-45-6789"
ECHOES = {
    "int": {"C": "22P02", "M": f'invalid input syntax for type integer: "{SECRET}"'},
    "json": {
        "C": "22P02",
        "M": "invalid input syntax for type json",
        "D": f'Token "{SECRET[:3]}" is invalid.',
        "W": f"JSON data, line 1: {SECRET}",
    },
    "xml": {
        "C": "2200N",
        "M": "invalid XML content",
        "D": f"line 1: Start tag expected, '<' not found\n{SECRET}\n^",
    },
    "to_date": {
        "C": "22007",
        "M": f'invalid value "{SECRET[:2]}" for "MM"',
        "D": "Value must be in the range 1 to 12.",
    },
    "bytes": {"C": "22021", "M": 'invalid byte sequence for encoding "UTF8": 0x31 0x32'},
    "bits": {"C": "22026", "M": "bit string length 11 does not match type bit(3)"},
    "regclass": {"C": "42P01", "M": f'relation "{SECRET}" does not exist'},
    "word": {"C": "42P01", "M": 'relation "true" does not exist'},
    "notice": {"C": "00000", "S": "NOTICE", "M": f"value {SECRET}", "q": f"SELECT '{SECRET}'"},
}


@pytest.mark.parametrize("case", list(ECHOES))
def test_errors_of_a_statement_that_reads_masked_data_keep_no_value(case):
    sm = masking(allow=True)
    sm.detectors.__init__([])  # the rule alone must hold, without the detectors' net
    plan = sm.plan("SELECT count(*) FROM customers WHERE ssn::int > 0", CAT)
    fields = {"S": "ERROR", **ECHOES[case]}
    out = sm.mask_error_fields(fields, plan, CAT)
    blob = json.dumps(out)
    for part in (SECRET, SECRET[:3], SECRET[:2], "0x31", "11", '"true"'):
        assert part not in blob, (part, out)
    assert out["C"] == fields["C"]
    assert "pgwarden redacted the values" in out["M"] and "public.customers.ssn" in out["M"]
    assert out["M"].split()[0] == fields["M"].split()[0]  # what kind of error it was
    for key in ("D", "W", "q"):
        if key in fields:
            assert out[key] == "[redacted]"


def test_errors_of_statements_that_read_no_masked_column_keep_their_detail():
    plan = plan_of("INSERT INTO orders (id, customer_id, status, total_cents) VALUES (1, 1, 'new', 5)")
    assert not plan.touches_masked
    dup = {
        "C": "23505",
        "M": 'duplicate key value violates unique constraint "orders_pkey"',
        "D": "Key (id)=(1) already exists.",
        "s": "public",
        "t": "orders",
    }
    assert SM.mask_error_fields(dup, None if not plan.masks_anything else plan, CAT) == dup
    # the detectors still guard free text
    note = {"C": "P0001", "M": "call me at 987-65-4321"}
    assert SM.mask_error_fields(note, plan, CAT)["M"] == "call me at [redacted:us_ssn]"


# -- COPY options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "val, read",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (2, None),
        ("true", True),
        ("TRUE", True),
        ("On", True),
        ("1", True),
        ("false", False),
        ("OFF", False),
        ("Off", False),
        ("0", False),
        ("match", "match"),
        ("MATCH", "match"),
        ("yes", None),
    ],
)
def test_copy_booleans_are_read_as_postgresql_reads_them(val, read):
    assert copy_bool(val) == read


@pytest.mark.parametrize("header", ["'OFF'", "'False'", "0", "'off'"])
def test_a_header_switched_off_in_any_spelling_does_not_let_the_first_row_through(header):
    plan = plan_of(f"COPY (SELECT id, ssn FROM customers) TO STDOUT (FORMAT csv, HEADER {header})")
    assert plan.error is None, plan.error
    rw = plan.bind(0, [])
    assert rw.copy_data(b"1,123-45-6789\n") == b'1,"[redacted]"\n'


def test_a_header_switched_on_passes_only_the_names():
    for sql in ("COPY customers TO STDOUT CSV HEADER", "COPY customers TO STDOUT (FORMAT csv, HEADER 'ON')"):
        assert copy_options(plan_stmt_options(sql))["header"] is True


def plan_stmt_options(sql):
    from pglast import parse_sql

    return parse_sql(sql)[0].stmt.options


@pytest.mark.parametrize(
    "sql, words",
    [
        ("COPY customers TO STDOUT (ENCODING 'LATIN1')", "ENCODING"),
        ("COPY (SELECT id FROM orders) TO STDOUT (FORMAT csv, ENCODING 'SJIS')", "ENCODING"),
        ("COPY customers TO STDOUT (FORMAT csv, HEADER MATCH)", "MATCH"),
        ("COPY customers TO STDOUT (FORMAT csv, HEADER 'yes')", "HEADER"),
    ],
)
def test_copy_options_the_proxy_cannot_follow_are_refused(sql, words):
    assert words in refused(sql)


def test_copy_in_utf8_spelled_any_way_is_accepted():
    for enc in ("UTF8", "utf-8", "Unicode", "utf_8"):
        assert plan_of(f"COPY customers TO STDOUT (ENCODING '{enc}')").error is None


# -- ITIN ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["ITIN 912-70-1234 on file", "tax id 999 88 7777", "900-70-0001"])
def test_us_ssn_detector_catches_itins(text):
    scrubbed = DetectorSet([builtin("us_ssn")]).scrub(text)
    assert "[redacted:us_ssn]" in scrubbed
    assert not any(c.isdigit() for c in scrubbed)


# -- functions the catalog knows, and those it does not ----------------------------------------------
def test_only_set_returning_or_unknown_functions_over_masked_values_are_predicates():
    import dataclasses

    from masking_helpers import SHOP_TABLES

    from pgwarden.masking import Catalog

    cat = Catalog.from_dicts(
        SHOP_TABLES,
        builtin_functions={"upper", "count", "generate_series"},
        user_functions={"public.digest", "public.explode"},
    )
    cat = dataclasses.replace(cat, set_returning_functions=cat.set_returning_functions | {"explode"})
    assert SM.plan("SELECT digest(ssn) FROM customers", cat).error is None  # known, returns one value
    for sql in (
        "SELECT explode(ssn) FROM customers",
        "SELECT made_up_fn(ssn) FROM customers",
        "SELECT count(*) FROM customers c, explode(c.ssn) e",
    ):
        err = SM.plan(sql, cat).error
        assert err is not None and "set-returning" in err.message, sql
    assert SM.plan("SELECT made_up_fn(name) FROM customers", cat).error is None


def test_execute_and_fetch_count_as_reading_masked_data():
    from pgwarden.masking import MaskingSession

    s = MaskingSession()
    assert LAX.plan(
        "PREPARE p AS SELECT count(*) FROM customers WHERE ssn::int > 0", CAT, session=s
    ).touches_masked
    plan = LAX.plan("EXECUTE p", CAT, session=s)
    assert plan.touches_masked and plan.masks_anything
    assert LAX.plan("FETCH 1 FROM c", CAT, session=s).touches_masked


def test_a_view_that_filters_on_a_masked_column_reads_it():
    """Its errors may echo the value, though the query names only clear view columns."""
    from masking_helpers import SHOP_TABLES

    from pgwarden.masking import Catalog

    cat = Catalog.from_dicts(
        SHOP_TABLES, {"public.numbered": ("SELECT id FROM public.customers WHERE ssn::int > 0", ["id"])}
    )
    for _ in range(2):  # analysed, then from the view cache
        plan = SM.plan("SELECT id FROM numbered", cat)
        assert plan.error is None and plan.touches_masked
        assert "public.customers.ssn" in plan.masked_sources
