"""pytest plugin: a real pgwarden proxy in front of the session's PostgreSQL.

The proxy runs on its own event loop in a background thread (as it would in its own process),
so synchronous clients (psql, pgbench, pg8000, psycopg) and asyncio ones (asyncpg) alike talk
to it over real TCP. `make_proxy(...)` builds one from YAML documents; `proxy` is the default:
static user `agent` / `agent-pw`, defaultAction allow, no policy documents.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from fix_pg import APP_PASSWORD, APP_USER, SHOP_DB

from pgwarden.embedded import EmbeddedPostgres
from pgwarden.proxy.main import RunningProxy, start_proxy
from pgwarden.resources import parse_documents

AGENT_USER = "agent"
AGENT_PASSWORD = "agent-pw"


class ProxyThread:
    """An event loop in a thread; coroutines are run on it with `call`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="pgwarden-proxy")
        self.thread.start()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class ProxyHandle:
    running: RunningProxy
    runner: ProxyThread
    pg: EmbeddedPostgres
    user: str = AGENT_USER
    password: str = AGENT_PASSWORD
    host: str = "127.0.0.1"
    dbname: str = SHOP_DB

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def server(self) -> Any:
        return self.running.server

    def dsn(self, **over: Any) -> str:
        parts = {"host": self.host, "port": self.port, "dbname": self.dbname, "user": self.user,
                 "password": self.password, "sslmode": "disable", **over}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    async def asyncpg(self) -> Any:
        """An asyncpg connection through the proxy as this handle's user (no TLS)."""
        import asyncpg

        return await asyncpg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                     database=self.dbname, ssl=False)

    def env(self, **over: str) -> dict[str, str]:
        return {**os.environ, "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                "PGPASSWORD": self.password, "PGDATABASE": self.dbname, "PGSSLMODE": "disable", **over}

    def psql(self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-v", "ON_ERROR_STOP=1", *args],
            capture_output=True, text=True, env=self.env(), input=input, check=check, timeout=timeout,
        )

    def stop(self, drain_timeout: float = 0) -> None:
        self.runner.call(self.running.stop(drain_timeout=drain_timeout))


def proxy_documents(pg: EmbeddedPostgres, *, proxy_spec: dict[str, Any] | None = None,
                    connection_spec: dict[str, Any] | None = None, extra: list[dict[str, Any]] | None = None) -> str:
    """YAML for a DatabaseConnection `shop` + ProxyConfig (+ extra documents)."""
    api = "pgwarden.dev/v1alpha1"
    conn = {"host": pg.host, "port": pg.port, "database": SHOP_DB, "sslMode": "disable", **(connection_spec or {})}
    spec: dict[str, Any] = {
        "connectionRef": {"name": "shop"},
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"username": APP_USER, "password": APP_PASSWORD},
        "users": [{"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}],
        "defaultAction": "allow",
    }
    spec.update(proxy_spec or {})
    docs = [
        {"apiVersion": api, "kind": "DatabaseConnection", "metadata": {"name": "shop"}, "spec": conn},
        {"apiVersion": api, "kind": "ProxyConfig", "metadata": {"name": "test"}, "spec": spec},
        *(extra or []),
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="session")
def proxy_thread() -> Iterator[ProxyThread]:
    runner = ProxyThread()
    yield runner
    runner.close()


@pytest.fixture
def make_proxy(pg: EmbeddedPostgres, proxy_thread: ProxyThread) -> Iterator[Callable[..., ProxyHandle]]:
    started: list[ProxyHandle] = []

    def make(**kw: Any) -> ProxyHandle:
        text = kw.pop("yaml_text", None) or proxy_documents(pg, **kw)
        running = proxy_thread.call(start_proxy(parse_documents(text)))
        handle = ProxyHandle(running=running, runner=proxy_thread, pg=pg)
        started.append(handle)
        return handle

    yield make
    for h in started:
        try:
            h.stop()
        except Exception:
            pass


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyHandle]) -> ProxyHandle:
    return make_proxy()
