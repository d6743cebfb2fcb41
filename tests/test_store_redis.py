"""Redis store checks: the key layout shared with Java routers, bad data, outages."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import pytest
import redis.asyncio

from proxy.errors import (
    StoreBusyError,
    StoreDataError,
    StoreError,
    StoreUnavailableError,
)
from proxy.store import PERSISTENT, RedisStore
from proxy.store.redis import mask_password
from proxy.store.redis_pool import TrimmingBlockingPool

if TYPE_CHECKING:
    from conftest import RedisServer, RedisServerFactory

NS = "ns"
UID = "u1"
SERVICE = "game"
LINK_KEY = "sf:{ns:lk:u1}game"
UID_HASH_KEY = "sf:{ns:lk:u1}"
TTL_S = 30.0

STORE_LOGGER = "stateful_route.store"
# Timeouts of the store in the outage tests, kept short so they run fast.
OUTAGE_TIMEOUT_S = 0.2
OUTAGE_RETRIES = 2
# Upper bound for one failed call: every attempt waits at most the connect
# and the reply timeout, plus the backoff (at most 0.1 s each) in between.
MAX_FAILED_CALL_S = (OUTAGE_RETRIES + 1) * 2 * OUTAGE_TIMEOUT_S + OUTAGE_RETRIES * 0.1


# Key layout


async def test_temporary_link_is_string_without_hash(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 3, TTL_S)

    assert await redis_client.type(LINK_KEY) == "string"
    assert await redis_client.get(LINK_KEY) == "3"
    assert await redis_client.exists(UID_HASH_KEY) == 0


async def test_temporary_link_ttl_is_within_given_ttl(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 3, 1.5)

    ttl_ms = await redis_client.pttl(LINK_KEY)

    assert ttl_ms > 0
    assert ttl_ms <= 1500


async def test_temporary_ttl_rounds_up_to_milliseconds(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 3, 10.0001)

    ttl_ms = await redis_client.pttl(LINK_KEY)

    assert ttl_ms > 9900
    assert ttl_ms <= 10001


async def test_persistent_link_is_string_and_hash_field(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 3, PERSISTENT)

    assert await redis_client.type(LINK_KEY) == "string"
    assert await redis_client.get(LINK_KEY) == "3"
    assert await redis_client.pttl(LINK_KEY) == -1
    assert await redis_client.type(UID_HASH_KEY) == "hash"
    assert await redis_client.hgetall(UID_HASH_KEY) == {SERVICE: "3"}


async def test_removing_last_persistent_link_deletes_uid_hash(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 3, PERSISTENT)

    await redis_store.remove(NS, UID, SERVICE)

    assert await redis_client.exists(LINK_KEY) == 0
    assert await redis_client.exists(UID_HASH_KEY) == 0


async def test_delayed_remove_sets_expiry_on_link(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 3, PERSISTENT)

    await redis_store.remove(NS, UID, SERVICE, delay_s=5.0)

    ttl_ms = await redis_client.pttl(LINK_KEY)
    assert ttl_ms > 0
    assert ttl_ms <= 5000
    assert await redis_client.exists(UID_HASH_KEY) == 0


async def test_delayed_remove_if_pod_sets_expiry_on_link(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 3, PERSISTENT)

    assert await redis_store.remove_if_pod(NS, UID, SERVICE, 3, delay_s=5.0)

    ttl_ms = await redis_client.pttl(LINK_KEY)
    assert ttl_ms > 0
    assert ttl_ms <= 5000
    assert await redis_client.exists(UID_HASH_KEY) == 0


# Values written by another router in the documented layout


async def test_reads_persistent_link_written_by_hand(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "4")
    await redis_client.hset(UID_HASH_KEY, SERVICE, "4")

    assert await redis_store.get(NS, UID, SERVICE) == 4
    assert await redis_store.get_if_persistent(NS, UID, SERVICE) == 4
    assert await redis_store.linked_services(NS, UID) == {SERVICE: 4}
    assert await redis_store.link_ttl(NS, UID, SERVICE) == PERSISTENT
    assert await redis_store.batch_get(NS, SERVICE, [UID]) == {4: [UID]}


async def test_reads_temporary_link_written_by_hand(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "0", px=30_000)

    assert await redis_store.get(NS, UID, SERVICE) == 0
    assert await redis_store.get_if_persistent(NS, UID, SERVICE) is None
    assert await redis_store.linked_services(NS, UID) == {}
    remaining = await redis_store.link_ttl(NS, UID, SERVICE)
    assert remaining is not None
    assert 0 < remaining <= 30.0


async def test_try_set_respects_persistent_link_written_by_hand(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "4")
    await redis_client.hset(UID_HASH_KEY, SERVICE, "4")

    assert await redis_store.try_set(NS, UID, SERVICE, 5, TTL_S) == (False, 4)
    assert await redis_client.get(LINK_KEY) == "4"


async def test_remove_if_pod_matches_leading_zero_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "04")

    assert await redis_store.get(NS, UID, SERVICE) == 4
    assert await redis_store.remove_if_pod(NS, UID, SERVICE, 4) is True
    assert await redis_client.exists(LINK_KEY) == 0


# Values that are no pod index

INVALID_VALUES = ["abc", "-1", "1.5", "", " 1", "1e0", "0x1", "\u0661", "9" * 5000]


@pytest.mark.parametrize("value", INVALID_VALUES)
async def test_get_rejects_invalid_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis, value: str
) -> None:
    await redis_client.set(LINK_KEY, value)

    with pytest.raises(StoreDataError) as caught:
        await redis_store.get(NS, UID, SERVICE)
    assert caught.value.key == LINK_KEY
    assert caught.value.value == value


@pytest.mark.parametrize("value", INVALID_VALUES)
async def test_batch_get_rejects_invalid_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis, value: str
) -> None:
    await redis_client.set(LINK_KEY, value)

    with pytest.raises(StoreDataError) as caught:
        await redis_store.batch_get(NS, SERVICE, ["u0", UID])
    assert caught.value.key == LINK_KEY


async def test_linked_services_rejects_invalid_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.hset(UID_HASH_KEY, SERVICE, "pod-1")

    with pytest.raises(StoreDataError) as caught:
        await redis_store.linked_services(NS, UID)
    assert caught.value.key == UID_HASH_KEY
    assert caught.value.value == {SERVICE: "pod-1"}


async def test_set_if_absent_rejects_invalid_existing_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "abc")

    with pytest.raises(StoreDataError):
        await redis_store.set_if_absent(NS, UID, SERVICE, 1, TTL_S)
    assert await redis_client.get(LINK_KEY) == "abc"


async def test_try_set_keeps_invalid_persistent_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "abc")

    with pytest.raises(StoreDataError):
        await redis_store.try_set(NS, UID, SERVICE, 1, TTL_S)
    assert await redis_client.get(LINK_KEY) == "abc"


async def test_try_set_overwrites_invalid_temporary_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "abc", px=30_000)

    assert await redis_store.try_set(NS, UID, SERVICE, 1, TTL_S) == (True, 1)
    assert await redis_client.get(LINK_KEY) == "1"


async def test_remove_if_pod_keeps_invalid_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "1e0")

    with pytest.raises(StoreDataError):
        await redis_store.remove_if_pod(NS, UID, SERVICE, 1)
    assert await redis_client.get(LINK_KEY) == "1e0"


async def test_set_writes_link_over_invalid_value(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(LINK_KEY, "abc")

    with pytest.raises(StoreDataError):
        await redis_store.set(NS, UID, SERVICE, 1, TTL_S)
    assert await redis_client.get(LINK_KEY) == "1"


async def test_wrong_key_type_raises_store_error(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.hset(LINK_KEY, "field", "1")

    with pytest.raises(StoreError, match="WRONGTYPE"):
        await redis_store.get(NS, UID, SERVICE)


# Scripts and arguments


async def test_scripts_are_loaded_again_after_script_flush(
    redis_store: RedisStore, redis_client: redis.asyncio.Redis
) -> None:
    await redis_store.set(NS, UID, SERVICE, 1, TTL_S)
    await redis_client.script_flush()

    assert await redis_store.set(NS, UID, SERVICE, 2, TTL_S) == 1


async def test_set_rejects_infinite_ttl(redis_store: RedisStore) -> None:
    with pytest.raises(ValueError, match="expected a finite number"):
        await redis_store.set(NS, UID, SERVICE, 1, float("inf"))


@pytest.mark.parametrize(
    "option",
    [
        {"timeout_s": 0},
        {"connect_timeout_s": -1.0},
        {"retries": -1},
        {"max_connections": 0},
        {"idle_timeout_s": -1.0},
        {"idle_timeout_s": math.inf},
        {"min_idle_connections": -1},
    ],
)
def test_constructor_rejects_invalid_option(option: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        RedisStore("redis://127.0.0.1:1/0", **option)  # type: ignore[arg-type]


async def test_burst_beyond_pool_size_waits_for_connection(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    store = RedisStore(redis_server.url, max_connections=2)
    try:
        results = await asyncio.gather(
            *(
                store.set_if_absent(NS, f"u{index}", SERVICE, 1, TTL_S)
                for index in range(50)
            )
        )
    finally:
        await store.close()

    assert results == [1] * 50


async def test_burst_of_new_users_shares_small_pool(
    private_redis_server: RedisServer,
) -> None:
    store = RedisStore(private_redis_server.url, max_connections=8)
    inspector = redis.asyncio.from_url(private_redis_server.url)
    users = [f"new-{index}" for index in range(600)]
    # New users keep arriving, 200 in flight at a time, while other work
    # blocks the loop for 2 ms per iteration, as in a busy proxy.
    in_flight = asyncio.Semaphore(200)
    stopping = asyncio.Event()

    async def route_new_user(uid: str) -> int:
        async with in_flight:
            # The store calls of a new user's first request.
            await store.read_link_noticed(NS, uid, SERVICE, TTL_S)
            return await store.set_if_absent(NS, uid, SERVICE, 1, TTL_S)

    async def hold_loop() -> None:
        while not stopping.is_set():
            time.sleep(0.002)  # noqa: ASYNC251 - blocks the loop on purpose
            await asyncio.sleep(0)

    try:
        holder = asyncio.create_task(hold_loop())
        try:
            results = await asyncio.gather(*(route_new_user(uid) for uid in users))
        finally:
            stopping.set()
            await holder
        linked = [await store.get(NS, uid, SERVICE) for uid in users]
        # No trim ran, so every connection that the burst opened is open.
        on_server = await server_connections(inspector)
        idle, in_use = store.pool_connections()
    finally:
        await inspector.aclose()
        await store.close()

    assert results == [1] * len(users)
    assert linked == [1] * len(users)
    assert on_server <= 8
    assert idle <= 8
    assert in_use == 0


async def test_pool_serves_waiting_requests_in_order(
    redis_server: RedisServer,
) -> None:
    pool = TrimmingBlockingPool.from_url(
        redis_server.url, max_connections=1, timeout=5.0
    )
    served: list[str] = []

    async def take(name: str) -> None:
        connection = await pool.get_connection()
        served.append(name)
        await asyncio.sleep(0)
        await pool.release(connection)

    try:
        held_connection = await pool.get_connection()
        waiting = [asyncio.create_task(take(f"waiter-{index}")) for index in range(5)]
        await asyncio.sleep(0.05)
        await pool.release(held_connection)
        # Arrives after the connection came back, but behind the waiters.
        late = asyncio.create_task(take("late"))
        await asyncio.gather(*waiting, late)
    finally:
        await pool.aclose()

    assert served == [f"waiter-{index}" for index in range(5)] + ["late"]


async def test_exhausted_pool_raises_store_busy(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, max_connections=1, timeout_s=0.2)
    assert isinstance(store._client, redis.asyncio.Redis)
    pool = store._client.connection_pool
    try:
        held_connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        started = time.monotonic()
        with pytest.raises(StoreBusyError, match="no free connection of 1"):
            await store.get(NS, "busy", SERVICE)
        waited_s = time.monotonic() - started
        await pool.release(held_connection)
        after_release = await store.get(NS, "busy", SERVICE)
        idle, in_use = store.pool_connections()
    finally:
        await store.close()

    assert 0.15 < waited_s < 1.0
    assert after_release is None
    assert (idle, in_use) == (1, 0)


async def test_short_pause_gives_busy_not_outage(
    private_redis_server: RedisServer,
) -> None:
    # The calls holding the two connections time out once and succeed on a
    # retry after the pause. The calls waiting for a connection time out
    # first, as busy: an outage would place uncached users by the hash.
    store = RedisStore(
        private_redis_server.url, max_connections=2, timeout_s=0.4, retries=2
    )
    admin = redis.asyncio.Redis.from_url(private_redis_server.url)
    try:
        await store.get(NS, "warm", SERVICE)
        await admin.execute_command("CLIENT", "PAUSE", "500", "ALL")
        results = await asyncio.gather(
            *(store.get(NS, f"paused-{index}", SERVICE) for index in range(8)),
            return_exceptions=True,
        )
        unavailable = store.unavailable
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await store.close()

    busy = [result for result in results if isinstance(result, StoreBusyError)]
    assert busy
    assert all(result is None or result in busy for result in results)
    assert not unavailable


# Idle connections


class ManualClock:
    """A monotonic clock that only moves when a test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def server_connections(client: redis.asyncio.Redis) -> int:
    """Return the connections the server counts, without `client`'s own."""
    clients = await client.client_list()
    return len(clients) - 1


