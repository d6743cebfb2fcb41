"""The admin API: health, metrics, the view of the services, pod state and links.

It listens on loopback by default, apart from the traffic port. With
``admin.token`` set, every endpoint but ``/healthz`` and ``/readyz`` requires
``Authorization: Bearer <token>``. Errors are JSON bodies with an ``error``
code and a ``message`` naming the value, as on the traffic port.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.admin_health import add_health_routes
from proxy.admin_input import SERVER_KEY, json_response, server_of
from proxy.admin_links import delete_link, get_link, get_links, put_link
from proxy.admin_pods import (
    drain_pod,
    get_pod_state,
    list_pods,
    put_pod_state,
    undrain_pod,
)
from proxy.admin_rebalance import rebalance
from proxy.admin_reload import reload_config
from proxy.errors import (
    RequestError,
    StoreDataError,
    StoreError,
    StoreUnavailableError,
)
from proxy.relay import error_response

if TYPE_CHECKING:
    from proxy.server import ProxyServer

logger = logging.getLogger("stateful_route.admin")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Rejected requests are logged at most once per this many seconds, with a
# count, so a client retrying with a wrong token cannot flood the log.
_REJECTION_LOG_INTERVAL_S = 60.0


async def healthz(request: web.Request) -> web.Response:
    """Return 200 while the process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Return 200 when the store responds and the proxy is not stopping, else 503."""
    server = server_of(request)
    if server.stopping:
        return json_response(
            {"status": "stopping", "store": server.store.backend}, status=503
        )
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
    server = server_of(request)
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
    server = server_of(request)
    return json_response(
        {
            "uptime_s": round(time.time() - server.started_at, 3),
            "pid": os.getpid(),
            "worker": server.worker,
            "in_flight": server.in_flight,
            "store": server.store.backend,
            "local_cache": {
                "entries": len(server.cache),
                "hits": server.cache.hits,
                "misses": server.cache.misses,
                "coherent": server.invalidator is not None
                and server.invalidator.connected,
                "invalidated_keys": 0
                if server.invalidator is None
                else server.invalidator.invalidated_keys,
            },
            "retries": server.retry_counters,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Return the proxy's metrics in the Prometheus text format."""
    # Imported on the first scrape, so a proxy never scraped does not load it.
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = server_of(request).metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def _require_token(
    token: str, clock: Callable[[], float] = time.monotonic
) -> Middleware:
    """Return a middleware that requires `token` on every endpoint but health.

    The token is compared in constant time. `clock` returns monotonic
    seconds, for the rate limit of the log of rejected requests.
    """
    expected = token.encode("utf-8", "surrogatepass")
    rejections = _Rejections(clock)

    @web.middleware
    async def require_token(
        request: web.Request, handler: _Handler
    ) -> web.StreamResponse:
        if request.match_info.handler in _OPEN_HANDLERS:
            return await handler(request)
        if _bearer_token_matches(request, expected):
            return await handler(request)
        rejections.note(request)
        response = error_response(
            401,
            "unauthorized",
            "missing or invalid bearer token: send the header "
            "'Authorization: Bearer <admin.token>'",
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    return require_token


def _bearer_token_matches(request: web.Request, expected: bytes) -> bool:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # surrogatepass encodes any str, so a malformed header fails the
    # comparison instead of raising.
    presented = credentials.strip().encode("utf-8", "surrogatepass")
    return hmac.compare_digest(presented, expected)


class _Rejections:
    """Counts requests rejected for their token and logs them, rate-limited."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._count = 0
        self._next_log_at = 0.0

    def note(self, request: web.Request) -> None:
        self._count += 1
        now = self._clock()
        if now < self._next_log_at:
            return
        logger.warning(
            "rejected %d admin requests without a valid token, the last one "
            "%s %s from %s",
            self._count,
            request.method,
            request.path,
            request.remote,
        )
        self._count = 0
        self._next_log_at = now + _REJECTION_LOG_INTERVAL_S


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn the errors of the handlers into JSON error responses."""
    try:
        return await handler(request)
    except RequestError as exc:
        logger.debug(
            "admin rejected %s %s with %d: %s",
            request.method,
            request.path,
            exc.status,
            exc.message,
        )
        return error_response(exc.status, exc.code, exc.message, **exc.details)
    except StoreUnavailableError as exc:
        # The store logs the start and the end of an outage, so one line per
        # request is kept at DEBUG.
        logger.debug(
            "store unavailable for %s %s: %s", request.method, request.path, exc
        )
        return error_response(
            503,
            "store_unavailable",
            "the link store is unavailable, retry later",
            backend=exc.backend,
        )
    except StoreDataError as exc:
        logger.error(
            "invalid store data for %s %s: %s", request.method, request.path, exc
        )
        return error_response(500, "invalid_store_data", str(exc))
    except StoreError as exc:
        logger.error("store failed for %s %s: %s", request.method, request.path, exc)
        return error_response(500, "store_error", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """Return aiohttp's own errors, such as an unknown path, as JSON."""
    code = exc.reason.lower().replace(" ", "_")
    if exc.status == 404:
        return error_response(404, code, f"no admin endpoint at {request.path}")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        response = error_response(
            405,
            code,
            f"method {request.method} is not allowed on {request.path}; "
            f"allowed: {allowed}",
        )
        response.headers["Allow"] = allowed
        return response
    return error_response(exc.status, code, exc.text or exc.reason)


_OPEN_HANDLERS: frozenset[object] = frozenset({healthz, readyz})


def build_admin_app(server: ProxyServer) -> web.Application:
    """Return the admin application of `server`, with every endpoint routed."""
    settings = server.config.admin
    middlewares: list[Middleware] = [_json_errors]
    if settings.token:
        middlewares.append(_require_token(settings.token))
    elif not _is_loopback(settings.host):
        logger.warning(
            "the admin API listens on %s without admin.token: anyone who can "
            "reach it can drain pods and change links",
            settings.host,
        )
    app = web.Application(middlewares=middlewares)
    app[SERVER_KEY] = server

    router = app.router
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    router.add_get("/v1/status", status)
    router.add_get("/metrics", metrics)
    router.add_get("/v1/services", list_services)
    router.add_post("/v1/reload", reload_config)
    # Path values match any character but '/', so that a value with '{' or
    # '}' reaches validation and gets a 400, not a 404.
    pods = "/v1/services/{service:[^/]+}/pods"
    router.add_get(pods, list_pods)
    router.add_post(pods + "/{index:[^/]+}/drain", drain_pod)
    router.add_post(pods + "/{index:[^/]+}/undrain", undrain_pod)
    router.add_post("/v1/services/{service:[^/]+}/rebalance", rebalance)
    add_health_routes(router)
    router.add_get("/v1/pod/state", get_pod_state)
    router.add_put("/v1/pod/state", put_pod_state)
    links = "/v1/links/{namespace:[^/]+}/{uid:[^/]+}"
    router.add_get(links, get_links)
    router.add_get(links + "/{service:[^/]+}", get_link)
    router.add_put(links + "/{service:[^/]+}", put_link)
    router.add_delete(links + "/{service:[^/]+}", delete_link)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
