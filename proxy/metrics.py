"""Prometheus metrics of one proxy, served by the admin API at ``GET /metrics``.

Each `ProxyServer` has its own `CollectorRegistry`, so several proxies in one
process never share a metric. Per-request work is one counter increment and
one histogram observation, plus one increment for each failed attempt at a
pod, on label children cached by their label values.
Everything that the proxy already counts, such as links created, cache hits
or health, is read from those counters at scrape time instead.

Labels are kept to configured names and small numbers: the service, the pod
index, the status class and the error kind. A client's service header
appears only when it names a configured service, and UIDs and namespaces
never appear.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.errors import StoreBusyError, StoreError, StoreUnavailableError
from proxy.relay import UpstreamError
from proxy.retry import Stage

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from proxy.store.redis import RedisStore

PREFIX = "stateful_route_"

# Bucket bounds in seconds. Requests include the pod's own time, and store
# calls are single Redis round trips on a nearby server.
REQUEST_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
STORE_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


def upstream_error_kind(error: UpstreamError) -> str:
    """Return the ``kind`` label of a failed attempt at a pod."""
    if isinstance(error.cause, TimeoutError):
        return "timeout"
    stage = error.stage
    if stage is Stage.CONNECT:
        return "connect"
    if stage is Stage.SENT:
        return "reset"
    if stage is Stage.STALE:
        return "stale"
    return "protocol"


def store_error_kind(error: StoreError) -> str:
    """Return the ``kind`` label of a failed store call."""
    if isinstance(error, StoreUnavailableError):
        return "unavailable"
    if isinstance(error, StoreBusyError):
        return "busy"
    return "command"


class Metrics:
    """The registry of one proxy, with the metrics that requests update.

    :param server: the proxy whose counters the registry reads at scrape time.
    """

    def __init__(self, server: ProxyServer) -> None:
        self._services = frozenset(server.services)
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = Counter(
            PREFIX + "requests",
            "Requests on the proxy port by service, pod and status class.",
            ("service", "pod", "status_class"),
            registry=registry,
        )
        self._request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from reading a request to the end of its response, by service.",
            ("service",),
            buckets=REQUEST_BUCKETS_S,
            registry=registry,
        )
        self._upstream_errors = Counter(
            PREFIX + "upstream_errors",
            "Attempts at a pod that failed before the response, by service and kind.",
            ("service", "kind"),
            registry=registry,
        )
        self._store_duration = Histogram(
            PREFIX + "store_operation_duration_seconds",
            "Time of one Redis round trip, failed ones included.",
            buckets=STORE_BUCKETS_S,
            registry=registry,
        )
        self._store_errors = Counter(
            PREFIX + "store_errors",
            "Redis calls that failed, by kind.",
            ("kind",),
            registry=registry,
        )
        redis = _redis_store(server)
        if redis is not None:
            redis.observer = self.observe_store_call
        registry.register(ServerCollector(server, redis))

        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._error_children: dict[tuple[str, str], Counter] = {}

    def set_services(self, services: Collection[str]) -> None:
        """Take the configured services after a reload, for the label check."""
        self._services = frozenset(services)

    def forget_service(self, service: str) -> None:
        """Remove every labelled series of a service that a reload removed."""
        for key in [key for key in self._request_children if key[0] == service]:
            del self._request_children[key]
            self._requests.remove(key[0], key[1], f"{key[2]}xx")
        if self._duration_children.pop(service, None) is not None:
            self._request_duration.remove(service)
        for error_key in [key for key in self._error_children if key[0] == service]:
            del self._error_children[error_key]
            self._upstream_errors.remove(*error_key)

    def forget_pods(self, service: str, kept_indexes: Collection[int]) -> None:
        """Remove the request series of the pods of `service` not in `kept_indexes`."""
        for key in list(self._request_children):
            name, pod, status_class = key
            if name == service and pod and int(pod) not in kept_indexes:
                del self._request_children[key]
                self._requests.remove(name, pod, f"{status_class}xx")

    def observe_request(
        self, service: str, pod: int | None, status: int, duration_s: float
    ) -> None:
        """Count one finished request and sample its duration.

        `service` is the client's service header, which counts as "" unless
        it names a configured service. `pod` is None when the proxy rejected
        the request before routing it.
        """
        if service not in self._services:
            service = ""
        pod_label = "" if pod is None else str(pod)
        status_class = status // 100
        key = (service, pod_label, status_class)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._requests.labels(service, pod_label, f"{status_class}xx")
            self._request_children[key] = counter
        counter.inc()

        histogram = self._duration_children.get(service)
        if histogram is None:
            histogram = self._request_duration.labels(service)
            self._duration_children[service] = histogram
        histogram.observe(duration_s)

    def observe_upstream_error(self, service: str, error: UpstreamError) -> None:
        """Count one failed attempt at a pod of the configured `service`."""
        key = (service, upstream_error_kind(error))
        counter = self._error_children.get(key)
        if counter is None:
            counter = self._upstream_errors.labels(*key)
            self._error_children[key] = counter
        counter.inc()

    def observe_store_call(self, duration_s: float, error: StoreError | None) -> None:
        """Sample one Redis round trip, as the `RedisStore.observer` of the proxy."""
        self._store_duration.observe(duration_s)
        if error is not None:
            self._store_errors.labels(store_error_kind(error)).inc()


class ServerCollector(Collector):
    """Reads the counters and tables of a proxy at scrape time.

    :param server: the proxy.
    :param redis: its store when that is Redis, for the outage gauge.
    """

    def __init__(self, server: ProxyServer, redis: RedisStore | None) -> None:
        self._server = server
        self._redis = redis

    def collect(self) -> Iterator[Metric]:
        server = self._server
        in_flight = GaugeMetricFamily(
            PREFIX + "requests_in_flight",
            "Requests in flight on the proxy port and the inbound pod port.",
        )
        in_flight.add_metric([], server.in_flight)
        yield in_flight
        yield from self._pod_metrics()
        yield from self._router_metrics()
        yield from self._retry_metrics()

        degraded = GaugeMetricFamily(
            PREFIX + "store_degraded",
            "1 while the Redis store is in an outage and routing runs without it.",
        )
        unavailable = self._redis is not None and self._redis.unavailable
        degraded.add_metric([], 1 if unavailable else 0)
        yield degraded

    def _pod_metrics(self) -> Iterator[Metric]:
        server = self._server
        usable = GaugeMetricFamily(
            PREFIX + "pod_usable",
            "1 while health checks find the pod usable, else 0.",
            labels=("service", "pod"),
        )
        failures = CounterMetricFamily(
            PREFIX + "pod_failures",
            "Times the pod became unusable, each of which starts a failover.",
            labels=("service", "pod"),
        )
        panic_routes = CounterMetricFamily(
            PREFIX + "panic_routes",
            "Requests routed in panic mode, to pods that health finds unusable.",
            labels=("service",),
        )
        default_namespace = server.config.proxy.default_namespace
        for name, service in server.services.items():
            health = service.health
            # A templated service has a pod of each index in every namespace,
            # and the gauge shows 1 only while all of them are usable.
            by_index: dict[int, bool] = {}
            for namespace in service.settings.namespaces or (default_namespace,):
                pod_set = server.states.peek(namespace, name)
                if pod_set is not None:
                    pods = [status.pod for status in pod_set.statuses.values()]
                else:
                    pods = list(service.pods(namespace) or ())
                for pod in pods:
                    ok = health.usable(pod)
                    by_index[pod.index] = by_index.get(pod.index, True) and ok
            for index, ok in sorted(by_index.items()):
                usable.add_metric([name, str(index)], 1 if ok else 0)

            down_by_index: dict[int, int] = {}
            counts = server.health_counts.get(name)
            if counts is not None:
                for pod, count in counts.down.items():
                    down_by_index[pod.index] = down_by_index.get(pod.index, 0) + count
            for index, count in sorted(down_by_index.items()):
                failures.add_metric([name, str(index)], count)
            panic_routes.add_metric([name], health.panic_routes)
        yield usable
        yield failures
        yield panic_routes

    def _router_metrics(self) -> Iterator[Metric]:
        router = self._server.router
        cache = self._server.cache
        for name, value, documentation in (
            (
                "links_created",
                router.links_created,
                "Links this proxy created for users without one.",
            ),
            (
                "users_moved",
                router.users_moved,
                "Users whose link this proxy moved to another pod.",
            ),
            (
                "degraded_placements",
                router.degraded_routes,
                "Requests placed by consistent hash because the store was down.",
            ),
            ("local_cache_hits", cache.hits, "Link lookups the local cache served."),
            (
                "local_cache_misses",
                cache.misses,
                "Link lookups that the local cache could not serve.",
            ),
        ):
            counter = CounterMetricFamily(PREFIX + name, documentation)
            counter.add_metric([], value)
            yield counter

    def _retry_metrics(self) -> Iterator[Metric]:
        retries = CounterMetricFamily(
            PREFIX + "retries",
            "Attempts sent again after a pod failed before the response.",
            labels=("service",),
        )
        rejected = CounterMetricFamily(
            PREFIX + "retries_rejected",
            "Retries not sent because the service's retry budget had no room.",
            labels=("service",),
        )
        for name, counts in self._server.retry_counters.items():
            retries.add_metric([name], counts["retries"])
            rejected.add_metric([name], counts["retries_rejected"])
        yield retries
        yield rejected


def _redis_store(server: ProxyServer) -> RedisStore | None:
    """Return the proxy's store when it is a `RedisStore`, else None."""
    if server.store.backend != "redis":
        return None
    # Imported here, as in create_store, so a memory-store proxy never
    # imports redis-py.
    from proxy.store.redis import RedisStore

    store = server.store
    if not isinstance(store, RedisStore):
        return None
    return store
