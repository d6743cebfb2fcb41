"""Unit tests of the retry rules, the retry budget and the retry relink."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiohttp import StreamReader
from aiohttp.test_utils import make_mocked_request

from proxy.cache import LinkCache
from proxy.config import ServiceSettings
from proxy.podset import PodSet, build_pod_set
from proxy.retry import (
    RETRYABLE_METHODS,
    RequestBody,
    Retry,
    RetryBudget,
    Stage,
    plan_retry,
    read_body,
)
from proxy.routing import Origin, Router
from proxy.services import Service
from proxy.store.memory import MemoryStore

NS = "default"
LINK_TTL_S = 300.0
NOW_MS = 1_764_800_000_000
BUFFER_BYTES = 1024


class FakeClock:
    """A clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stream_of(data: bytes) -> StreamReader:
    protocol = mock.Mock(_reading_paused=False)
    stream = StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(data)
    stream.feed_eof()
    return stream


async def collect(body: RequestBody) -> bytes:
    data = body.data()
    if data is None or isinstance(data, bytes):
        return data or b""
    return b"".join([chunk async for chunk in data])


# Which failures are retried, and where.


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "PUT"])
def test_refused_connect_retries_any_method(method: str) -> None:
    assert plan_retry(Stage.CONNECT, method, True, 1) is Retry.OTHER_POD


@pytest.mark.parametrize("method", sorted(RETRYABLE_METHODS))
def test_broken_exchange_retries_idempotent_methods(method: str) -> None:
    assert plan_retry(Stage.SENT, method, True, 1) is Retry.OTHER_POD


@pytest.mark.parametrize("method", ["POST", "PATCH", "TRACE", "CONNECT", "get"])
def test_broken_exchange_never_resends_others(method: str) -> None:
    assert plan_retry(Stage.SENT, method, True, 1) is None


def test_stale_connection_retries_same_pod() -> None:
    assert plan_retry(Stage.STALE, "GET", True, 1) is Retry.SAME_POD


def test_stale_connection_never_resends_post() -> None:
    assert plan_retry(Stage.STALE, "POST", True, 1) is None


@pytest.mark.parametrize("stage", [Stage.TIMEOUT, Stage.OTHER])
def test_timeouts_and_bad_responses_not_retried(stage: Stage) -> None:
    assert plan_retry(stage, "GET", True, 1) is None


@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.SENT, Stage.STALE])
def test_consumed_body_is_never_resent(stage: Stage) -> None:
    assert plan_retry(stage, "PUT", False, 1) is None


@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.SENT, Stage.STALE])
def test_no_attempts_left_means_no_retry(stage: Stage) -> None:
    assert plan_retry(stage, "GET", True, 0) is None


# Request bodies.


async def test_streamed_body_replayable_until_read() -> None:
    body = RequestBody(content=stream_of(b"abc"))
    before = body.replayable

    sent = await collect(body)

    assert before is True
    assert sent == b"abc"
    assert body.replayable is False


async def test_buffered_body_stays_replayable() -> None:
    body = RequestBody(buffered=b"abc")

    first = await collect(body)
    second = await collect(body)

    assert first == b"abc"
    assert second == b"abc"
    assert body.replayable is True


async def test_small_put_body_is_buffered() -> None:
    payload = stream_of(b"x" * BUFFER_BYTES)
    headers = {"Content-Length": str(BUFFER_BYTES)}
    request = make_mocked_request("PUT", "/", headers=headers, payload=payload)

    body = await read_body(request, BUFFER_BYTES, retries=True)

    assert body.data() == b"x" * BUFFER_BYTES
    assert body.replayable is True


@pytest.mark.parametrize(
    ("method", "length", "retries"),
    [
        ("POST", 3, True),  # never resent once written, so never held
        ("PUT", BUFFER_BYTES + 1, True),  # over the buffer limit
        ("PUT", None, True),  # chunked, length unknown
        ("PUT", 3, False),  # retries off
    ],
)
async def test_other_bodies_are_streamed(
    method: str, length: int | None, retries: bool
) -> None:
    size = 3 if length is None else length
    payload = stream_of(b"x" * size)
    headers = {"Transfer-Encoding": "chunked"}
    if length is not None:
        headers = {"Content-Length": str(length)}
    request = make_mocked_request(method, "/", headers=headers, payload=payload)

    body = await read_body(request, BUFFER_BYTES, retries=retries)

    assert not isinstance(body.data(), bytes)
    assert await collect(body) == b"x" * size


async def test_request_without_body_is_replayable() -> None:
    request = make_mocked_request("GET", "/")

    body = await read_body(request, BUFFER_BYTES, retries=True)

    assert body.data() is None
    assert body.replayable is True


async def test_short_buffered_body_raises() -> None:
    request = make_mocked_request(
        "PUT", "/", headers={"Content-Length": "10"}, payload=stream_of(b"abc")
    )

    with pytest.raises(asyncio.IncompleteReadError):
        await read_body(request, BUFFER_BYTES, retries=True)


