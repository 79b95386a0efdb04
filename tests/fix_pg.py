"""pytest plugin: one real PostgreSQL server per test session, seeded with the shop schema.

Tests prove what reached the server from its statement log (`log_statement=all`):

    mark = pg.log_position(); ...; assert "DELETE" not in pg.log_since(mark)
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

import pytest

from pgwarden.embedded import EmbeddedPostgres

SHOP_DB = "shop"
APP_USER = "app"
APP_PASSWORD = "app-secret-pw"


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
