"""Small helpers shared by the proxy tests: polling instead of sleeping, and looking at the server
directly (as its superuser, not through the proxy)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

from pgwarden.embedded import EmbeddedPostgres

T = TypeVar("T")


def wait_until(
    check: Callable[[], T], timeout: float = 15, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def superuser(pg: EmbeddedPostgres, dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(pg.dsn(dbname=dbname), autocommit=True)


def running_queries(pg: EmbeddedPostgres, marker: str) -> list[tuple[int, str, str]]:
    """(pid, state, query) of the server's backends whose query text contains `marker`."""
    with superuser(pg) as c:
        rows = c.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        ).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def active_queries(pg: EmbeddedPostgres, marker: str) -> list[tuple[int, str, str]]:
    return [r for r in running_queries(pg, marker) if r[1] == "active"]
