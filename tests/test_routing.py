from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import Counter

import pytest

from proxy.cache import LinkCache
from proxy.config import ServiceSettings
from proxy.errors import NoPodError, StoreUnavailableError
from proxy.hashing import rank
from proxy.health import HealthTable
from proxy.podset import PodSet, build_pod_set
from proxy.podstate import PodState, Routing
from proxy.routing import FAILOVER_REASON, Origin, Router
from proxy.services import Service
from proxy.store.base import PERSISTENT, LinkStore
from proxy.store.memory import MemoryStore

NS = "default"
LINK_TTL_S = 300.0
NOW_MS = 1_764_800_000_000


def make_service(pods: int = 3) -> Service:
    addresses = tuple(f"127.0.0.1:{9000 + index}" for index in range(pods))
    return Service(ServiceSettings(name="game", pods=addresses))


def make_pods(count: int, **states: PodState) -> PodSet:
    """Return the pod set of `count` pods; `states` maps "pod<i>" to a record."""
    service = make_service(count)
    records = {int(name[3:]): state for name, state in states.items()}
    return build_pod_set(service.settings, NS, service.pods(NS), records, NOW_MS)


def record(routing: Routing, load: int = 0, age_s: float = 0) -> PodState:
    return PodState(load, routing, NOW_MS - int(age_s * 1000))


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

    assert route.origin is Origin.MOVED
    assert route.pod.index < 3
    assert await store.get(NS, "alice", "game") == route.pod.index


async def test_cached_missing_pod_is_dropped() -> None:
    store = MemoryStore()
    router = make_router(store)
    service = make_service(3)
    await store.set(NS, "alice", "game", 2, LINK_TTL_S)
    await router.route(NS, service, make_pods(3), "alice")

    route = await router.route(NS, service, make_pods(2), "alice")

    assert route.origin is Origin.MOVED
    assert route.previous == 2
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
        await router.route(NS, make_service(0), make_pods(0), "alice")


async def test_request_without_uid_creates_no_link() -> None:
    store = MemoryStore()
    router = make_router(store)

    route = router.pick_unlinked(make_service(), make_pods(3))

    assert route.origin is Origin.UNLINKED
    assert len(store) == 0


async def test_draining_pod_keeps_linked_user() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)
    pods = make_pods(3, pod1=record(Routing.DENY_NEW_CALL))

    route = await router.route(NS, make_service(), pods, "alice")

    assert route.origin is Origin.LINK
    assert route.pod.index == 1


async def test_draining_pod_gets_no_new_users() -> None:
    router = make_router(MemoryStore())
    service = make_service()
    pods = make_pods(3, pod1=record(Routing.DENY_NEW_CALL))

    picks = {
        (await router.route(NS, service, pods, f"user-{n}")).pod.index
        for n in range(30)
    }

    assert picks == {0, 2}


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (record(Routing.SHUTDOWN), "shutdown"),
        (record(Routing.READY, age_s=61), "stale"),
    ],
)
async def test_unavailable_pod_loses_user_once(state: PodState, reason: str) -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store)
    service = make_service()
    pods = make_pods(3, pod1=state)

    moved = await router.route(NS, service, pods, "alice")
    again = await router.route(NS, service, pods, "alice")

    assert moved.origin is Origin.MOVED
    assert moved.previous == 1
    assert moved.reason == reason
    assert moved.pod.index != 1
    assert again.pod == moved.pod
    assert again.origin is Origin.CACHE
    assert router.users_moved == 1


async def test_moved_user_stays_after_pod_returns() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)
    service = make_service()
    moved = await router.route(
        NS, service, make_pods(3, pod1=record(Routing.SHUTDOWN)), "alice"
    )

    back = await router.route(NS, service, make_pods(3), "alice")

    assert back.pod == moved.pod
    assert back.origin is Origin.LINK


async def test_cached_pod_that_shut_down_is_left() -> None:
    store = MemoryStore()
    router = make_router(store)
    service = make_service()
    await store.set(NS, "alice", "game", 2, LINK_TTL_S)
    await router.route(NS, service, make_pods(3), "alice")

    route = await router.route(
        NS, service, make_pods(3, pod2=record(Routing.SHUTDOWN)), "alice"
    )

    assert route.origin is Origin.MOVED
    assert route.pod.index != 2


