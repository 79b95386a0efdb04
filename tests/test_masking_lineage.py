"""The adversarial corpus: every shape an agent can use to reach a masked value."""

import pytest
from masking_helpers import SHOP_TABLES, masking, shop_catalog

from pgwarden.masking import Catalog, MaskingSession

CAT = shop_catalog()
SM = masking()
D = "derived"
STAR = [None, None, "email", "redact", "last4", "hash", None, None]


def actions(sql, sm=SM, cat=CAT, **kw):
    plan = sm.plan(sql, cat, **kw)
    assert plan.error is None, plan.error
    return [[c.action for c in r.columns] for r in plan.results]


def denied(sql, sm=SM, cat=CAT, **kw):
    plan = sm.plan(sql, cat, **kw)
    assert plan.error is not None, f"not denied: {sql}"
    assert plan.error.sqlstate == "42501"
    return plan.error


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT email FROM customers", ["email"]),
        ("SELECT email AS contact, name FROM customers", ["email", None]),
        ('SELECT c.email "E" FROM public.customers c', ["email"]),
        ("SELECT * FROM customers", STAR),
        ("SELECT c.* FROM customers c", STAR),
        ("TABLE customers", STAR),
        ("SELECT id, total_cents FROM orders", [None, None]),
        ("SELECT count(*), max(total_cents) FROM orders", [None, None]),
        # expressions, casts, aggregates, concatenation, JSON builders
        ("SELECT upper(email) FROM customers", [D]),
        ("SELECT email::varchar(200) FROM customers", [D]),
        ("SELECT CAST(ssn AS text) FROM customers", [D]),
        ("SELECT 'x' || ssn FROM customers", [D]),
        ("SELECT substr(card_number, 1, 6) FROM customers", [D]),
        ("SELECT string_agg(email, ',') FROM customers", [D]),
        ("SELECT array_agg(ssn) FROM customers", [D]),
        ("SELECT json_build_object('e', email) FROM customers", [D]),
        ("SELECT jsonb_agg(card_number) FROM customers", [D]),
        ("SELECT coalesce(phone, 'none') FROM customers", [D]),
        ("SELECT length(ssn) FROM customers", [D]),
        ("SELECT format('%s', email) FROM customers", [D]),
        ("SELECT ssn = '123-45-6789' FROM customers", [D]),
        ("SELECT (SELECT max(ssn) FROM customers)", [D]),
        # subqueries, CTEs, set operations, views
        ("SELECT s FROM (SELECT ssn AS s FROM customers) q", ["redact"]),
        ("SELECT * FROM (SELECT id, email FROM customers) q(a, b)", [None, "email"]),
        ("WITH x AS (SELECT email FROM customers) SELECT * FROM x", ["email"]),
        ("WITH x(e) AS (SELECT email FROM customers) SELECT x.e FROM x", ["email"]),
        ("WITH a AS (SELECT ssn FROM customers), b AS (SELECT ssn AS z FROM a) SELECT z FROM b", ["redact"]),
        ("SELECT name FROM customers UNION ALL SELECT email FROM customers", ["email"]),
        ("SELECT name FROM customers INTERSECT SELECT name FROM customers", [None]),
        ("SELECT * FROM customer_contacts", [None, None, "email", "hash"]),
        ("SELECT upper(email) FROM customer_contacts", [D]),
        ("SELECT (SELECT email FROM customers LIMIT 1)", ["email"]),
        ("SELECT o.id, (SELECT c.ssn FROM customers c WHERE c.id = o.customer_id) FROM orders o",
         [None, "redact"]),
        ("SELECT * FROM customers c, LATERAL (SELECT c.ssn) s", STAR + ["redact"]),
        ("SELECT * FROM orders JOIN customers USING (id)",
         [None] * 6 + ["email", "redact", "last4", "hash", None, None]),
        ("SELECT * FROM (VALUES (1, 'a')) v(x, y)", [None, None]),
        ("WITH RECURSIVE r(n, e) AS (SELECT 1, email FROM customers UNION ALL SELECT n + 1, e FROM r "
         "WHERE n < 3) SELECT * FROM r", [None, "email"]),
        # WITH RECURSIVE lets a query name a sibling defined after it, even one named like a table
        ("WITH RECURSIVE a AS (SELECT * FROM orders), orders AS (SELECT ssn AS id FROM customers) "
         "SELECT * FROM a", [D]),
        # the recursive term moves the value one column per step: it reaches f after five
        ("WITH RECURSIVE r(n, a, b, c, d, e, f) AS (SELECT 1, ssn, '', '', '', '', '' FROM customers "
         "UNION ALL SELECT n + 1, f, a, b, c, d, e FROM r WHERE n < 6) SELECT f FROM r", ["redact"]),
        # whole-row references
        ("SELECT c FROM customers c", [D]),
        ("SELECT customers FROM customers", [D]),
        ("SELECT row_to_json(c) FROM customers c", [D]),
        ("SELECT to_jsonb(c.*) FROM customers c", [D]),
        ("SELECT ROW(id, email) FROM customers", [D]),
        ("SELECT (c).email FROM customers c", ["email"]),
        ("SELECT (c).* FROM customers c", STAR),
        ("SELECT o FROM orders o", [None]),
        # set-returning functions over masked data, unknown things
        ("SELECT * FROM generate_series(1, 3) g", [None]),
        ("SELECT * FROM not_in_catalog", [D]),
        ("SELECT x FROM not_in_catalog", [D]),
        # results of writes
        ("INSERT INTO customers (name, email, ssn, card_number) VALUES ('a', 'b', 'c', 'd') RETURNING id, ssn",
         [None, "redact"]),
        ("DELETE FROM orders WHERE id = 1 RETURNING *", [None] * 5),
        ("UPDATE customers SET name = 'x' WHERE id = 1 RETURNING email", ["email"]),
        ("WITH d AS (DELETE FROM customers WHERE id = 9 RETURNING ssn) SELECT * FROM d", ["redact"]),
        ("EXPLAIN SELECT email FROM customers", [None]),
        ("SHOW search_path", [None]),
    ],
)
def test_result_columns(sql, expected):
    assert actions(sql) == [expected]


