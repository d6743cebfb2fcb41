"""Rebalancing: spread temporary links again when one pod has too many.

A pod is overloaded when its count of temporary links exceeds the mean of
the routable pods of its service by ``rebalance_factor``. The rebalancer then
removes temporary links of that pod, the least recently renewed first, until
the pod is down to the mean, at most ``rebalance_rate_per_s`` links a
second. Those users are placed again, by the service's strategy, on their
next request. Persistent links are never touched, and neither are draining
pods, whose users are meant to stay.

Counts come from the per-pod index, which is a hint: each removal re-checks
the link atomically with `remove_if_temporary`.

NOTE: on Redis Cluster another proxy instance keeps a removed link in its
local cache for up to ``local_cache_ttl_s``, so for that long it can send
the user to the old pod while this proxy places the user anew. With one Redis server
it drops the entry when Redis reports the removal (`proxy.invalidation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from proxy.cache import LinkCache
from proxy.errors import StoreError
from proxy.podstate import now_ms
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.store.base import LinkStore

logger = logging.getLogger("stateful_route.rebalance")

# UIDs shown per pod in a plan or a result.
SAMPLE_SIZE = 10
# Maximum wait between two turns of the loop, in seconds.
TICK_S = 1.0


@dataclass(frozen=True, slots=True)
class PodCount:
    """Links of one routable pod, from the per-pod index."""

    index: int
    temporary: int
    persistent: int


@dataclass(slots=True)
class Rebalance:
    """A plan, and once run, what it removed.

    `planned` maps a pod index to how many temporary links should go;
    `removed` and `sample` what went, when not a dry run.
    """

    namespace: str
    service: str
    mean: float
    threshold: float
    counts: list[PodCount]
    planned: dict[int, int]
    dry_run: bool
    removed: dict[int, int] = field(default_factory=dict)
    sample: dict[int, list[str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {
            "namespace": self.namespace,
            "service": self.service,
            "dry_run": self.dry_run,
            "mean": round(self.mean, 3),
            "threshold": round(self.threshold, 3),
            "pods": [
                {
                    "index": count.index,
                    "temporary": count.temporary,
                    "persistent": count.persistent,
                    "planned": self.planned.get(count.index, 0),
                    "removed": self.removed.get(count.index, 0),
                    "sample": self.sample.get(count.index, []),
                }
                for count in self.counts
            ],
        }


class Rebalancer:
    """Plans and runs rebalancing for the services that use it.

    :param store: the link store with the per-pod index.
    :param states: the pod sets in use.
    :param services: the configured services by name.
    :param cache: this proxy's link cache, cleared of removed links.
    :param sleep: waits between removals; tests pass a fake one.
    """

    def __init__(
        self,
        store: LinkStore,
        states: PodStates,
        services: Mapping[str, Service],
        cache: LinkCache,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._states = states
        self._services = services
        self._cache = cache
        self._sleep = sleep

    async def plan(self, namespace: str, service: Service) -> Rebalance:
        """Return what a run would remove now, without removing anything."""
        pod_set = await self._states.load(namespace, service.name)
        at_ms = now_ms()
        counts = []
        for pod in pod_set.routable:
            temporary, persistent = await self._store.count_indexed(
                namespace, service.name, pod.index, at_ms
            )
            counts.append(PodCount(pod.index, temporary, persistent))

        mean = sum(count.temporary for count in counts) / len(counts) if counts else 0
        threshold = mean * service.settings.rebalance_factor
        planned = {
            count.index: count.temporary - math.ceil(mean)
            for count in counts
            if count.temporary > threshold and count.temporary > math.ceil(mean)
        }
        return Rebalance(
            namespace, service.name, mean, threshold, counts, planned, dry_run=True
        )

    async def run_once(
        self, namespace: str, service: Service, *, dry_run: bool, max_removals: int
    ) -> Rebalance:
        """Plan, and unless `dry_run`, remove up to `max_removals` links."""
        result = await self.plan(namespace, service)
        if dry_run:
            for index, planned in result.planned.items():
                result.sample[index] = await self._store.indexed_uids(
                    namespace, service.name, index, now_ms(), min(planned, SAMPLE_SIZE)
                )
            return result

        result.dry_run = False
        budget = max_removals
        pause_s = 1 / service.settings.rebalance_rate_per_s
        for index, planned in result.planned.items():
            wanted = min(planned, budget)
            removed = await self._remove_from_pod(
                namespace, service, index, wanted, pause_s, result
            )
            budget -= removed
            if budget <= 0:
                break
        if result.removed:
            logger.info(
                "rebalanced service=%s namespace=%s: removed %s temporary links "
                "(pod: count), mean %.1f",
                service.name,
                namespace,
                result.removed,
                result.mean,
            )
        return result

    async def _remove_from_pod(
        self,
        namespace: str,
        service: Service,
        index: int,
        wanted: int,
        pause_s: float,
        result: Rebalance,
    ) -> int:
        removed = 0
        # The index lists the soonest expiring links first: the users who
        # renewed their link least recently, so the least active ones move.
        uids = await self._store.indexed_uids(
            namespace, service.name, index, now_ms(), wanted * 2 + SAMPLE_SIZE
        )
        for uid in uids:
            if removed >= wanted:
                break
            if not await self._store.remove_if_temporary(
                namespace, uid, service.name, index
            ):
                continue
            await self._store.unindex_link(namespace, service.name, index, uid)
            self._cache.drop((namespace, service.name, uid))
            removed += 1
            sample = result.sample.setdefault(index, [])
            if len(sample) < SAMPLE_SIZE:
                sample.append(uid)
            await self._sleep(pause_s)
        if removed:
            result.removed[index] = removed
        return removed

    async def run(self, stopping: asyncio.Event) -> None:
        """Rebalance the services with ``rebalance = true`` until `stopping`.

        The services are looked up again every turn, and a turn comes at
        least every `TICK_S`, so a reload that adds a service or turns
        ``rebalance`` on takes effect within that time.
        """
        loop = asyncio.get_running_loop()
        next_run: dict[str, float] = {}
        while not stopping.is_set():
            services = [s for s in self._services.values() if s.settings.rebalance]
            next_run = {
                service.name: next_run.get(service.name, loop.time())
                for service in services
            }
            for service in services:
                if next_run[service.name] > loop.time():
                    continue
                next_run[service.name] = (
                    loop.time() + service.settings.rebalance_interval_s
                )
                for namespace in self._states.namespaces_of(service.name):
                    await self._run_logged(namespace, service)
            next_at = min(next_run.values(), default=loop.time() + TICK_S)
            wait_s = min(TICK_S, max(0.0, next_at - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait_s)

    async def _run_logged(self, namespace: str, service: Service) -> None:
        # One round removes at most what the rate allows in one interval.
        settings = service.settings
        max_removals = max(
            1, int(settings.rebalance_rate_per_s * settings.rebalance_interval_s)
        )
        try:
            await self.run_once(
                namespace, service, dry_run=False, max_removals=max_removals
            )
        except StoreError as exc:
            logger.warning(
                "rebalancing service=%s namespace=%s failed: %s",
                service.name,
                namespace,
                exc,
            )
