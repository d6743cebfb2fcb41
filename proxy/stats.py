"""Measurements of the pods of a service by this proxy, kept apart from strategies.

Every `Service` owns one `PodStats` table, keyed by `Pod` (pod index and
address). A templated service's pods in two namespaces have different
addresses and so separate entries. Static pods serve every namespace with
the same processes, so they share one entry per pod. For each pod the table
holds:

- ``in_flight``: requests relayed to the pod through this proxy right now;
- ``latency_s``: a peak-EWMA of the response time, the time from sending the
  request to the end of the relayed response;
- ``error_rate``: a decaying share of failed responses, between 0 and 1;
- ``samples``: how many responses were measured.

With decay time tau (``ewma_decay_s`` of the service), a sample x taken
dt seconds after the pod's previous one updates the estimate E to
``max(x, w * E + (1 - w) * x)`` with ``w = exp(-dt / tau)``. A response
slower than the estimate therefore replaces it at once (the peak), and a
faster one pulls it down by a weight that grows with dt. Between samples a
reader sees ``E * exp(-dt / tau)``, so an idle pod looks faster over time and
is tried again. A measurement older than tau counts as none. The error rate
uses the same weights with x = 1 for a failure and 0 otherwise.

A failure is a 5xx or 429 response, including the 502 and 504 that the relay
returns when the pod cannot be reached or times out. It is sampled as at
least `FAILURE_PENALTY_S`, so a pod that fails fast does not look fast.

Strategies get the table when they are built and never own it, so
rebuilding a strategy keeps every measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.pods import Pod

if TYPE_CHECKING:
    from proxy.server import ProxyServer

# The response time a failed request counts as, at least.
FAILURE_PENALTY_S = 1.0
# Maximum entries of one service's table. A pod that changes its address
# (registry discovery) gets a new entry, so beyond this the idle entry with
# the oldest sample is dropped.
MAX_ENTRIES = 4096


def is_failure(status: int) -> bool:
    """Return whether a response status counts as a failure of the pod."""
    return status >= 500 or status == 429


class PodStat:
    """The measurements of one pod, updated by `PodStats`."""

    __slots__ = ("error_rate", "in_flight", "latency_s", "sampled_at", "samples")

    def __init__(self) -> None:
        self.in_flight = 0
        self.latency_s = 0.0
        self.error_rate = 0.0
        self.samples = 0
        # Clock time of the last sample, meaningless while samples is 0.
        self.sampled_at = 0.0


@dataclass(frozen=True, slots=True)
class PodMetrics:
    """A snapshot of one pod's measurements at one time.

    `latency_s` is None when the pod has no sample within the decay time.
    """

    in_flight: int
    latency_s: float | None
    error_rate: float
    samples: int


class PodStats:
    """The measurements of the pods of one service.

    :param decay_s: decay time of the latency and error-rate averages.
    :param clock: returns monotonic seconds.
    :param max_entries: entries kept before idle ones are dropped.
    """

    __slots__ = ("_clock", "_entries", "_max_entries", "decay_s")

    def __init__(
        self,
        decay_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        if not decay_s > 0:
            raise ValueError(f"invalid decay_s {decay_s!r}: expected > 0")
        self.decay_s = decay_s
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[Pod, PodStat] = {}

    def now(self) -> float:
        """Return the current time of the table's clock, in seconds."""
        return self._clock()

    def start(self, pod: Pod) -> PodStat:
        """Count a request to `pod` as in flight and return the entry for `finish`."""
        stat = self._entries.get(pod)
        if stat is None:
            stat = self._add(pod)
        stat.in_flight += 1
        return stat

    def finish(self, stat: PodStat, elapsed_s: float, status: int) -> None:
        """End a request that `start` counted, sampling its time and status."""
        stat.in_flight -= 1
        failed = is_failure(status)
        if failed and elapsed_s < FAILURE_PENALTY_S:
            elapsed_s = FAILURE_PENALTY_S
        now = self._clock()
        age_s = now - stat.sampled_at
        stat.samples += 1
        if stat.samples == 1 or age_s > self.decay_s:
            stat.latency_s = elapsed_s
            stat.error_rate = 1.0 if failed else 0.0
        else:
            weight = math.exp(-age_s / self.decay_s)
            blended = weight * stat.latency_s + (1.0 - weight) * elapsed_s
            stat.latency_s = elapsed_s if elapsed_s > blended else blended
            stat.error_rate *= weight
            if failed:
                stat.error_rate += 1.0 - weight
        stat.sampled_at = now

    def cancel(self, stat: PodStat) -> None:
        """End a request that `start` counted, without a sample.

        For a request that the client abandoned, whose time does not measure
        the pod.
        """
        stat.in_flight -= 1

    def get(self, pod: Pod) -> PodStat | None:
        return self._entries.get(pod)

    def in_flight(self, pod: Pod) -> int:
        stat = self._entries.get(pod)
        return 0 if stat is None else stat.in_flight

    def estimate_s(self, stat: PodStat | None, now: float) -> float | None:
        """Return the decayed latency estimate, or None without a recent sample."""
        if stat is None or stat.samples == 0:
            return None
        age_s = now - stat.sampled_at
        if age_s > self.decay_s:
            return None
        return stat.latency_s * math.exp(-age_s / self.decay_s)

    def metrics(self, pod: Pod, now: float) -> PodMetrics:
        """Return the pod's measurements as readers see them at `now`."""
        stat = self._entries.get(pod)
        if stat is None:
            return PodMetrics(0, None, 0.0, 0)
        estimate = self.estimate_s(stat, now)
        error_rate = 0.0
        if estimate is not None:
            error_rate = stat.error_rate * math.exp(
                -(now - stat.sampled_at) / self.decay_s
            )
        return PodMetrics(stat.in_flight, estimate, error_rate, stat.samples)

    def _add(self, pod: Pod) -> PodStat:
        if len(self._entries) >= self._max_entries:
            idle = [
                (s.sampled_at, p) for p, s in self._entries.items() if not s.in_flight
            ]
            if idle:
                del self._entries[min(idle, key=lambda item: item[0])[1]]
        stat = self._entries[pod] = PodStat()
        return stat

    def __len__(self) -> int:
        return len(self._entries)