async def test_no_routable_pod_raises_no_pod() -> None:
    router = make_router(MemoryStore())
    pods = make_pods(
        2, pod0=record(Routing.DENY_NEW_CALL), pod1=record(Routing.SHUTDOWN)
    )

    with pytest.raises(NoPodError):
        await router.route(NS, make_service(2), pods, "alice")


async def test_concurrent_moves_end_on_one_pod(redis_store: LinkStore) -> None:
    await redis_store.set(NS, "carol", "game", 0, LINK_TTL_S)
    service = make_service()
    pods = make_pods(3, pod0=record(Routing.SHUTDOWN))
    routers = [make_router(redis_store) for _ in range(20)]

    routes = await asyncio.gather(
        *(router.route(NS, service, pods, "carol") for router in routers)
    )

    assert len({route.pod.index for route in routes}) == 1
    assert routes[0].pod.index != 0
    assert sum(router.users_moved for router in routers) == 1


async def test_concurrent_first_links_agree_in_redis(redis_store: LinkStore) -> None:
    service = make_service()
    routers = [make_router(redis_store) for _ in range(20)]

    routes = await asyncio.gather(
        *(router.route(NS, service, make_pods(3), "dave") for router in routers)
    )

    assert len({route.pod.index for route in routes}) == 1
    assert await redis_store.get(NS, "dave", "game") == routes[0].pod.index


