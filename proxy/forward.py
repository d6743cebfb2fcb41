"""The forwarding handler: read the routing headers, route, relay to the pod.

Errors map to statuses by where they come from: the client (400, 404), the
store (503), the pod (502, or 504 on a timeout). Bodies stream both ways and
are never decompressed. Lower layers raise; this module logs each failure
once, with the ids involved.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Config
from proxy.errors import NoPodError, RequestError, StoreDataError, StoreUnavailableError
from proxy.names import dns_label_problem, uid_problem
from proxy.pods import Pod
from proxy.routing import Route, Router
from proxy.services import Service
from proxy.statetable import PodStates

logger = logging.getLogger("stateful_route.forward")

# Hop-by-hop headers (RFC 9110, section 7.6.1) apply to one connection and
# are never relayed. Headers named in Connection are dropped as well.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Headers that the client session must not add on its own, so the pod sees
# the client's headers and nothing more.
_SKIP_AUTO_HEADERS = frozenset(
    {"Accept", "Accept-Encoding", "User-Agent", "Content-Type"}
)
_RELAY_CHUNK_SIZE = 64 * 1024


def error_response(
    status: int, code: str, message: str, **details: str | int
) -> web.Response:
    """Return a response with a short JSON body describing a failure."""
    body = orjson.dumps({"error": code, "message": message, **details})
    return web.Response(status=status, body=body, content_type="application/json")


def strip_hop_by_hop(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Return a copy of `headers` without hop-by-hop headers, order kept."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(","))
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in HOP_BY_HOP and lowered not in named:
            kept.add(name, value)
    return kept


class Forwarder:
    """The request handler of the proxy port.

    :param config: the configuration.
    :param services: the configured services by name.
    :param router: computes the linked pod.
    :param states: the current pod sets with their state records.
    :param session: the client session holding the pooled pod connections.
    """

    def __init__(
        self,
        config: Config,
        services: dict[str, Service],
        router: Router,
        states: PodStates,
        session: aiohttp.ClientSession,
    ) -> None:
        self._proxy = config.proxy
        self._services = services
        self._router = router
        self._states = states
        self._session = session
        self._timeouts = {
            name: aiohttp.ClientTimeout(
                total=None,
                sock_connect=service.settings.connect_timeout_s,
                sock_read=service.settings.read_timeout_s,
            )
            for name, service in services.items()
        }
        self.in_flight = 0
        # Created by wait_idle only, so the request path does no event work
        # until the proxy stops.
        self._idle: asyncio.Event | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route one request to its pod and relay the response."""
        self.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for no request in flight; return whether none is."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ids: dict[str, Any] = {}
        try:
            namespace, service, uid = self._read_routing_headers(request, ids)
            pod_set = self._states.get(namespace, service.name)
            if pod_set is None:
                pod_set = await self._states.load(namespace, service.name)
            if uid is None:
                route = self._router.pick_unlinked(service, pod_set)
            else:
                route = await self._router.route(namespace, service, pod_set, uid)
        except RequestError as exc:
            logger.info(
                "rejected %s %s with %d: %s %s",
                request.method,
                request.path,
                exc.status,
                exc.message,
                _ids(ids),
            )
            return error_response(exc.status, exc.code, exc.message, **exc.details)
        except StoreUnavailableError as exc:
            # The store logs the start and end of an outage; one line per
            # request would flood the log.
            logger.debug("store unavailable for %s: %s", _ids(ids), exc)
            return error_response(
                503,
                "store_unavailable",
                "the link store is unavailable, retry later",
                backend=exc.backend,
            )
        except StoreDataError as exc:
            logger.error("invalid link data for %s: %s", _ids(ids), exc)
            return error_response(500, "invalid_link", str(exc))
        except NoPodError as exc:
            logger.warning("no routable pod for %s", _ids(ids))
            response = error_response(
                503,
                "no_pod",
                f"service {exc.service!r} has no routable pod in "
                f"namespace {exc.namespace!r}",
                service=exc.service,
                namespace=exc.namespace,
            )
            response.headers["Retry-After"] = str(self._retry_after_s(exc.service))
            return response

        ids["pod"] = route.pod.index
        return await self._forward(request, route, service, ids)

    def _retry_after_s(self, service: str) -> int:
        """Return seconds until the pod states are read again, at least 1."""
        return max(1, math.ceil(self._services[service].settings.state_refresh_s))

    def _read_routing_headers(
        self, request: web.BaseRequest, ids: dict[str, Any]
    ) -> tuple[str, Service, str | None]:
        proxy = self._proxy
        if not request.raw_path.startswith("/"):
            # Absolute-form and authority-form targets name a host; the proxy
            # only ever connects to configured pods.
            raise RequestError(
                400,
                "invalid_target",
                "request target must be a path starting with '/'",
                value=request.raw_path[:200],
            )

        namespace = _single_header(request, proxy.namespace_header)
        if namespace is None:
            namespace = proxy.default_namespace
        else:
            problem = dns_label_problem(namespace)
            if problem is not None:
                raise RequestError(
                    400,
                    "invalid_namespace",
                    f"namespace {problem}",
                    header=proxy.namespace_header,
                    value=namespace,
                )
        ids["namespace"] = namespace

        service_name = _single_header(request, proxy.service_header)
        if service_name is None:
            service_name = proxy.default_service
            if not service_name:
                raise RequestError(
                    400,
                    "missing_service",
                    f"missing {proxy.service_header} header and no default service",
                    header=proxy.service_header,
                )
        ids["service"] = service_name
        service = self._services.get(service_name)
        if service is None:
            raise RequestError(
                404,
                "unknown_service",
                f"service {service_name!r} is not configured",
                header=proxy.service_header,
                value=service_name,
            )
        if not service.settings.serves(namespace):
            raise RequestError(
                404,
                "unknown_namespace",
                f"service {service_name!r} is not configured in namespace "
                f"{namespace!r}",
                header=proxy.namespace_header,
                value=namespace,
            )

        uid = _single_header(request, proxy.uid_header)
        if uid is None:
            if service.settings.allow_without_uid:
                return namespace, service, None
            raise RequestError(
                400,
                "missing_uid",
                f"missing {proxy.uid_header} header",
                header=proxy.uid_header,
            )
        ids["uid"] = uid
        problem = uid_problem(uid)
        if problem is not None:
            raise RequestError(
                400, "invalid_uid", f"UID {problem}", header=proxy.uid_header
            )
        return namespace, service, uid

    async def _forward(
        self,
        request: web.BaseRequest,
        route: Route,
        service: Service,
        ids: dict[str, Any],
    ) -> web.StreamResponse:
        pod = route.pod
        address = pod.address
        path, _, query = request.raw_path.partition("?")
        url = URL.build(
            scheme="http",
            host=address.host,
            port=address.port,
            path=path,
            query_string=query,
            encoded=True,
        )
        headers = self._upstream_headers(request)
        if route.previous is not None:
            # Tell the pod that it received a moved user, so it can rebuild
            # the user's state.
            headers["X-Route-Previous-Pod"] = str(route.previous)
            headers["X-Route-Reason"] = route.reason
        body = request.content if request.body_exists else None

        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._timeouts[service.name],
                skip_auto_headers=_SKIP_AUTO_HEADERS,
            ) as upstream:
                response = self._downstream_response(upstream, pod)
                # Errors of the pod's side come from reading upstream.content;
                # the writes below fail only when the client is gone.
                if not await _client_write(response.prepare(request), ids):
                    return response
                async for chunk in upstream.content.iter_chunked(_RELAY_CHUNK_SIZE):
                    if not await _client_write(response.write(chunk), ids):
                        return response
                await _client_write(response.write_eof(), ids)
                return response
        except asyncio.CancelledError:
            logger.debug("client went away, cancelled upstream request %s", _ids(ids))
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if response is not None and response.prepared:
                return _abort_relay(request, response, exc, ids)
            return _upstream_error(exc, pod, ids)

    def _upstream_headers(self, request: web.BaseRequest) -> CIMultiDict[str]:
        headers = strip_hop_by_hop(request.headers)
        peer = request.remote or ""
        forwarded_for = ", ".join(headers.getall("X-Forwarded-For", ()))
        headers.popall("X-Forwarded-For", None)
        headers["X-Forwarded-For"] = (
            f"{forwarded_for}, {peer}" if forwarded_for else peer
        )
        headers["X-Forwarded-Proto"] = request.scheme
        host = request.headers.get("Host")
        if host is not None:
            headers["X-Forwarded-Host"] = host
        return headers

    def _downstream_response(
        self, upstream: aiohttp.ClientResponse, pod: Pod
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(strip_hop_by_hop(upstream.headers))
        if self._proxy.routed_pod_header:
            response.headers[self._proxy.routed_pod_header] = str(pod.index)
        return response


async def _client_write(write: Awaitable[object], ids: dict[str, Any]) -> bool:
    """Await one write to the client; return False when the client is gone."""
    try:
        await write
    except ConnectionError as exc:
        logger.debug("client went away during the response %s: %r", _ids(ids), exc)
        return False
    return True


def _single_header(request: web.BaseRequest, name: str) -> str | None:
    """Return the value of a header that must appear at most once."""
    values = request.headers.getall(name, ())
    if not values:
        return None
    if len(values) > 1:
        raise RequestError(
            400,
            "repeated_header",
            f"{name} appears {len(values)} times, expected once",
            header=name,
        )
    return values[0]


def _upstream_error(exc: BaseException, pod: Pod, ids: dict[str, Any]) -> web.Response:
    if isinstance(exc, TimeoutError):
        kind = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "read"
        logger.warning("%s timeout from %s %s", kind, pod, _ids(ids))
        return error_response(
            504, "pod_timeout", f"{kind} timeout from pod {pod.index}", pod=pod.index
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        logger.warning("cannot connect to %s %s: %s", pod, _ids(ids), exc.os_error)
        return error_response(
            502, "pod_unreachable", f"cannot connect to pod {pod.index}", pod=pod.index
        )
    logger.warning("request to %s failed %s: %r", pod, _ids(ids), exc)
    return error_response(
        502,
        "pod_error",
        f"pod {pod.index} failed: {type(exc).__name__}",
        pod=pod.index,
    )


def _abort_relay(
    request: web.BaseRequest,
    response: web.StreamResponse,
    exc: BaseException,
    ids: dict[str, Any],
) -> web.StreamResponse:
    """Close the client connection of a response whose body broke off.

    The status line is already sent, so the only honest signal left is a
    connection closed before the end of the body.
    """
    logger.warning("response from pod broke off %s: %r", _ids(ids), exc)
    transport = request.transport
    if transport is not None:
        transport.abort()
    return response


def _ids(ids: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in ids.items())
