"""Drivers outside Python through the proxy, unchanged: the PostgreSQL JDBC driver and node-postgres.

Each test runs a small program as an application would: it logs in with SCRAM as the static
user `agent`, runs parameterized and plain queries, hits an error and carries on, and prints
what it saw; the test reads that output. The drivers are fetched once with their ordinary
clients (Maven, npm) into a cache folder (`PGWARDEN_TEST_DRIVERS`, default
~/.cache/pgwarden-test-drivers); a JDBC jar that is already on the machine (the local Maven
repository, Debian's libpostgresql-jdbc-java) is used as is. Without the runtime or the
driver the test is skipped and says why.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from fix_proxy import ProxyHandle

from pgwarden.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow

JDBC_VERSION = "42.7.4"


def drivers_cache() -> Path:
    d = Path(os.environ.get("PGWARDEN_TEST_DRIVERS") or Path.home() / ".cache" / "pgwarden-test-drivers")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _first_error(text: str, n: int = 300) -> str:
    """The first line that says what went wrong (Maven and npm print pages of advice after it)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    picked = next((ln for ln in lines if "ERROR" in ln or "ERR!" in ln), lines[0] if lines else "")
    return picked[:n]


def _tail(text: str, n: int = 600) -> str:
    text = text.strip()
    return text[-n:] if len(text) > n else text


