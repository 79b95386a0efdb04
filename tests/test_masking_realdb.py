"""The engine against the real server: the catalog loader, and the adversarial corpus run on
PostgreSQL with the results' raw bytes (text and binary format) passed through the rewriters."""

import psycopg
import pytest
from fix_pg import SHOP_DB
from masking_helpers import SECRETS, masking

from pgwarden.masking import CatalogCache, Field, build_data_row, load_catalog

pg8000_native = pytest.importorskip("pg8000.native")

CORPUS = [
    "SELECT * FROM customers",
    "SELECT email AS e, c.ssn AS s, card_number, phone FROM customers c",
    "SELECT upper(email), ssn::varchar(20), 'x' || card_number, lower(phone) FROM customers",
    "SELECT string_agg(email, ','), array_agg(ssn), json_agg(card_number) FROM customers",
    "SELECT json_build_object('e', email, 's', ssn) FROM customers",
    "SELECT row_to_json(c), to_jsonb(c.*), c, ROW(c.email, c.ssn) FROM customers c",
    "SELECT (c).email, (c).* FROM customers c",
    "WITH x AS (SELECT email, ssn FROM customers) SELECT * FROM x",
    "SELECT s FROM (SELECT ssn AS s FROM customers) q",
    "SELECT name FROM customers UNION ALL SELECT email FROM customers UNION ALL SELECT ssn FROM customers",
    "SELECT * FROM customer_contacts",
    "SELECT * FROM customers c, LATERAL unnest(ARRAY[c.ssn, c.card_number]) u",
    "SELECT u FROM customers c, LATERAL jsonb_each_text(to_jsonb(c)) u",
    "SELECT id, notes FROM customers",
    "SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id",
    "SELECT (SELECT max(ssn) FROM customers), (SELECT email FROM customers LIMIT 1)",
]


def dsn(pg, **kw):
    return dict(host=pg.host, port=pg.port, user=pg.superuser, password=pg.password, dbname=SHOP_DB, **kw)


@pytest.fixture(scope="module")
def catalog(pg):
    conn = pg8000_native.Connection(pg.superuser, host=pg.host, port=pg.port, password=pg.password,
                                    database=SHOP_DB)
    try:
        return load_catalog(conn)
    finally:
        conn.close()


def test_catalog_loader_reads_tables_views_functions_and_types(catalog):
    cust = catalog.get("public", "customers")
    assert cust.columns[:4] == ("id", "name", "email", "ssn")
    assert cust.type_oids[0] == 23 and cust.type_oids[2] == 25 and cust.oid
    assert catalog.by_oid[cust.oid] is cust
    view = catalog.get("public", "customer_contacts")
    assert view.kind == "v" and "public.customers" in view.view_sql
    assert "upper" in catalog.builtin_functions and "row_to_json" in catalog.builtin_functions
    assert 1043 in catalog.text_type_oids
    # set-returning functions as the server lists them (pg_proc.proretset)
    assert {"generate_series", "regexp_matches", "pg_ls_dir"} <= catalog.set_returning_functions
    assert "upper" not in catalog.set_returning_functions
    sm = masking()
    assert [c.action for c in sm.plan("SELECT * FROM customer_contacts", catalog)[0].columns] == [
        None, None, "email", "hash"]


def test_catalog_cache_refreshes(pg):
    def connect():
        return pg8000_native.Connection(pg.superuser, host=pg.host, port=pg.port, password=pg.password,
                                        database=SHOP_DB)

    cache = CatalogCache(connect, max_age=3600)
    assert cache.stale and cache.current().relations == {}
    first = cache.refresh()
    assert not cache.stale and cache.current() is first
    cache.mark_stale()
    assert cache.stale and cache.refresh().version != first.version


def run_raw(pg, sql, binary):
    with psycopg.connect(**dsn(pg)) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute(sql)
        res = cur.pgresult
        fields = [Field(res.fname(i).decode(), res.ftable(i), res.ftablecol(i), res.ftype(i),
                        res.fsize(i), res.fmod(i), res.fformat(i)) for i in range(res.nfields)]
        rows = [build_data_row([res.get_value(r, c) for c in range(res.nfields)]) for r in range(res.ntuples)]
        return fields, rows


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("sql", CORPUS)
def test_no_seeded_secret_survives_the_rewriter(pg, catalog, sql, binary):
    sm = masking(allow=True)  # the set-returning shapes are predicates by default; here: their rows
    plan = sm.plan(sql, catalog)
    assert plan.error is None, plan.error
    fields, rows = run_raw(pg, sql, binary)
    rw = plan.bind(0, fields)
    assert rw is not None
    out = b"".join(rw.rewrite(r) for r in rows)
    for secret in SECRETS:
        assert secret.encode() not in out, (secret, sql)
        # also not as the digits alone (a card number printed as a number, an SSN without dashes)
        digits = "".join(ch for ch in secret if ch.isdigit())
        if len(digits) >= 9:
            assert digits.encode() not in out.replace(b"-", b"").replace(b" ", b""), (secret, sql)


def test_unmasked_columns_arrive_intact(pg, catalog):
    sql = "SELECT o.id, name, total_cents FROM orders o JOIN customers c ON c.id = o.customer_id"
    for binary in (False, True):
        fields, rows = run_raw(pg, sql, binary)
        rw = masking().plan(sql, catalog).bind(0, fields)
        assert all((rw.rewrite(r) if rw else r) == r for r in rows)


def test_copy_to_stdout_is_masked(pg, catalog):
    sm = masking()
    for sql in ("COPY customers TO STDOUT", "COPY (SELECT * FROM customers) TO STDOUT WITH (FORMAT csv, HEADER)"):
        plan = sm.plan(sql, catalog)
        rw = plan.bind(0, [])
        with psycopg.connect(**dsn(pg)) as conn, conn.cursor().copy(sql) as copy:
            data = b"".join(bytes(b) for b in copy)
        lines = data.splitlines(keepends=True)  # seeded values have no embedded newlines
        out = b"".join(rw.copy_data(line) for line in lines)
        assert len(out.splitlines()) == len(lines)
        for secret in SECRETS:
            assert secret.encode() not in out, (secret, sql)
        assert b"Ada Lovelace" in out


def test_error_text_of_a_failed_cast_is_masked(pg, catalog):
    sm = masking()
    sql = "SELECT ssn::int FROM customers"
    plan = sm.plan(sql, catalog)
    with psycopg.connect(**dsn(pg)) as conn, pytest.raises(psycopg.Error) as e:
        conn.execute(sql)
    diag = e.value.diag
    fields = {"M": diag.message_primary or "", "D": diag.message_detail or ""}
    assert "-" in fields["M"]  # the server printed the value
    out = sm.mask_error_fields(fields, plan, catalog)
    for secret in SECRETS:
        assert secret not in out["M"]


def test_unique_violation_detail_is_masked(pg, catalog):
    sm = masking()
    with psycopg.connect(**dsn(pg)) as conn, pytest.raises(psycopg.errors.UniqueViolation) as e:
        conn.execute("INSERT INTO customers (name, email, ssn, card_number) "
                     "VALUES ('x', 'ada@example.com', '1', '2')")
    d = e.value.diag
    out = sm.mask_error_fields({"M": d.message_primary, "D": d.message_detail, "s": d.schema_name,
                                "t": d.table_name}, None, catalog)
    assert "ada@example.com" not in out["D"] and out["D"].startswith("Key (email)=")
