from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy.cache import LinkCache
from proxy.config import ServiceSettings, parse_config
from proxy.podstate import PodState, Routing, now_ms
from proxy.rebalance import Rebalancer
from proxy.server import ProxyServer
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.store.base import PERSISTENT, LinkStore

NS = "default"
TTL_S = 300.0
PODS = ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")


async def no_sleep(seconds: float) -> None:
    return None


def make_service(**settings: Any) -> Service:
    return Service(ServiceSettings(name="game", pods=PODS, **settings))


async def link(
    store: LinkStore, pod: int, count: int, prefix: str, ttl_s: float
) -> None:
    """Link `count` users to `pod` and index them, as a router would."""
    for number in range(count):
        uid = f"{prefix}-{number}"
        await store.set(NS, uid, "game", pod, ttl_s)
        expires_ms = None if ttl_s == PERSISTENT else now_ms() + int(ttl_s * 1000)
        await store.index_link(NS, "game", pod, uid, expires_ms)


async def skewed(store: LinkStore) -> None:
    """Pod 0: 60 temporary and 5 persistent links; pods 1 and 2: 10 each."""
    await link(store, 0, 60, "hot", TTL_S)
    await link(store, 0, 5, "owned", PERSISTENT)
    await link(store, 1, 10, "one", TTL_S)
    await link(store, 2, 10, "two", TTL_S)


def make_rebalancer(store: LinkStore, service: Service) -> Rebalancer:
    services = {"game": service}
    states = PodStates(store, services)
    return Rebalancer(store, states, services, LinkCache(240, 1000), sleep=no_sleep)


async def test_plan_targets_pod_above_threshold(store: LinkStore) -> None:
    await skewed(store)
    service = make_service()

    plan = await make_rebalancer(store, service).plan(NS, service)

    assert plan.mean == pytest.approx(80 / 3)
    assert plan.threshold == pytest.approx(80 / 3 * 1.5)
    assert plan.planned == {0: 60 - 27}


async def test_dry_run_removes_nothing(store: LinkStore) -> None:
    await skewed(store)
    service = make_service()

    result = await make_rebalancer(store, service).run_once(
        NS, service, dry_run=True, max_removals=100
    )

    assert result.removed == {}
    assert len(result.sample[0]) == 10
    assert await store.count_indexed(NS, "game", 0, now_ms()) == (60, 5)
    assert await store.get(NS, result.sample[0][0], "game") == 0


async def test_run_removes_excess_temporary_links(store: LinkStore) -> None:
    await skewed(store)
    service = make_service()

    result = await make_rebalancer(store, service).run_once(
        NS, service, dry_run=False, max_removals=100
    )

    assert result.removed == {0: 33}
    assert await store.count_indexed(NS, "game", 0, now_ms()) == (27, 5)
    for uid in result.sample[0]:
        assert await store.get(NS, uid, "game") is None


async def test_run_never_touches_persistent_links(store: LinkStore) -> None:
    await link(store, 0, 40, "owned", PERSISTENT)
    await link(store, 1, 2, "one", TTL_S)
    service = make_service()

    result = await make_rebalancer(store, service).run_once(
        NS, service, dry_run=False, max_removals=100
    )

    assert 0 not in result.removed
    assert await store.get_if_persistent(NS, "owned-0", "game") == 0
    assert await store.linked_services(NS, "owned-39") == {"game": 0}


async def test_run_respects_removal_limit(store: LinkStore) -> None:
    await skewed(store)
    service = make_service()

    result = await make_rebalancer(store, service).run_once(
        NS, service, dry_run=False, max_removals=5
    )

    assert result.removed == {0: 5}
    assert await store.count_indexed(NS, "game", 0, now_ms()) == (55, 5)


async def test_draining_pod_is_left_alone(store: LinkStore) -> None:
    await skewed(store)
    record = PodState(0, Routing.DENY_NEW_CALL, now_ms())
    await store.publish_pod_state(NS, "game", 0, record.encode())
    service = make_service()

    plan = await make_rebalancer(store, service).plan(NS, service)

    assert plan.planned == {}
    assert [count.index for count in plan.counts] == [1, 2]


async def test_balanced_pods_need_no_moves(store: LinkStore) -> None:
    for pod in range(3):
        await link(store, pod, 20, f"pod{pod}", TTL_S)
    service = make_service()

    plan = await make_rebalancer(store, service).plan(NS, service)

    assert plan.planned == {}


async def test_run_waits_between_removals(store: LinkStore) -> None:
    await skewed(store)
    service = make_service(rebalance_rate_per_s=4.0)
    pauses: list[float] = []

    async def record_pause(seconds: float) -> None:
        pauses.append(seconds)

    services = {"game": service}
    rebalancer = Rebalancer(
        store, PodStates(store, services), services, LinkCache(240, 1000), record_pause
    )
    await rebalancer.run_once(NS, service, dry_run=False, max_removals=3)

    assert pauses == [0.25, 0.25, 0.25]


async def test_admin_rebalance_dry_run_and_run(memory_store: LinkStore) -> None:
    document = {
        "proxy": {"port": 0},
        "admin": {"port": 0},
        "services": {"game": {"pods": list(PODS)}},
    }
    server = ProxyServer(parse_config(document, environ={}), store=memory_store)
    await server.start()
    try:
        await skewed(memory_store)
        url = f"http://{server.admin_address}/v1/services/game/rebalance"
        async with aiohttp.ClientSession() as session:
            async with session.post(url) as response:
                assert response.status == 200
                planned = await response.json()
            async with session.post(url, params={"dry_run": "false"}) as response:
                assert response.status == 200
                done = await response.json()
            async with session.post(url, params={"dry_run": "maybe"}) as response:
                assert response.status == 400
                rejected = await response.json()
    finally:
        await server.stop()

    assert planned["dry_run"] is True
    assert planned["pods"][0]["planned"] == 33
    assert planned["pods"][0]["removed"] == 0
    assert done["dry_run"] is False
    assert done["pods"][0]["removed"] == 33
    assert rejected["error"] == "invalid_parameter"
