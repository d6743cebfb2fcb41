from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from proxy.config import ServiceSettings
from proxy.pods import Address, Pod
from proxy.podset import PodSet, build_pod_set
from proxy.podstate import PodState, Routing
from proxy.services import Service
from proxy.statetable import PodStates, _Entry
from proxy.stats import (
    FAILURE_PENALTY_S,
    PodMetrics,
    PodStats,
    calculate_load,
    is_failure,
    pod_metrics,
)
from proxy.store.memory import MemoryStore

DECAY_S = 10.0
NOW_MS = 1_764_800_000_000
POD = Pod(0, Address("127.0.0.1", 9000))
OTHER = Pod(1, Address("127.0.0.1", 9001))


class FakeClock:
    """A clock for `PodStats` that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stats(clock: FakeClock) -> PodStats:
    return PodStats(DECAY_S, clock)


def sample(
    stats: PodStats, latency_s: float, status: int = 200, pod: Pod = POD
) -> None:
    stats.finish(stats.start(pod), latency_s, status)


def estimate(stats: PodStats, pod: Pod = POD) -> float | None:
    return stats.estimate_s(stats.get(pod), stats.now())


# In flight.


def test_in_flight_counts_started_requests(stats: PodStats) -> None:
    first = stats.start(POD)
    stats.start(POD)
    stats.finish(first, 0.01, 200)

    assert stats.in_flight(POD) == 1
    assert stats.in_flight(OTHER) == 0


def test_cancelled_request_leaves_no_sample(stats: PodStats) -> None:
    stats.cancel(stats.start(POD))

    assert stats.in_flight(POD) == 0
    assert estimate(stats) is None
    assert stats.metrics(POD, stats.now()).samples == 0


def test_equal_pods_share_one_entry(stats: PodStats) -> None:
    stats.start(POD)
    stats.start(Pod(0, Address("127.0.0.1", 9000)))

    assert stats.in_flight(POD) == 2
    assert len(stats) == 1


# Latency estimate.


def test_first_sample_sets_estimate(stats: PodStats) -> None:
    sample(stats, 0.020)

    assert estimate(stats) == pytest.approx(0.020)


def test_slower_sample_replaces_estimate(stats: PodStats, clock: FakeClock) -> None:
    sample(stats, 0.010)
    clock.now += 0.5

    sample(stats, 0.200)

    assert estimate(stats) == pytest.approx(0.200)


def test_faster_sample_pulls_estimate_down(stats: PodStats, clock: FakeClock) -> None:
    sample(stats, 0.100)
    clock.now += 2.0

    sample(stats, 0.010)
    weight = math.exp(-2.0 / DECAY_S)

    assert estimate(stats) == pytest.approx(weight * 0.100 + (1 - weight) * 0.010)


def test_estimate_decays_while_idle(stats: PodStats, clock: FakeClock) -> None:
    sample(stats, 0.100)

    clock.now += 5.0

    assert estimate(stats) == pytest.approx(0.100 * math.exp(-0.5))


def test_estimate_forgotten_after_decay_time(stats: PodStats, clock: FakeClock) -> None:
    sample(stats, 0.100)

    clock.now += DECAY_S + 0.1

    assert estimate(stats) is None


def test_sample_after_decay_time_starts_over(stats: PodStats, clock: FakeClock) -> None:
    sample(stats, 0.500, status=503)
    clock.now += DECAY_S + 0.1

    sample(stats, 0.010)

    assert estimate(stats) == pytest.approx(0.010)
    assert stats.metrics(POD, stats.now()).error_rate == 0.0


def test_stats_reject_nonpositive_decay() -> None:
    with pytest.raises(ValueError, match="decay_s"):
        PodStats(0.0)


# Failures.


@pytest.mark.parametrize(
    ("status", "failed"),
    [(200, False), (302, False), (404, False), (429, True), (500, True), (504, True)],
)
def test_failure_statuses(status: int, failed: bool) -> None:
    assert is_failure(status) is failed


def test_fast_failure_counts_as_penalty(stats: PodStats) -> None:
    sample(stats, 0.002, status=502)

    assert estimate(stats) == pytest.approx(FAILURE_PENALTY_S)


def test_slow_failure_keeps_its_time(stats: PodStats) -> None:
    sample(stats, 3.0, status=504)

    assert estimate(stats) == pytest.approx(3.0)


def test_client_error_counts_as_success(stats: PodStats) -> None:
    sample(stats, 0.002, status=404)

    assert estimate(stats) == pytest.approx(0.002)
    assert stats.metrics(POD, stats.now()).error_rate == 0.0


def test_error_rate_follows_failures(stats: PodStats, clock: FakeClock) -> None:
    sample(stats, 0.01)
    clock.now += 1.0
    sample(stats, 0.01, status=500)
    weight = math.exp(-1.0 / DECAY_S)

    assert stats.metrics(POD, stats.now()).error_rate == pytest.approx(1 - weight)


def test_error_rate_decays_while_idle(stats: PodStats, clock: FakeClock) -> None:
    sample(stats, 0.01, status=500)

    clock.now += 5.0

    assert stats.metrics(POD, stats.now()).error_rate == pytest.approx(math.exp(-0.5))


# The size bound.


def test_full_table_drops_oldest_idle_entry(clock: FakeClock) -> None:
    stats = PodStats(DECAY_S, clock, max_entries=2)
    busy = stats.start(POD)
    sample(stats, 0.01, pod=OTHER)
    clock.now += 1.0
    newest = Pod(2, Address("127.0.0.1", 9002))

    sample(stats, 0.01, pod=newest)

    assert len(stats) == 2
    assert stats.get(OTHER) is None
    assert stats.get(POD) is busy


# Calculated load.


def test_calculated_load_combines_measurements() -> None:
    metrics = PodMetrics(in_flight=3, latency_s=0.020, error_rate=0.25, samples=9)

    assert calculate_load(100, metrics) == pytest.approx(100 + 4 * 20 + 250)


def test_calculated_load_without_samples_is_reported() -> None:
    metrics = PodMetrics(in_flight=2, latency_s=None, error_rate=0.0, samples=0)

    assert calculate_load(-40, metrics) == -40


def make_server(pod_set: PodSet | None, service: Service) -> SimpleNamespace:
    """Return the parts of a `ProxyServer` that `pod_metrics` reads.

    The states are a real `PodStates`, because a module compiled with mypyc
    checks that `server.states` is one.
    """
    services = {service.name: service}
    states = PodStates(MemoryStore(), services)
    if pod_set is not None:
        states._entries[("default", service.name)] = _Entry(pod_set, {}, 0, 0)
    return SimpleNamespace(services=services, states=states)


def test_pod_metrics_lists_each_pod(clock: FakeClock) -> None:
    settings = ServiceSettings(name="game", pods=("127.0.0.1:9000", "127.0.0.1:9001"))
    service = Service(settings, PodStats(DECAY_S, clock))
    records = {1: PodState(7, Routing.READY, NOW_MS)}
    pod_set = build_pod_set(
        settings, "default", service.pods("default"), records, NOW_MS
    )
    sample(service.stats, 0.004, pod=OTHER)
    service.stats.start(OTHER)

    rows = pod_metrics(make_server(pod_set, service), "default", "game")

    assert [row["index"] for row in rows] == [0, 1]
    assert rows[0]["reported_load"] is None
    assert rows[0]["latency_ms"] is None
    assert rows[0]["calculated_load"] == 0
    assert rows[1]["in_flight"] == 1
    assert rows[1]["latency_ms"] == pytest.approx(4.0)
    assert rows[1]["calculated_load"] == pytest.approx(7 + 2 * 4.0)


def test_pod_metrics_before_first_read() -> None:
    settings = ServiceSettings(name="game", pods=("127.0.0.1:9000",))
    service = Service(settings)

    rows = pod_metrics(make_server(None, service), "default", "game")

    assert [row["address"] for row in rows] == ["127.0.0.1:9000"]
    assert rows[0]["samples"] == 0
