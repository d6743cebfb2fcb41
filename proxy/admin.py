"""The admin API: the proxy's own health and its view of the services.

It listens on loopback by default, apart from the traffic port.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.errors import StoreUnavailableError

if TYPE_CHECKING:
    from proxy.server import ProxyServer

_SERVER_KEY = web.AppKey["ProxyServer"]("server")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json"
    )


async def healthz(request: web.Request) -> web.Response:
    """Return 200 while the process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Return 200 when the store answers, 503 otherwise."""
    server = request.app[_SERVER_KEY]
    try:
        await server.store.ping()
    except StoreUnavailableError as exc:
        return json_response(
            {
                "status": "unavailable",
                "store": server.store.backend,
                "reason": str(exc),
            },
            status=503,
        )
    return json_response({"status": "ready", "store": server.store.backend})


async def list_services(request: web.Request) -> web.Response:
    """Return every service with its strategy and pods per namespace."""
    server = request.app[_SERVER_KEY]
    services = []
    for service in server.services.values():
        settings = service.settings
        namespaces = settings.namespaces or (server.config.proxy.default_namespace,)
        services.append(
            {
                "name": service.name,
                "strategy": settings.strategy,
                "allow_without_uid": settings.allow_without_uid,
                "pods": {
                    namespace: [
                        {"index": pod.index, "address": str(pod.address)}
                        for pod in service.pods(namespace) or ()
                    ]
                    for namespace in namespaces
                },
            }
        )
    return json_response({"services": services})


async def status(request: web.Request) -> web.Response:
    """Return counters of the running proxy."""
    server = request.app[_SERVER_KEY]
    return json_response(
        {
            "uptime_s": round(time.time() - server.started_at, 3),
            "in_flight": server.in_flight,
            "store": server.store.backend,
            "local_cache": {
                "entries": len(server.cache),
                "hits": server.cache.hits,
                "misses": server.cache.misses,
            },
        }
    )


def build_admin_app(server: ProxyServer) -> web.Application:
    app = web.Application()
    app[_SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/services", list_services)
    app.router.add_get("/v1/status", status)
    return app
