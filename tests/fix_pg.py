"""pytest plugin: one real PostgreSQL server per test session, seeded with the shop schema.

Tests prove what reached the server from its statement log (`log_statement=all`):

    mark = pg.log_position(); ...; assert "DELETE" not in pg.log_since(mark)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import resources

import pytest

from pgwarden.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_bindir, server_major

SHOP_DB = "shop"
APP_USER = "app"
APP_PASSWORD = "app-secret-pw"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-version",
        default=os.environ.get("PGWARDEN_TEST_PG") or None,
        help="PostgreSQL major version to test against (15, 16, 18...); default: the first server found",
    )


def pytest_configure(config: pytest.Config) -> None:
    version = config.getoption("--pg-version")
    if not version:
        return
    bindir = find_bindir(int(version))  # fails now, with what to install, rather than in every test
    os.environ["PGWARDEN_PG_VERSION"] = str(version)  # servers started by subprocesses (the demo) too
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_report_header(config: pytest.Config) -> str:
    try:
        bindir = find_bindir()
    except EmbeddedPostgresError as e:
        return f"PostgreSQL: {e}"
    return f"PostgreSQL {server_major(bindir)} from {bindir}"


def shop_sql() -> str:
    return resources.files("pgwarden").joinpath("demo/shop.sql").read_text()


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres().start()
    try:
        server.psql(f"CREATE DATABASE {SHOP_DB}")
        server.psql(shop_sql(), dbname=SHOP_DB)
        server.psql(
            f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}' IN ROLE shop_reader, shop_writer",
            dbname=SHOP_DB,
        )
        server.psql(f"GRANT CREATE ON SCHEMA public TO {APP_USER}", dbname=SHOP_DB)
        yield server
    finally:
        server.stop()
