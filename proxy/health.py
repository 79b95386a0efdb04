"""Liveness and readiness over HTTP, for Kubernetes probes.

/healthz: the process is serving its event loop. /readyz: the listener is open and the proxy is
not draining; 503 otherwise, so a pod that is shutting down stops receiving new agents.
"""

from __future__ import annotations

import json

from aiohttp import web

from pgwarden.proxy.server import ProxyServer


def make_app(server: ProxyServer) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready = server._server is not None and server._server.is_serving() and not server.draining
        body = {"ready": ready, "sessions": server.active_sessions, "draining": server.draining,
                "config": server.reload_status.as_dict()}
        return web.Response(status=200 if ready else 503, text=json.dumps(body) + "\n", content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_health(server: ProxyServer, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(server), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
