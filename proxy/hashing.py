"""Consistent hashing of UIDs to pods: rendezvous hashing with bounded loads.

Every (uid, pod index) pair gets a 64-bit score, and a UID goes to the
candidate with the highest score, so every proxy with the same candidates
places a UID on the same pod without asking the store. Adding a pod moves
only the UIDs that now score highest on it, and removing one moves only its
own UIDs.

The score, which another router must compute the same way to agree:

- ``u`` = BLAKE2b with an 8-byte digest of the UTF-8 UID, read big-endian;
- ``s`` = ``mix64((index + 1) * 0x9E3779B97F4A7C15 mod 2**64)``;
- ``score`` = ``mix64(u XOR s)``, where ``mix64`` is the SplitMix64
  finalizer (`_mix64`).

Bounded loads: a pod takes a new user only while its requests in flight
through this proxy are below ``ceil(load_factor * (total + 1) / n)``, where
`total` counts the in-flight requests of the `n` candidates. A full pod
passes the user to the candidate with the next highest score. The counts
are this proxy's own, so the bound is local: proxies that see different
loads may place a UID differently. With equal loads every proxy agrees,
because the highest-scoring pod is then always below the bound.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence

from proxy.config import ServiceSettings
from proxy.errors import NoPodError
from proxy.pods import Pod
from proxy.podset import PodSet
from proxy.stats import PodStats

_MASK_64 = (1 << 64) - 1
_GOLDEN_64 = 0x9E3779B97F4A7C15


def _mix64(value: int) -> int:
    """Return the SplitMix64 finalizer of a 64-bit value."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK_64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK_64
    return value ^ (value >> 31)


def uid_hash(uid: str) -> int:
    """Return the 64-bit hash of a UID that every score of it starts from."""
    digest = hashlib.blake2b(uid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=65536)
def _pod_seed(index: int) -> int:
    return _mix64((index + 1) * _GOLDEN_64 & _MASK_64)


def score(hashed_uid: int, index: int) -> int:
    """Return the rendezvous score of a UID, hashed by `uid_hash`, for a pod."""
    return _mix64(hashed_uid ^ _pod_seed(index))


def _scores(hashed_uid: int, seeds: Sequence[int]) -> list[int]:
    """Return `score` for every pod seed, with `_mix64` inlined for speed."""
    scores = []
    for seed in seeds:
        value = hashed_uid ^ seed
        value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK_64
        value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK_64
        scores.append(value ^ (value >> 31))
    return scores


def rank(uid: str, pods: Sequence[Pod]) -> list[Pod]:
    """Return `pods` by descending score for `uid`: the preference order."""
    hashed = uid_hash(uid)
    return sorted(pods, key=lambda pod: score(hashed, pod.index), reverse=True)


class ConsistentHash:
    """Rendezvous hashing of the UID with bounded loads (see the module doc).

    Requests without a UID have nothing to keep consistent and rotate over
    the candidates. Pods of weight 0 in ``weights`` are left out, so a
    weighted service placed by hash while the store is down keeps them free
    of new users.
    """

    name = "consistent_hash"

    def __init__(self, settings: ServiceSettings, stats: PodStats) -> None:
        self._stats = stats
        self._load_factor = settings.load_factor
        self._excluded = frozenset(
            index for index, weight in enumerate(settings.weights) if weight == 0
        )
        self._counter = 0
        # The seeds of the last candidates seen, which change only when the
        # routable pods do.
        self._seeded: Sequence[Pod] = ()
        self._seeds: list[int] = []

    def pick(self, pods: Sequence[Pod], uid: str | None, pod_set: PodSet) -> Pod:
        if self._excluded:
            pods = [pod for pod in pods if pod.index not in self._excluded]
            if not pods:
                raise NoPodError(pod_set.namespace, pod_set.service)
        if uid is None:
            self._counter += 1
            return pods[self._counter % len(pods)]

        if pods is not self._seeded and pods != self._seeded:
            self._seeds = [_pod_seed(pod.index) for pod in pods]
        self._seeded = pods
        scores = _scores(uid_hash(uid), self._seeds)
        best = pods[scores.index(max(scores))]
        in_flight = self._stats.in_flight
        if in_flight(best) == 0:
            # Below any bound: the bound is at least 1.
            return best

        total = sum(map(in_flight, pods))
        bound = math.ceil(self._load_factor * (total + 1) / len(pods))
        if in_flight(best) < bound:
            return best
        ranked = sorted(zip(scores, pods, strict=True), key=_first, reverse=True)
        for _, pod in ranked:
            if in_flight(pod) < bound:
                return pod
        # Not reached: the mean load is below the bound, so some pod is under it.
        return best


def _first(item: tuple[int, Pod]) -> int:
    return item[0]
