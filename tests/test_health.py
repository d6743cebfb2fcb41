"""The health state machine: probe thresholds, ejections, slow start, observers.

Pure and synchronous: a fake clock, no network.
"""

from __future__ import annotations

import logging

import pytest

from proxy.config import ServiceSettings
from proxy.health import HealthState, HealthTable, Transition, log_transition
from proxy.logs import RepeatFilter
from proxy.pods import Address, Pod

PODS = tuple(Pod(index, Address("127.0.0.1", 9000 + index)) for index in range(4))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_table(
    clock: Clock | None = None, pods: int = 3, **settings: object
) -> HealthTable:
    """Return a table of service game whose one pool is the first `pods` pods."""
    addresses = tuple(str(pod.address) for pod in PODS)
    service = ServiceSettings(name="game", pods=addresses, **settings)  # type: ignore[arg-type]
    table = HealthTable(service, clock or Clock())
    table.set_pools([PODS[:pods]])
    return table


def fail_probes(
    table: HealthTable, pod: Pod, count: int, error: str = "refused"
) -> None:
    for _ in range(count):
        table.record_probe(pod, error)


def pass_probes(table: HealthTable, pod: Pod, count: int) -> None:
    for _ in range(count):
        table.record_probe(pod, None)


def fail_requests(table: HealthTable, pod: Pod, count: int) -> None:
    for _ in range(count):
        table.record(pod, False, "status 503")


def drain(table_queue: object) -> list[Transition]:
    items = []
    queue = table_queue
    while not queue.empty():  # type: ignore[attr-defined]
        items.append(queue.get_nowait())  # type: ignore[attr-defined]
    return items


# Active probes.


def test_unknown_pod_is_usable() -> None:
    table = make_table()

    assert table.usable(PODS[0])
    assert table.state(PODS[0]) is HealthState.HEALTHY


def test_unhealthy_after_threshold_failures() -> None:
    table = make_table(unhealthy_threshold=3)

    fail_probes(table, PODS[0], 2)
    after_two = table.usable(PODS[0])
    fail_probes(table, PODS[0], 1)

    assert after_two
    assert not table.usable(PODS[0])
    assert table.state(PODS[0]) is HealthState.UNHEALTHY


def test_success_resets_failure_streak() -> None:
    table = make_table(unhealthy_threshold=3)

    for _ in range(10):
        fail_probes(table, PODS[0], 2)
        pass_probes(table, PODS[0], 1)

    assert table.usable(PODS[0])


def test_one_failure_in_five_never_flips() -> None:
    table = make_table(unhealthy_threshold=3)
    queue = table.subscribe()
    errors = ["status 500", "timeout", "reset"]

    for round_number in range(100):
        error = errors[round_number % 3] if round_number % 5 == 4 else None
        table.record_probe(PODS[1], error)

    entry = table.get(PODS[1])
    assert entry is not None
    assert entry.failed_probes == 20
    assert table.usable(PODS[1])
    assert drain(queue) == []


def test_healthy_after_threshold_successes() -> None:
    table = make_table(unhealthy_threshold=1, healthy_threshold=2)
    fail_probes(table, PODS[0], 1)

    pass_probes(table, PODS[0], 1)
    after_one = table.usable(PODS[0])
    pass_probes(table, PODS[0], 1)

    assert not after_one
    assert table.usable(PODS[0])


def test_failed_probe_restarts_recovery() -> None:
    table = make_table(unhealthy_threshold=1, healthy_threshold=2)
    fail_probes(table, PODS[0], 1)

    pass_probes(table, PODS[0], 1)
    fail_probes(table, PODS[0], 1)
    pass_probes(table, PODS[0], 1)

    assert not table.usable(PODS[0])


# Passive detection and ejection.


def test_consecutive_failures_eject_pod() -> None:
    table = make_table(consecutive_failures=5)

    fail_requests(table, PODS[0], 4)
    after_four = table.usable(PODS[0])
    fail_requests(table, PODS[0], 1)

    assert after_four
    assert table.state(PODS[0]) is HealthState.EJECTED


def test_success_resets_passive_streak() -> None:
    table = make_table(consecutive_failures=5)

    for _ in range(10):
        fail_requests(table, PODS[0], 4)
        table.record(PODS[0], True, "")

    assert table.usable(PODS[0])


def test_zero_consecutive_failures_disables_ejection() -> None:
    table = make_table(consecutive_failures=0)

    fail_requests(table, PODS[0], 1000)

    assert table.usable(PODS[0])
    assert table.get(PODS[0]) is None


def test_ejection_ends_after_base_time() -> None:
    clock = Clock()
    table = make_table(clock, consecutive_failures=1, base_ejection_s=30.0)
    fail_requests(table, PODS[0], 1)

    clock.now += 29.9
    before_end = table.usable(PODS[0])
    clock.now += 0.1

    assert not before_end
    assert table.usable(PODS[0])


