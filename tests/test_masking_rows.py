"""Byte-level rewriting: DataRow (text, binary), CopyData (text, CSV), error fields."""

import json

from masking_helpers import masking, shop_catalog

from pgwarden.masking import (
    Catalog,
    Field,
    build_data_row,
    build_row_description,
    parse_data_row,
    parse_row_description,
)

CAT = shop_catalog()
SM = masking()


def f(name, type_oid=25, fmt=0, table_oid=0, attnum=0):
    return Field(name, table_oid, attnum, type_oid, -1, -1, fmt)


def test_result_without_masked_columns_gets_no_rewriter():
    sm_nodet = masking()
    sm_nodet.detectors.__init__([])  # a rule without detectors
    plan = sm_nodet.plan("SELECT id, total_cents FROM orders", CAT)
    assert plan[0].bind([f("id", 23), f("total_cents", 23)]) is None


def test_text_format_masks_only_masked_columns():
    plan = SM.plan("SELECT id, name, email, ssn, card_number FROM customers", CAT)
    fields = [f("id", 23), f("name"), f("email"), f("ssn"), f("card_number", 1043)]
    rw = plan.bind(0, fields)
    row = build_data_row([b"1", b"Ada Lovelace", b"ada@example.com", b"123-45-6789", b"4111111111111111"])
    out = parse_data_row(rw.rewrite(row))
    assert out == [b"1", b"Ada Lovelace", b"a***@example.com", b"[redacted]", b"****1111"]


def test_nulls_stay_null_and_non_text_types_become_null():
    plan = SM.plan("SELECT ssn, ssn::int, email FROM customers", CAT)
    rw = plan.bind(0, [f("ssn"), f("ssn", 23), f("email")])
    out = parse_data_row(rw.rewrite(build_data_row([None, b"123456789", b"a@b.co"])))
    assert out == [None, None, b"a***@b.co"]


def test_binary_format_replacements_are_valid_for_the_type():
    plan = SM.plan("SELECT id, email, row_to_json(c)::jsonb, to_json(ssn), ssn FROM customers c", CAT)
    fields = [f("id", 23, 1), f("email", 25, 1), f("j", 3802, 1), f("k", 114, 1), f("ssn", 1043, 1)]
    rw = plan.bind(0, fields)
    row = build_data_row([(1).to_bytes(4, "big"), b"ada@example.com",
                          b'\x01{"ssn": "123-45-6789"}', b'"123-45-6789"', b"123-45-6789"])
    out = parse_data_row(rw.rewrite(row))
    assert out[0] == (1).to_bytes(4, "big")
    assert out[1] == b"a***@example.com"
    assert out[2][:1] == b"\x01" and json.loads(out[2][1:]) == "[redacted]"
    assert json.loads(out[3]) == "[redacted]"
    assert out[4] == b"[redacted]"


def test_formats_from_bind_override_describe():
    plan = SM.plan("SELECT email FROM customers", CAT)
    rw = plan[0].bind([f("email", 3802, 0)], formats=[1])
    out = parse_data_row(rw.rewrite(build_data_row([b'\x01"ada@example.com"'])))
    assert out == [b'\x01"a***@example.com"']


def test_table_oid_confirms_a_masked_column_lineage_missed():
    plan = SM.plan("SELECT 1", CAT)  # pretend the analysis saw nothing
    rw = plan.bind(0, [f("x", 25, 0, table_oid=16390, attnum=4)])
    assert parse_data_row(rw.rewrite(build_data_row([b"123-45-6789"]))) == [b"[redacted]"]


def test_detectors_catch_values_in_free_text_and_leave_clean_rows_as_they_are():
    plan = SM.plan("SELECT id, notes FROM customers", CAT)
    rw = plan.bind(0, [f("id", 23), f("notes")])
    clean = build_data_row([b"1", b"prefers email"])
    assert rw.rewrite(clean) is clean
    dirty = build_data_row([b"2", b"call grace@example.org after 5pm"])
    assert parse_data_row(rw.rewrite(dirty)) == [b"2", b"call [redacted:email] after 5pm"]


