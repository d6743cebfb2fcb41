"""The local link cache kept coherent through Redis invalidations.

Two ``stateful-route run`` processes share one real redis-server and the
pod processes of ``tests/test_e2e.py``. A link changed through one proxy's
admin API, or by a raw SET, must reach the other proxy's routing within a
bounded wait, and a killed invalidation connection must flush the cache and
come back. The first tests run one `Invalidator` in the test process on
that redis-server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from conftest import RedisServer
from test_e2e import (
    CLIENT_TIMEOUT,
    LINK_TTL_S,
    POD_COUNT,
    Document,
    Launch,
    PodProcess,
    ProxyProcess,
    proxy_document,
    request_json,
    routing_headers,
    start_pods,
    start_proxy,
    stop_pods,
    stop_process,
)

from proxy.cache import LinkCache
from proxy.hashing import rank
from proxy.invalidation import Invalidator, parse_link_key
from proxy.pods import Pod, parse_address
from proxy.store import RedisStore
from proxy.store.keys import link_key

NAMESPACE = "default"
SERVICE = "game"
# Bounded waits, not timings: the proxies usually take a few milliseconds.
PROPAGATION_TIMEOUT_S = 5.0
RECONNECT_TIMEOUT_S = 10.0
RETURNING_REQUESTS = 400


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    started = start_pods(POD_COUNT, tmp_path_factory.mktemp("pods"))
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture
def document(
    pods: list[PodProcess],
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
) -> Document:
    """A proxy on the shared pods and Redis; `redis_client` flushed Redis."""
    return proxy_document(pods, redis_server.url)


@pytest.fixture
async def launch_proxy(tmp_path: Path) -> AsyncIterator[Launch]:
    started: list[ProxyProcess] = []

    async def launch(document: Document) -> ProxyProcess:
        proxy = await start_proxy(tmp_path, document, len(started))
        started.append(proxy)
        return proxy

    try:
        yield launch
    finally:
        for proxy in started:
            stop_process(proxy.process)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


async def routed_pod(
    client: aiohttp.ClientSession, proxy: ProxyProcess, uid: str
) -> int:
    reply = await request_json(client, proxy.url, routing_headers(uid))
    assert reply.status == 200, reply.body
    pod: int = reply.body["pod"]
    return pod


async def status(client: aiohttp.ClientSession, proxy: ProxyProcess) -> Any:
    reply = await request_json(client, f"{proxy.admin_url}/v1/status", {})
    assert reply.status == 200, reply.body
    return reply.body


async def wait_for_pod(
    client: aiohttp.ClientSession, proxy: ProxyProcess, uid: str, pod: int
) -> bool:
    """Return whether `proxy` routes `uid` to `pod` within the bounded wait."""
    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while time.monotonic() < deadline:
        if await routed_pod(client, proxy, uid) == pod:
            return True
        await asyncio.sleep(0.01)
    return False


async def wait_for_log(proxy: ProxyProcess, text: str) -> bool:
    deadline = time.monotonic() + RECONNECT_TIMEOUT_S
    while time.monotonic() < deadline:
        if text in proxy.log():
            return True
        await asyncio.sleep(0.02)
    return False


async def cache_user_on(
    client: aiohttp.ClientSession, proxies: list[ProxyProcess], uid: str
) -> int:
    """Route `uid` through every proxy until each one serves it from its cache."""
    pod = await routed_pod(client, proxies[0], uid)
    for proxy in proxies:
        before = (await status(client, proxy))["local_cache"]["hits"]
        assert await routed_pod(client, proxy, uid) == pod
        assert await routed_pod(client, proxy, uid) == pod
        after = (await status(client, proxy))["local_cache"]["hits"]
        assert after > before, f"uid {uid} is not cached on {proxy.url}"
    return pod


def other_pod(pod: int) -> int:
    return (pod + 1) % 3


# Key parsing.


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("sf:{default:lk:alice}game", ("default", "game", "alice")),
        ("sf:{ns-1:lk:a:b:c}svc", ("ns-1", "svc", "a:b:c")),
        ("sf:{default:lk:alice}", None),
        ("sf:{default:lk:alice}game:moved", None),
        ("sf:{default:state:game}", None),
        ("sf:{default:podlinks:game:1}", None),
        ("other:{default:lk:alice}game", None),
        ("sf:{default:lk:}game", None),
        ("sf:{default:lk:alice", None),
    ],
)
def test_parse_link_key_cases(key: str, expected: tuple[str, str, str] | None) -> None:
    assert parse_link_key(key) == expected


def test_parse_link_key_round_trip() -> None:
    key = link_key("team-a", "user:42", "chat")
    assert parse_link_key(key) == ("team-a", "chat", "user:42")


# One Invalidator in this process, on the shared Redis.


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_server.url)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def running_invalidator(
    store: RedisStore, cache: LinkCache, recent_s: float = 5.0
) -> AsyncIterator[Invalidator]:
    """Run an Invalidator of `cache` until the block ends, once subscribed."""
    invalidator = Invalidator(
        store.invalidation_pool(1.0), store, cache, recent_s=recent_s
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(invalidator.run(stopping))
    try:
        await asyncio.wait_for(invalidator.first_round.wait(), RECONNECT_TIMEOUT_S)
        assert invalidator.connected, "the invalidation connection did not subscribe"
        yield invalidator
    finally:
        stopping.set()
        await task


async def wait_until(condition: Callable[[], bool]) -> bool:
    """Return whether `condition` is true within the bounded propagation wait."""
    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_invalidation_before_put_drops_stale_entry(
    store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    cache = LinkCache(240.0, 1000)
    key = (NAMESPACE, SERVICE, "reader")
    async with running_invalidator(store, cache) as invalidator:
        await redis_client.set(link_key(NAMESPACE, "reader", SERVICE), "2")
        received = await wait_until(lambda: invalidator.invalidated_keys >= 1)
        # A store read that began before the SET caches the pod it read.
        cache.put(key, 1)
        dropped = await wait_until(lambda: cache.peek(key) is None)

    assert received
    assert dropped
    assert invalidator.dropped_entries == 1


async def test_burst_of_invalidations_is_forgotten(
    store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    cache = LinkCache(240.0, 1000)
    keys = [link_key(NAMESPACE, f"burst-{index}", SERVICE) for index in range(300)]
    async with running_invalidator(store, cache, recent_s=0.2) as invalidator:
        async with redis_client.pipeline(transaction=False) as pipeline:
            for key in keys:
                pipeline.set(key, "1")
            await pipeline.execute()
        received = await wait_until(lambda: invalidator.invalidated_keys >= 300)
        remembered_after_burst = invalidator.remembered_keys
        # Without further writes the listening loop drops them by itself.
        forgotten = await wait_until(lambda: invalidator.remembered_keys == 0)

    assert received
    assert remembered_after_burst > 0
    assert forgotten


# Two proxies on one Redis.


async def test_admin_change_reaches_other_proxy(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    first = await launch_proxy(document)
    second = await launch_proxy(document)
    assert (await status(client, second))["local_cache"]["coherent"] is True
    uid = "moved-by-admin"
    pod = await cache_user_on(client, [first, second], uid)

    target = other_pod(pod)
    url = f"{first.admin_url}/v1/links/{NAMESPACE}/{uid}/{SERVICE}"
    async with client.put(url, json={"pod": target}) as response:
        assert response.status == 200, await response.text()

    assert await wait_for_pod(client, second, uid, target)
    assert await routed_pod(client, first, uid) == target


async def test_raw_set_reaches_both_proxies(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    first = await launch_proxy(document)
    second = await launch_proxy(document)
    uid = "moved-by-hand"
    pod = await cache_user_on(client, [first, second], uid)

    target = other_pod(pod)
    await redis_client.set(link_key(NAMESPACE, uid, SERVICE), str(target), px=60_000)

    assert await wait_for_pod(client, first, uid, target)
    assert await wait_for_pod(client, second, uid, target)


async def test_renewal_keeps_cached_entry(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    # Another router's cache miss restarts the link's TTL, which Redis
    # reports as an invalidation. The entry must survive it, or proxies
    # sharing users would make each other miss on every request.
    proxy = await launch_proxy(document)
    uid = "renewed"
    pod = await cache_user_on(client, [proxy], uid)
    key = link_key(NAMESPACE, uid, SERVICE)
    before = (await status(client, proxy))["local_cache"]

    assert await redis_client.pexpire(key, LINK_TTL_S * 1000)
    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while (await status(client, proxy))["local_cache"]["invalidated_keys"] <= before[
        "invalidated_keys"
    ]:
        assert time.monotonic() < deadline, "no invalidation for the renewal"
        await asyncio.sleep(0.02)
    # Time for the re-read of the link that the invalidation started.
    await asyncio.sleep(0.2)

    assert await routed_pod(client, proxy, uid) == pod
    after = (await status(client, proxy))["local_cache"]
    assert after["misses"] == before["misses"]
    assert after["hits"] == before["hits"] + 1


async def test_flushdb_empties_cache(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    proxy = await launch_proxy(document)
    await cache_user_on(client, [proxy], "flushed")
    assert (await status(client, proxy))["local_cache"]["entries"] >= 1

    await redis_client.flushdb()

    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while (await status(client, proxy))["local_cache"]["entries"] > 0:
        assert time.monotonic() < deadline, "FLUSHDB did not empty the cache"
        await asyncio.sleep(0.02)


async def test_killed_connection_flushes_and_resumes(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    first = await launch_proxy(document)
    second = await launch_proxy(document)
    uid = "survives-a-kill"
    pod = await cache_user_on(client, [first, second], uid)

    killed = await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 2
    for proxy in (first, second):
        assert await wait_for_log(proxy, "invalidation connection to Redis restored")
        assert "invalidation connection to Redis lost" in proxy.log()
        body = await status(client, proxy)
        assert body["local_cache"]["coherent"] is True
        # No request was routed since the kill, so the entry must be gone.
        assert body["local_cache"]["entries"] == 0

    await cache_user_on(client, [first, second], uid)
    target = other_pod(pod)
    url = f"{first.admin_url}/v1/links/{NAMESPACE}/{uid}/{SERVICE}"
    async with client.put(url, json={"pod": target}) as response:
        assert response.status == 200, await response.text()
    assert await wait_for_pod(client, second, uid, target)


async def test_returning_users_rarely_reach_redis(
    launch_proxy: Launch,
    pods: list[PodProcess],
    private_redis_server: RedisServer,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch_proxy(proxy_document(pods, private_redis_server.url))
    uids = [f"returning-{number}" for number in range(4)]
    for uid in uids:
        await routed_pod(client, proxy, uid)
    # Let the background index writes and the invalidation checks finish.
    await asyncio.sleep(0.5)

    counter = redis.asyncio.from_url(private_redis_server.url)
    try:
        await counter.config_resetstat()
        for number in range(RETURNING_REQUESTS):
            await routed_pod(client, proxy, uids[number % len(uids)])
        await asyncio.sleep(0.5)
        stats = await counter.info("commandstats")
    finally:
        await counter.aclose()

    # The pod state refresh (HGETALL), the failover handler's index counts
    # (ZCOUNT and friends) and the PING of the idle invalidation connection
    # run on their own schedule whatever the traffic. Link reads, renewals and index
    # writes are the commands a request could cost.
    per_request = {
        f"cmdstat_{name}"
        for name in ("evalsha", "eval", "get", "set", "zadd", "zrem", "pttl")
    }
    calls = {name: stats[name]["calls"] for name in per_request if name in stats}
    assert calls == {}


async def test_outage_keeps_cached_pods(
    launch_proxy: Launch,
    pods: list[PodProcess],
    private_redis_server: RedisServer,
    client: aiohttp.ClientSession,
) -> None:
    document = proxy_document(pods, private_redis_server.url)
    document["store"]["redis_timeout_s"] = 0.3
    document["store"]["redis_connect_timeout_s"] = 0.3
    proxy = await launch_proxy(document)
    pod_list = [Pod(pod.index, parse_address(pod.address)) for pod in pods]
    # Users linked to a pod that the consistent hash would not pick, so only
    # the cached link can keep them there during the outage.
    linked: dict[str, int] = {}
    writer = redis.asyncio.from_url(private_redis_server.url)
    try:
        for number in range(3):
            uid = f"cached-{number}"
            pod = rank(uid, pod_list)[-1].index
            await writer.set(link_key(NAMESPACE, uid, SERVICE), str(pod), px=60_000)
            linked[uid] = pod
    finally:
        await writer.aclose()
    for uid, pod in linked.items():
        assert await cache_user_on(client, [proxy], uid) == pod

    private_redis_server.stop()
    assert await wait_for_log(proxy, "invalidation connection to Redis lost")

    for uid, pod in linked.items():
        assert await routed_pod(client, proxy, uid) == pod
    warnings = [line for line in proxy.log().splitlines() if "level=WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "unavailable" in warnings[0]
