from __future__ import annotations

import asyncio

import pytest

from proxy.cache import LinkCache
from proxy.config import ServiceSettings
from proxy.errors import NoPodError
from proxy.pods import Address, Pod
from proxy.routing import Origin, Router
from proxy.services import Service
from proxy.store.base import PERSISTENT, LinkStore
from proxy.store.memory import MemoryStore

NS = "default"
LINK_TTL_S = 300.0


def make_service(pods: int = 3) -> Service:
    addresses = tuple(f"127.0.0.1:{9000 + index}" for index in range(pods))
    return Service(ServiceSettings(name="game", pods=addresses))


def make_pods(count: int) -> tuple[Pod, ...]:
    return tuple(
        Pod(index, Address("127.0.0.1", 9000 + index)) for index in range(count)
    )


def make_router(store: LinkStore, cache_ttl_s: float = 240.0) -> Router:
    return Router(store, LinkCache(cache_ttl_s, 1000), LINK_TTL_S)


async def test_new_uid_gets_temporary_link() -> None:
    store = MemoryStore()
    service = make_service()
    router = make_router(store)

    route = await router.route(NS, service, make_pods(3), "alice")

    assert route.origin is Origin.NEW_LINK
    assert await store.get(NS, "alice", "game") == route.pod.index
    ttl = await store.link_ttl(NS, "alice", "game")
    assert ttl is not None
    assert 0 < ttl <= LINK_TTL_S


async def test_returning_uid_hits_local_cache() -> None:
    router = make_router(MemoryStore())
    service = make_service()
    first = await router.route(NS, service, make_pods(3), "alice")

    second = await router.route(NS, service, make_pods(3), "alice")

    assert second.origin is Origin.CACHE
    assert second.pod == first.pod


async def test_existing_link_wins_over_strategy() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 2, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)

    route = await router.route(NS, make_service(), make_pods(3), "alice")

    assert route.origin is Origin.LINK
    assert route.pod.index == 2


async def test_link_to_pod_zero_is_kept() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 0, PERSISTENT)
    router = make_router(store, cache_ttl_s=0)

    for _ in range(3):
        route = await router.route(NS, make_service(), make_pods(3), "alice")
        assert route.pod.index == 0


async def test_new_uids_rotate_over_pods() -> None:
    router = make_router(MemoryStore())
    service = make_service()

    picks = [
        (await router.route(NS, service, make_pods(3), f"user-{n}")).pod.index
        for n in range(6)
    ]

    assert picks == [0, 1, 2, 0, 1, 2]


async def test_link_to_missing_pod_is_replaced() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 7, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)

    route = await router.route(NS, make_service(), make_pods(3), "alice")

    assert route.origin is Origin.RELINKED
    assert route.pod.index < 3
    assert await store.get(NS, "alice", "game") == route.pod.index


async def test_cached_missing_pod_is_dropped() -> None:
    store = MemoryStore()
    router = make_router(store)
    service = make_service(3)
    await store.set(NS, "alice", "game", 2, LINK_TTL_S)
    await router.route(NS, service, make_pods(3), "alice")

    route = await router.route(NS, service, make_pods(2), "alice")

    assert route.origin is Origin.RELINKED
    assert route.pod.index < 2


async def test_persistent_link_stays_persistent() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, PERSISTENT)
    router = make_router(store, cache_ttl_s=0)

    await router.route(NS, make_service(), make_pods(3), "alice")

    assert await store.link_ttl(NS, "alice", "game") == PERSISTENT
    assert await store.linked_services(NS, "alice") == {"game": 1}


async def test_reading_link_renews_its_ttl() -> None:
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    router = make_router(store, cache_ttl_s=0)
    await router.route(NS, make_service(), make_pods(3), "alice")

    now[0] += 200
    await router.route(NS, make_service(), make_pods(3), "alice")

    assert await store.link_ttl(NS, "alice", "game") == pytest.approx(LINK_TTL_S)


async def test_concurrent_first_requests_share_one_pod() -> None:
    store = MemoryStore()
    service = make_service()
    routers = [make_router(store) for _ in range(20)]

    routes = await asyncio.gather(
        *(router.route(NS, service, make_pods(3), "bob") for router in routers)
    )

    assert len({route.pod.index for route in routes}) == 1


async def test_empty_pod_set_raises_no_pod() -> None:
    router = make_router(MemoryStore())

    with pytest.raises(NoPodError):
        await router.route(NS, make_service(), (), "alice")


async def test_request_without_uid_creates_no_link() -> None:
    store = MemoryStore()
    router = make_router(store)

    route = router.pick_unlinked(make_service(), make_pods(3), NS)

    assert route.origin is Origin.UNLINKED
    assert len(store) == 0