# The retry budget.


def make_budget(
    clock: FakeClock, percent: float = 20, window_s: float = 10, min_per_s: float = 0
) -> RetryBudget:
    return RetryBudget("game", percent, window_s, min_per_s, clock=clock)


def spend(budget: RetryBudget, count: int) -> int:
    """Try `count` retries; return how many the budget allowed."""
    return sum(budget.try_spend() for _ in range(count))


def test_budget_allows_share_of_requests() -> None:
    budget = make_budget(FakeClock())
    for _ in range(100):
        budget.note_request()

    allowed = spend(budget, 30)

    assert allowed == 20
    assert budget.retried == 20
    assert budget.rejected == 10


def test_budget_floor_allows_retries_without_traffic() -> None:
    budget = make_budget(FakeClock(), min_per_s=3)

    allowed = spend(budget, 50)

    assert allowed == 30  # 3 per second over 10 s
    assert budget.limit() == 30


def test_budget_floor_and_share_take_maximum() -> None:
    budget = make_budget(FakeClock(), min_per_s=1)
    for _ in range(200):
        budget.note_request()

    assert budget.limit() == 40


def test_budget_forgets_requests_after_window() -> None:
    clock = FakeClock()
    budget = make_budget(clock)
    for _ in range(100):
        budget.note_request()
    clock.now += 10.0

    allowed = spend(budget, 5)

    assert allowed == 0
    assert budget.window_counts() == (0, 0)


def test_budget_frees_retries_after_window() -> None:
    clock = FakeClock()
    budget = make_budget(clock, min_per_s=0.5)
    first = spend(budget, 10)
    clock.now += 10.0

    second = spend(budget, 10)

    assert first == 5
    assert second == 5
    assert budget.retried == 10


def test_budget_window_slides_per_slot() -> None:
    clock = FakeClock()
    budget = make_budget(clock, percent=100)
    for _ in range(4):
        budget.note_request()
    clock.now += 5.0
    for _ in range(6):
        budget.note_request()
    at_half = budget.window_counts()
    clock.now += 5.0

    at_end = budget.window_counts()

    assert at_half == (10, 0)
    assert at_end == (6, 0)


def test_budget_refund_frees_retry() -> None:
    budget = make_budget(FakeClock(), min_per_s=0.1)
    first = budget.try_spend()
    second = budget.try_spend()
    budget.refund()

    third = budget.try_spend()

    assert first is True
    assert second is False
    assert third is True
    assert budget.retried == 1
    assert budget.rejected == 1


def test_budget_rejects_invalid_window() -> None:
    with pytest.raises(ValueError, match="window_s"):
        make_budget(FakeClock(), window_s=0)


# Moving a user after a failed attempt.


def make_service(pods: int = 3) -> Service:
    addresses = tuple(f"127.0.0.1:{9000 + index}" for index in range(pods))
    return Service(ServiceSettings(name="game", pods=addresses))


def make_pods(service: Service) -> PodSet:
    return build_pod_set(service.settings, NS, service.pods(NS), {}, NOW_MS)


def make_router(store: MemoryStore) -> Router:
    return Router(store, LinkCache(240.0, 1000), LINK_TTL_S)


async def test_retry_relink_moves_user_off_failed_pod() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 0, LINK_TTL_S)
    service = make_service()
    router = make_router(store)

    route = await router.relink_for_retry(
        NS, service, make_pods(service), "alice", (0,)
    )

    assert route is not None
    assert route.pod.index != 0
    assert route.origin is Origin.MOVED
    assert route.previous == 0
    assert route.reason == "retry"
    assert await store.get(NS, "alice", "game") == route.pod.index
    assert router.cache.get((NS, "game", "alice")) == route.pod.index


async def test_concurrent_retry_relinks_agree() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 0, LINK_TTL_S)
    service = make_service(4)
    router = make_router(store)
    pod_set = make_pods(service)

    routes = await asyncio.gather(
        *(
            router.relink_for_retry(NS, service, pod_set, "alice", (0,))
            for _ in range(3)
        )
    )

    pods = {route.pod.index for route in routes if route is not None}
    assert len(pods) == 1
    assert await store.get(NS, "alice", "game") in pods
    assert router.users_moved == 1


async def test_retry_without_uid_writes_no_link() -> None:
    store = MemoryStore()
    service = make_service()
    router = make_router(store)

    route = await router.relink_for_retry(NS, service, make_pods(service), None, (1,))

    assert route is not None
    assert route.pod.index != 1
    assert route.origin is Origin.UNLINKED
    assert route.previous == 1


async def test_retry_relink_without_other_pod() -> None:
    store = MemoryStore()
    await store.set(NS, "alice", "game", 0, LINK_TTL_S)
    service = make_service(2)
    router = make_router(store)

    route = await router.relink_for_retry(
        NS, service, make_pods(service), "alice", (0, 1)
    )

    assert route is None
    assert await store.get(NS, "alice", "game") == 0