def calculate_load(reported_load: int, metrics: PodMetrics) -> float:
    """Combine the pod's reported load with this proxy's measurements.

    ``reported_load + (in_flight + 1) * latency_ms + 1000 * error_rate``:
    the second term is the least-response-time cost in milliseconds, and a
    pod failing every request adds the failure penalty of 1,000 ms. A pod
    without a recent sample adds only its error term, which is then 0.
    """
    latency_ms = 0.0 if metrics.latency_s is None else metrics.latency_s * 1000
    return (
        reported_load
        + (metrics.in_flight + 1) * latency_ms
        + FAILURE_PENALTY_S * 1000 * metrics.error_rate
    )


def pod_metrics(
    server: ProxyServer, namespace: str, service: str
) -> list[dict[str, object]]:
    """Return the measurements and the calculated load of every pod, by index.

    For the admin API. The caller validates `namespace` and `service`. The
    pods are those of the current pod set, or the configured pods before the
    service's state records were first read. `reported_load` is None for a
    pod without a record, and `calculated_load` then counts it as 0.
    """
    entry = server.services[service]
    stats = entry.stats
    pod_set = server.states.get(namespace, service)
    pods: list[tuple[Pod, int | None]]
    if pod_set is not None:
        pods = [
            (status.pod, None if status.state is None else status.state.load)
            for status in pod_set.statuses.values()
        ]
    else:
        pods = [(pod, None) for pod in entry.pods(namespace) or ()]

    now = stats.now()
    result: list[dict[str, object]] = []
    for pod, reported_load in pods:
        metrics = stats.metrics(pod, now)
        latency_ms = None if metrics.latency_s is None else metrics.latency_s * 1000
        result.append(
            {
                "index": pod.index,
                "address": str(pod.address),
                "in_flight": metrics.in_flight,
                "latency_ms": None if latency_ms is None else round(latency_ms, 3),
                "error_rate": round(metrics.error_rate, 4),
                "samples": metrics.samples,
                "reported_load": reported_load,
                "calculated_load": round(
                    calculate_load(reported_load or 0, metrics), 3
                ),
            }
        )
    return result