class FlakyStore(MemoryStore):
    """A memory store whose link operations fail while `down` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("memory", "down for the test")

    async def get_and_refresh(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._check()
        return await super().get_and_refresh(*args, **kwargs)

    async def set_if_absent(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._check()
        return await super().set_if_absent(*args, **kwargs)


async def test_store_outage_places_by_hash() -> None:
    store = FlakyStore()
    store.down = True
    service = make_service()
    pod_set = make_pods(3)

    route = await make_router(store).route(NS, service, pod_set, "alice")

    assert route.origin is Origin.DEGRADED
    assert route.pod == rank("alice", pod_set.routable)[0]


async def test_store_outage_writes_no_link() -> None:
    store = FlakyStore()
    store.down = True
    router = make_router(store, cache_ttl_s=0)
    await router.route(NS, make_service(), make_pods(3), "alice")
    store.down = False

    assert await store.get(NS, "alice", "game") is None


async def test_store_outage_without_routable_pod() -> None:
    store = FlakyStore()
    store.down = True
    pod_set = make_pods(
        2, pod0=record(Routing.DENY_NEW_CALL), pod1=record(Routing.SHUTDOWN)
    )

    with pytest.raises(NoPodError):
        await make_router(store).route(NS, make_service(2), pod_set, "alice")


async def test_recovered_store_links_degraded_pod() -> None:
    store = FlakyStore()
    router = make_router(store, cache_ttl_s=0)
    service = make_service()
    pod_set = make_pods(3)
    store.down = True
    during = await router.route(NS, service, pod_set, "alice")
    store.down = False

    after = await router.route(NS, service, pod_set, "alice")

    assert after.origin is Origin.NEW_LINK
    assert after.pod == during.pod
    assert await store.get(NS, "alice", "game") == during.pod.index


async def test_cached_pod_survives_store_outage() -> None:
    store = FlakyStore()
    router = make_router(store)
    service = make_service()
    first = await router.route(NS, service, make_pods(3), "alice")
    store.down = True

    second = await router.route(NS, service, make_pods(3), "alice")

    assert second.origin is Origin.CACHE
    assert second.pod == first.pod


async def test_new_link_is_indexed_on_its_pod() -> None:
    store = MemoryStore()
    router = make_router(store)

    route = await router.route(NS, make_service(), make_pods(3), "alice")
    await router.wait_background()

    uids = await store.indexed_uids(NS, "game", route.pod.index, NOW_MS, 10)
    assert uids == ["alice"]


async def test_moved_user_changes_index_entry() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    await store.index_link(NS, "game", 1, "alice", None)
    router = make_router(store)

    moved = await router.route(
        NS, make_service(), make_pods(3, pod1=record(Routing.SHUTDOWN)), "alice"
    )
    await router.wait_background()

    assert await store.indexed_uids(NS, "game", 1, NOW_MS, 10) == []
    new_pod_uids = await store.indexed_uids(NS, "game", moved.pod.index, NOW_MS, 10)
    assert new_pod_uids == ["alice"]


async def test_read_persistent_link_indexed_as_persistent() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 2, PERSISTENT)
    router = make_router(store, cache_ttl_s=0)

    await router.route(NS, make_service(), make_pods(3), "alice")
    await router.wait_background()

    assert await store.count_indexed(NS, "game", 2, NOW_MS) == (0, 1)


# Health checks.


def mark_unhealthy(service: Service, *indexes: int) -> None:
    """Fail enough probes of each pod for the health checks to drop it."""
    for pod in service.pods(NS) or ():
        if pod.index in indexes:
            for _ in range(service.settings.unhealthy_threshold):
                service.health.record_probe(pod, "cannot connect")


def mark_healthy(service: Service, *indexes: int) -> None:
    for pod in service.pods(NS) or ():
        if pod.index in indexes:
            for _ in range(service.settings.healthy_threshold):
                service.health.record_probe(pod, None)


async def test_unhealthy_linked_pod_fails_over() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)
    service = make_service()
    mark_unhealthy(service, 1)

    moved = await router.route(NS, service, make_pods(3), "alice")
    again = await router.route(NS, service, make_pods(3), "alice")

    assert moved.origin is Origin.MOVED
    assert moved.previous == 1
    assert moved.reason == FAILOVER_REASON
    assert moved.pod.index != 1
    assert again.origin is Origin.LINK
    assert again.pod == moved.pod
    assert await store.get(NS, "alice", "game") == moved.pod.index


async def test_cached_unhealthy_pod_is_left() -> None:
    store = MemoryStore()
    router = make_router(store)
    service = make_service()
    await store.set(NS, "alice", "game", 2, LINK_TTL_S)
    await router.route(NS, service, make_pods(3), "alice")
    mark_unhealthy(service, 2)

    route = await router.route(NS, service, make_pods(3), "alice")

    assert route.origin is Origin.MOVED
    assert route.reason == FAILOVER_REASON
    assert route.pod.index != 2


async def test_new_users_skip_unhealthy_pod() -> None:
    router = make_router(MemoryStore())
    service = make_service()
    mark_unhealthy(service, 0)

    picks = {
        (await router.route(NS, service, make_pods(3), f"user-{n}")).pod.index
        for n in range(30)
    }

    assert picks == {1, 2}


async def test_recovered_pod_keeps_moved_users() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)
    service = make_service()
    mark_unhealthy(service, 1)
    moved = await router.route(NS, service, make_pods(3), "alice")

    mark_healthy(service, 1)
    back = await router.route(NS, service, make_pods(3), "alice")

    assert back.pod == moved.pod
    assert back.origin is Origin.LINK


async def test_panic_keeps_links_and_places_users(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)
    service = make_service()
    mark_unhealthy(service, 0, 1, 2)

    with caplog.at_level(logging.WARNING, logger="stateful_route.routing"):
        linked = await router.route(NS, service, make_pods(3), "alice")
        newcomers = [
            await router.route(NS, service, make_pods(3), f"user-{n}") for n in range(6)
        ]

    assert linked.origin is Origin.LINK
    assert linked.pod.index == 1
    assert {route.pod.index for route in newcomers} == {0, 1, 2}
    assert service.health.panic_namespaces == {NS}
    assert service.health.panic_entries == 1
    assert service.health.panic_routes == 7
    panic_lines = [r for r in caplog.records if "panic mode for" in r.getMessage()]
    assert len(panic_lines) == 1


async def test_panic_ends_when_pod_recovers(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)
    service = make_service()
    mark_unhealthy(service, 0, 1, 2)
    await router.route(NS, service, make_pods(3), "alice")

    mark_healthy(service, 2)
    with caplog.at_level(logging.INFO, logger="stateful_route.routing"):
        route = await router.route(NS, service, make_pods(3), "alice")

    assert route.pod.index == 2
    assert route.reason == FAILOVER_REASON
    assert service.health.panic_namespaces == set()
    assert any("panic mode over" in r.getMessage() for r in caplog.records)


async def test_slow_start_ramps_new_users() -> None:
    clock = [100.0]
    router = Router(MemoryStore(), LinkCache(0, 1000), LINK_TTL_S, rng=random.Random(7))
    service = make_service()
    settings = dataclasses.replace(service.settings, slow_start_s=30.0)
    service.health = HealthTable(settings, clock=lambda: clock[0])
    mark_unhealthy(service, 1)
    mark_healthy(service, 1)

    clock[0] += 3.0  # a share of 0.1
    early = Counter(
        [
            (await router.route(NS, service, make_pods(3), f"early-{n}")).pod.index
            for n in range(300)
        ]
    )
    clock[0] += 30.0
    late = Counter(
        [
            (await router.route(NS, service, make_pods(3), f"late-{n}")).pod.index
            for n in range(300)
        ]
    )

    assert early[1] < 30
    assert early[1] > 0
    assert late[1] == 100


async def test_move_notice_marks_next_request() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    await store.replace_if_pod(NS, "alice", "game", 1, 2, LINK_TTL_S, FAILOVER_REASON)
    router = make_router(store, cache_ttl_s=0)
    service = make_service()

    first = await router.route(NS, service, make_pods(3), "alice")
    second = await router.route(NS, service, make_pods(3), "alice")

    assert first.origin is Origin.MOVED
    assert first.pod.index == 2
    assert first.previous == 1
    assert first.reason == FAILOVER_REASON
    assert second.previous is None


async def test_move_notice_reaches_other_proxy(redis_store: LinkStore) -> None:
    await redis_store.set(NS, "bob", "game", 0, LINK_TTL_S)
    await redis_store.replace_if_pod(NS, "bob", "game", 0, 1, LINK_TTL_S, "failover")
    first_proxy, second_proxy = make_router(redis_store), make_router(redis_store)
    service = make_service()

    seen = await second_proxy.route(NS, service, make_pods(3), "bob")
    again = await first_proxy.route(NS, service, make_pods(3), "bob")

    assert seen.origin is Origin.MOVED
    assert seen.previous == 0
    assert seen.reason == "failover"
    assert again.origin is Origin.LINK
    assert again.previous is None


async def test_move_without_notice_leaves_no_mark() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    await store.replace_if_pod(NS, "alice", "game", 1, 2, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)

    route = await router.route(NS, make_service(), make_pods(3), "alice")

    assert route.previous is None


async def test_move_observers_see_moves() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 1, LINK_TTL_S)
    router = make_router(store, cache_ttl_s=0)
    service = make_service()
    mark_unhealthy(service, 1)
    seen: list[tuple[str, str, str, int, str, int]] = []
    router.move_observers.append(lambda *move: seen.append(move))

    route = await router.route(NS, service, make_pods(3), "alice")

    assert seen == [(NS, "game", "alice", 1, FAILOVER_REASON, route.pod.index)]


def test_failover_target_excludes_failed_pod() -> None:
    router = make_router(MemoryStore())
    service = make_service()
    mark_unhealthy(service, 0)

    targets = {
        router.choose_target(NS, service, make_pods(3), f"user-{n}", 1)
        for n in range(10)
    }

    assert {pod.index for pod in targets if pod is not None} == {2}
    assert None not in targets


def test_no_failover_target_in_panic() -> None:
    router = make_router(MemoryStore())
    service = make_service()
    mark_unhealthy(service, 0, 1, 2)

    assert router.choose_target(NS, service, make_pods(3), "alice", 1) is None


async def test_store_outage_skips_unhealthy_pods() -> None:
    store = FlakyStore()
    store.down = True
    service = make_service()
    pod_set = make_pods(3)
    preferred = rank("alice", pod_set.routable)[0]
    mark_unhealthy(service, preferred.index)

    route = await make_router(store).route(NS, service, pod_set, "alice")

    assert route.origin is Origin.DEGRADED
    assert route.pod != preferred