# -- JDBC -------------------------------------------------------------------------------------
def jdbc_jar() -> Path:
    """The PostgreSQL JDBC driver jar: cached, already on the machine, or fetched with Maven."""
    cached = drivers_cache() / "jdbc"
    found = sorted(glob.glob(str(cached / "postgresql-*.jar")))
    found += sorted(
        glob.glob(str(Path.home() / ".m2/repository/org/postgresql/postgresql/*/postgresql-*.jar"))
    )
    found += [p for p in ["/usr/share/java/postgresql.jar"] if os.path.exists(p)]
    if found:
        return Path(found[0])
    if shutil.which("mvn") is None:
        pytest.skip("no PostgreSQL JDBC jar on this machine and no mvn to fetch one")
    try:
        r = subprocess.run(
            [
                "mvn", "-q", "-B", "dependency:copy",
                f"-Dartifact=org.postgresql:postgresql:{JDBC_VERSION}",
                f"-DoutputDirectory={cached}",
            ],
            capture_output=True, text=True, timeout=300, cwd=drivers_cache(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("fetching the PostgreSQL JDBC driver with Maven timed out (no network?)")
    jar = cached / f"postgresql-{JDBC_VERSION}.jar"
    if r.returncode != 0 or not jar.exists():
        pytest.skip(
            "could not fetch org.postgresql:postgresql with Maven (no network?); install "
            f"libpostgresql-jdbc-java or put a jar in {cached}: {_first_error(r.stdout + r.stderr)}"
        )
    return jar


JAVA_PROGRAM = r"""
import java.sql.*;

public class ThroughProxy {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        String marker = args[1];
        try (Connection conn = DriverManager.getConnection(url, args[2], args[3])) {
            System.out.println("server=" + conn.getMetaData().getDatabaseProductName());
            // more runs than prepareThreshold (5): the driver moves to a named server-side statement
            try (PreparedStatement ps = conn.prepareStatement("SELECT name, email FROM customers WHERE id = ?")) {
                for (int i = 0; i < 7; i++) {
                    ps.setInt(1, 1 + i % 3);
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            System.out.println("customer=" + rs.getString("name") + "|" + rs.getString(2));
                        }
                    }
                }
            }
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT count(*), sum(total_cents), now() FROM orders WHERE customer_id = ? AND status <> ?")) {
                ps.setLong(1, 1);
                ps.setString(2, "no-such-status");
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    System.out.println("orders=" + rs.getLong(1) + "|" + (rs.getLong(2) > 0) + "|" + (rs.getTimestamp(3) != null));
                }
            }
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT count(*) FROM orders")) {
                rs.next();
                System.out.println("all_orders=" + rs.getInt(1));
            }
            // a transaction with a batch, rolled back
            conn.setAutoCommit(false);
            try (PreparedStatement ps = conn.prepareStatement("INSERT INTO audit_scratch (payload) VALUES (?)")) {
                for (int i = 0; i < 3; i++) {
                    ps.setString(1, marker + "-" + i);
                    ps.addBatch();
                }
                int total = 0;
                for (int n : ps.executeBatch()) total += n;
                System.out.println("batch=" + total);
            }
            try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM audit_scratch WHERE payload LIKE ?")) {
                ps.setString(1, marker + "-%");
                try (ResultSet rs = ps.executeQuery()) { rs.next(); System.out.println("in_tx=" + rs.getInt(1)); }
                conn.rollback();
                conn.setAutoCommit(true);
                try (ResultSet rs = ps.executeQuery()) { rs.next(); System.out.println("after_rollback=" + rs.getInt(1)); }
            }
            // an error, then the connection still works
            try (Statement st = conn.createStatement()) {
                st.executeQuery("SELECT 1/0");
                System.out.println("error=none");
            } catch (SQLException e) {
                System.out.println("error=" + e.getSQLState());
            }
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT 'still here'")) {
                rs.next();
                System.out.println("after_error=" + rs.getString(1));
            }
        }
    }
}
"""


def test_jdbc_through_proxy(proxy: ProxyHandle, pg: EmbeddedPostgres, tmp_path: Path) -> None:
    if shutil.which("java") is None or shutil.which("javac") is None:
        pytest.skip("no Java runtime and compiler (java, javac) on this machine")
    jar = jdbc_jar()
    (tmp_path / "ThroughProxy.java").write_text(JAVA_PROGRAM)
    r = subprocess.run(
        ["javac", "-cp", str(jar), "-d", str(tmp_path), str(tmp_path / "ThroughProxy.java")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    marker = "jdbc" + uuid.uuid4().hex[:10]
    url = f"jdbc:postgresql://{proxy.host}:{proxy.port}/{proxy.dbname}?sslmode=disable&ApplicationName=jdbc-test"
    mark = pg.log_position()
    r = subprocess.run(
        ["java", "-cp", f"{jar}{os.pathsep}{tmp_path}", "ThroughProxy", url, marker, proxy.user, proxy.password],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, f"jar {jar}\n{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    out = dict(line.split("=", 1) for line in lines)
    assert out["server"] == "PostgreSQL"
    customers = [line.removeprefix("customer=") for line in lines if line.startswith("customer=")]
    assert customers[:3] == [
        "Ada Lovelace|ada@example.com",
        "Grace Hopper|grace@example.org",
        "Alan Turing|alan@example.net",
    ], customers
    assert len(customers) == 7 and customers[6] == customers[0]
    count, has_total, has_now = out["orders"].split("|")
    assert int(count) > 0 and has_total == "true" and has_now == "true"
    assert out["all_orders"] == "20"
    assert out["batch"] == "3" and out["in_tx"] == "3" and out["after_rollback"] == "0"
    assert out["error"] == "22012"
    assert out["after_error"] == "still here"
    # the driver really used the extended protocol with a named statement, through to the server
    log = pg.log_since(mark)
    assert "execute S_" in log and "SELECT name, email FROM customers WHERE id = $1" in log, _tail(log, 2000)


# -- node-postgres ----------------------------------------------------------------------------
def node_pg_modules() -> Path:
    """node_modules holding pg@8, installed once with npm into the cache folder."""
    prefix = drivers_cache() / "node"
    modules = prefix / "node_modules"
    if (modules / "pg" / "package.json").exists():
        return modules
    if shutil.which("npm") is None:
        pytest.skip("no npm to install node-postgres")
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), "pg@8"],
            capture_output=True, text=True, timeout=300, cwd=prefix,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("npm install pg@8 timed out (no network?)")
    if r.returncode != 0 or not (modules / "pg" / "package.json").exists():
        pytest.skip(f"npm install pg@8 failed (no network?): {_first_error(r.stdout + r.stderr)}")
    return modules


NODE_PROGRAM = r"""
const { Client } = require('pg');
const [port, user, password, database, marker] = process.argv.slice(2);

async function main() {
  const client = new Client({ host: '127.0.0.1', port: Number(port), user, password, database, ssl: false,
                              application_name: 'node-pg-test' });
  await client.connect();
  const out = { version: require('pg/package.json').version };
  out.param = (await client.query('SELECT name, email FROM customers WHERE id = $1', [2])).rows;
  out.simple = (await client.query('SELECT count(*)::int AS n FROM orders')).rows[0].n;
  out.multi = (await client.query('SELECT 1 AS a; SELECT 2 AS b')).map((r) => r.rows[0]);
  const named = { name: 'cust_by_id', text: 'SELECT name FROM customers WHERE id = $1' };
  out.named = [];
  for (const id of [1, 3, 1]) out.named.push((await client.query({ ...named, values: [id] })).rows[0].name);
  out.types = (await client.query('SELECT $1::int + 1 AS i, $2::text AS t, NULL::text AS n, true AS b',
                                  [41, 'héllo'])).rows[0];
  await client.query('BEGIN');
  await client.query('INSERT INTO audit_scratch (payload) VALUES ($1), ($2)', [marker + '-a', marker + '-b']);
  out.in_tx = (await client.query('SELECT count(*)::int AS n FROM audit_scratch WHERE payload LIKE $1',
                                  [marker + '-%'])).rows[0].n;
  await client.query('ROLLBACK');
  out.after_rollback = (await client.query('SELECT count(*)::int AS n FROM audit_scratch WHERE payload LIKE $1',
                                           [marker + '-%'])).rows[0].n;
  try {
    await client.query('SELECT 1/$1::int', [0]);
    out.error = null;
  } catch (e) {
    out.error = e.code;
  }
  out.after_error = (await client.query('SELECT $1::text AS s', ['still here'])).rows[0].s;
  await client.end();
  console.log(JSON.stringify(out));
}

main().catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_postgres_through_proxy(proxy: ProxyHandle, pg: EmbeddedPostgres, tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("no node on this machine")
    modules = node_pg_modules()
    script = tmp_path / "through_proxy.js"
    script.write_text(NODE_PROGRAM)
    marker = "node" + uuid.uuid4().hex[:10]
    mark = pg.log_position()
    r = subprocess.run(
        ["node", str(script), str(proxy.port), proxy.user, proxy.password, proxy.dbname, marker],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NODE_PATH": str(modules)},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["version"].startswith("8.")
    assert out["param"] == [{"name": "Grace Hopper", "email": "grace@example.org"}]
    assert out["simple"] == 20
    assert out["multi"] == [{"a": 1}, {"b": 2}]
    assert out["named"] == ["Ada Lovelace", "Alan Turing", "Ada Lovelace"]
    assert out["types"] == {"i": 42, "t": "héllo", "n": None, "b": True}
    assert out["in_tx"] == 2 and out["after_rollback"] == 0
    assert out["error"] == "22012"
    assert out["after_error"] == "still here"
    log = pg.log_since(mark)
    # the named statement was parsed once on the server and executed three times
    assert log.count("execute cust_by_id") == 3, _tail(log, 2000)
