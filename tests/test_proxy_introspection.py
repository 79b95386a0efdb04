"""What people and agents use to look at a database works through the gate, on each version.

Under the example AccessPolicy (`systemCatalogs: read`, default deny) a newcomer's first moves —
psql's `\\d` family with the server version's own psql — must not be refused. The suite's
`--pg-version` picks the server and puts that version's psql first on PATH.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from fix_proxy import ProxyHandle, proxy_documents
from test_proxy_drivers import jdbc_jar

from pgwarden.proxy.main import start_proxy
from pgwarden.resources import parse_documents

ROOT = Path(__file__).resolve().parents[1]


def _server_major(pg) -> int:
    return int(pg.psql("SHOW server_version_num").strip()) // 10000


def example_policy() -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "access-policy.yaml").read_text())
    doc["spec"]["connectionRef"] = {"name": "shop"}
    return doc


def example_masking() -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "masking-rule.yaml").read_text())
    doc["spec"]["connectionRef"] = {"name": "shop"}
    return doc


# psql's describe commands (psql --help=commands, "Informational"); objects of the shop schema
PSQL_DESCRIBE = [
    r"\d",
    r"\d customers",
    r"\d+ orders",
    r"\d customer_contacts",
    r"\d+ customer_contacts",
    r"\d orders_pkey",
    r"\d+ orders_id_seq",
    r"\dt",
    r"\dt+",
    r"\dv",
    r"\dv+",
    r"\di",
    r"\di+",
    r"\ds",
    r"\ds+",
    r"\dm",
    r"\dE",
    r"\da",
    r"\dA",
    r"\dAc",
    r"\dAf",
    r"\dAo",
    r"\dAp",
    r"\db",
    r"\dc",
    r"\dC",
    r"\dd",
    r"\dD",
    r"\ddp",
    r"\des",
    r"\det",
    r"\dew",
    r"\df",
    r"\df+",
    r"\dF",
    r"\dFd",
    r"\dFp",
    r"\dFt",
    r"\dg",
    r"\dl",
    r"\dL",
    r"\dn",
    r"\dn+",
    r"\do",
    r"\dO",
    r"\dp",
    r"\dP",
    r"\drds",
    r"\dRp",
    r"\dT",
    r"\dT+",
    r"\du",
    r"\dx",
    r"\dx+",
    r"\dX",
    r"\dy",
    r"\l",
    r"\l+",
    r"\z",
    r"\sv customer_contacts",
    r"\dconfig",
]


# catalogs that hold passwords are never readable, whatever the policy (docs/policy.md)
PSQL_REFUSED = {
    r"\dRs": "pg_catalog.pg_subscription holds connection strings with passwords",
    r"\deu": "pg_catalog.pg_user_mappings holds passwords for other servers",
}


def _start(pg, proxy_thread, extra: list[dict]) -> ProxyHandle:
    running = proxy_thread.call(start_proxy(parse_documents(proxy_documents(pg, extra=extra))))
    return ProxyHandle(running=running, runner=proxy_thread, pg=pg)


@pytest.fixture(scope="module")
def catalog_proxy(pg, proxy_thread):
    handle = _start(pg, proxy_thread, [example_policy()])
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def masked_proxy(pg, proxy_thread):
    """The example policy and the example MaskingRule (customers' email, ssn, card_number, phone)."""
    os.environ.setdefault("PGWARDEN_MASKING_HASH_KEY", "introspection-test-key")
    handle = _start(pg, proxy_thread, [example_policy(), example_masking()])
    yield handle
    handle.stop()


@pytest.mark.parametrize("command", PSQL_DESCRIBE)
def test_psql_describe_commands_work_through_the_gate(catalog_proxy, command: str) -> None:
    out = catalog_proxy.psql("-c", command)
    assert out.returncode == 0 and "ERROR" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", sorted(PSQL_REFUSED))
def test_psql_describe_commands_over_password_catalogs_are_refused(pg, catalog_proxy, command: str) -> None:
    mark = pg.log_position()
    out = catalog_proxy.psql("-c", command)
    assert out.returncode == 1 and PSQL_REFUSED[command] in out.stderr, out.stderr
    assert PSQL_REFUSED[command].split()[0].split(".")[1] not in pg.log_since(mark)  # nothing reached it


# -- drivers and ORMs: their own introspection queries, run by the real libraries ----------------------

JAVA_METADATA = """
import java.sql.*;

public class Metadata {
    public static void main(String[] a) throws Exception {
        try (Connection c = DriverManager.getConnection(a[0], a[1], a[2])) {
            DatabaseMetaData md = c.getMetaData();
            System.out.println("version=" + md.getDatabaseMajorVersion());
            try (ResultSet r = md.getTables(null, "public", "%", new String[] {"TABLE", "VIEW"})) {
                while (r.next()) System.out.println("table=" + r.getString("TABLE_NAME") + ":" + r.getString("TABLE_TYPE"));
            }
            try (ResultSet r = md.getColumns(null, "public", "customers", "%")) {
                while (r.next()) System.out.println("column=" + r.getString("COLUMN_NAME") + ":" + r.getString("TYPE_NAME"));
            }
            try (ResultSet r = md.getPrimaryKeys(null, "public", "orders")) {
                while (r.next()) System.out.println("pk=" + r.getString("COLUMN_NAME"));
            }
            try (ResultSet r = md.getImportedKeys(null, "public", "orders")) {
                while (r.next()) System.out.println("fk=" + r.getString("FKCOLUMN_NAME") + "->" + r.getString("PKTABLE_NAME"));
            }
            try (ResultSet r = md.getIndexInfo(null, "public", "customers", true, false)) {
                while (r.next()) System.out.println("unique=" + r.getString("COLUMN_NAME"));
            }
        }
    }
}
"""


def test_jdbc_database_metadata_works_through_the_gate(pg, catalog_proxy, tmp_path: Path) -> None:
    jar = jdbc_jar()
    (tmp_path / "Metadata.java").write_text(JAVA_METADATA)
    build = subprocess.run(
        ["javac", "-cp", str(jar), "-d", str(tmp_path), str(tmp_path / "Metadata.java")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    p = catalog_proxy
    url = f"jdbc:postgresql://{p.host}:{p.port}/{p.dbname}?sslmode=disable"
    run = subprocess.run(
        ["java", "-cp", f"{jar}{os.pathsep}{tmp_path}", "Metadata", url, p.user, p.password],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = set(run.stdout.splitlines())
    assert f"version={_server_major(pg)}" in lines
    assert {"table=customers:TABLE", "table=orders:TABLE", "table=customer_contacts:VIEW"} <= lines
    assert {"column=email:text", "column=ssn:text", "column=created_at:timestamptz"} <= lines
    assert "pk=id" in lines and "fk=customer_id->customers" in lines
    assert {"unique=id", "unique=email"} <= lines


def test_sqlalchemy_inspector_works_through_the_gate(pg, catalog_proxy) -> None:
    import sqlalchemy as sa

    p = catalog_proxy
    engine = sa.create_engine(f"postgresql+psycopg://{p.user}:{p.password}@{p.host}:{p.port}/{p.dbname}")
    try:
        insp = sa.inspect(engine)
        assert {"customers", "orders", "audit_scratch"} <= set(insp.get_table_names())
        assert "customer_contacts" in insp.get_view_names()
        assert "public" in insp.get_schema_names()
        assert [c["name"] for c in insp.get_columns("customers")][:4] == ["id", "name", "email", "ssn"]
        assert insp.get_pk_constraint("orders")["constrained_columns"] == ["id"]
        fks = insp.get_foreign_keys("orders")
        assert [(f["constrained_columns"], f["referred_table"]) for f in fks] == [
            (["customer_id"], "customers")
        ]
        assert {u["column_names"][0] for u in insp.get_unique_constraints("customers")} == {"email"}
        assert any(i["column_names"] == ["email"] for i in insp.get_indexes("customers"))
        assert insp.get_check_constraints("orders")
        assert "customers" in insp.get_view_definition("customer_contacts")
        md = sa.MetaData()
        orders = sa.Table("orders", md, autoload_with=engine)  # reflection, then a query with it
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar() == 20
    finally:
        engine.dispose()


def test_psycopg_type_introspection_works_through_the_gate(pg, catalog_proxy) -> None:
    import psycopg
    from psycopg.types import TypeInfo
    from psycopg.types.composite import CompositeInfo

    with psycopg.connect(catalog_proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        info = TypeInfo.fetch(conn, "timestamptz")
        assert info is not None and info.name == "timestamptz" and info.array_oid > 0
        orders_row = CompositeInfo.fetch(conn, "orders")  # a table's row type
        assert orders_row is not None and list(orders_row.field_names[:3]) == ["id", "customer_id", "status"]


# -- masked columns stay masked in what introspection returns ----------------------------------------

SECRETS = ("ada@example.com", "123-45-6789", "4111111111111111", "grace@example.org", "+1 415 555 0101")


@pytest.mark.parametrize("command", [r"\d customers", r"\d+ customers", r"\sv customer_contacts", r"\dX", r"\dL", r"\dd",
                                     r"\dt+", r"\l"])
def test_describing_masked_tables_works_and_shows_no_values(pg, masked_proxy, command: str) -> None:
    out = masked_proxy.psql("-c", command)
    assert out.returncode == 0, out.stderr
    assert not any(s in out.stdout for s in SECRETS)


def test_column_statistics_of_masked_columns_are_not_readable(pg, masked_proxy) -> None:
    """pg_stats holds the most common values of every column: not part of systemCatalogs: read."""
    pg.psql("ANALYZE public.customers", dbname="shop")
    mark = pg.log_position()
    for sql in (
        "SELECT most_common_vals FROM pg_stats WHERE tablename = 'customers'",
        "SELECT stxdmcv FROM pg_statistic_ext_data",
        "SELECT * FROM pg_statistic",
    ):
        out = masked_proxy.psql("-A", "-t", "-c", sql)
        assert out.returncode == 1 and "pgwarden denied this statement" in out.stderr, (sql, out.stderr)
        assert not any(s in out.stdout for s in SECRETS)
    assert "most_common_vals" not in pg.log_since(mark) and "pg_statistic" not in pg.log_since(mark)


def test_a_view_over_masked_columns_returns_them_masked(pg, masked_proxy) -> None:
    out = masked_proxy.psql("-A", "-t", "-c", "SELECT email FROM customer_contacts ORDER BY id LIMIT 1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "a***@example.com"