def ejection_duration(table: HealthTable, clock: Clock, pod: Pod) -> float:
    """Eject `pod` with failed requests; return how long the ejection lasts."""
    fail_requests(table, pod, 1)
    entry = table.get(pod)
    assert entry is not None
    assert entry.ejected_until is not None
    duration = entry.ejected_until - clock.now
    clock.now = entry.ejected_until
    assert table.usable(pod)
    return duration


def test_ejection_time_grows_then_caps() -> None:
    clock = Clock()
    table = make_table(
        clock, consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=100.0
    )

    durations = [ejection_duration(table, clock, PODS[0]) for _ in range(5)]

    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0]


def test_quiet_time_lowers_ejection_count() -> None:
    clock = Clock()
    table = make_table(
        clock, consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=300.0
    )
    for _ in range(3):
        ejection_duration(table, clock, PODS[0])

    clock.now += 2 * 300.0
    after_quiet = ejection_duration(table, clock, PODS[0])

    assert after_quiet == 60.0


@pytest.mark.parametrize(
    ("pods", "percent", "ejectable"),
    [(1, 50, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2), (4, 100, 4), (3, 0, 0)],
)
def test_ejection_percent_counts_candidate(
    pods: int, percent: int, ejectable: int
) -> None:
    table = make_table(pods=pods, consecutive_failures=1, max_ejection_percent=percent)

    for pod in PODS[:pods]:
        fail_requests(table, pod, 1)

    ejected = [pod for pod in PODS[:pods] if table.state(pod) is HealthState.EJECTED]
    assert len(ejected) == ejectable


def test_refused_ejection_counted_and_retried() -> None:
    clock = Clock()
    table = make_table(clock, pods=2, consecutive_failures=1, base_ejection_s=10.0)
    fail_requests(table, PODS[0], 1)
    fail_requests(table, PODS[1], 1)
    entry = table.get(PODS[1])
    assert entry is not None

    clock.now += 10.0
    fail_requests(table, PODS[1], 1)

    assert entry.refused_ejections == 1
    assert table.usable(PODS[0])
    assert table.state(PODS[1]) is HealthState.EJECTED


def test_pod_outside_pools_counts_whole_table() -> None:
    table = make_table(pods=3, consecutive_failures=1)
    table.set_pools([])
    for pod in PODS[:3]:
        pass_probes(table, pod, 1)

    fail_requests(table, PODS[0], 1)
    fail_requests(table, PODS[1], 1)

    assert table.state(PODS[0]) is HealthState.EJECTED
    assert table.usable(PODS[1])


def test_lone_unknown_pod_is_not_ejected() -> None:
    table = make_table(consecutive_failures=1)
    table.set_pools([])

    fail_requests(table, PODS[0], 3)

    assert table.usable(PODS[0])


def test_unhealthy_pod_is_not_ejected() -> None:
    table = make_table(unhealthy_threshold=1, consecutive_failures=1)
    fail_probes(table, PODS[0], 1)

    fail_requests(table, PODS[0], 3)

    entry = table.get(PODS[0])
    assert entry is not None
    assert entry.ejected_until is None
    assert table.state(PODS[0]) is HealthState.UNHEALTHY


def test_probe_recovery_keeps_ejection() -> None:
    clock = Clock()
    table = make_table(
        clock, unhealthy_threshold=1, healthy_threshold=1, consecutive_failures=1
    )
    fail_requests(table, PODS[0], 1)
    fail_probes(table, PODS[0], 1)

    pass_probes(table, PODS[0], 1)

    assert table.state(PODS[0]) is HealthState.EJECTED


# Transitions.


def test_transitions_only_on_flips() -> None:
    table = make_table(unhealthy_threshold=2, healthy_threshold=2)
    queue = table.subscribe()

    fail_probes(table, PODS[0], 6)
    pass_probes(table, PODS[0], 6)

    transitions = drain(queue)
    assert [(t.old, t.new) for t in transitions] == [
        (HealthState.HEALTHY, HealthState.UNHEALTHY),
        (HealthState.UNHEALTHY, HealthState.HEALTHY),
    ]


def test_transition_names_pod_and_reason() -> None:
    table = make_table(unhealthy_threshold=2)
    queue = table.subscribe()

    fail_probes(table, PODS[2], 2, error="cannot connect: refused")

    [transition] = drain(queue)
    assert transition.pod == PODS[2]
    assert transition.service == "game"
    assert transition.reason == (
        "failed 2 probes in a row, last error: cannot connect: refused"
    )


def test_unhealthy_to_ejected_not_published() -> None:
    clock = Clock()
    table = make_table(
        clock, unhealthy_threshold=1, healthy_threshold=1, consecutive_failures=1
    )
    fail_requests(table, PODS[0], 1)
    queue = table.subscribe()

    fail_probes(table, PODS[0], 1)
    pass_probes(table, PODS[0], 1)

    assert drain(queue) == []


