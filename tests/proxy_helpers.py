"""Small helpers shared by the proxy tests: polling instead of sleeping, and looking at the server
directly (as its superuser, not through the proxy)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
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


def backends_of(pg: EmbeddedPostgres, user: str) -> set[int]:
    """The pids of the server's client backends logged in as `user`."""
    with superuser(pg) as c:
        rows = c.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s", (user,)).fetchall()
    return {int(r[0]) for r in rows}


def active_queries(pg: EmbeddedPostgres, marker: str) -> list[tuple[int, str, str]]:
    return [r for r in running_queries(pg, marker) if r[1] == "active"]


class ProxyProcess:
    """`pgwarden proxy --config FILE` as a real process, with its health endpoint."""

    def __init__(self, config_text: str, folder: Path, port: int, health_port: int) -> None:
        self.port = port
        self.health_port = health_port
        self.config = folder / "proxy.yaml"
        self.config.write_text(config_text)
        self.log = folder / "proxy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgwarden.cli", "proxy", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: self.exited() or self.http("/readyz")[0] == 200, timeout=30, what="the proxy to be ready"
        )
        assert not self.exited(), self.log.read_text()

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def http(self, path: str) -> tuple[int, str]:
        """(status, body) of a GET on the health endpoint; (0, reason) when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError) as e:
            return 0, str(e)

    def status(self, field: str) -> int:
        """A `Vm*` figure of /proc/PID/status, in kB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> None:
        if not self.exited():
            self.proc.kill()
            self.proc.wait(10)
