"""Balancing strategies: which pod a user without a link is placed on.

A strategy is built once per service. On every pick it is given the pods
that may take new users and the service's current `PodSet` (loads, states),
so it keeps no copy of the pod set and a change of pods or of their health
never resets it. Strategies are chosen by name from `STRATEGIES`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.config import ServiceSettings
from proxy.pods import Pod
from proxy.podset import PodSet


class Strategy(Protocol):
    """Chooses one pod among the candidates for a new user."""

    name: str

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        """Return one of `pods`, which is never empty."""
        ...


class RoundRobin:
    """A rotation over the candidates, in pod order, one step per pick.

    While the pod set stays the same, every pod gets one user in turn.
    """

    name = "round_robin"

    def __init__(self, settings: ServiceSettings) -> None:
        self._counter = 0

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        pod = pods[self._counter % len(pods)]
        self._counter += 1
        return pod


class LowestLoad:
    """The Java best-pod rule: a random pod among the least loaded.

    The floor is the lowest published load among the candidates; every
    candidate with a load of at most floor + `load_range` qualifies, and one
    of them is picked at random, so a burst of new users spreads over the
    pods near the floor instead of piling onto one.
    """

    name = "lowest_load"

    def __init__(
        self, settings: ServiceSettings, rng: random.Random | None = None
    ) -> None:
        self._load_range = settings.load_range
        self._rng = rng or random.Random()

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        floor = min(pod_set.load(pod.index) for pod in pods)
        ceiling = floor + self._load_range
        window = [pod for pod in pods if pod_set.load(pod.index) <= ceiling]
        return self._rng.choice(window)


STRATEGIES: dict[str, Callable[[ServiceSettings], Strategy]] = {
    RoundRobin.name: RoundRobin,
    LowestLoad.name: LowestLoad,
}


def build_strategy(settings: ServiceSettings) -> Strategy:
    """Return a new strategy for a service; raise KeyError when unknown."""
    return STRATEGIES[settings.strategy](settings)
