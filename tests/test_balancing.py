from __future__ import annotations

import random

from proxy import config
from proxy.balancing import STRATEGIES, LowestLoad, RoundRobin, build_strategy
from proxy.config import ServiceSettings
from proxy.pods import Address, Pod
from proxy.podset import PodSet, build_pod_set
from proxy.podstate import PodState, Routing

NOW_MS = 1_764_800_000_000
SETTINGS = ServiceSettings(name="game", pods=("127.0.0.1:1",))
NO_STATE = PodSet("default", "game", {}, NOW_MS)


def pod_set_with_loads(*loads: int) -> PodSet:
    addresses = tuple(f"127.0.0.1:{9000 + index}" for index in range(len(loads)))
    settings = ServiceSettings(name="game", pods=addresses)
    pods = tuple(
        Pod(index, Address("127.0.0.1", 9000 + index)) for index in range(len(loads))
    )
    records = {
        index: PodState(load, Routing.READY, NOW_MS) for index, load in enumerate(loads)
    }
    return build_pod_set(settings, "default", pods, records, NOW_MS)


def make_pods(count: int) -> tuple[Pod, ...]:
    return tuple(
        Pod(index, Address("127.0.0.1", 9000 + index)) for index in range(count)
    )


def test_round_robin_rotates_in_pod_order() -> None:
    strategy = RoundRobin(SETTINGS)
    pods = make_pods(3)

    picks = [strategy.pick(pods, f"user-{n}", NO_STATE).index for n in range(7)]

    assert picks == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_gives_every_pod_equal_share() -> None:
    strategy = RoundRobin(SETTINGS)
    pods = make_pods(4)
    counts = [0, 0, 0, 0]

    for n in range(400):
        counts[strategy.pick(pods, str(n), NO_STATE).index] += 1

    assert counts == [100, 100, 100, 100]


def test_round_robin_follows_a_shrinking_pod_set() -> None:
    strategy = RoundRobin(SETTINGS)
    for _ in range(5):
        strategy.pick(make_pods(3), None, NO_STATE)

    picks = {strategy.pick(make_pods(2), None, NO_STATE).index for _ in range(4)}

    assert picks == {0, 1}


def test_strategy_registry_builds_by_name() -> None:
    assert isinstance(build_strategy(SETTINGS), RoundRobin)


def test_registry_matches_config_names() -> None:
    assert set(STRATEGIES) == set(config.STRATEGIES)


def lowest_load(load_range: int, seed: int = 1) -> LowestLoad:
    settings = ServiceSettings(
        name="game", pods=("127.0.0.1:1",), load_range=load_range
    )
    return LowestLoad(settings, random.Random(seed))


def test_lowest_load_picks_within_range_of_floor() -> None:
    pod_set = pod_set_with_loads(900, 100, 550, 601)
    strategy = lowest_load(500)

    picks = {strategy.pick(pod_set.routable, None, pod_set).index for _ in range(200)}

    assert picks == {1, 2}


def test_lowest_load_spreads_over_the_window() -> None:
    pod_set = pod_set_with_loads(10, 20, 30)
    strategy = lowest_load(500)
    counts = [0, 0, 0]

    for _ in range(300):
        counts[strategy.pick(pod_set.routable, None, pod_set).index] += 1

    assert min(counts) > 60


def test_lowest_load_handles_negative_loads() -> None:
    pod_set = pod_set_with_loads(-1000, -400, 0)
    strategy = lowest_load(500)

    picks = {strategy.pick(pod_set.routable, None, pod_set).index for _ in range(100)}

    assert picks == {0}


def test_lowest_load_with_zero_range_takes_minimum() -> None:
    pod_set = pod_set_with_loads(5, 3, 3, 4)
    strategy = lowest_load(0)

    picks = {strategy.pick(pod_set.routable, None, pod_set).index for _ in range(100)}

    assert picks == {1, 2}


def test_lowest_load_counts_pod_zero() -> None:
    pod_set = pod_set_with_loads(0, 1000)
    strategy = lowest_load(10)

    assert strategy.pick(pod_set.routable, None, pod_set).index == 0