def test_detectors_in_json_keep_it_valid():
    plan = SM.plan("SELECT '{}'::jsonb AS j", CAT)
    rw = plan.bind(0, [f("j", 3802, 1)])
    out = parse_data_row(rw.rewrite(build_data_row([b'\x01{"n": 4111111111111111, "s": "x ada@example.com"}'])))
    doc = json.loads(out[0][1:])
    assert doc == {"n": "[redacted:credit_card]", "s": "x [redacted:email]"}


def test_unknown_shape_masks_everything():
    plan = SM.plan("SELECT * FROM not_in_catalog", CAT)
    rw = plan.bind(0, [f("a"), f("b", 23)])
    assert parse_data_row(rw.rewrite(build_data_row([b"secret", b"7"]))) == [b"[redacted]", None]


def test_row_description_round_trip():
    fields = [f("id", 23, 1, 16390, 1), f("email", 25, 0, 16390, 3)]
    assert parse_row_description(build_row_description(fields)) == tuple(fields)


def test_copy_text_format():
    plan = SM.plan("COPY customers (id, email, ssn, notes) TO STDOUT", CAT)
    rw = plan.bind(0, [])
    line = b"1\tada@example.com\t123-45-6789\tcall grace@example.org\\tafter 5pm\n"
    assert rw.copy_data(line) == b"1\ta***@example.com\t[redacted]\tcall [redacted:email]\\tafter 5pm\n"
    assert rw.copy_data(b"2\t\\N\t\\N\t\\N\n") == b"2\t\\N\t\\N\t\\N\n"
    assert rw.copy_data(b"3\tx\\\\y@example.com\t1\\t2\tok\n") == b"3\tx***@example.com\t[redacted]\tok\n"


def test_copy_csv_format_with_header_and_quotes():
    plan = SM.plan("COPY (SELECT id, email, notes FROM customers) TO STDOUT WITH (FORMAT csv, HEADER)", CAT)
    rw = plan.bind(0, [])
    assert rw.copy_data(b"id,email,notes\n") == b"id,email,notes\n"
    out = rw.copy_data(b'2,grace@example.org,"call grace@example.org, after ""5pm""\nthanks"\n')
    assert out == b'2,"g***@example.org","call [redacted:email], after ""5pm""\nthanks"\n'
    assert rw.copy_data(b"3,,VIP\n") == b"3,,VIP\n"  # NULL email stays NULL


def test_copy_of_non_text_masked_column_writes_null():
    plan = SM.plan("COPY (SELECT id, length(ssn) FROM customers) TO STDOUT", CAT)
    rw = plan.bind(0, [])
    assert rw.copy_data(b"1\t11\n") == b"1\t[redacted]\n"  # type unknown: masked text


def test_error_fields():
    fields = {
        "S": "ERROR", "C": "22P02", "M": 'invalid input syntax for type integer: "123-45-6789"',
    }
    assert SM.mask_error_fields(fields)["M"] == 'invalid input syntax for type integer: "[redacted]"'
    dup = {"M": 'duplicate key value violates unique constraint "customers_email_key"',
           "D": "Key (email)=(ada@example.com) already exists.", "s": "public", "t": "customers"}
    out = SM.mask_error_fields(dup, catalog=CAT)
    assert out["D"] == "Key (email)=([redacted]) already exists."
    assert out["M"] == dup["M"]
    row = {"M": 'null value in column "name" of relation "customers" violates not-null constraint',
           "D": "Failing row contains (9, null, zed@example.com, 111-22-3333, 4111, null, null, now).",
           "s": "public", "t": "customers"}
    out = SM.mask_error_fields(row, catalog=CAT)
    assert out["D"] == "Failing row contains ([redacted])."
    assert out["M"] == row["M"]
    other = {"D": "Key (status)=(new) is not present in table \"orders\".", "s": "public", "t": "orders"}
    assert SM.mask_error_fields(other, catalog=CAT)["D"] == other["D"]
    notice = {"M": "hello grace@example.org 4111111111111111"}
    assert SM.mask_error_fields(notice)["M"] == "hello [redacted:email] [redacted:credit_card]"


