from __future__ import annotations

import math
import random

import pytest

from proxy import config
from proxy.balancing import (
    FULL_SCAN_MAX_PODS,
    STRATEGIES,
    LeastConnections,
    LeastResponseTime,
    LowestLoad,
    RoundRobin,
    Strategy,
    WeightedRoundRobin,
    build_strategy,
)
from proxy.config import ServiceSettings
from proxy.errors import NoPodError
from proxy.hashing import ConsistentHash, rank
from proxy.pods import Address, Pod
from proxy.podset import PodSet, build_pod_set
from proxy.podstate import PodState, Routing
from proxy.stats import PodStats

NOW_MS = 1_764_800_000_000
SETTINGS = ServiceSettings(name="game", pods=("127.0.0.1:1",))
NO_STATE = PodSet("default", "game", {}, NOW_MS)
DECAY_S = 10.0


class FakeClock:
    """A clock for `PodStats` that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def new_stats(clock: FakeClock | None = None) -> PodStats:
    return PodStats(DECAY_S, clock or FakeClock())


def sample(stats: PodStats, pod: Pod, latency_s: float, status: int = 200) -> None:
    """Record one finished request to `pod`."""
    stats.finish(stats.start(pod), latency_s, status)


def hold(stats: PodStats, pod: Pod, count: int) -> None:
    """Count `count` requests to `pod` as in flight, never finished."""
    for _ in range(count):
        stats.start(pod)


def pick_indexes(strategy: Strategy, pods: tuple[Pod, ...], count: int) -> list[int]:
    return [strategy.pick(pods, f"user-{n}", NO_STATE).index for n in range(count)]


# Round robin.


def test_round_robin_rotates_in_pod_order() -> None:
    strategy = RoundRobin(SETTINGS, new_stats())
    pods = make_pods(3)

    picks = [strategy.pick(pods, f"user-{n}", NO_STATE).index for n in range(7)]

    assert picks == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_gives_every_pod_equal_share() -> None:
    strategy = RoundRobin(SETTINGS, new_stats())
    pods = make_pods(4)
    counts = [0, 0, 0, 0]

    for n in range(400):
        counts[strategy.pick(pods, str(n), NO_STATE).index] += 1

    assert counts == [100, 100, 100, 100]


def test_round_robin_follows_a_shrinking_pod_set() -> None:
    strategy = RoundRobin(SETTINGS, new_stats())
    for _ in range(5):
        strategy.pick(make_pods(3), None, NO_STATE)

    picks = {strategy.pick(make_pods(2), None, NO_STATE).index for _ in range(4)}

    assert picks == {0, 1}


# The registry.


@pytest.mark.parametrize("name", config.STRATEGIES)
def test_registry_builds_each_strategy_by_name(name: str) -> None:
    settings = ServiceSettings(name="game", pods=("127.0.0.1:1",), strategy=name)

    assert build_strategy(settings, new_stats()).name == name


def test_registry_matches_config_names() -> None:
    assert set(STRATEGIES) == set(config.STRATEGIES)


def test_rebuilt_strategy_keeps_measurements() -> None:
    stats = new_stats()
    pods = make_pods(3)
    settings = ServiceSettings(
        name="game", pods=("127.0.0.1:1",), strategy="least_response_time"
    )
    for pod, latency_s in zip(pods, (0.030, 0.005, 0.020), strict=True):
        sample(stats, pod, latency_s)
    build_strategy(settings, stats)

    rebuilt = build_strategy(settings, stats)

    assert set(pick_indexes(rebuilt, pods, 20)) == {1}


# Least connections.


def least_connections(stats: PodStats, seed: int = 1) -> LeastConnections:
    return LeastConnections(SETTINGS, stats, random.Random(seed))


def test_least_connections_picks_fewest_in_flight() -> None:
    stats = new_stats()
    pods = make_pods(3)
    hold(stats, pods[0], 3)
    hold(stats, pods[1], 1)
    hold(stats, pods[2], 2)

    picks = set(pick_indexes(least_connections(stats), pods, 50))

    assert picks == {1}


def test_least_connections_breaks_ties_at_random() -> None:
    stats = new_stats()
    pods = make_pods(3)
    hold(stats, pods[0], 1)

    picks = set(pick_indexes(least_connections(stats), pods, 100))

    assert picks == {1, 2}


def test_least_connections_counts_finished_requests() -> None:
    stats = new_stats()
    pods = make_pods(2)
    hold(stats, pods[0], 2)
    sample(stats, pods[1], 0.01)
    sample(stats, pods[1], 0.01)

    picks = set(pick_indexes(least_connections(stats), pods, 20))

    assert picks == {1}


def test_least_connections_large_pool_samples_two() -> None:
    stats = new_stats()
    pods = make_pods(64)
    for pod in pods:
        if pod.index != 3:
            hold(stats, pod, 1)
    hold(stats, pods[7], 50)

    picks = pick_indexes(least_connections(stats), pods, 500)

    assert 7 not in picks
    # A full scan would take pod 3 every time; two random choices take it
    # only when it is drawn.
    assert 0 < picks.count(3) < 100
    assert len(pods) > FULL_SCAN_MAX_PODS


# Weighted round robin.


def weighted(*weights: int) -> WeightedRoundRobin:
    addresses = tuple(f"127.0.0.1:{9000 + index}" for index in range(len(weights)))
    settings = ServiceSettings(
        name="game",
        pods=addresses,
        strategy="weighted_round_robin",
        weights=weights,
    )
    return WeightedRoundRobin(settings, new_stats())


def test_weighted_round_robin_smooth_for_5_1_1() -> None:
    picks = pick_indexes(weighted(5, 1, 1), make_pods(3), 14)

    assert picks == [0, 0, 1, 0, 2, 0, 0] * 2


def test_weighted_round_robin_smooth_for_3_2() -> None:
    picks = pick_indexes(weighted(3, 2), make_pods(2), 10)

    assert picks == [0, 1, 0, 1, 0] * 2


def test_weighted_round_robin_shares_follow_weights() -> None:
    picks = pick_indexes(weighted(5, 1, 1), make_pods(3), 70)

    assert [picks.count(index) for index in range(3)] == [50, 10, 10]


def test_weighted_round_robin_skips_weight_zero() -> None:
    picks = pick_indexes(weighted(2, 0, 1), make_pods(3), 30)

    assert [picks.count(index) for index in range(3)] == [20, 0, 10]


def test_weighted_round_robin_all_zero_raises() -> None:
    strategy = weighted(1, 0, 0)
    pods = make_pods(3)[1:]

    with pytest.raises(NoPodError):
        strategy.pick(pods, "alice", NO_STATE)


def test_weighted_round_robin_without_weights_rotates() -> None:
    picks = pick_indexes(weighted(), make_pods(3), 6)

    assert picks == [0, 1, 2, 0, 1, 2]


def test_weighted_round_robin_follows_candidates() -> None:
    strategy = weighted(5, 1, 1)
    pods = make_pods(3)

    picks = [strategy.pick(pods[1:], None, NO_STATE).index for _ in range(4)]

    assert picks == [1, 2, 1, 2]


# Least response time.


def least_response_time(stats: PodStats, seed: int = 1) -> LeastResponseTime:
    return LeastResponseTime(SETTINGS, stats, random.Random(seed))


def test_least_response_time_prefers_faster_pod() -> None:
    stats = new_stats()
    pods = make_pods(3)
    for pod, latency_s in zip(pods, (0.030, 0.010, 0.020), strict=True):
        sample(stats, pod, latency_s)

    picks = set(pick_indexes(least_response_time(stats), pods, 50))

    assert picks == {1}


def test_least_response_time_weighs_in_flight() -> None:
    stats = new_stats()
    pods = make_pods(2)
    sample(stats, pods[0], 0.010)
    sample(stats, pods[1], 0.025)
    hold(stats, pods[0], 2)

    picks = set(pick_indexes(least_response_time(stats), pods, 20))

    assert picks == {1}


def test_least_response_time_recovers_improved_pod() -> None:
    clock = FakeClock()
    stats = new_stats(clock)
    pods = make_pods(3)
    strategy = least_response_time(stats)
    sample(stats, pods[1], 0.100)

    def serve(picks: int) -> list[int]:
        """Pick every 0.1 s. Pods 0 and 2 respond in 10 ms, and pod 1 never."""
        chosen = []
        for n in range(picks):
            pod = strategy.pick(pods, f"user-{n}", NO_STATE)
            if pod.index != 1:
                sample(stats, pod, 0.010)
            chosen.append(pod.index)
            clock.now += 0.1
        return chosen

    within_decay_time = serve(95)
    past_decay_time = serve(30)
    sample(stats, pods[1], 0.004)
    after_improvement = serve(20)

    assert 1 not in within_decay_time
    assert 1 in past_decay_time
    assert set(after_improvement) == {1}


def test_least_response_time_seeds_unsampled_pod() -> None:
    stats = new_stats()
    pods = make_pods(3)
    sample(stats, pods[0], 0.010)
    sample(stats, pods[1], 0.010)
    hold(stats, pods[0], 1)
    hold(stats, pods[1], 1)

    picks = set(pick_indexes(least_response_time(stats), pods, 10))

    assert picks == {2}


def test_least_response_time_no_herd_on_unsampled() -> None:
    stats = new_stats()
    pods = make_pods(3)
    sample(stats, pods[0], 0.010)
    sample(stats, pods[1], 0.010)
    hold(stats, pods[2], 3)

    picks = set(pick_indexes(least_response_time(stats), pods, 50))

    assert picks == {0, 1}


def test_least_response_time_without_samples_spreads() -> None:
    picks = set(pick_indexes(least_response_time(new_stats()), make_pods(3), 60))

    assert picks == {0, 1, 2}


@pytest.mark.parametrize("status", [500, 503, 429])
def test_least_response_time_avoids_fast_failures(status: int) -> None:
    stats = new_stats()
    pods = make_pods(2)
    sample(stats, pods[0], 0.002, status)
    sample(stats, pods[1], 0.050)

    picks = set(pick_indexes(least_response_time(stats), pods, 20))

    assert picks == {1}


# Lowest load.


def lowest_load(load_range: int, seed: int = 1) -> LowestLoad:
    settings = ServiceSettings(
        name="game", pods=("127.0.0.1:1",), load_range=load_range
    )
    return LowestLoad(settings, new_stats(), random.Random(seed))


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


# Consistent hash.

UIDS = [f"user-{n}" for n in range(2000)]


def consistent_hash(
    stats: PodStats | None = None, weights: tuple[int, ...] = ()
) -> ConsistentHash:
    service = ServiceSettings(
        name="game",
        pods=tuple(f"127.0.0.1:{9000 + index}" for index in range(len(weights) or 1)),
        strategy="consistent_hash",
        weights=weights,
    )
    return ConsistentHash(service, stats if stats is not None else new_stats())


def placements(strategy: ConsistentHash, pods: tuple[Pod, ...]) -> dict[str, int]:
    return {uid: strategy.pick(pods, uid, NO_STATE).index for uid in UIDS}


def test_consistent_hash_agrees_across_instances() -> None:
    pods = make_pods(4)

    first = placements(consistent_hash(), pods)
    second = placements(consistent_hash(), pods)

    assert first == second


def test_consistent_hash_follows_rank() -> None:
    pods = make_pods(4)

    placed = placements(consistent_hash(), pods)

    assert placed == {uid: rank(uid, pods)[0].index for uid in UIDS}


def test_consistent_hash_spreads_uids_evenly() -> None:
    placed = placements(consistent_hash(), make_pods(4))
    counts = [list(placed.values()).count(index) for index in range(4)]

    assert min(counts) > 0.8 * len(UIDS) / 4
    assert max(counts) < 1.2 * len(UIDS) / 4


def test_consistent_hash_keeps_uids_on_added_pod() -> None:
    before = placements(consistent_hash(), make_pods(4))
    after = placements(consistent_hash(), make_pods(5))
    kept = [uid for uid in UIDS if before[uid] == after[uid]]
    moved_to = {after[uid] for uid in UIDS if before[uid] != after[uid]}

    assert len(kept) >= 0.7 * len(UIDS)
    assert moved_to == {4}


def test_consistent_hash_keeps_uids_on_removed_pod() -> None:
    pods = make_pods(4)
    before = placements(consistent_hash(), pods)
    after = placements(consistent_hash(), pods[:2] + pods[3:])
    kept = [uid for uid in UIDS if before[uid] == after[uid]]
    moved_from = {before[uid] for uid in UIDS if before[uid] != after[uid]}

    assert len(kept) >= 0.7 * len(UIDS)
    assert moved_from == {2}


def test_consistent_hash_respects_load_bound() -> None:
    stats = new_stats()
    pods = make_pods(4)
    strategy = consistent_hash(stats)
    preferring_pod_0 = [uid for uid in UIDS if rank(uid, pods)[0].index == 0][:100]

    for uid in preferring_pod_0:
        stats.start(strategy.pick(pods, uid, NO_STATE))
    loads = [stats.in_flight(pod) for pod in pods]

    assert len(preferring_pod_0) == 100
    assert max(loads) <= math.ceil(1.25 * 100 / 4)
    assert loads[0] == max(loads)


def test_consistent_hash_full_pod_passes_to_next() -> None:
    stats = new_stats()
    pods = make_pods(4)
    uid = UIDS[0]
    first, second = rank(uid, pods)[:2]
    hold(stats, first, 10)

    assert consistent_hash(stats).pick(pods, uid, NO_STATE) == second


def test_consistent_hash_without_uid_rotates() -> None:
    strategy = consistent_hash()
    pods = make_pods(3)

    picks = {strategy.pick(pods, None, NO_STATE).index for _ in range(3)}

    assert picks == {0, 1, 2}


def test_consistent_hash_skips_weight_zero_pods() -> None:
    pods = make_pods(3)
    strategy = consistent_hash(weights=(1, 0, 1))

    assert 1 not in set(placements(strategy, pods).values())
