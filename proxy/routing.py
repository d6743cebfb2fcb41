"""Computing the linked pod of a request.

The steps, for a (namespace, service, uid):

1. The local cache. A cached index that the service no longer has is dropped.
2. The link in the store, read with `get_and_refresh` so that a user who keeps
   sending requests keeps a temporary link alive.
3. No link: the service's strategy picks a pod, and `set_if_absent` writes
   it with the temporary TTL. The pod that `set_if_absent` returns wins, so
   concurrent first requests of one UID all end on one pod.
4. A link to a pod index that the service no longer has counts as no link.
   It is removed with `remove_if_pod`, which fails if another router changed
   the link meanwhile, and then step 3 runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

from proxy.cache import LinkCache
from proxy.errors import NoPodError, StoreDataError
from proxy.pods import Pod
from proxy.services import Service
from proxy.store.base import LinkStore

logger = logging.getLogger("stateful_route.routing")

# Rounds of steps 2-4 before giving up. A second round is needed only when
# another router writes a link to a missing pod between our steps.
_MAX_ROUNDS = 3


class Origin(Enum):
    """Where the pod of a route came from."""

    CACHE = "cache"
    LINK = "link"
    NEW_LINK = "new_link"
    RELINKED = "relinked"
    UNLINKED = "unlinked"


@dataclass(frozen=True, slots=True)
class Route:
    """The pod a request goes to, and where that choice came from."""

    pod: Pod
    origin: Origin


class Router:
    """Finds or creates the link of a UID and returns its pod.

    :param store: the link store.
    :param cache: the per-process link cache.
    :param link_ttl_s: TTL of the temporary links this router creates.
    """

    def __init__(self, store: LinkStore, cache: LinkCache, link_ttl_s: float) -> None:
        self.store = store
        self.cache = cache
        self.link_ttl_s = link_ttl_s

    async def route(
        self, namespace: str, service: Service, pods: tuple[Pod, ...], uid: str
    ) -> Route:
        """Return the pod linked to `uid`, linking one first when there is none.

        `pods` are the pods of `service` in `namespace`. Raises
        `StoreUnavailableError` when the store cannot be reached.
        """
        if not pods:
            raise NoPodError(namespace, service.name)
        key = (namespace, service.name, uid)
        cached = self.cache.get(key)
        if cached is not None:
            if cached < len(pods):
                return Route(pods[cached], Origin.CACHE)
            self.cache.drop(key)

        origin = Origin.NEW_LINK
        for _ in range(_MAX_ROUNDS):
            linked = await self.store.get_and_refresh(
                namespace, uid, service.name, self.link_ttl_s
            )
            if linked is not None and linked < len(pods):
                self.cache.put(key, linked)
                return Route(
                    pods[linked], Origin.LINK if origin is Origin.NEW_LINK else origin
                )
            if linked is not None:
                await self._unlink_missing_pod(namespace, service, uid, linked, pods)
                origin = Origin.RELINKED

            choice = service.strategy.pick(pods, uid)
            winner = await self.store.set_if_absent(
                namespace, uid, service.name, choice.index, self.link_ttl_s
            )
            if winner < len(pods):
                self.cache.put(key, winner)
                logger.debug(
                    "linked uid=%s to pod=%d service=%s namespace=%s (%s)",
                    uid,
                    winner,
                    service.name,
                    namespace,
                    origin.value,
                )
                return Route(pods[winner], origin)
        raise StoreDataError(
            f"link of uid {uid!r} for service {service.name!r}",
            f"a pod index outside 0..{len(pods) - 1} after {_MAX_ROUNDS} rounds",
        )

    def pick_unlinked(
        self, service: Service, pods: tuple[Pod, ...], namespace: str
    ) -> Route:
        """Return a pod for a request without a UID; no link is created."""
        if not pods:
            raise NoPodError(namespace, service.name)
        return Route(service.strategy.pick(pods, None), Origin.UNLINKED)

    async def _unlink_missing_pod(
        self,
        namespace: str,
        service: Service,
        uid: str,
        linked: int,
        pods: tuple[Pod, ...],
    ) -> None:
        removed = await self.store.remove_if_pod(namespace, uid, service.name, linked)
        logger.info(
            "uid=%s service=%s namespace=%s was linked to pod=%d, which the "
            "service does not have (%d pods): %s",
            uid,
            service.name,
            namespace,
            linked,
            len(pods),
            "removed the link" if removed else "another router changed it first",
        )
