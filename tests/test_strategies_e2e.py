"""End-to-end tests of the balancing strategies, with real pod processes.

Each test starts ``stateful-route run`` as a subprocess with the in-memory
link store, in front of ``tests/pod_app.py`` processes on loopback, and
places new users through it. Every user is a new UID, so each first request
is one pick of the service's strategy.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import LOOPBACK, free_port
from test_e2e import (
    POD_APP,
    READY_TIMEOUT_S,
    Document,
    PodProcess,
    ProxyProcess,
    Reply,
    accepts_connections,
    log_tail,
    request_json,
    routing_headers,
    spawn,
    start_proxy,
    stop_pods,
    stop_process,
)

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
SLOW_POD_DELAY_MS = 50
HELD_REQUESTS = 20
HELD_REQUEST_MS = 3000
WAIT_S = 5.0

Launch = Callable[[Document], Awaitable[ProxyProcess]]


def start_delayed_pods(directory: Path, delays_ms: list[int]) -> list[PodProcess]:
    """Start one pod per entry of `delays_ms`, each responding that much later."""
    pods: list[PodProcess] = []
    try:
        for index, delay_ms in enumerate(delays_ms):
            port = free_port()
            command = [sys.executable, str(POD_APP), "--index", str(index)]
            command += ["--port", str(port), "--delay-ms", str(delay_ms)]
            log_path = directory / f"pod-{index}.log"
            pods.append(PodProcess(index, port, spawn(command, log_path), log_path))

        deadline = time.monotonic() + READY_TIMEOUT_S
        for pod in pods:
            while not accepts_connections(pod.port):
                if pod.process.poll() is not None:
                    pytest.fail(f"pod {pod.index} exited: {log_tail(pod.log_path)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"pod {pod.index} did not listen on {pod.address}")
                time.sleep(0.02)
    except BaseException:
        stop_pods(pods)
        raise
    return pods


def strategy_document(
    pods: list[PodProcess], strategy: str, **service: object
) -> Document:
    """Return a configuration of service ``game`` on `pods` with `strategy`."""
    return {
        "proxy": {"host": LOOPBACK, "shutdown_timeout_s": 2.0},
        "admin": {"host": LOOPBACK},
        "store": {"backend": "memory"},
        "log": {"level": "info"},
        "services": {
            "game": {
                "pods": [pod.address for pod in pods],
                "strategy": strategy,
                "read_timeout_s": 10.0,
                **service,
            }
        },
    }


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    """Three pods without delay, shared by the tests of this module."""
    started = start_delayed_pods(tmp_path_factory.mktemp("pods"), [0, 0, 0])
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture
def pods_one_slow(tmp_path: Path) -> Iterator[list[PodProcess]]:
    """Three pods, of which pod 2 responds `SLOW_POD_DELAY_MS` later."""
    started = start_delayed_pods(tmp_path, [0, 0, SLOW_POD_DELAY_MS])
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture
async def launch_proxy(tmp_path: Path) -> AsyncIterator[Launch]:
    """Start proxies for one test, and stop every one still running after it."""
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


async def place_users(
    client: aiohttp.ClientSession,
    proxy: ProxyProcess,
    uids: list[str],
    concurrency: int = 1,
) -> list[Reply]:
    """Send one request per UID, at most `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)

    async def call(uid: str) -> Reply:
        async with limit:
            return await request_json(client, f"{proxy.url}/", routing_headers(uid))

    return list(await asyncio.gather(*(call(uid) for uid in uids)))


async def proxy_in_flight(client: aiohttp.ClientSession, proxy: ProxyProcess) -> int:
    reply = await request_json(client, f"{proxy.admin_url}/v1/status", {})
    count: int = reply.body["in_flight"]
    return count


async def test_least_response_time_avoids_slow_pod(
    launch_proxy: Launch,
    pods_one_slow: list[PodProcess],
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch_proxy(strategy_document(pods_one_slow, "least_response_time"))
    warm_up = await place_users(client, proxy, [f"warm-{n}" for n in range(30)])

    replies = await place_users(
        client, proxy, [f"user-{n}" for n in range(300)], concurrency=4
    )
    counts = Counter(reply.body["pod"] for reply in replies)

    assert {reply.status for reply in warm_up + replies} == {200}
    assert {reply.body["pod"] for reply in warm_up} == {0, 1, 2}
    assert counts[2] <= 0.2 * len(replies), counts


async def test_least_connections_spares_busy_pod(
    launch_proxy: Launch, pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(strategy_document(pods, "least_connections"))
    [first] = await place_users(client, proxy, ["holder"])
    busy_pod = first.body["pod"]
    held = [
        asyncio.create_task(
            request_json(
                client,
                f"{proxy.url}/slow?ms={HELD_REQUEST_MS}",
                routing_headers("holder"),
            )
        )
        for _ in range(HELD_REQUESTS)
    ]
    deadline = time.monotonic() + WAIT_S
    while await proxy_in_flight(client, proxy) < HELD_REQUESTS:
        assert time.monotonic() < deadline, "held requests not in flight in time"
        await asyncio.sleep(0.02)

    newcomers = await place_users(client, proxy, [f"user-{n}" for n in range(60)])
    in_flight_after = await proxy_in_flight(client, proxy)
    held_replies = await asyncio.gather(*held)

    assert {reply.status for reply in newcomers} == {200}
    assert busy_pod not in {reply.body["pod"] for reply in newcomers}
    assert in_flight_after >= HELD_REQUESTS
    assert {reply.status for reply in held_replies} == {200}
    assert {reply.body["pod"] for reply in held_replies} == {busy_pod}


async def test_weighted_round_robin_places_by_weight(
    launch_proxy: Launch, pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    document = strategy_document(pods, "weighted_round_robin", weights=[5, 1, 1])
    proxy = await launch_proxy(document)

    replies = await place_users(client, proxy, [f"user-{n}" for n in range(70)])
    placed = [reply.body["pod"] for reply in replies]

    assert {reply.status for reply in replies} == {200}
    assert placed[:7] == [0, 0, 1, 0, 2, 0, 0]
    assert [placed.count(index) for index in range(3)] == [50, 10, 10]