@pytest.mark.parametrize(
    "sql, expected",
    [
        # which rows come back depends on the masked values: a predicate, allowed only by allowInPredicates
        ("SELECT status FROM orders UNION SELECT ssn FROM customers", ["redact"]),
        ("SELECT email FROM customers EXCEPT SELECT status FROM orders", ["email"]),
        ("SELECT * FROM customers c, unnest(ARRAY[c.ssn]) u", STAR + [D]),
        ("SELECT u FROM customers c, LATERAL jsonb_each_text(to_jsonb(c)) u", [D]),
    ],
)
def test_result_columns_of_row_comparing_shapes(sql, expected):
    assert actions(sql, masking(allow=True)) == [expected]
    assert "allowInPredicates" in denied(sql).hint


def test_planner_statistics_hold_samples_of_values():
    cat = Catalog.from_dicts({**SHOP_TABLES, "pg_catalog.pg_stats": ["tablename", "attname", "most_common_vals"]})
    assert actions("SELECT most_common_vals FROM pg_stats", SM, cat) == [[D]]


def test_unknown_relations_are_not_usable_in_predicates():
    assert denied("SELECT x FROM not_in_catalog WHERE y = 1")


def test_multiple_statements_in_one_query_keep_their_order():
    assert actions("SELECT 1; SET x.y = 1; SELECT ssn FROM customers") == [[None], [], ["redact"]]


def test_copy_gets_the_same_lineage():
    plan = SM.plan("COPY customers TO STDOUT", CAT)
    assert plan[0].kind == "copy" and [c.action for c in plan[0].columns] == STAR
    plan = SM.plan("COPY customers (name, ssn) TO STDOUT WITH (FORMAT csv, HEADER)", CAT)
    assert [c.action for c in plan[0].columns] == [None, "redact"]
    assert plan[0].copy_options == {"format": "csv", "header": True}
    plan = SM.plan("COPY (SELECT lower(email) FROM customers) TO STDOUT", CAT)
    assert [c.action for c in plan[0].columns] == [D]
    assert SM.plan("COPY orders FROM STDIN", CAT)[0].kind == "none"