def test_ejection_end_is_published() -> None:
    clock = Clock()
    table = make_table(clock, consecutive_failures=1, base_ejection_s=5.0)
    queue = table.subscribe()
    fail_requests(table, PODS[0], 1)

    clock.now += 5.0
    table.end_due_ejections()

    transitions = drain(queue)
    assert [t.new for t in transitions] == [HealthState.EJECTED, HealthState.HEALTHY]
    assert transitions[1].reason == "the ejection time is over"


def test_every_subscriber_gets_transitions() -> None:
    table = make_table(unhealthy_threshold=1)
    queues = [table.subscribe(), table.subscribe()]

    fail_probes(table, PODS[0], 1)

    assert [len(drain(queue)) for queue in queues] == [1, 1]


def test_full_queue_drops_oldest_transition() -> None:
    table = make_table(unhealthy_threshold=1, healthy_threshold=1)
    queue = table.subscribe(size=2)

    for _ in range(3):
        fail_probes(table, PODS[0], 1)
        pass_probes(table, PODS[0], 1)

    transitions = drain(queue)
    assert [t.new for t in transitions] == [HealthState.UNHEALTHY, HealthState.HEALTHY]
    assert table.dropped_transitions == 4


def test_version_changes_on_flips() -> None:
    table = make_table(unhealthy_threshold=1)
    before = table.version

    fail_probes(table, PODS[0], 1)
    after_flip = table.version
    fail_probes(table, PODS[0], 5)

    assert after_flip != before
    assert table.version == after_flip


def test_due_ejection_ends_on_version_read() -> None:
    clock = Clock()
    table = make_table(clock, consecutive_failures=1, base_ejection_s=5.0)
    fail_requests(table, PODS[0], 1)
    during = table.version

    clock.now += 5.0

    assert table.version != during
    assert table.state(PODS[0]) is HealthState.HEALTHY


def test_usable_pods_filters_unusable() -> None:
    table = make_table(unhealthy_threshold=1)
    pods = PODS[:3]
    same = table.usable_pods(pods)

    fail_probes(table, PODS[1], 1)

    assert same is pods
    assert table.usable_pods(pods) == (PODS[0], PODS[2])


def test_retain_drops_departed_pods() -> None:
    table = make_table(unhealthy_threshold=1)
    fail_probes(table, PODS[3], 1)

    table.retain(PODS[:3])

    assert table.get(PODS[3]) is None
    assert table.usable_pods((PODS[3],)) == (PODS[3],)


# Slow start.


def test_slow_start_share_grows_linearly() -> None:
    clock = Clock()
    table = make_table(
        clock, unhealthy_threshold=1, healthy_threshold=1, slow_start_s=30.0
    )
    fail_probes(table, PODS[0], 1)
    pass_probes(table, PODS[0], 1)

    shares = []
    for _ in range(4):
        shares.append(table.slow_start_share(PODS[0]))
        clock.now += 10.0

    assert shares == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert not table.in_slow_start


def test_no_slow_start_before_failure() -> None:
    table = make_table(slow_start_s=30.0)

    pass_probes(table, PODS[0], 5)

    assert table.slow_start_share(PODS[0]) == 1.0
    assert not table.in_slow_start


def test_zero_slow_start_recovers_fully() -> None:
    table = make_table(unhealthy_threshold=1, healthy_threshold=1, slow_start_s=0.0)
    fail_probes(table, PODS[0], 1)

    pass_probes(table, PODS[0], 1)

    assert table.slow_start_share(PODS[0]) == 1.0


# The log subscriber.


def test_down_logged_as_warning(caplog: pytest.LogCaptureFixture) -> None:
    transition = Transition(
        "game", PODS[1], HealthState.HEALTHY, HealthState.UNHEALTHY, "timeout"
    )

    with caplog.at_level(logging.INFO, logger="stateful_route.health"):
        log_transition(transition)

    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "pod=1 service=game at 127.0.0.1:9001 is now unhealthy (was healthy): timeout"
    )


def test_many_pods_down_all_logged(caplog: pytest.LogCaptureFixture) -> None:
    # The repeat filter lets a few lines of one template through per
    # window, and each pod's transition must still be logged.
    repeat_filter = RepeatFilter(repeats=2, window_s=60)
    pods = [Pod(index, Address("127.0.0.1", 9000 + index)) for index in range(8)]

    with caplog.at_level(logging.INFO, logger="stateful_route.health"):
        for pod in pods:
            log_transition(
                Transition(
                    "game", pod, HealthState.HEALTHY, HealthState.UNHEALTHY, "timeout"
                )
            )

    passed = [record for record in caplog.records if repeat_filter.filter(record)]
    assert [record.getMessage().split()[0] for record in passed] == [
        f"pod={index}" for index in range(8)
    ]


def test_up_logged_as_info(caplog: pytest.LogCaptureFixture) -> None:
    transition = Transition(
        "game", PODS[1], HealthState.EJECTED, HealthState.HEALTHY, "over"
    )

    with caplog.at_level(logging.INFO, logger="stateful_route.health"):
        log_transition(transition)

    [record] = caplog.records
    assert record.levelno == logging.INFO
