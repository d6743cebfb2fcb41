"""The forwarding handler: read the routing headers, route, relay to the pod.

Errors map to statuses by where they come from: the client (400, 404), the
store (503), the pod (502, or 504 on a timeout). Bodies stream both ways and
are never decompressed. Lower layers raise; this module logs each failure
once, with the ids involved.

Every attempt at a pod is counted in its service's `PodStats`: in flight
while it runs, then one sample of its time and status. An attempt that the
client abandons ends without a sample.

A failed attempt is sent again when `proxy.retry.plan_retry` allows it and
the service's retry budget has room: to the same pod after a broken pooled
connection, else to another routable pod, to which the user's link moves.
The pod of a retry gets ``X-Route-Previous-Pod`` and ``X-Route-Reason:
retry``. See docs/retries.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.http import HttpProcessingError
from multidict import CIMultiDictProxy, istr

from proxy.config import Config
from proxy.errors import (
    NoPodError,
    RequestError,
    StoreBusyError,
    StoreDataError,
    StoreUnavailableError,
)
from proxy.inbound import (
    GuardedBody,
    Limits,
    RequestRejected,
    closing_error,
    parse_networks,
)
from proxy.inflight import InFlight
from proxy.metrics import Metrics
from proxy.names import dns_label_problem, uid_problem
from proxy.pods import Pod
from proxy.podset import PodSet
from proxy.relay import (
    Relay,
    UpstreamError,
    answer_expect,
    error_response,
    format_ids,
)
from proxy.request_head import pod_request_headers
from proxy.retry import (
    RequestBody,
    Retry,
    RetryBudget,
    Stage,
    plan_retry,
    read_body,
)
from proxy.routing import Origin, Route, Router
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.tunnel import TUNNEL_OPENED
from proxy.upstream import UpstreamPool

logger = logging.getLogger("stateful_route.forward")


# Headers that inform a pod that a user was moved to it. Only
# the proxy sets them; a client's own values are dropped. Typed as a tuple
# of any length, so that mypyc keeps one tuple object instead of building
# one per request.
_ROUTE_HEADERS: Final[tuple[str, ...]] = ("X-Route-Previous-Pod", "X-Route-Reason")
# Final, so that mypyc calls it without an attribute lookup on the module.
_monotonic: Final = time.monotonic
# Failure descriptions for the passive health checks, by stage.
_FAILURE_KINDS = {
    Stage.CONNECT: "connect error",
    Stage.SENT: "connection broken",
    Stage.TIMEOUT: "read timeout",
    Stage.OTHER: "invalid response",
}


class Forwarder:
    """The request handler of the proxy port.

    :param config: the configuration.
    :param services: the configured services by name.
    :param router: computes the linked pod.
    :param states: the current pod sets with their state records.
    :param pool: the pooled pod connections.
    :param metrics: counts every request and failed attempt; None for none.
    """

    def __init__(
        self,
        config: Config,
        services: dict[str, Service],
        router: Router,
        states: PodStates,
        pool: UpstreamPool,
        metrics: Metrics | None = None,
    ) -> None:
        self._proxy = config.proxy
        self._routing_headers = _routing_headers(config)
        self._routing_keys = _routing_keys(self._routing_headers)
        self._metrics = metrics
        self._services = services
        self._router = router
        self._states = states
        self._relay = Relay(pool, config.proxy.routed_pod_header)
        self._limits = Limits.from_settings(config.proxy)
        self._trusted = parse_networks(config.proxy.trusted_proxies)
        self._timeouts = {name: _timeout(service) for name, service in services.items()}
        self._budgets = {name: _budget(service) for name, service in services.items()}
        self.in_flight = InFlight()

    def reconfigure(self, config: Config) -> None:
        """Take the settings of a reload, for the services now in `services`.

        A service whose retry budget settings changed gets a new budget that
        carries the counters on, and removed services lose theirs.
        Requests in flight keep the timeout they started with.
        """
        self._proxy = config.proxy
        self._routing_headers = _routing_headers(config)
        self._routing_keys = _routing_keys(self._routing_headers)
        self._trusted = parse_networks(config.proxy.trusted_proxies)
        self._timeouts = {
            name: _timeout(service) for name, service in self._services.items()
        }
        budgets = {}
        for name, service in self._services.items():
            budget = self._budgets.get(name)
            if budget is None or budget.settings != _budget_settings(service):
                fresh = _budget(service)
                if budget is not None:
                    fresh.requests = budget.requests
                    fresh.retried = budget.retried
                    fresh.rejected = budget.rejected
                budget = fresh
            budgets[name] = budget
        self._budgets = budgets

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route one request to its pod and relay the response."""
        self.in_flight.enter()
        ids: dict[str, Any] = {}
        started = _monotonic()
        status = 500
        try:
            response = await self._handle(request, ids)
            # `response.status` of aiohttp 3.14, read without its property call.
            status = response._status
            return response
        except asyncio.CancelledError:
            # The client went away. That ends a tunnel after its 101, and
            # other requests before a status was sent, which are not counted.
            status = 101 if request.get(TUNNEL_OPENED) else 0
            raise
        finally:
            self.in_flight.leave()
            if self._metrics is not None and status:
                self._metrics.observe_request(
                    ids.get("service", ""),
                    ids.get("pod"),
                    status,
                    _monotonic() - started,
                )

    async def _handle(
        self, request: web.BaseRequest, ids: dict[str, Any]
    ) -> web.StreamResponse:
        try:
            namespace, service, uid = self._read_routing_headers(request, ids)
            pod_set = self._states.get(namespace, service.name)
            if pod_set is None:
                pod_set = await self._states.load(namespace, service.name)
            router = self._router
            if uid is None:
                route = router.pick_unlinked(service, pod_set)
            else:
                cached = router.route_cached(namespace, service, pod_set, uid)
                if cached is None:
                    route = await router.route_from_store(
                        namespace, service, pod_set, uid
                    )
                else:
                    route = cached
        except RequestError as invalid:
            logger.info(
                "rejected %s %s with %d: %s%s",
                request.method,
                _safe_path(request.raw_path),
                invalid.status,
                invalid.message,
                f" {format_ids(ids)}" if ids else "",
            )
            return error_response(
                invalid.status, invalid.code, invalid.message, **invalid.details
            )
        except StoreUnavailableError as unavailable:
            # The store logs the start and end of an outage; one line per
            # request would flood the log.
            logger.debug("store unavailable for %s: %s", format_ids(ids), unavailable)
            response = error_response(
                503,
                "store_unavailable",
                "the link store is unavailable, retry later",
                backend=unavailable.backend,
            )
            response.headers["Retry-After"] = "1"
            return response
        except StoreBusyError as busy:
            logger.warning("store busy for %s: %s", format_ids(ids), busy)
            response = error_response(
                503,
                "store_busy",
                "the proxy has no free store connection, retry later",
                backend=busy.backend,
            )
            response.headers["Retry-After"] = "1"
            return response
        except StoreDataError as bad_link:
            logger.error("invalid link data for %s: %s", format_ids(ids), bad_link)
            return error_response(500, "invalid_link", str(bad_link))
        except NoPodError as no_pod:
            logger.warning("no routable pod for %s", format_ids(ids))
            response = error_response(
                503,
                "no_pod",
                f"service {no_pod.service!r} has no routable pod in "
                f"namespace {no_pod.namespace!r}",
                service=no_pod.service,
                namespace=no_pod.namespace,
            )
            response.headers["Retry-After"] = str(self._retry_after_s(no_pod.service))
            return response

        ids["pod"] = route.pod.index
        settings = service.settings
        rejected = answer_expect(request)
        if rejected is not None:
            logger.info("rejected an Expect header with 417 %s", format_ids(ids))
            return rejected
        # A bodyless request needs no guard, because nothing reads its body.
        guard = None
        try:
            if request.body_exists:
                guard = GuardedBody(request.content, self._limits)
                body = await read_body(
                    request,
                    settings.retry_buffer_bytes,
                    settings.retry_attempts > 0,
                    guard,
                )
            else:
                body = RequestBody()
        except RequestRejected as body_rejected:
            return _body_rejected(request, body_rejected, ids)
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            HttpProcessingError,
        ) as body_error:
            logger.info(
                "rejected %s %s with 400: request body ended early or is invalid "
                "%s: %r",
                request.method,
                request.raw_path[:200],
                format_ids(ids),
                body_error,
            )
            return error_response(
                400, "invalid_body", "the request body ended early or is invalid"
            )
        return await self._relay_with_retries(
            request, namespace, service, pod_set, uid, route, body, guard, ids
        )

    async def _relay_with_retries(
        self,
        request: web.BaseRequest,
        namespace: str,
        service: Service,
        pod_set: PodSet,
        uid: str | None,
        route: Route,
        body: RequestBody,
        guard: GuardedBody | None,
        ids: dict[str, Any],
    ) -> web.StreamResponse:
        """Send attempts until a pod responds or no retry is allowed."""
        budget = self._budgets.get(service.name)
        if budget is None:
            # A reload removed the service while this request was routed.
            budget = _budget(service)
        budget.note_request()
        extra_headers = None
        if route.previous is not None:
            # Tell the pod that it received a moved user, so it can rebuild
            # the user's state.
            extra_headers = {
                "X-Route-Previous-Pod": str(route.previous),
                "X-Route-Reason": route.reason,
            }
        elif route.origin is Origin.DEGRADED:
            # Placed without the store: the user's state may be on another pod.
            extra_headers = {"X-Route-Reason": "degraded"}
        routing_headers = self._routing_headers
        pod = route.pod
        failed: tuple[int, ...] = ()
        attempts_left = service.settings.retry_attempts
        while True:
            # The pod also gets the namespace, service and UID that the proxy
            # routed on when the client's Connection header named them.
            headers = pod_request_headers(
                request, extra_headers, _ROUTE_HEADERS, self._trusted, routing_headers
            )
            try:
                return await self._attempt(request, service, pod, ids, headers, body)
            except UpstreamError as exc:
                error = exc
            if guard is not None and guard.failure is not None:
                # The attempt failed because the client's body did.
                return _body_rejected(request, guard.failure, ids)

            plan = plan_retry(
                error.stage, request.method, body.replayable, attempts_left
            )
            if plan is Retry.OTHER_POD:
                failed += (pod.index,)
            if plan is None or not budget.try_spend():
                return self._relay.error_response(error, ids)
            attempts_left -= 1

            if plan is Retry.OTHER_POD:
                try:
                    moved = await self._router.relink_for_retry(
                        namespace, service, pod_set, uid, failed
                    )
                except NoPodError:
                    moved = None
                if moved is None:
                    budget.refund()
                    return self._relay.error_response(error, ids)
                pod = moved.pod
                extra_headers = {
                    "X-Route-Previous-Pod": str(error.pod.index),
                    "X-Route-Reason": "retry",
                }
                logger.warning(
                    "retrying %s on pod=%d: pod=%d failed before the response "
                    "(%s: %r) %s",
                    request.method,
                    pod.index,
                    error.pod.index,
                    error.stage.value,
                    error.cause,
                    format_ids(ids),
                )
                ids["pod"] = pod.index
            else:
                logger.info(
                    "retrying %s on another connection: a pooled connection to "
                    "pod=%d broke before the response (%r) %s",
                    request.method,
                    pod.index,
                    error.cause,
                    format_ids(ids),
                )

    async def _attempt(
        self,
        request: web.BaseRequest,
        service: Service,
        pod: Pod,
        ids: dict[str, Any],
        headers: bytes,
        body: RequestBody,
    ) -> web.StreamResponse:
        """Send one attempt to `pod`, sampling it in the service's stats.

        The outcome also goes to the service's passive health checks. A
        pooled connection that broke before the response, which the pod
        most likely closed while it was idle, counts in neither.
        """
        timeout = self._timeouts.get(service.name) or _timeout(service)
        stats = service.stats
        stat = stats.start(pod)
        started = _monotonic()
        try:
            relayed = await self._relay.send(request, pod, timeout, ids, headers, body)
        except UpstreamError as exc:
            if self._metrics is not None:
                self._metrics.observe_upstream_error(service.name, exc)
            if exc.stage is Stage.STALE:
                stats.cancel(stat)
                raise
            stats.finish(stat, _monotonic() - started, exc.status)
            service.health.record(pod, False, _FAILURE_KINDS[exc.stage])
            raise
        except BaseException:
            stats.cancel(stat)
            raise
        # NOTE: a body that breaks off after the status line was sent counts
        # with the pod's status, because the relay returns that response.
        # `relayed.status` of aiohttp 3.14, read without its property call.
        status = relayed._status
        stats.finish(stat, _monotonic() - started, status)
        if status < 500:
            service.health.record(pod, True, "")
        else:
            service.health.record(pod, False, f"status {status}")
        return relayed

    def retry_counters(self) -> dict[str, dict[str, int]]:
        """Return the requests relayed, retries sent and retries rejected, by service.

        A retry is rejected when the service's retry budget has no room.
        """
        return {
            name: {
                "requests": budget.requests,
                "retries": budget.retried,
                "retries_rejected": budget.rejected,
            }
            for name, budget in self._budgets.items()
        }

    def _retry_after_s(self, service: str) -> int:
        """Return seconds until the pod states are read again, at least 1."""
        configured = self._services.get(service)
        if configured is None:
            return 1
        return max(1, math.ceil(configured.settings.state_refresh_s))

    def _read_routing_headers(
        self, request: web.BaseRequest, ids: dict[str, Any]
    ) -> tuple[str, Service, str | None]:
        proxy = self._proxy
        namespace_key, service_key, uid_key = self._routing_keys
        headers = request.headers
        # `check_request` already rejected targets that are not a path.
        namespace = _single_header(headers, namespace_key)
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

        service_name = _single_header(headers, service_key)
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

        uid = _single_header(headers, uid_key)
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


