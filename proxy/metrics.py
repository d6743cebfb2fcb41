"""Prometheus metrics of one proxy, served by the admin API at ``GET /metrics``.

Each `ProxyServer` has its own `CollectorRegistry`, so several proxies in one
process never share a metric. Per-request work is one count and one
duration sample in the plain numbers of `RequestCollector`, plus one count
for each failed attempt at a pod and, with the Redis store, one duration
sample for each Redis call. The first scrape imports prometheus-client, so
a worker that is never scraped does not load it. Everything that the proxy
already counts, such as links created, cache hits or health, is read from
those counters at scrape time instead.

Labels are kept to configured names and small numbers: the service, the pod
index, the status class and the error kind. A client's service header
appears only when it names a configured service, and UIDs and namespaces
never appear.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Final

from proxy.errors import StoreBusyError, StoreError, StoreUnavailableError
from proxy.relay import UpstreamError
from proxy.retry import Stage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import HistogramMetricFamily, Metric

    from proxy.server import ProxyServer
    from proxy.store.redis import RedisStore

PREFIX = "stateful_route_"

# Bucket bounds in seconds. Requests include the pod's own time, and store
# calls are single Redis round trips on a nearby server. Typed as tuples of
# any length, because mypyc keeps a fixed-length tuple of floats unboxed and
# builds a new tuple object for every `bucket_index` call.
REQUEST_BUCKETS_S: Final[tuple[float, ...]] = (
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
STORE_BUCKETS_S: Final[tuple[float, ...]] = (
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


def bucket_index(bounds: tuple[float, ...], value: float) -> int:
    """Return the index of the first of the sorted `bounds` at least `value`.

    It is `bisect.bisect_left` with the same algorithm. mypyc compiles it to
    a loop over unboxed floats, where a call of `bisect_left` costs a
    generic function call with boxed arguments.
    """
    low = 0
    high = len(bounds)
    while low < high:
        middle = (low + high) // 2
        if bounds[middle] < value:
            low = middle + 1
        else:
            high = middle
    return low


def store_error_kind(error: StoreError) -> str:
    """Return the ``kind`` label of a failed store call."""
    if isinstance(error, StoreUnavailableError):
        return "unavailable"
    if isinstance(error, StoreBusyError):
        return "busy"
    return "command"


class Metrics:
    """The metrics of one proxy, and the registry that exposes them.

    The metrics that requests and store calls update are plain numbers, and
    `registry` imports prometheus-client only on the first scrape. The
    import took 1.2 MiB of resident memory (prometheus-client 0.26.0,
    CPython 3.11.7, benchmarks/idle_connections.py).

    :param server: the proxy whose counters the registry reads at scrape time.
    """

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._services = frozenset(server.services)
        self._requests = RequestCollector()
        self._upstream_errors = UpstreamErrorCollector()
        self._store_calls = StoreCallCollector()
        self._redis = _redis_store(server)
        if self._redis is not None:
            self._redis.observer = self.observe_store_call
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """The registry of every metric of the proxy, made on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            registry.register(self._requests)
            registry.register(self._upstream_errors)
            registry.register(self._store_calls)
            registry.register(ServerCollector(self._server, self._redis))
            self._registry = registry
        return self._registry

    def set_services(self, services: Collection[str]) -> None:
        """Take the configured services after a reload, for the label check."""
        self._services = frozenset(services)

    def forget_service(self, service: str) -> None:
        """Remove every labelled series of a service that a reload removed."""
        self._requests.forget_service(service)
        self._upstream_errors.forget_service(service)

    def forget_pods(self, service: str, kept_indexes: Collection[int]) -> None:
        """Remove the request series of the pods of `service` not in `kept_indexes`."""
        self._requests.forget_pods(service, kept_indexes)

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
        self._requests.observe(service, pod, status // 100, duration_s)

    def observe_upstream_error(self, service: str, error: UpstreamError) -> None:
        """Count one failed attempt at a pod of the configured `service`."""
        self._upstream_errors.count(service, upstream_error_kind(error))

    def observe_store_call(self, duration_s: float, error: StoreError | None) -> None:
        """Sample one Redis round trip, as the `RedisStore.observer` of the proxy."""
        kind = None if error is None else store_error_kind(error)
        self._store_calls.observe(duration_s, kind)


class _Durations:
    """The duration samples of one series: a count per bucket, and their sum."""

    __slots__ = ("buckets", "created", "total_s")

    def __init__(self, bounds: int) -> None:
        # One count per bound, then one for +Inf.
        self.buckets = [0] * (bounds + 1)
        self.total_s = 0.0
        self.created = time.time()


def _le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """Return the "le" labels of `bounds`, as prometheus-client writes them."""
    return (*(str(float(bound)) for bound in bounds), "+Inf")


def _add_histogram(
    family: HistogramMetricFamily,
    labels: dict[str, str],
    le_labels: tuple[str, ...],
    durations: _Durations,
) -> None:
    """Add the series of `durations` to `family`, with its ``_created`` sample."""
    from prometheus_client.samples import Sample

    cumulative = 0
    buckets = []
    for bound, count in zip(le_labels, durations.buckets, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family.add_metric(list(labels.values()), buckets, durations.total_s)
    family.samples.append(Sample(family.name + "_created", labels, durations.created))


class RequestCollector:
    """The request counter and duration histogram, kept in plain numbers.

    prometheus-client's `Counter` and `Histogram` take a lock on every
    increment. The proxy counts on its event loop thread only and the
    scrape runs on that thread too, so plain ints and floats suffice. On
    the benchmark's 9-byte requests, callgrind counted about 5 % of the
    instructions per request in those two metrics. The exposition is the
    one the two metrics had.
    """

    _LE_LABELS = _le_labels(REQUEST_BUCKETS_S)

    def __init__(self) -> None:
        # (service, pod index or None, status class) -> [count, created
        # timestamp]. The pod label is formatted at scrape time.
        self._counts: dict[tuple[str, int | None, int], list[float]] = {}
        self._durations: dict[str, _Durations] = {}

    def observe(
        self, service: str, pod: int | None, status_class: int, duration_s: float
    ) -> None:
        """Count one request and sample its duration."""
        key = (service, pod, status_class)
        count = self._counts.get(key)
        if count is None:
            self._counts[key] = [1, time.time()]
        else:
            count[0] += 1
        durations = self._durations.get(service)
        if durations is None:
            durations = self._durations[service] = _Durations(len(REQUEST_BUCKETS_S))
        # A sample equal to a bound counts in that bound's bucket, because
        # "le" means less than or equal.
        durations.buckets[bucket_index(REQUEST_BUCKETS_S, duration_s)] += 1
        durations.total_s += duration_s

    def forget_service(self, service: str) -> None:
        """Remove every series of `service`."""
        for key in [key for key in self._counts if key[0] == service]:
            del self._counts[key]
        self._durations.pop(service, None)

    def forget_pods(self, service: str, kept_indexes: Collection[int]) -> None:
        """Remove the request counts of the pods of `service` not in `kept_indexes`."""
        for key in list(self._counts):
            name, pod, _ = key
            if name == service and pod is not None and pod not in kept_indexes:
                del self._counts[key]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily(
            PREFIX + "requests",
            "Requests on the proxy port by service, pod and status class.",
            labels=("service", "pod", "status_class"),
        )
        for (service, pod, status_class), (count, created) in self._counts.items():
            pod_label = "" if pod is None else str(pod)
            requests.add_metric(
                [service, pod_label, f"{status_class}xx"], count, created=created
            )
        yield requests

        histogram = HistogramMetricFamily(
            PREFIX + "request_duration_seconds",
            "Time from reading a request to the end of its response, by service.",
            labels=("service",),
        )
        for service, durations in self._durations.items():
            _add_histogram(histogram, {"service": service}, self._LE_LABELS, durations)
        yield histogram


class UpstreamErrorCollector:
    """The counter of failed attempts at pods by service and kind, in plain numbers."""

    def __init__(self) -> None:
        # (service, kind) -> [count, created timestamp]
        self._counts: dict[tuple[str, str], list[float]] = {}

    def count(self, service: str, kind: str) -> None:
        """Count one failed attempt at a pod of `service`."""
        key = (service, kind)
        count = self._counts.get(key)
        if count is None:
            self._counts[key] = [1, time.time()]
        else:
            count[0] += 1

    def forget_service(self, service: str) -> None:
        """Remove every series of `service`."""
        for key in [key for key in self._counts if key[0] == service]:
            del self._counts[key]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        errors = CounterMetricFamily(
            PREFIX + "upstream_errors",
            "Attempts at a pod that failed before the response, by service and kind.",
            labels=("service", "kind"),
        )
        for (service, kind), (count, created) in self._counts.items():
            errors.add_metric([service, kind], count, created=created)
        yield errors


class StoreCallCollector:
    """The duration histogram and error counter of Redis calls, in plain numbers."""

    _LE_LABELS = _le_labels(STORE_BUCKETS_S)

    def __init__(self) -> None:
        self._durations = _Durations(len(STORE_BUCKETS_S))
        # kind -> [count, created timestamp]
        self._errors: dict[str, list[float]] = {}

    def observe(self, duration_s: float, error_kind: str | None) -> None:
        """Sample one call, and count it as an error of `error_kind` unless None."""
        durations = self._durations
        durations.buckets[bucket_index(STORE_BUCKETS_S, duration_s)] += 1
        durations.total_s += duration_s
        if error_kind is None:
            return
        count = self._errors.get(error_kind)
        if count is None:
            self._errors[error_kind] = [1, time.time()]
        else:
            count[0] += 1

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        histogram = HistogramMetricFamily(
            PREFIX + "store_operation_duration_seconds",
            "Time of one Redis round trip, failed ones included.",
        )
        _add_histogram(histogram, {}, self._LE_LABELS, self._durations)
        yield histogram

        errors = CounterMetricFamily(
            PREFIX + "store_errors",
            "Redis calls that failed, by kind.",
            labels=("kind",),
        )
        for kind, (count, created) in self._errors.items():
            errors.add_metric([kind], count, created=created)
        yield errors


class ServerCollector:
    """Reads the counters and tables of a proxy at scrape time.

    :param server: the proxy.
    :param redis: its store when that is Redis, for the outage gauge.
    """

    def __init__(self, server: ProxyServer, redis: RedisStore | None) -> None:
        self._server = server
        self._redis = redis

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        from prometheus_client.core import CounterMetricFamily

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
        from prometheus_client.core import CounterMetricFamily

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