@pytest.mark.parametrize(
    "sql, words",
    [
        # predicates are an oracle
        ("SELECT id FROM customers WHERE ssn LIKE '1%'", "WHERE"),
        ("SELECT id FROM customers c JOIN orders o ON o.status = c.email", "JOIN"),
        ("SELECT id FROM customers ORDER BY ssn", "ORDER BY"),
        ("SELECT email FROM customers ORDER BY 1", "ORDER BY"),
        ("SELECT count(*) FROM customers GROUP BY card_number", "GROUP BY"),
        ("SELECT count(*) FROM customers GROUP BY id HAVING max(ssn) > '5'", "HAVING"),
        ("SELECT CASE WHEN ssn LIKE '1%' THEN 1 ELSE 0 END FROM customers", "CASE WHEN"),
        ("SELECT count(*) FILTER (WHERE ssn LIKE '1%') FROM customers", "FILTER"),
        ("SELECT row_number() OVER (ORDER BY ssn) FROM customers", "ORDER BY"),
        ("SELECT id FROM orders WHERE customer_id IN (SELECT id FROM customers WHERE email LIKE 'a%')", "WHERE"),
        ("SELECT EXISTS (SELECT 1 FROM customers WHERE ssn = '123-45-6789')", "WHERE"),
        ("DELETE FROM customers WHERE ssn LIKE '1%'", "WHERE"),
        ("SELECT DISTINCT ON (email) id FROM customers", "DISTINCT ON"),
        ("SELECT * FROM customer_contacts WHERE email LIKE 'a%'", "WHERE"),
        ("EXPLAIN ANALYZE SELECT 1 FROM customers WHERE ssn = '1'", "WHERE"),
        # writes that move a masked value elsewhere
        ("INSERT INTO audit_scratch (payload) SELECT email FROM customers", "INSERT"),
        ("INSERT INTO audit_scratch (payload) VALUES ((SELECT ssn FROM customers LIMIT 1))", "INSERT"),
        ("UPDATE customers SET notes = ssn", "UPDATE"),
        # a subscript of the written column decides where the value lands: it is copied too
        ("INSERT INTO audit_scratch (payload[(SELECT length(ssn) FROM customers LIMIT 1)]) VALUES ('x')",
         "INSERT"),
        ("UPDATE orders SET status[(SELECT ascii(ssn) FROM customers LIMIT 1)] = 'x' WHERE id = 1", "UPDATE"),
        ("INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO UPDATE "
         "SET status[(SELECT ascii(ssn) FROM customers LIMIT 1)] = 'x'", "ON CONFLICT"),
        ("UPDATE orders SET status = (SELECT email FROM customers LIMIT 1)", "UPDATE"),
        ("UPDATE orders o SET status = c.card_number FROM customers c WHERE c.id = o.customer_id", "UPDATE"),
        ("CREATE TABLE leak AS SELECT ssn FROM customers", "CREATE TABLE AS"),
        ("SELECT email INTO leak FROM customers", "SELECT INTO"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM customers", "CREATE TABLE AS"),
        ("COPY (SELECT ssn FROM customers) TO '/tmp/leak'", "server file"),
        ("COPY customers TO STDOUT (FORMAT binary)", "binary"),
        ("WITH x AS (INSERT INTO audit_scratch (payload) SELECT ssn FROM customers RETURNING 1) SELECT 1",
         "INSERT"),
        # side channels and opaque code
        ("SELECT set_config('my.x', ssn, false) FROM customers", "set_config"),
        ("SELECT pg_notify('ch', email) FROM customers", "pg_notify"),
        ("SELECT setval('orders_id_seq', length(ssn)) FROM customers", "setval"),
        ("SELECT query_to_xml('select ssn from customers', true, false, '')", "runs SQL"),
        ("DO $$ BEGIN RAISE NOTICE '%', (SELECT ssn FROM customers LIMIT 1); END $$", "Do"),
        ("CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT ssn FROM customers LIMIT 1'",
         "CreateFunction"),
        ("ALTER TABLE customers RENAME COLUMN ssn TO x", "Rename"),
        # a masking rule names its tables: a masked table under another name is out of it
        ("ALTER TABLE customers RENAME TO clients", "Rename"),
        ("ALTER TABLE public.customers SET SCHEMA scratch", "AlterObjectSchema"),
        ("ALTER VIEW customers SET SCHEMA scratch", "AlterObjectSchema"),
        ("ALTER SCHEMA public RENAME TO p2", "renaming schema public"),
        ("ALTER TABLE orders ATTACH PARTITION customers FOR VALUES IN (1)", "AlterTable"),
        ("ALTER TABLE customers ADD COLUMN s2 text GENERATED ALWAYS AS (ssn) STORED", "AlterTable"),
        ("SELECT 1; SELECT 2 FROM customers WHERE ssn = 'x'", "WHERE"),
        ("SELEC nonsense", "parsed"),
    ],
)
def test_denied(sql, words):
    err = denied(sql)
    assert words in err.message
    assert "shop-pii" in err.message or "parsed" in err.message
    assert err.hint


@pytest.mark.parametrize("sql", [
    "ALTER TABLE orders SET SCHEMA scratch",
    "ALTER TABLE orders RENAME TO purchases",
    "ALTER SCHEMA scratch RENAME TO scratch2",
    "CREATE TABLE p (id int) PARTITION BY LIST (id)",
])
def test_ddl_that_moves_no_masked_relation_is_not_refused(sql):
    """The refusal of moves is about masked relations: the others move freely."""
    plan = SM.plan(sql, CAT)
    assert plan.error is None, plan.error


def test_deny_message_names_the_column_and_the_way_out():
    err = denied("SELECT id FROM customers WHERE ssn LIKE '1%'")
    assert "public.customers.ssn" in err.message
    assert "exemptSubjects" in err.hint


def test_derived_deny_and_whole_row_deny():
    strict = masking(derived="deny", whole_row="deny")
    assert "computed from" in denied("SELECT upper(email) FROM customers", strict).message
    assert "whole row" in denied("SELECT row_to_json(c) FROM customers c", strict).message
    assert "whole row" in denied("SELECT c FROM customers c", strict).message
    assert actions("SELECT email, name FROM customers", strict) == [["email", None]]
    # whole-row deny alone leaves derived values redacted
    wr = masking(whole_row="deny")
    assert actions("SELECT upper(email) FROM customers", wr) == [[D]]


def test_allow_in_predicates():
    lax = masking(allow=True)
    assert actions("SELECT id FROM customers WHERE ssn LIKE '1%' ORDER BY email", lax) == [[None]]
    # writes stay denied
    assert denied("UPDATE customers SET notes = ssn", lax)


def test_unqualified_name_shadowed_in_another_schema_keeps_the_mask():
    cat = Catalog.from_dicts({"public.customers": ["id", "ssn"], "private.customers": ["id", "ssn"]})
    # the session could have changed search_path; the masked candidate wins
    sm = masking()
    assert actions("SELECT ssn FROM customers", sm, cat, search_path=("private",)) == [["redact"]]


def test_partition_of_a_masked_table_is_masked():
    cat = Catalog.from_dicts({"public.customers": ["id", "ssn"], "public.customers_2024": ["id", "ssn"]},
                             parents={"public.customers_2024": ["public.customers"]})
    assert actions("SELECT ssn FROM customers_2024", SM, cat) == [["redact"]]


def test_the_parent_of_a_masked_table_is_masked_where_the_child_is():
    """Reading a parent returns its children's rows: a rule on a child (a partition, an inheriting
    table) masks the parent's column of that name, and `*` of the parent, at every level."""
    cat = Catalog.from_dicts({"public.people": ["id", "ssn", "note"], "public.customers": ["id", "ssn", "note"],
                              "public.all_parties": ["id", "ssn"]},
                             parents={"public.customers": ["public.people", "public.all_parties"],
                                      "public.people": ["public.all_parties"]})
    assert actions("SELECT ssn, note FROM people", SM, cat) == [["redact", None]]
    assert actions("SELECT * FROM all_parties", SM, cat) == [[None, "redact"]]
    assert actions("SELECT ssn FROM ONLY people", SM, cat) == [["redact"]]  # conservative: same plan
    denied("SELECT id FROM people WHERE ssn = 'x'", SM, cat)


def test_user_functions_are_opaque():
    cat = Catalog.from_dicts({"public.customers": ["id", "ssn"]}, builtin_functions={"upper", "count"},
                             user_functions={"public.lookup"})
    assert actions("SELECT lookup(1), upper('a'), count(*) FROM customers", SM, cat) == [[D, None, None]]
    assert actions("SELECT made_up_fn(1)", SM, cat) == [[D]]


def test_cursors_and_prepared_statements_follow_the_session():
    s = MaskingSession()
    assert actions("DECLARE c1 CURSOR FOR SELECT id, ssn FROM customers", session=s) == [[]]
    assert actions("FETCH 10 FROM c1", session=s) == [[None, "redact"]]
    assert actions("FETCH 10 FROM never_declared", session=s) == [[D]]
    assert actions("PREPARE p AS SELECT email FROM customers", session=s) == [[]]
    assert actions("EXECUTE p", session=s) == [["email"]]
    actions("DEALLOCATE p", session=s)
    assert actions("EXECUTE p", session=s) == [[D]]


def test_plans_are_cached_per_catalog_version_and_ddl_is_flagged():
    p1 = SM.plan("SELECT email FROM customers", CAT)
    assert SM.plan("SELECT email FROM customers", CAT) is p1
    assert SM.plan("SELECT email FROM customers", shop_catalog()) is not p1
    assert SM.plan("CREATE TABLE t (a int)", CAT).ddl
    assert not p1.ddl


def test_a_view_created_in_the_same_text_is_unknown_until_refresh():
    assert actions("CREATE VIEW v AS SELECT id FROM orders; SELECT * FROM v") == [[], [D]]
