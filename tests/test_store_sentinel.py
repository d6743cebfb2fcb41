"""RedisStore on a primary that Redis Sentinel monitors.

The contract suite runs on the shared Sentinel set too, through the `store`
fixture. These tests cover a failover, with the primary killed and its
replica promoted, and the parsing of Sentinel URLs.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
import redis.asyncio
from conftest import LOOPBACK, SENTINEL_PRIMARY_NAME, RedisSentinelSet

from proxy.config import _check_redis_url, parse_config
from proxy.demo import start_demo_pods
from proxy.errors import StoreUnavailableError
from proxy.server import ProxyServer
from proxy.store import RedisStore
from proxy.store.keys import link_key
from proxy.store.redis import mask_password, parse_sentinel_url

NS = "default"
SERVICE = "game"
UID_COUNT = 50
TTL_S = 300.0
# Bound on the wait for the Sentinels to promote the replica and for the
# store to reach it, well above the down-after time of the fixture.
FAILOVER_TIMEOUT_S = 30.0
REPLICATION_TIMEOUT_MS = 5000
# Pause between calls while the primary is down, as traffic would arrive.
CALL_INTERVAL_S = 0.05


async def wait_for_replication(port: int) -> None:
    """Wait until the replica of the primary on `port` has every write so far.

    WAIT counts the replicas that acknowledged the writes of its own
    connection, and the replication stream keeps the order of writes, so a
    write of this connection that reached the replica follows all earlier
    writes of the store.
    """
    async with redis.asyncio.Redis(host=LOOPBACK, port=port) as client:
        await client.set("replication-marker", "1")
        acknowledged = await client.execute_command("WAIT", 1, REPLICATION_TIMEOUT_MS)
    assert acknowledged == 1, "the replica did not acknowledge the writes"


async def test_store_follows_sentinel_failover(
    private_redis_sentinel: RedisSentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    sentinel_set = private_redis_sentinel
    store = RedisStore(sentinel_set.url, timeout_s=0.5, connect_timeout_s=0.5)
    caplog.set_level(logging.INFO, logger="stateful_route.store")
    try:
        uids = [f"user-{number}" for number in range(UID_COUNT)]
        for number, uid in enumerate(uids):
            assert await store.set_if_absent(NS, uid, SERVICE, number % 3, TTL_S) == (
                number % 3
            )
        await wait_for_replication(sentinel_set.primary.port)

        killed_at = time.monotonic()
        sentinel_set.primary.kill()
        failures = 0
        deadline = killed_at + FAILOVER_TIMEOUT_S
        while True:
            try:
                pod = await store.get(NS, uids[0], SERVICE)
                break
            except StoreUnavailableError:
                failures += 1
                assert time.monotonic() < deadline, (
                    f"the store did not reach a primary within {FAILOVER_TIMEOUT_S} s"
                )
                await asyncio.sleep(CALL_INTERVAL_S)
        recovered_s = time.monotonic() - killed_at

        links = {uid: await store.get(NS, uid, SERVICE) for uid in uids}
        written = await store.set_if_absent(NS, "after-failover", SERVICE, 2, TTL_S)
        read_back = await store.get(NS, "after-failover", SERVICE)
    finally:
        await store.close()

    # The time is printed for the operations page, never asserted.
    print(f"sentinel failover: store served again after {recovered_s:.1f} s")
    assert pod == 0
    assert failures > 0, "the store never noticed that the primary was killed"
    assert links == {uid: number % 3 for number, uid in enumerate(uids)}
    assert written == 2
    assert read_back == 2
    assert sentinel_set.primary_port() == sentinel_set.replica.port
    async with redis.asyncio.Redis(
        host=LOOPBACK, port=sentinel_set.replica.port, decode_responses=True
    ) as promoted:
        assert await promoted.get(f"sf:{{{NS}:lk:after-failover}}{SERVICE}") == "2"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert len(infos) == 1, [r.getMessage() for r in infos]


async def test_proxy_links_users_through_sentinel(
    redis_sentinel: RedisSentinelSet, sentinel_store: RedisStore
) -> None:
    runners, addresses = await start_demo_pods(2, LOOPBACK)
    document = {
        "proxy": {"host": LOOPBACK, "port": 0},
        "admin": {"host": LOOPBACK, "port": 0},
        "store": {"backend": "redis", "redis_url": redis_sentinel.url},
        "services": {SERVICE: {"pods": addresses}},
    }
    proxy = ProxyServer(parse_config(document, environ={}))
    try:
        await proxy.start()
        url = f"http://{proxy.proxy_address}/play"
        headers = {"X-Service": SERVICE, "X-Uid": "alice"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers=headers) as response,
        ):
            status = response.status
            body = await response.json(content_type=None)
    finally:
        await proxy.stop()
        for runner in runners:
            await runner.cleanup()

    assert status == 200
    async with redis.asyncio.Redis(
        host=LOOPBACK, port=redis_sentinel.primary.port, decode_responses=True
    ) as primary:
        assert await primary.get(link_key(NS, "alice", SERVICE)) == str(body["pod"])


async def test_sentinel_proxy_sees_link_changed_elsewhere(
    redis_sentinel: RedisSentinelSet, sentinel_store: RedisStore
) -> None:
    runners, addresses = await start_demo_pods(2, LOOPBACK)
    document = {
        "proxy": {"host": LOOPBACK, "port": 0},
        "admin": {"host": LOOPBACK, "port": 0},
        "store": {"backend": "redis", "redis_url": redis_sentinel.url},
        "services": {SERVICE: {"pods": addresses}},
    }
    proxy = ProxyServer(parse_config(document, environ={}))
    headers = {"X-Service": SERVICE, "X-Uid": "carol"}
    pods_seen: list[int] = []
    try:
        await proxy.start()
        url = f"http://{proxy.proxy_address}/play"
        async with aiohttp.ClientSession() as session:

            async def routed_pod() -> int:
                async with session.get(url, headers=headers) as response:
                    body = await response.json(content_type=None)
                return int(body["pod"])

            first = await routed_pod()
            # The second request is a cache hit, so only an invalidation
            # can make the proxy see the link written below.
            pods_seen.append(await routed_pod())
            async with redis.asyncio.Redis(
                host=LOOPBACK, port=redis_sentinel.primary.port
            ) as primary:
                await primary.set(link_key(NS, "carol", SERVICE), str(1 - first))
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                pods_seen.append(await routed_pod())
                if pods_seen[-1] != first:
                    break
                await asyncio.sleep(0.05)
        # Without its connection the cache is off, and the test above
        # would pass through store reads alone.
        connected = proxy.invalidator is not None and proxy.invalidator.connected
    finally:
        await proxy.stop()
        for runner in runners:
            await runner.cleanup()

    assert connected
    assert pods_seen[0] == first
    assert pods_seen[-1] == 1 - first


async def test_sentinel_pool_trims_idle_connections(
    redis_sentinel: RedisSentinelSet,
) -> None:
    now = [1000.0]
    store = RedisStore(
        redis_sentinel.url,
        idle_timeout_s=10.0,
        min_idle_connections=1,
        clock=lambda: now[0],
    )
    try:
        await asyncio.gather(
            *(store.get(NS, f"user-{number}", SERVICE) for number in range(20))
        )
        idle_after_burst, _ = store.pool_connections()
        now[0] += 11.0
        closed = await store.trim_idle_connections()
        idle_after_trim, in_use = store.pool_connections()
    finally:
        await store.close()

    assert idle_after_burst > 1
    assert closed == idle_after_burst - 1
    assert (idle_after_trim, in_use) == (1, 0)


def test_parse_sentinel_url_reads_every_part() -> None:
    target = parse_sentinel_url(
        "rediss+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/routes/2"
        "?sentinel_username=watch&sentinel_password=s3"
    )

    assert target.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
    assert target.primary == "routes"
    assert target.options == {
        "db": 2,
        "ssl": True,
        "username": "app",
        "password": "p@ss",
    }
    assert target.sentinel_options == {
        "ssl": True,
        "username": "watch",
        "password": "s3",
    }


def test_parse_sentinel_url_defaults_to_db_zero() -> None:
    target = parse_sentinel_url(
        f"redis+sentinel://10.0.0.1:26379/{SENTINEL_PRIMARY_NAME}"
    )

    assert target.primary == SENTINEL_PRIMARY_NAME
    assert target.options == {"db": 0, "ssl": False}
    assert target.sentinel_options == {"ssl": False}


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis+sentinel://10.0.0.1/routes", "got '10.0.0.1'"),
        ("redis+sentinel://10.0.0.1:port/routes", "got '10.0.0.1:port'"),
        ("redis+sentinel://10.0.0.1:26379,/routes", "got ''"),
        ("redis+sentinel://10.0.0.1:99999/routes", "got '10.0.0.1:99999'"),
        ("redis+sentinel://10.0.0.1:0/routes", "got '10.0.0.1:0'"),
        ("redis+sentinel://10.0.0.1:26379", "expected the primary name"),
        ("redis+sentinel://10.0.0.1:26379/", "expected the primary name"),
        ("redis+sentinel://10.0.0.1:26379/my%20primary", "got 'my primary'"),
        ("redis+sentinel://10.0.0.1:26379/routes/one", "got '/routes/one'"),
        ("redis+sentinel://10.0.0.1:26379/routes/0/1", "got '/routes/0/1'"),
        ("redis+sentinel://10.0.0.1:26379/routes?ssl=true", "parameter 'ssl'"),
        ("redis+sentinel://10.0.0.1:26379/routes#x", "expected no fragment"),
    ],
)
def test_sentinel_url_problems_are_reported(url: str, named: str) -> None:
    problems = _check_redis_url(url)

    assert len(problems) == 1
    assert problems[0].startswith("store.redis_url: invalid Redis Sentinel URL")
    assert named in problems[0]


def test_sentinel_url_passwords_are_masked() -> None:
    url = "redis+sentinel://:secret@10.0.0.1:26379/routes/x?sentinel_password=hidden"
    problems = _check_redis_url(url)

    assert "secret" not in problems[0]
    assert "hidden" not in problems[0]
    assert "hidden" not in mask_password(url)


def test_unknown_redis_scheme_is_named() -> None:
    assert _check_redis_url("sentinel://10.0.0.1:26379/routes") == [
        "store.redis_url: expected a redis://, rediss://, unix://, "
        "redis+cluster://, rediss+cluster://, redis+sentinel:// or "
        "rediss+sentinel:// URL, got the scheme 'sentinel'"
    ]
