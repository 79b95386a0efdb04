"""`pgwarden proxy --config FILE`: the standalone proxy (also what the sidecar runs).

`start_proxy` is the one way to assemble a running proxy from YAML documents; the CLI, the demo
and the test fixtures all use it, so what is tested is what runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass

from pgwarden.errors import UserError
from pgwarden.proxy.config import ProxyConfig, parse_proxy_config
from pgwarden.proxy.hooks import close_runtime, open_runtime, prepare_runtime, session_hooks
from pgwarden.proxy.reload import watch
from pgwarden.proxy.server import ProxyServer
from pgwarden.resources import Document, ResourceError, load_documents

log = logging.getLogger("pgwarden.proxy")


@dataclass
class RunningProxy:
    server: ProxyServer
    config: ProxyConfig
    health_runner: object | None = None
    watcher: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, drain_timeout: float | None = 0) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        await self.server.drain(timeout=drain_timeout)
        await close_runtime(self.server.runtime)
        if self.health_runner is not None:
            await self.health_runner.cleanup()  # type: ignore[attr-defined]


def build_server(docs: list[Document]) -> ProxyServer:
    """Validate the documents and assemble the proxy; raises ResourceError on bad config."""
    config = parse_proxy_config(docs)
    runtime = prepare_runtime(config, docs)
    return ProxyServer(config=config, runtime=runtime)


async def start_proxy(docs: list[Document], watch_paths: list[str] | None = None,
                      reload_interval: float = 2.0) -> RunningProxy:
    """Start serving; with `watch_paths`, follow changes to those files (hot reload)."""
    server = build_server(docs)
    await open_runtime(server.runtime, server.config)
    server.hooks = session_hooks(server.runtime, server.config)
    if server.runtime.token_auth is not None:
        server.token_auth = server.runtime.token_auth.authenticate
    await server.start()
    runner = None
    if server.config.health_port:
        from pgwarden.proxy.health import start_health

        runner = await start_health(server, server.config.health_host, server.config.health_port)
    running = RunningProxy(server=server, config=server.config, health_runner=runner)
    if watch_paths:
        running.watcher = asyncio.get_running_loop().create_task(
            watch(server, watch_paths, server.reload_status, reload_interval)
        )
    return running


async def serve_forever(docs: list[Document], paths: list[str]) -> None:
    running = await start_proxy(docs, watch_paths=paths)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: no new connections; waiting up to %ss for statements in flight", running.config.drain_timeout)
    await running.stop(drain_timeout=None)


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pure asyncio still works, somewhat slower
        pass


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        docs = load_documents(args.config)
        build_server(docs)  # validate before binding anything
    except ResourceError as e:
        raise UserError(f"invalid configuration: {e}") from e
    install_uvloop()
    asyncio.run(serve_forever(docs, args.config))
    return 0
