"""RedisStore on a real Redis Cluster of three primaries.

The contract suite runs on the cluster too, through the `store` fixture.
These tests cover what only a cluster shows, which is keys of many users
spread over all primaries, and the parsing of cluster URLs.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
import redis.asyncio

from proxy.config import _check_redis_url
from proxy.errors import StoreBusyError
from proxy.store import RedisStore
from proxy.store.keys import pod_links_key
from proxy.store.redis import parse_cluster_url

if TYPE_CHECKING:
    from conftest import RedisCluster

NS = "default"
SERVICE = "game"
UID_COUNT = 300
TTL_S = 300.0


async def test_cluster_store_spreads_links_over_primaries(
    cluster_store: RedisStore, cluster_clients: list[redis.asyncio.Redis]
) -> None:
    uids = [f"user-{number}" for number in range(UID_COUNT)]

    # Every operation of the store, over UIDs whose keys land in many slots.
    # A CROSSSLOT reply would raise StoreError and fail the test.
    for number, uid in enumerate(uids):
        pod = number % 3
        ttl_s = -1 if number % 2 else TTL_S
        assert await cluster_store.set(NS, uid, SERVICE, pod, ttl_s) is None
        assert await cluster_store.get_and_refresh(NS, uid, SERVICE, TTL_S) == pod
        assert await cluster_store.read_link(NS, uid, SERVICE, TTL_S) is not None
        accepted, current = await cluster_store.try_set(NS, uid, SERVICE, pod, ttl_s)
        assert accepted
        assert current == pod
        assert await cluster_store.set_if_absent(NS, uid, SERVICE, 5, TTL_S) == pod
        expires_ms = None if ttl_s == -1 else 2**40
        await cluster_store.index_link(NS, SERVICE, pod, uid, expires_ms)

    by_pod = await cluster_store.batch_get(NS, SERVICE, uids)
    assert sorted(uid for group in by_pod.values() for uid in group) == sorted(uids)
    assert by_pod[0] == uids[0::3]

    indexed = await cluster_store.indexed_uids(NS, SERVICE, 0, 0, UID_COUNT)
    assert sorted(indexed) == sorted(uids[0::3])
    counts = await cluster_store.count_indexed(NS, SERVICE, 1, 0)
    assert sum(counts) == len(uids[1::3])

    # Move the even UIDs of pod 0 to pod 1, then remove the rest.
    for number, uid in enumerate(uids):
        if number % 3 == 0 and number % 2 == 0:
            moved, current = await cluster_store.replace_if_pod(
                NS, uid, SERVICE, 0, 1, TTL_S, "failover"
            )
            assert moved
            assert current == 1
            await cluster_store.index_link(NS, SERVICE, 1, uid, 2**40, previous_pod=0)
            noticed = await cluster_store.read_link_noticed(NS, uid, SERVICE, TTL_S)
            assert noticed is not None
            assert noticed[2] == (0, "failover")

    for number, uid in enumerate(uids):
        assert await cluster_store.linked_services(NS, uid) is not None
        assert await cluster_store.link_ttl(NS, uid, SERVICE) is not None
        if number % 2:
            assert await cluster_store.get_if_persistent(NS, uid, SERVICE) is not None
            assert await cluster_store.remove(NS, uid, SERVICE)
        else:
            pod = await cluster_store.get(NS, uid, SERVICE)
            assert pod is not None
            assert await cluster_store.remove_if_pod(NS, uid, SERVICE, pod, 60)

    sizes = [await client.dbsize() for client in cluster_clients]
    assert all(size > 0 for size in sizes), f"keys per primary: {sizes}"
    # Delayed removals leave the even UIDs' keys; the odd ones are gone.
    assert await cluster_store.batch_get(NS, SERVICE, uids[1::2]) == {}


async def test_cluster_pod_index_lives_in_one_slot(
    cluster_store: RedisStore, cluster_clients: list[redis.asyncio.Redis]
) -> None:
    await cluster_store.index_link(NS, SERVICE, 2, "alice", None)
    await cluster_store.index_link(NS, SERVICE, 2, "bob", None)

    key = pod_links_key(NS, SERVICE, 2)
    slot = await cluster_clients[0].execute_command("CLUSTER", "KEYSLOT", key)
    counts = [
        await client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        for client in cluster_clients
    ]
    assert sorted(counts) == [0, 0, 1]


def test_parse_cluster_url_reads_nodes_and_password() -> None:
    nodes, options = parse_cluster_url(
        "rediss+cluster://app:p%40ss@10.0.0.1:7000,[::1]:7001/"
    )

    assert [(node.host, node.port) for node in nodes] == [
        ("10.0.0.1", 7000),
        ("::1", 7001),
    ]
    assert options == {"ssl": True, "username": "app", "password": "p@ss"}


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://10.0.0.1/",
        "redis+cluster://10.0.0.1:port/",
        "redis+cluster://10.0.0.1:7000,/",
        "redis+cluster://10.0.0.1:7000/1",
        "redis+cluster://10.0.0.1:7000/?ssl=true",
        "redis+cluster://10.0.0.1:70000/",
        "redis+cluster://10.0.0.1:0/",
    ],
)
def test_cluster_url_problems_are_reported(url: str) -> None:
    problems = _check_redis_url(url)

    assert len(problems) == 1
    assert problems[0].startswith("store.redis_url: invalid Redis Cluster URL")


def test_cluster_url_password_is_masked_in_problem() -> None:
    problems = _check_redis_url("redis+cluster://:secret@10.0.0.1/")

    assert "secret" not in problems[0]


async def test_cluster_burst_beyond_pool_waits_for_permit(
    redis_cluster: RedisCluster, cluster_clients: list[redis.asyncio.Redis]
) -> None:
    store = RedisStore(redis_cluster.url, max_connections=2)
    uids = [f"burst-{number}" for number in range(100)]
    try:
        results = await asyncio.gather(
            *(store.set_if_absent(NS, uid, SERVICE, 1, TTL_S) for uid in uids)
        )
        linked = [await store.get(NS, uid, SERVICE) for uid in uids]
    finally:
        await store.close()

    assert results == [1] * len(uids)
    assert linked == [1] * len(uids)


async def test_cluster_busy_permits_raise_store_busy(
    redis_cluster: RedisCluster, cluster_clients: list[redis.asyncio.Redis]
) -> None:
    store = RedisStore(redis_cluster.url, max_connections=1, timeout_s=0.2)
    release = asyncio.Event()

    async def hold_permit() -> None:
        await release.wait()

    try:
        await store.ping()
        holder = asyncio.create_task(store._call(hold_permit()))
        await asyncio.sleep(0.01)
        with pytest.raises(
            StoreBusyError, match="1 calls, the maximum, were in flight"
        ):
            await store.get(NS, "busy", SERVICE)
        release.set()
        await holder
        after_release = await store.get(NS, "busy", SERVICE)
    finally:
        await store.close()

    assert after_release is None
