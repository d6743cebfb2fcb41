"""Balancing strategies: which pod a user without a link is placed on.

A strategy is built once per service, from its settings and the service's
`PodStats` table, which it reads and never owns. On every pick it is given
the pods that may take new users and the service's current `PodSet` (loads,
states). It keeps no copy of the pod set, so a change of pods or of their
health never resets it. Rebuilding a strategy loses only its own position (a
rotation counter, smooth weights), never a measurement. Strategies are
chosen by name from `STRATEGIES`. The consistent hash is in
`proxy.hashing`, because routing also uses it while the store is down.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.config import ServiceSettings
from proxy.errors import NoPodError
from proxy.hashing import ConsistentHash
from proxy.pods import Pod
from proxy.podset import PodSet
from proxy.stats import PodStats

# Pools larger than this are sampled with two random choices instead of
# scanned, so a pick costs about the same for 20 pods as for 2,000.
FULL_SCAN_MAX_PODS = 16
# The latency estimate of every pod when no candidate has a recent sample.
# Its value does not matter because every pod gets it, so the in-flight
# counts decide.
_UNSAMPLED_ESTIMATE_S = 0.001


class Strategy(Protocol):
    """Chooses one pod among the candidates for a new user."""

    name: str

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        """Return one of `pods`, which is never empty.

        Raises `NoPodError` when none of `pods` may take new users, which
        happens only when all of them have weight 0 in ``weights``.
        """
        ...


class RoundRobin:
    """A rotation over the candidates, in pod order, one step per pick.

    While the pod set stays the same, every pod gets one user in turn.
    """

    name = "round_robin"

    def __init__(self, settings: ServiceSettings, stats: PodStats) -> None:
        self._counter = 0

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        pod = pods[self._counter % len(pods)]
        self._counter += 1
        return pod


class LeastConnections:
    """The pod with the fewest requests in flight through this proxy.

    Ties are broken at random. Above `FULL_SCAN_MAX_PODS` candidates, two
    distinct pods are drawn at random and the one with fewer requests in
    flight wins (power of two random choices).
    """

    name = "least_connections"

    def __init__(
        self,
        settings: ServiceSettings,
        stats: PodStats,
        rng: random.Random | None = None,
    ) -> None:
        self._stats = stats
        self._rng = rng or random.Random()

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        # NOTE: a request counts as in flight only once it reaches the relay,
        # after the link is written. Picks made during the same store round
        # trip do not see each other, so a burst of new users can share a pod.
        in_flight = self._stats.in_flight
        if len(pods) > FULL_SCAN_MAX_PODS:
            first, second = self._rng.sample(pods, 2)
            return first if in_flight(first) <= in_flight(second) else second
        counts = [in_flight(pod) for pod in pods]
        fewest = min(counts)
        tied = [pod for pod, count in zip(pods, counts, strict=True) if count == fewest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class WeightedRoundRobin:
    """Smooth weighted round robin, as in nginx's ``ngx_http_upstream_get_peer``.

    The nginx function is in ``src/http/ngx_http_upstream_round_robin.c``.
    Each pick adds every candidate's weight to its current value, takes the
    candidate with the highest value (the first in pod order on a tie) and
    subtracts the sum of the weights from it. Weights 5, 1, 1 give the
    repeating order 0 0 1 0 2 0 0, never a burst. Weights come from
    ``weights`` by pod index; a pod without one weighs 1, and a pod of
    weight 0 takes no new users.
    """

    name = "weighted_round_robin"

    def __init__(self, settings: ServiceSettings, stats: PodStats) -> None:
        self._weights = settings.weights
        self._current: dict[int, int] = {}

    def weight(self, index: int) -> int:
        return self._weights[index] if index < len(self._weights) else 1

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        current = self._current
        total = 0
        best: Pod | None = None
        best_value = 0
        for pod in pods:
            weight = self.weight(pod.index)
            if weight == 0:
                continue
            value = current.get(pod.index, 0) + weight
            current[pod.index] = value
            total += weight
            if best is None or value > best_value:
                best, best_value = pod, value
        if best is None:
            raise NoPodError(pod_set.namespace, pod_set.service)
        current[best.index] = best_value - total
        return best


class LeastResponseTime:
    """The pod with the lowest expected wait: latency x (in flight + 1).

    The latency is the pod's peak-EWMA estimate from `PodStats`. A pod
    without a recent sample gets the lowest estimate among the candidates as
    its seed, so a new pod takes a fair share of users and not all of them
    before its first response. Failures were sampled as slow, so a failing
    pod does not attract users. Ties are broken at random; above
    `FULL_SCAN_MAX_PODS` candidates two random pods are compared.
    """

    name = "least_response_time"

    def __init__(
        self,
        settings: ServiceSettings,
        stats: PodStats,
        rng: random.Random | None = None,
    ) -> None:
        self._stats = stats
        self._rng = rng or random.Random()

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        stats = self._stats
        if len(pods) > FULL_SCAN_MAX_PODS:
            pods = self._rng.sample(pods, 2)
        now = stats.now()
        entries = [stats.get(pod) for pod in pods]
        estimates = [stats.estimate_s(entry, now) for entry in entries]
        sampled = [estimate for estimate in estimates if estimate is not None]
        seed = min(sampled) if sampled else _UNSAMPLED_ESTIMATE_S

        costs = []
        for entry, estimate in zip(entries, estimates, strict=True):
            in_flight = 0 if entry is None else entry.in_flight
            costs.append((seed if estimate is None else estimate) * (in_flight + 1))
        lowest = min(costs)
        tied = [pod for pod, cost in zip(pods, costs, strict=True) if cost == lowest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class LowestLoad:
    """The Java best-pod rule: a random pod among the least loaded.

    The floor is the lowest published load among the candidates; every
    candidate with a load of at most floor + `load_range` qualifies, and one
    of them is picked at random, so a burst of new users spreads over the
    pods near the floor instead of piling onto one.
    """

    name = "lowest_load"

    def __init__(
        self,
        settings: ServiceSettings,
        stats: PodStats,
        rng: random.Random | None = None,
    ) -> None:
        self._load_range = settings.load_range
        self._rng = rng or random.Random()

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        floor = min(pod_set.load(pod.index) for pod in pods)
        ceiling = floor + self._load_range
        window = [pod for pod in pods if pod_set.load(pod.index) <= ceiling]
        return self._rng.choice(window)


STRATEGIES: dict[str, Callable[[ServiceSettings, PodStats], Strategy]] = {
    RoundRobin.name: RoundRobin,
    LeastConnections.name: LeastConnections,
    WeightedRoundRobin.name: WeightedRoundRobin,
    LeastResponseTime.name: LeastResponseTime,
    LowestLoad.name: LowestLoad,
    ConsistentHash.name: ConsistentHash,
}


def build_strategy(settings: ServiceSettings, stats: PodStats) -> Strategy:
    """Return a new strategy for a service; raise KeyError when unknown."""
    return STRATEGIES[settings.strategy](settings, stats)