async def open_connections(store: RedisStore, count: int) -> None:
    """Make the store's pool open about `count` connections at once."""
    await asyncio.gather(
        *(store.set_if_absent(NS, f"burst-{index}", SERVICE, 1, TTL_S)
          for index in range(count))
    )  # fmt: skip


async def test_trim_closes_idle_connections_down_to_floor(
    private_redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    store = RedisStore(
        private_redis_server.url,
        idle_timeout_s=10.0,
        min_idle_connections=2,
        clock=clock,
    )
    inspector = redis.asyncio.from_url(private_redis_server.url)
    try:
        await open_connections(store, 30)
        idle_after_burst, _ = store.pool_connections()
        closed_too_early = await store.trim_idle_connections()
        clock.now += 10.5
        closed = await store.trim_idle_connections()
        idle_after_trim, in_use_after_trim = store.pool_connections()
        on_server = await server_connections(inspector)
        linked = await store.get(NS, "burst-0", SERVICE)
    finally:
        await inspector.aclose()
        await store.close()

    assert idle_after_burst > 10
    assert closed_too_early == 0
    assert closed == idle_after_burst - 2
    assert (idle_after_trim, in_use_after_trim) == (2, 0)
    assert on_server == 2
    assert linked == 1


async def test_trim_keeps_recently_used_connections(
    private_redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    store = RedisStore(
        private_redis_server.url,
        idle_timeout_s=10.0,
        min_idle_connections=0,
        clock=clock,
    )
    try:
        await open_connections(store, 20)
        idle_after_burst, _ = store.pool_connections()
        clock.now += 8.0
        # A sequential call reuses one connection, which counts as fresh.
        await store.get(NS, "burst-0", SERVICE)
        clock.now += 8.0
        closed = await store.trim_idle_connections()
        idle_after_trim, _ = store.pool_connections()
    finally:
        await store.close()

    assert closed == idle_after_burst - 1
    assert idle_after_trim == 1


async def test_zero_idle_timeout_keeps_connections(
    private_redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    store = RedisStore(
        private_redis_server.url,
        idle_timeout_s=0,
        min_idle_connections=0,
        clock=clock,
    )
    try:
        await open_connections(store, 20)
        idle_after_burst, _ = store.pool_connections()
        clock.now += 1e6
        closed = await store.trim_idle_connections()
        idle_after_trim, _ = store.pool_connections()
    finally:
        await store.close()

    assert closed == 0
    assert idle_after_trim == idle_after_burst


async def test_trim_under_load_fails_no_call(
    private_redis_server: RedisServer,
) -> None:
    """Trims between and during bursts close only idle connections.

    Without retries, a call on a connection closed under it would fail.
    """
    clock = ManualClock()
    store = RedisStore(
        private_redis_server.url,
        retries=0,
        idle_timeout_s=1.0,
        min_idle_connections=0,
        clock=clock,
    )
    closed = 0
    results: list[int] = []
    try:
        for round_number in range(20):
            uids = [f"load-{round_number}-{index}" for index in range(100)]
            burst = asyncio.gather(
                *(store.set_if_absent(NS, uid, SERVICE, 2, TTL_S) for uid in uids)
            )
            while not burst.done():
                # Every idle connection counts as expired at each trim.
                clock.now += 2.0
                closed += await store.trim_idle_connections()
                await asyncio.sleep(0)
            results += await burst
        _, in_use = store.pool_connections()
    finally:
        await store.close()

    assert results == [2] * 2000
    assert closed > 0
    assert in_use == 0


async def test_idle_trim_loop_closes_connections(
    private_redis_server: RedisServer,
) -> None:
    store = RedisStore(
        private_redis_server.url, idle_timeout_s=0.05, min_idle_connections=1
    )
    stopping = asyncio.Event()
    trim = asyncio.create_task(store.run_idle_trim(stopping))
    try:
        await open_connections(store, 20)
        # Up to 5 s for the loop: a bounded wait, not a timing.
        for _ in range(250):
            if store.pool_connections()[0] <= 1:
                break
            await asyncio.sleep(0.02)
        idle, in_use = store.pool_connections()
    finally:
        stopping.set()
        await trim
        await store.close()

    assert (idle, in_use) == (1, 0)


# Password masking


@pytest.mark.parametrize(
    ("url", "described"),
    [
        ("redis://:secret@db:6379/0", "redis://:***@db:6379/0"),
        ("redis://app:secret@db:6379/0", "redis://app:***@db:6379/0"),
        ("rediss://app:s%40cret@db/1", "rediss://app:***@db/1"),
        (
            "unix:///run/redis.sock?db=0&password=secret",
            "unix:///run/redis.sock?db=0&password=***",
        ),
        ("redis://db:6379/0", "redis://db:6379/0"),
    ],
)
def test_mask_password_hides_password(url: str, described: str) -> None:
    assert mask_password(url) == described


async def test_describe_masks_password() -> None:
    store = RedisStore("redis://app:secret@127.0.0.1:6379/0")
    try:
        described = store.describe()
    finally:
        await store.close()

    assert "secret" not in described
    assert described == "redis://app:***@127.0.0.1:6379/0"


# Outages, on a private server that the tests stop and restart


@pytest.fixture
async def outage_store(
    private_redis_server: RedisServer,
) -> AsyncIterator[RedisStore]:
    store = RedisStore(
        private_redis_server.url,
        timeout_s=OUTAGE_TIMEOUT_S,
        connect_timeout_s=OUTAGE_TIMEOUT_S,
        retries=OUTAGE_RETRIES,
    )
    try:
        yield store
    finally:
        await store.close()


async def test_stopped_server_raises_store_unavailable(
    private_redis_server: RedisServer, outage_store: RedisStore
) -> None:
    await outage_store.set(NS, UID, SERVICE, 1, TTL_S)
    private_redis_server.stop()

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: outage_store.get(NS, UID, SERVICE),
        lambda: outage_store.set(NS, UID, SERVICE, 2, TTL_S),
        lambda: outage_store.try_set(NS, UID, SERVICE, 2, TTL_S),
        lambda: outage_store.remove(NS, UID, SERVICE),
        lambda: outage_store.batch_get(NS, SERVICE, [UID]),
        lambda: outage_store.linked_services(NS, UID),
        lambda: outage_store.link_ttl(NS, UID, SERVICE),
        lambda: outage_store.ping(),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            await call()
        assert time.monotonic() - started < MAX_FAILED_CALL_S
        assert caught.value.backend == "redis"


async def test_paused_server_times_out_as_unavailable(
    private_redis_server: RedisServer, outage_store: RedisStore
) -> None:
    await outage_store.set(NS, UID, SERVICE, 1, TTL_S)
    private_redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="Timeout"):
            await outage_store.get(NS, UID, SERVICE)
        elapsed = time.monotonic() - started
    finally:
        private_redis_server.resume()

    assert elapsed >= OUTAGE_TIMEOUT_S
    assert elapsed < MAX_FAILED_CALL_S
    assert await get_when_back(outage_store) == 1


async def get_when_back(store: RedisStore, timeout_s: float = 5.0) -> int | None:
    """Return the test link once the store responds again, within `timeout_s`.

    During an outage the store sends one call per probe interval to Redis,
    so the first calls after a recovery can still fail at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await store.get(NS, UID, SERVICE)
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_calls_during_outage_fail_fast(
    private_redis_server: RedisServer, outage_store: RedisStore
) -> None:
    await outage_store.set(NS, UID, SERVICE, 1, TTL_S)
    private_redis_server.pause()
    try:
        with pytest.raises(StoreUnavailableError):
            await outage_store.get(NS, UID, SERVICE)
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(StoreUnavailableError):
                await outage_store.get(NS, UID, SERVICE)
        elapsed = time.monotonic() - started
    finally:
        private_redis_server.resume()

    assert elapsed < OUTAGE_TIMEOUT_S
    assert await get_when_back(outage_store) == 1


async def test_outage_logs_start_and_end_once(
    private_redis_server: RedisServer,
    outage_store: RedisStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOGGER)
    await outage_store.set(NS, UID, SERVICE, 1, PERSISTENT)
    private_redis_server.stop()

    for _ in range(10):
        with pytest.raises(StoreUnavailableError):
            await outage_store.get(NS, UID, SERVICE)
    failures = await asyncio.gather(
        *(outage_store.get(NS, UID, SERVICE) for _ in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(error, StoreUnavailableError) for error in failures)

    private_redis_server.start()
    assert await get_when_back(outage_store) is None
    assert await outage_store.set(NS, UID, SERVICE, 2, TTL_S) is None

    records = [record for record in caplog.records if record.name == STORE_LOGGER]
    warnings = [record for record in records if record.levelno == logging.WARNING]
    infos = [record for record in records if record.levelno == logging.INFO]
    assert len(warnings) == 1
    assert "unavailable" in warnings[0].getMessage()
    assert len(infos) == 1
    assert "reachable again" in infos[0].getMessage()
    failed_calls = int(infos[0].getMessage().split(" and ")[1].split()[0])
    assert failed_calls >= 20


async def test_outage_log_masks_password(
    redis_server_factory: RedisServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory("--requirepass", "hunter2-secret")
    store = RedisStore(
        f"redis://:hunter2-secret@127.0.0.1:{server.port}/0",
        timeout_s=OUTAGE_TIMEOUT_S,
        connect_timeout_s=OUTAGE_TIMEOUT_S,
        retries=OUTAGE_RETRIES,
    )
    caplog.set_level(logging.INFO, logger=STORE_LOGGER)
    try:
        await store.ping()
        server.stop()
        with pytest.raises(StoreUnavailableError) as caught:
            await store.ping()
    finally:
        await store.close()

    assert "hunter2-secret" not in str(caught.value)
    assert "hunter2-secret" not in caplog.text
    assert ":***@" in caplog.text


async def test_state_keys_follow_documented_layout(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    try:
        await client.flushdb()
        await store.publish_pod_state("eu", "game", 0, '{"load":-3}')
        await store.publish_workload("eu", "game", '{"pods":1}')

        assert await client.type("sf:{eu:state:game}") == "hash"
        assert await client.hgetall("sf:{eu:state:game}") == {"0": '{"load":-3}'}
        assert await client.get("sf:{eu:workload:game}") == '{"pods":1}'
    finally:
        await client.aclose()
        await store.close()