def _routing_headers(config: Config) -> tuple[str, str, str]:
    """Return the names of the namespace, service and UID headers."""
    proxy = config.proxy
    return (proxy.namespace_header, proxy.service_header, proxy.uid_header)


def _routing_keys(names: tuple[str, str, str]) -> tuple[istr, istr, istr]:
    """Return `names` as multidict's `istr`, which a lookup need not lowercase."""
    namespace, service, uid = names
    return istr(namespace), istr(service), istr(uid)


def _timeout(service: Service) -> aiohttp.ClientTimeout:
    settings = service.settings
    return aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.connect_timeout_s,
        sock_read=settings.read_timeout_s,
    )


def _budget_settings(service: Service) -> tuple[float, float, float]:
    settings = service.settings
    return (
        settings.retry_budget_percent,
        settings.retry_budget_window_s,
        settings.retry_min_per_s,
    )


def _budget(service: Service) -> RetryBudget:
    return RetryBudget(service.name, *_budget_settings(service))


def _body_rejected(
    request: web.BaseRequest, exc: RequestRejected, ids: dict[str, Any]
) -> web.Response:
    logger.info(
        "rejected %s %s from %s with %d: %s %s",
        request.method,
        _safe_path(request.raw_path),
        request.remote,
        exc.status,
        exc.message,
        format_ids(ids),
    )
    return closing_error(exc.status, exc.code, exc.message)


def _single_header(headers: CIMultiDictProxy[str], key: istr) -> str | None:
    """Return the value of a header that must appear at most once."""
    values = headers.getall(key, ())
    if not values:
        return None
    if len(values) > 1:
        name = str(key)
        raise RequestError(
            400,
            "repeated_header",
            f"{name} appears {len(values)} times, expected once",
            header=name,
        )
    return values[0]


def _safe_path(raw_path: str) -> str:
    """Return a request target for a log line, quoted when it is odd or long."""
    if len(raw_path) <= 200 and raw_path.isprintable() and " " not in raw_path:
        return raw_path
    return repr(raw_path[:200])
