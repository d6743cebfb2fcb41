from __future__ import annotations

from proxy.balancing import STRATEGIES, RoundRobin, build_strategy
from proxy.pods import Address, Pod


def make_pods(count: int) -> tuple[Pod, ...]:
    return tuple(
        Pod(index, Address("127.0.0.1", 9000 + index)) for index in range(count)
    )


def test_round_robin_rotates_in_pod_order() -> None:
    strategy = RoundRobin()
    pods = make_pods(3)

    picks = [strategy.pick(pods, f"user-{n}").index for n in range(7)]

    assert picks == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_gives_every_pod_equal_share() -> None:
    strategy = RoundRobin()
    pods = make_pods(4)
    counts = [0, 0, 0, 0]

    for n in range(400):
        counts[strategy.pick(pods, str(n)).index] += 1

    assert counts == [100, 100, 100, 100]


def test_round_robin_follows_a_shrinking_pod_set() -> None:
    strategy = RoundRobin()
    for _ in range(5):
        strategy.pick(make_pods(3), None)

    picks = {strategy.pick(make_pods(2), None).index for _ in range(4)}

    assert picks == {0, 1}


def test_strategy_registry_builds_by_name() -> None:
    assert "round_robin" in STRATEGIES
    assert isinstance(build_strategy("round_robin"), RoundRobin)