def test_a_failing_row_in_a_partition_of_a_masked_table_is_redacted():
    """PostgreSQL names the partition a failing row is in (`events_1`), not the table the rule names
    (`events`): the row's values are redacted all the same, also when a rule names the child and
    the error the parent, and when the catalog does not know the table. A table the catalog knows
    to hold no masked column keeps its row; so does a partition key without a masked column."""
    cat = Catalog.from_dicts({"public.customers": ["id", "name", "email", "ssn"],
                              "public.customers_1": ["id", "name", "email", "ssn"],
                              "public.orders": ["id", "status"]},
                             parents={"public.customers_1": ["public.customers"]})
    detail = "Failing row contains (1, null, ada@example.com, 111-22-3333)."
    for table in ("customers_1", "customers", "unknown_table"):
        out = SM.mask_error_fields({"M": "null value", "D": detail, "s": "public", "t": table}, catalog=cat)
        assert out["D"] == "Failing row contains ([redacted]).", table
    plain = {"M": "null value", "D": "Failing row contains (7, null).", "s": "public", "t": "orders"}
    assert SM.mask_error_fields(plain, catalog=cat)["D"] == plain["D"]
    moved = {"M": 'no partition of relation "customers" found for row', "s": "public", "t": "customers",
             "D": "Partition key of the failing row contains (id, ssn) = (-1, 111-22-3333)."}
    assert SM.mask_error_fields(moved, catalog=cat)["D"] == \
        "Partition key of the failing row contains (id, ssn) = ([redacted])."
    by_id = {**moved, "D": "Partition key of the failing row contains (id) = (-1)."}
    assert SM.mask_error_fields(by_id, catalog=cat)["D"] == by_id["D"]


def test_error_fields_after_a_statement_that_touched_masked_data():
    plan = SM.plan("SELECT upper(name)::int FROM customers WHERE id = 1", CAT)
    fields = {"M": 'some message quoting "Ada Lovelace" and relation "customers"'}
    # the plan touched nothing masked: quoted text passes
    assert SM.mask_error_fields(fields, plan, CAT)["M"] == fields["M"]
    plan = SM.plan("SELECT upper(email)::int FROM customers", CAT)
    assert SM.mask_error_fields(fields, plan, CAT)["M"] == (
        'some message quoting "[redacted]" and relation "customers" (pgwarden redacted the values in this '
        'error: the statement reads public.customers.email, which the masking rule hides)')


def test_one_plan_bound_to_shapes_in_turn_masks_each_as_the_server_described_it():
    """A cached plan keeps the rewriter it bound last (by the fields object): rebinding to another
    RowDescription, or to an equal one parsed again, never reuses a rewriter made for other columns."""
    plan = SM.plan("SELECT 1", CAT)  # the server's table OID and column number decide
    ssn_first = parse_row_description(build_row_description(
        [f("x", 25, 0, table_oid=16390, attnum=4), f("y")]))
    ssn_second = parse_row_description(build_row_description(
        [f("x"), f("y", 25, 0, table_oid=16390, attnum=4)]))
    row = build_data_row([b"Ada Lovelace", b"Ada Lovelace"])
    for _ in range(2):
        for fields, shown in ((ssn_first, [b"[redacted]", b"Ada Lovelace"]),
                              (ssn_second, [b"Ada Lovelace", b"[redacted]"]),
                              (list(ssn_second), [b"Ada Lovelace", b"[redacted]"])):
            rw = plan.bind(0, fields)
            assert parse_data_row(rw.rewrite(row)) == shown
    assert plan.bind(0, ssn_first) is plan.bind(0, ssn_first)
    assert parse_row_description(build_row_description(list(ssn_first))) is ssn_first  # parsed once, shared
    # a list may change after it was bound: it is never taken for the shape it had
    fields = list(ssn_first)
    assert parse_data_row(plan.bind(0, fields).rewrite(row)) == [b"[redacted]", b"Ada Lovelace"]
    fields[:] = ssn_second
    assert parse_data_row(plan.bind(0, fields).rewrite(row)) == [b"Ada Lovelace", b"[redacted]"]
