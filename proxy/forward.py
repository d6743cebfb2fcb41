"""The forwarding handler: read the routing headers, route, relay to the pod.

Errors map to statuses by where they come from: the client (400, 404), the
store (503), the pod (502, or 504 on a timeout). Bodies stream both ways and
are never decompressed. Lower layers raise; this module logs each failure
once, with the ids involved.

Every relayed request is counted in its service's `PodStats`: in flight
while it runs, then one sample of its time and status. A request that the
client abandons ends without a sample.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.errors import NoPodError, RequestError, StoreDataError, StoreUnavailableError
from proxy.inflight import InFlight
from proxy.names import dns_label_problem, uid_problem
from proxy.relay import Relay, error_response, format_ids
from proxy.routing import Router
from proxy.services import Service
from proxy.statetable import PodStates

logger = logging.getLogger("stateful_route.forward")


# Headers by which the proxy tells a pod that a user was moved to it. Only
# the proxy sets them; a client's own values are dropped.
_ROUTE_HEADERS = ("X-Route-Previous-Pod", "X-Route-Reason")


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
        self._relay = Relay(session, config.proxy.routed_pod_header)
        self._timeouts = {
            name: aiohttp.ClientTimeout(
                total=None,
                sock_connect=service.settings.connect_timeout_s,
                sock_read=service.settings.read_timeout_s,
            )
            for name, service in services.items()
        }
        self.in_flight = InFlight()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route one request to its pod and relay the response."""
        self.in_flight.enter()
        try:
            return await self._handle(request)
        finally:
            self.in_flight.leave()

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
                request.raw_path[:200],
                exc.status,
                exc.message,
                format_ids(ids),
            )
            return error_response(exc.status, exc.code, exc.message, **exc.details)
        except StoreUnavailableError as exc:
            # The store logs the start and end of an outage; one line per
            # request would flood the log.
            logger.debug("store unavailable for %s: %s", format_ids(ids), exc)
            return error_response(
                503,
                "store_unavailable",
                "the link store is unavailable, retry later",
                backend=exc.backend,
            )
        except StoreDataError as exc:
            logger.error("invalid link data for %s: %s", format_ids(ids), exc)
            return error_response(500, "invalid_link", str(exc))
        except NoPodError as exc:
            logger.warning("no routable pod for %s", format_ids(ids))
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
        extra_headers = None
        if route.previous is not None:
            # Tell the pod that it received a moved user, so it can rebuild
            # the user's state.
            extra_headers = {
                "X-Route-Previous-Pod": str(route.previous),
                "X-Route-Reason": route.reason,
            }
        timeout = self._timeouts[service.name]
        stats = service.stats
        stat = stats.start(route.pod)
        started = time.monotonic()
        try:
            relayed = await self._relay.relay(
                request, route.pod, timeout, ids, extra_headers, _ROUTE_HEADERS
            )
        except BaseException:
            stats.cancel(stat)
            raise
        # NOTE: a body that breaks off after the status line was sent counts
        # with the pod's status, because the relay returns that response.
        stats.finish(stat, time.monotonic() - started, relayed.status)
        return relayed

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
