"""Computing the linked pod of a request.

The steps, for a (namespace, service, uid) and the service's current
`PodSet`:

1. The local cache. A cached pod that is no longer available is dropped.
2. The link in the store, read with `read_link`, which restarts the TTL of a
   temporary link so that a user who keeps sending requests keeps it alive.
   A linked pod that is available is used, a draining one included: it keeps
   its users.
3. No link: the strategy picks one of the routable pods, and `set_if_absent`
   writes it with the temporary TTL. The pod that `set_if_absent` returns
   wins, so concurrent first requests of one UID all end on one pod.
4. A link to a pod that is not available (SHUTDOWN, stale, or an index the
   service no longer has) is replaced with `replace_if_pod`, a
   compare-and-set on the old pod: of concurrent requests, exactly one moves
   the user and the others follow its choice. The user is never moved back
   by itself when the old pod returns.

While the store is unavailable, a UID that is not in the local cache is
placed by the service's consistent hash over the routable pods, and no link
is written (`Origin.DEGRADED`). Every proxy with the same pods and equal
loads picks the same pod, so users keep sticking during an outage of Redis.
The router remembers these placements for the link TTL: repeated requests
keep their pod even when the bounded load would choose another, and once the
store answers again, a UID without a link is linked to the pod it used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from proxy.cache import LinkCache
from proxy.errors import NoPodError, StoreDataError, StoreError, StoreUnavailableError
from proxy.pods import Pod
from proxy.podset import PodSet
from proxy.podstate import now_ms
from proxy.services import Service
from proxy.store.base import LinkStore

logger = logging.getLogger("stateful_route.routing")

# Rounds of steps 2-4 before giving up. A second round is needed only when
# another router links the user to an unavailable pod between our steps.
_MAX_ROUNDS = 3
# Maximum placements remembered from store outages. Beyond it the oldest is
# dropped.
_MAX_DEGRADED_PLACEMENTS = 100_000

_Key = tuple[str, str, str]


class Origin(Enum):
    """Where the pod of a route came from."""

    CACHE = "cache"
    LINK = "link"
    NEW_LINK = "new_link"
    MOVED = "moved"
    UNLINKED = "unlinked"
    DEGRADED = "degraded"


@dataclass(frozen=True, slots=True)
class Route:
    """The pod a request goes to, and where that choice came from.

    For a user moved off an unavailable pod, `previous` is that pod's index
    and `reason` why it was left.
    """

    pod: Pod
    origin: Origin
    previous: int | None = None
    reason: str = ""


class Router:
    """Finds or creates the link of a UID and returns its pod.

    :param store: the link store.
    :param cache: the per-process link cache.
    :param link_ttl_s: TTL of the temporary links this router creates, and
        of the placements it remembers while the store is unavailable.
    :param clock: returns monotonic seconds.
    """

    def __init__(
        self,
        store: LinkStore,
        cache: LinkCache,
        link_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache = cache
        self.link_ttl_s = link_ttl_s
        self._clock = clock
        # NOTE: links_created counts the links this router proposed and found
        # in place; two routers proposing the same pod at once both count it.
        self.links_created = 0
        self.users_moved = 0
        self.degraded_routes = 0
        self._pending: set[asyncio.Task[None]] = set()
        # (namespace, service, uid) -> (pod index, expiry in clock seconds).
        self._degraded: dict[_Key, tuple[int, float]] = {}

    async def route(
        self, namespace: str, service: Service, pod_set: PodSet, uid: str
    ) -> Route:
        """Return the pod linked to `uid`, linking one first when there is none.

        While the store is unavailable, return the pod of the consistent
        hash without a link. Raises `NoPodError` when a new link or
        placement is needed and no pod is routable.
        """
        key = (namespace, service.name, uid)
        cached = self.cache.get(key)
        if cached is not None:
            status = pod_set.get(cached)
            if status is not None and status.available:
                return Route(status.pod, Origin.CACHE)
            self.cache.drop(key)

        try:
            return await self._route_in_store(key, service, pod_set)
        except StoreUnavailableError:
            # The store logs the start and the end of the outage.
            return self._place_degraded(key, service, pod_set)

    async def _route_in_store(
        self, key: _Key, service: Service, pod_set: PodSet
    ) -> Route:
        namespace, _, uid = key
        previous: int | None = None
        reason = ""
        for _ in range(_MAX_ROUNDS):
            read = await self.store.read_link(
                namespace, uid, service.name, self.link_ttl_s
            )
            if read is None:
                choice = self._choose(key, service, pod_set)
                winner = await self.store.set_if_absent(
                    namespace, uid, service.name, choice.index, self.link_ttl_s
                )
                self._degraded.pop(key, None)
                status = pod_set.get(winner)
                if status is None or not status.available:
                    continue  # another router linked an unavailable pod
                self.cache.put(key, winner)
                self._index_later(key, winner, persistent=False)
                if previous is None:
                    self._log_link(namespace, service, uid, winner)
                    return Route(status.pod, Origin.NEW_LINK)
                return Route(status.pod, Origin.MOVED, previous, reason)

            linked, persistent = read
            status = pod_set.get(linked)
            if status is not None and status.available:
                if self._degraded:
                    self._degraded.pop(key, None)
                self.cache.put(key, linked)
                # The read renewed a temporary link, so renew its index entry.
                self._index_later(key, linked, persistent=persistent)
                if previous is None:
                    return Route(status.pod, Origin.LINK)
                # Another router moved the user first; follow its choice.
                return Route(status.pod, Origin.MOVED, previous, reason)

            previous = linked
            reason = "missing" if status is None else status.reason
            choice = self._choose(key, service, pod_set)
            replaced, _ = await self.store.replace_if_pod(
                namespace, uid, service.name, linked, choice.index, self.link_ttl_s
            )
            self._degraded.pop(key, None)
            if replaced:
                self.cache.put(key, choice.index)
                self._index_later(key, choice.index, persistent=False, previous=linked)
                self._log_move(namespace, service, uid, previous, reason, choice.index)
                return Route(choice, Origin.MOVED, previous, reason)
            # The link changed meanwhile: the next round reads it again.
        raise StoreDataError(
            f"link of uid {uid!r} for service {service.name!r}",
            f"an unavailable pod after {_MAX_ROUNDS} rounds",
        )

    def _index_later(
        self, key: _Key, pod: int, *, persistent: bool, previous: int | None = None
    ) -> None:
        """Update the per-pod index of linked UIDs without delaying the request."""
        namespace, service, uid = key
        expires_ms = None if persistent else now_ms() + int(self.link_ttl_s * 1000)
        task = asyncio.create_task(
            self._index(namespace, service, pod, uid, expires_ms, previous)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _index(
        self,
        namespace: str,
        service: str,
        pod: int,
        uid: str,
        expires_ms: int | None,
        previous: int | None,
    ) -> None:
        try:
            await self.store.index_link(
                namespace, service, pod, uid, expires_ms, previous_pod=previous
            )
        except StoreError as exc:
            # The index is a hint that failover and rebalancing re-check, and
            # the store logs outages itself.
            logger.debug("index update failed for uid=%s pod=%d: %s", uid, pod, exc)

    async def wait_background(self) -> None:
        """Wait for pending index updates, before the store is closed."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _choose(self, key: _Key, service: Service, pod_set: PodSet) -> Pod:
        """Return the pod to link: the one used during an outage, else a pick."""
        remembered = self._remembered(key, pod_set)
        if remembered is not None:
            return remembered
        return self._pick(key[0], service, pod_set, key[2])

    def _place_degraded(self, key: _Key, service: Service, pod_set: PodSet) -> Route:
        """Place a UID by the consistent hash while the store is unavailable."""
        namespace, _, uid = key
        pod = self._remembered(key, pod_set)
        if pod is None:
            if not pod_set.routable:
                raise NoPodError(namespace, service.name)
            pod = service.placement.pick(pod_set.routable, uid, pod_set)
            if len(self._degraded) >= _MAX_DEGRADED_PLACEMENTS:
                del self._degraded[next(iter(self._degraded))]
            self._degraded[key] = (pod.index, self._clock() + self.link_ttl_s)
        self.degraded_routes += 1
        logger.debug(
            "placed uid=%s on pod=%d service=%s namespace=%s without a link, "
            "the store is unavailable",
            uid,
            pod.index,
            service.name,
            namespace,
        )
        return Route(pod, Origin.DEGRADED)

    def _remembered(self, key: _Key, pod_set: PodSet) -> Pod | None:
        """Return the pod of a placement made during an outage, when still usable.

        Like a linked pod, it is usable while available, draining included.
        """
        if not self._degraded:
            return None
        entry = self._degraded.get(key)
        if entry is None:
            return None
        index, expires_at = entry
        status = pod_set.get(index)
        if expires_at <= self._clock() or status is None or not status.available:
            del self._degraded[key]
            return None
        return status.pod

    def _pick(
        self, namespace: str, service: Service, pod_set: PodSet, uid: str | None
    ) -> Pod:
        if not pod_set.routable:
            raise NoPodError(namespace, service.name)
        return service.strategy.pick(pod_set.routable, uid, pod_set)

    def pick_unlinked(self, service: Service, pod_set: PodSet) -> Route:
        """Return a routable pod for a request without a UID; no link is created."""
        pod = self._pick(pod_set.namespace, service, pod_set, None)
        return Route(pod, Origin.UNLINKED)

    def _log_link(self, namespace: str, service: Service, uid: str, pod: int) -> None:
        self.links_created += 1
        logger.debug(
            "linked uid=%s to pod=%d service=%s namespace=%s",
            uid,
            pod,
            service.name,
            namespace,
        )

    def _log_move(
        self,
        namespace: str,
        service: Service,
        uid: str,
        previous: int,
        reason: str,
        pod: int,
    ) -> None:
        self.users_moved += 1
        logger.info(
            "moved uid=%s service=%s namespace=%s from pod=%d (%s) to pod=%d",
            uid,
            service.name,
            namespace,
            previous,
            reason,
            pod,
        )
