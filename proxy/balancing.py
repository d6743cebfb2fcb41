"""Balancing strategies: which pod a user without a link is placed on.

A strategy is built once per service and is given the pods that can take
new users on every pick, so it keeps no copy of the pod set and a change of
pods never resets it. Strategies are chosen by name from `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.pods import Pod


class Strategy(Protocol):
    """Chooses one pod among the candidates for a new user."""

    name: str

    def pick(self, pods: Sequence[Pod], uid: str | None) -> Pod:
        """Return one of `pods`, which is never empty."""
        ...


class RoundRobin:
    """A rotation over the candidates, in pod order, one step per pick.

    While the pod set stays the same, every pod gets one user in turn.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def pick(self, pods: Sequence[Pod], uid: str | None) -> Pod:
        pod = pods[self._counter % len(pods)]
        self._counter += 1
        return pod


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    RoundRobin.name: RoundRobin,
}


def build_strategy(name: str) -> Strategy:
    """Return a new strategy of the given name; raise KeyError when unknown."""
    return STRATEGIES[name]()
