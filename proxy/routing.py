"""Computing the linked pod of a request.

The steps, for a (namespace, service, uid) and the service's current
`PodSet`:

1. The local cache. A cached pod that is no longer available, or that the
   health checks found unusable, is dropped.
2. The link in the store, read with `read_link`, which restarts the TTL of a
   temporary link so that a user who keeps sending requests keeps it alive.
   A linked pod that is available and usable is used, a draining one
   included: it keeps its users.
3. No link: the strategy picks one of the routable pods that the health
   checks find usable, and `set_if_absent` writes it with the temporary
   TTL. The pod that `set_if_absent` returns wins, so concurrent first
   requests of one UID all end on one pod.
4. A link to a pod that is not available (SHUTDOWN, stale, or an index the
   service no longer has), or that the health checks found unusable
   (reason ``failover``), is replaced with `replace_if_pod`. This
   compare-and-set on the old pod lets exactly one of concurrent requests
   move the user, and the others follow its choice. The user is never
   moved back by itself when the old pod returns.

The health checks (`proxy.health`) change the choice in two more ways. In
**panic mode**, when no routable pod of the pod set is usable, routing
ignores health: users stay on their available pods and new users go to any
routable pod, instead of every request getting 503. A pod in **slow start**
after it recovered is offered to each new user with the probability
`HealthTable.slow_start_share`, so its share of new users grows over
``slow_start_s``.

The failover handler moves the users of an unusable pod in the background
with `replace_if_pod` and a move notice in the store. The user's next
request, through whichever proxy, reads the notice with the link and carries
`previous` and `reason`, as if the request had moved the user itself.

While the store is unavailable, a UID that is not in the local cache is
placed by the service's consistent hash over the usable routable pods, and
no link is written (`Origin.DEGRADED`). The cache is suspended when its
invalidations from Redis stop, which an outage also causes, and a UID that
was cached at that moment keeps that pod instead. Every proxy with the same pods and
equal loads picks the same pod, so users keep sticking during an outage of
Redis. The router remembers these placements for the link TTL: repeated
requests keep their pod even when the bounded load would choose another,
and once the store responds again, a UID without a link is linked to the pod
it used.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from proxy.cache import LinkCache
from proxy.errors import NoPodError, StoreDataError, StoreError, StoreUnavailableError
from proxy.pods import Pod
from proxy.podset import PodSet, PodStatus
from proxy.podstate import now_ms
from proxy.services import Service
from proxy.store.base import LinkStore

logger = logging.getLogger("stateful_route.routing")

# `Route.reason` of a user moved off a pod that the health checks found
# unusable, and of a user moved by an operator through the admin API.
FAILOVER_REASON = "failover"
MIGRATED_REASON = "migrated"

# Rounds of steps 2-4 before giving up. A second round is needed only when
# another router links the user to an unavailable pod between our steps.
_MAX_ROUNDS = 3
# Maximum placements remembered from store outages. Beyond it the oldest is
# dropped.
_MAX_DEGRADED_PLACEMENTS = 100_000
# Maximum cached health views, one per (namespace, service).
_MAX_VIEWS = 4096
# Maximum shared routes of cache hits, one per pod. Beyond it they are all
# dropped and built again.
_MAX_CACHE_ROUTES = 4096

_Key = tuple[str, str, str]
MoveObserver = Callable[[str, str, str, int, str, int], None]
"""Called with (namespace, service, uid, previous pod, reason, new pod)."""


class Origin(Enum):
    """Source of the pod of a route."""

    CACHE = "cache"
    LINK = "link"
    NEW_LINK = "new_link"
    MOVED = "moved"
    UNLINKED = "unlinked"
    DEGRADED = "degraded"


@dataclass(frozen=True, slots=True)
class Route:
    """The pod a request goes to, and where that choice came from.

    For a user moved off an unavailable or unusable pod, `previous` is that
    pod's index and `reason` why it was left.
    """

    pod: Pod
    origin: Origin
    previous: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HealthView:
    """The routable pods of one pod set that the health checks find usable.

    Valid while the pod set's `routable` tuple and the health table's
    `version` stay the same. `healthy` is empty in panic mode.
    """

    routable: tuple[Pod, ...]
    version: int
    healthy: tuple[Pod, ...]

    @property
    def panic(self) -> bool:
        """Whether pods are routable but none of them is usable."""
        return bool(self.routable) and not self.healthy

    @property
    def candidates(self) -> tuple[Pod, ...]:
        """The pods that may take new users: the usable ones, or all in panic."""
        return self.healthy or self.routable


class Router:
    """Finds or creates the link of a UID and returns its pod.

    :param store: the link store.
    :param cache: the per-process link cache.
    :param link_ttl_s: TTL of the temporary links this router creates, and
        of the placements it remembers while the store is unavailable.
    :param clock: returns monotonic seconds.
    :param rng: draws which pods in slow start take a new user.
    """

    def __init__(
        self,
        store: LinkStore,
        cache: LinkCache,
        link_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.link_ttl_s = link_ttl_s
        self._clock = clock
        self._rng = rng or random.Random()
        # NOTE: links_created counts the links this router proposed and found
        # in place; two routers proposing the same pod at once both count it.
        self.links_created = 0
        self.users_moved = 0
        self.degraded_routes = 0
        self.move_observers: list[MoveObserver] = []
        self._pending: set[asyncio.Task[None]] = set()
        # (namespace, service, uid) -> (pod index, expiry in clock seconds).
        self._degraded: dict[_Key, tuple[int, float]] = {}
        self._views: dict[tuple[str, str], HealthView] = {}
        self._cache_routes: dict[Pod, Route] = {}

    async def route(
        self, namespace: str, service: Service, pod_set: PodSet, uid: str
    ) -> Route:
        """Return the pod linked to `uid`, linking one first when there is none.

        While the store is unavailable, return the pod of the consistent
        hash without a link. Raises `NoPodError` when a new link or
        placement is needed and no pod is routable.
        """
        route = self.route_cached(namespace, service, pod_set, uid)
        if route is not None:
            return route
        return await self.route_from_store(namespace, service, pod_set, uid)

    def route_cached(
        self, namespace: str, service: Service, pod_set: PodSet, uid: str
    ) -> Route | None:
        """Return the route of `uid` from the local cache, or None on a miss.

        It is the first step of `route`, which needs no await. After None,
        the caller continues with `route_from_store`. A cached pod that may
        no longer keep its users is dropped from the cache.
        """
        key = (namespace, service.name, uid)
        view = self.health_view(namespace, service, pod_set)
        if view.panic:
            service.health.panic_routes += 1
        cached = self.cache.get(key)
        if cached is not None:
            status = pod_set.get(cached)
            if status is not None and self._keeps(service, view, status):
                return self._cache_route(status.pod)
            self.cache.drop(key)
        return None

    def _cache_route(self, pod: Pod) -> Route:
        """Return the `Origin.CACHE` route of `pod`, built once per pod.

        A `Route` is immutable, so requests share it. Building one calls the
        dataclass's generated ``__init__``, which mypyc 2.4.1 leaves as
        interpreted Python.
        """
        route = self._cache_routes.get(pod)
        if route is None:
            if len(self._cache_routes) >= _MAX_CACHE_ROUTES:
                self._cache_routes.clear()
            route = self._cache_routes[pod] = Route(pod, Origin.CACHE)
        return route

    async def route_from_store(
        self, namespace: str, service: Service, pod_set: PodSet, uid: str
    ) -> Route:
        """Return the linked pod of `uid` from the store, after `route_cached`."""
        key = (namespace, service.name, uid)
        try:
            route = await self._route_in_store(key, service, pod_set)
        except StoreUnavailableError:
            # The store logs the start and the end of the outage.
            route = self._place_degraded(key, service, pod_set)
        return route

    async def _route_in_store(
        self, key: _Key, service: Service, pod_set: PodSet
    ) -> Route:
        namespace, _, uid = key
        previous: int | None = None
        reason = ""
        for _ in range(_MAX_ROUNDS):
            read = await self.store.read_link_noticed(
                namespace, uid, service.name, self.link_ttl_s
            )
            view = self.health_view(namespace, service, pod_set)
            if read is None:
                choice = self._choose(key, service, pod_set, view)
                winner = await self.store.set_if_absent(
                    namespace, uid, service.name, choice.index, self.link_ttl_s
                )
                self._degraded.pop(key, None)
                status = pod_set.get(winner)
                if status is None or not self._keeps(service, view, status):
                    continue  # another router linked an unavailable pod
                self.cache.put(key, winner)
                self._index_later(key, winner, persistent=False)
                if previous is None:
                    self._log_link(namespace, service, uid, winner)
                    return Route(status.pod, Origin.NEW_LINK)
                return Route(status.pod, Origin.MOVED, previous, reason)

            linked, persistent, notice = read
            status = pod_set.get(linked)
            if status is not None and self._keeps(service, view, status):
                if self._degraded:
                    self._degraded.pop(key, None)
                self.cache.put(key, linked)
                # The read renewed a temporary link, so renew its index entry.
                self._index_later(key, linked, persistent=persistent)
                if previous is None and notice is not None:
                    # A failover moved the user in the background, maybe
                    # through another proxy: tell the new pod once.
                    return Route(status.pod, Origin.MOVED, notice[0], notice[1])
                if previous is None:
                    return Route(status.pod, Origin.LINK)
                # Another router moved the user first; follow its choice.
                return Route(status.pod, Origin.MOVED, previous, reason)

            previous = linked
            reason = _move_reason(status)
            choice = self._choose(key, service, pod_set, view)
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

    def health_view(
        self, namespace: str, service: Service, pod_set: PodSet
    ) -> HealthView:
        """Return the usable routable pods of `pod_set`, computed once per change.

        Logs the start and the end of panic mode of the pod set, once each.
        """
        health = service.health
        key = (namespace, service.name)
        view = self._views.get(key)
        if (
            view is not None
            and view.version == health.version
            and view.routable is pod_set.routable
        ):
            return view

        healthy = health.usable_pods(pod_set.routable)
        view = HealthView(pod_set.routable, health.version, healthy)
        if key not in self._views and len(self._views) >= _MAX_VIEWS:
            del self._views[next(iter(self._views))]
        self._views[key] = view
        self._note_panic(namespace, service, view)
        return view

    def _note_panic(self, namespace: str, service: Service, view: HealthView) -> None:
        health = service.health
        if view.panic == (namespace in health.panic_namespaces):
            return
        if view.panic:
            health.panic_namespaces.add(namespace)
            health.panic_entries += 1
            logger.warning(
                "panic mode for service=%s namespace=%s: none of its %d routable "
                "pods passes the health checks, so routing ignores them until one "
                "does",
                service.name,
                namespace,
                len(view.routable),
            )
        else:
            health.panic_namespaces.discard(namespace)
            logger.info(
                "panic mode over for service=%s namespace=%s: %d of %d routable "
                "pods pass the health checks",
                service.name,
                namespace,
                len(view.healthy),
                len(view.routable),
            )

    def _keeps(self, service: Service, view: HealthView, status: PodStatus) -> bool:
        """Return whether a linked, cached or remembered pod keeps its user.

        An available pod keeps its users while the health checks find it
        usable, and also when no routable pod is usable, since a move would
        have nowhere better to go.
        """
        if not status.available:
            return False
        return service.health.usable(status.pod) or not view.healthy

    def choose_target(
        self,
        namespace: str,
        service: Service,
        pod_set: PodSet,
        uid: str,
        exclude: int,
    ) -> Pod | None:
        """Return the pod to move `uid` to from pod `exclude`, by the strategy.

        Only usable routable pods qualify. Returns None when there is none,
        in panic mode included. Raises `NoPodError` when the strategy
        rejects every candidate (weights 0).
        """
        view = self.health_view(namespace, service, pod_set)
        if not view.healthy:
            return None
        pods = [pod for pod in self._candidates(service, view) if pod.index != exclude]
        if not pods:
            return None
        return service.strategy.pick(pods, uid, pod_set)

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

    def forget_service(self, service: str) -> None:
        """Drop the health views and outage placements of a removed service."""
        for view_key in [key for key in self._views if key[1] == service]:
            del self._views[view_key]
        for key in [key for key in self._degraded if key[1] == service]:
            del self._degraded[key]

    async def wait_background(self) -> None:
        """Wait for pending index updates, before the store is closed."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _choose(
        self, key: _Key, service: Service, pod_set: PodSet, view: HealthView
    ) -> Pod:
        """Return the pod to link: the one used during an outage, else a pick."""
        remembered = self._remembered(key, service, pod_set, view)
        if remembered is not None:
            return remembered
        return self._pick(key[0], service, pod_set, key[2], view)

    def _place_degraded(self, key: _Key, service: Service, pod_set: PodSet) -> Route:
        """Place a UID while the store is unavailable.

        The first choice is the pod cached before the cache was suspended. It
        is routed like a cache hit, because the user's state is there. Next
        comes a placement made earlier in the outage, which wins over the
        cached pod when that pod was unusable at the time. Last comes the
        consistent hash.
        """
        namespace, _, uid = key
        view = self.health_view(namespace, service, pod_set)
        pod = self._remembered(key, service, pod_set, view)
        cached = self._cached_before_outage(key, service, pod_set, view)
        if cached is not None and (pod is None or pod.index == cached.index):
            # The user's state is on the cached pod, as on a cache hit.
            # Remembering it keeps the user there if Redis comes back
            # without the link.
            self._remember_degraded(key, cached)
            return Route(cached, Origin.CACHE)
        if pod is None:
            candidates = self._candidates(service, view)
            if not candidates:
                raise NoPodError(namespace, service.name)
            pod = service.placement.pick(candidates, uid, pod_set)
        self._remember_degraded(key, pod)
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

    def _remember_degraded(self, key: _Key, pod: Pod) -> None:
        """Remember a placement of an outage, so the link names it once written."""
        if key in self._degraded:
            return
        if len(self._degraded) >= _MAX_DEGRADED_PLACEMENTS:
            del self._degraded[next(iter(self._degraded))]
        self._degraded[key] = (pod.index, self._clock() + self.link_ttl_s)

    def _cached_before_outage(
        self, key: _Key, service: Service, pod_set: PodSet, view: HealthView
    ) -> Pod | None:
        """Return the pod the local cache had for `key` before it was suspended.

        The cache is suspended when its invalidations from Redis stop, which
        a Redis outage also causes, so users cached then keep their pod.
        """
        index = self.cache.stale_pod(key)
        if index is None:
            return None
        status = pod_set.get(index)
        if status is None or not self._keeps(service, view, status):
            return None
        return status.pod

    def _remembered(
        self, key: _Key, service: Service, pod_set: PodSet, view: HealthView
    ) -> Pod | None:
        """Return the pod of a placement made during an outage, when still usable.

        Like a linked pod, it is kept while available and usable, draining
        included.
        """
        if not self._degraded:
            return None
        entry = self._degraded.get(key)
        if entry is None:
            return None
        index, expires_at = entry
        status = pod_set.get(index)
        if (
            expires_at <= self._clock()
            or status is None
            or not self._keeps(service, view, status)
        ):
            del self._degraded[key]
            return None
        return status.pod

    def _candidates(self, service: Service, view: HealthView) -> Sequence[Pod]:
        """Return the pods that may take a new user now, slow start applied.

        A pod in slow start is kept with the probability of its share. When
        the draw keeps no pod, every candidate is returned.
        """
        pods = view.candidates
        health = service.health
        if not health.in_slow_start or len(pods) < 2:
            return pods
        admitted = []
        for pod in pods:
            share = health.slow_start_share(pod)
            if share >= 1.0 or self._rng.random() < share:
                admitted.append(pod)
        return admitted or pods

    def _pick(
        self,
        namespace: str,
        service: Service,
        pod_set: PodSet,
        uid: str | None,
        view: HealthView,
    ) -> Pod:
        pods = self._candidates(service, view)
        if not pods:
            raise NoPodError(namespace, service.name)
        return service.strategy.pick(pods, uid, pod_set)

    def pick_unlinked(self, service: Service, pod_set: PodSet) -> Route:
        """Return a routable pod for a request without a UID; no link is created."""
        view = self.health_view(pod_set.namespace, service, pod_set)
        if view.panic:
            service.health.panic_routes += 1
        pod = self._pick(pod_set.namespace, service, pod_set, None, view)
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
        for observer in self.move_observers:
            observer(namespace, service.name, uid, previous, reason, pod)

    # --- Request-level retries (proxy/forward.py); appended for proxy/retry.py. ---

    async def relink_for_retry(
        self,
        namespace: str,
        service: Service,
        pod_set: PodSet,
        uid: str | None,
        failed: tuple[int, ...],
    ) -> Route | None:
        """Pick a pod outside `failed` for a retry and move `uid` to it.

        The candidates are those that may take new users (`_candidates`:
        usable routable pods, slow start applied, all routable ones in panic
        mode). `failed` lists the pods that failed this request, the last
        one last. The link moves with `replace_if_pod` from that pod, so of
        concurrent retries of one UID exactly one chooses and the others
        follow it. Returns None when no candidate is left. While the store
        is unavailable, the retry goes to the pod without moving the link.
        """
        view = self.health_view(namespace, service, pod_set)
        candidates = [
            pod for pod in self._candidates(service, view) if pod.index not in failed
        ]
        if not candidates:
            return None
        choice = service.strategy.pick(candidates, uid, pod_set)
        previous = failed[-1]
        if uid is None:
            return Route(choice, Origin.UNLINKED, previous, "retry")

        key = (namespace, service.name, uid)
        self.cache.drop(key)
        try:
            replaced, linked = await self.store.replace_if_pod(
                namespace, uid, service.name, previous, choice.index, self.link_ttl_s
            )
        except StoreError as exc:
            logger.debug(
                "retry of uid=%s goes to pod=%d without moving its link: %s",
                uid,
                choice.index,
                exc,
            )
            return Route(choice, Origin.DEGRADED, previous, "retry")
        if replaced:
            self.cache.put(key, choice.index)
            self._index_later(key, choice.index, persistent=False, previous=previous)
            self._log_move(namespace, service, uid, previous, "retry", choice.index)
            return Route(choice, Origin.MOVED, previous, "retry")
        status = None if linked is None else pod_set.get(linked)
        if (
            status is not None
            and status.pod.index not in failed
            and self._keeps(service, view, status)
        ):
            # Another request moved the user first; follow its choice.
            return Route(status.pod, Origin.MOVED, previous, "retry")
        return Route(choice, Origin.UNLINKED, previous, "retry")


def _move_reason(status: PodStatus | None) -> str:
    """Return why a linked pod lost its user: its pod state, else health."""
    if status is None:
        return "missing"
    if not status.available:
        return status.reason
    return FAILOVER_REASON
