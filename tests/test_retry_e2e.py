"""End-to-end tests of request-level retries, with real pods and Redis.

Each test starts ``stateful-route run`` as a subprocess in front of two
``tests/pod_app.py`` pods (indexes 0 and 1) and a third pod (index 2) that
fails: a ``tests/reset_pod.py`` process that reads each request and resets
the connection, or a stopped pod that refuses connections. Users are linked
to the failing pod by writing their link into Redis, and the scripted pod's
event log shows how often a request reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from conftest import LOOPBACK, RedisServer, free_port
from test_e2e import (
    READY_TIMEOUT_S,
    Document,
    PodProcess,
    ProxyProcess,
    accepts_connections,
    log_tail,
    pod_headers,
    request_json,
    routing_headers,
    spawn,
    start_pods,
    start_proxy,
    stop_pods,
    stop_process,
    wait_for_in_flight,
)

from proxy.store.keys import link_key

SCRIPTED_POD = Path(__file__).with_name("reset_pod.py")
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
LINK_TTL_S = 60
BROKEN_INDEX = 2
BURST_REQUESTS = 100
BURST_PERCENT = 20
# A low floor, so that the share of requests is what limits the burst.
BURST_MIN_PER_S = 0.1
SLOW_REQUEST_MS = 3000
IDLE_WAIT_S = 1.5


@dataclass
class ScriptedPod:
    """One ``tests/reset_pod.py`` process and its event log."""

    index: int
    port: int
    process: Any
    events_path: Path

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def events(self, uid: str | None = None) -> list[dict[str, Any]]:
        """Return the logged events, of one UID when `uid` is given."""
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line]
        return [event for event in events if uid is None or event["uid"] == uid]


def start_scripted_pod(directory: Path, index: int, mode: str) -> ScriptedPod:
    """Start ``tests/reset_pod.py`` in `mode` and wait until it listens."""
    port = free_port()
    events_path = directory / f"scripted-{mode}-events.jsonl"
    command = [sys.executable, str(SCRIPTED_POD), "--index", str(index)]
    command += ["--port", str(port), "--log", str(events_path), "--mode", mode]
    output_path = directory / f"scripted-{mode}.log"
    pod = ScriptedPod(index, port, spawn(command, output_path), events_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not accepts_connections(port):
        if pod.process.poll() is not None:
            stop_process(pod.process)
            pytest.fail(f"scripted pod exited: {log_tail(output_path)}")
        if time.monotonic() > deadline:
            stop_process(pod.process)
            pytest.fail(f"scripted pod did not listen on {pod.address}")
        time.sleep(0.02)
    return pod


def retry_document(addresses: list[str], redis_url: str, **service: Any) -> Document:
    """Return a configuration of service ``game`` on `addresses`, Redis links."""
    return {
        "proxy": {"host": LOOPBACK, "shutdown_timeout_s": 2.0},
        "admin": {"host": LOOPBACK},
        "store": {
            "backend": "redis",
            "redis_url": redis_url,
            "redis_timeout_s": 0.5,
            "redis_connect_timeout_s": 0.5,
            "temporary_link_ttl_s": float(LINK_TTL_S),
            "local_cache_ttl_s": 30.0,
        },
        "log": {"level": "info"},
        "services": {
            "game": {
                "pods": addresses,
                "read_timeout_s": 5.0,
                "connect_timeout_s": 1.0,
                **service,
            }
        },
    }


async def link_users(
    redis_client: redis.asyncio.Redis, uids: list[str], pod: int
) -> None:
    """Write temporary links of `uids` to `pod`, as a router would."""
    async with redis_client.pipeline(transaction=False) as pipe:
        for uid in uids:
            pipe.set(link_key("default", uid, "game"), str(pod), ex=LINK_TTL_S)
        await pipe.execute()


async def linked_pod(redis_client: redis.asyncio.Redis, uid: str) -> int | None:
    value = await redis_client.get(link_key("default", uid, "game"))
    return None if value is None else int(value)


async def retry_counters(
    client: aiohttp.ClientSession, proxy: ProxyProcess
) -> dict[str, int]:
    reply = await request_json(client, f"{proxy.admin_url}/v1/status", {})
    counters: dict[str, int] = reply.body["retries"]["game"]
    return counters


# Fixtures.


@pytest.fixture(scope="module")
def good_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    """Pods 0 and 1, shared by the tests of this module."""
    started = start_pods(2, tmp_path_factory.mktemp("pods"))
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture(scope="module")
def reset_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptedPod]:
    """Pod 2, resetting every request after reading it. Tests filter by UID."""
    pod = start_scripted_pod(tmp_path_factory.mktemp("reset"), BROKEN_INDEX, "reset")
    try:
        yield pod
    finally:
        stop_process(pod.process)


@pytest.fixture
def close_idle_pod(tmp_path: Path) -> Iterator[ScriptedPod]:
    """Pod 0 of its own service, closing each connection when it is reused."""
    pod = start_scripted_pod(tmp_path, 0, "close-idle")
    try:
        yield pod
    finally:
        stop_process(pod.process)


@pytest.fixture
async def launch_proxy(tmp_path: Path) -> AsyncIterator[Any]:
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


@pytest.fixture
def broken_addresses(good_pods: list[PodProcess], reset_pod: ScriptedPod) -> list[str]:
    return [pod.address for pod in good_pods] + [reset_pod.address]


# A pod that reads the request, then resets the connection.


async def test_written_post_is_never_resent(
    launch_proxy: Any,
    broken_addresses: list[str],
    reset_pod: ScriptedPod,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch_proxy(retry_document(broken_addresses, redis_server.url))
    await link_users(redis_client, ["poster"], BROKEN_INDEX)

    async with client.post(
        f"{proxy.url}/orders", headers=routing_headers("poster"), data=b"order-1"
    ) as response:
        status = response.status
        body = await response.json()

    assert status == 502
    assert body["pod"] == BROKEN_INDEX
    assert len(reset_pod.events("poster")) == 1
    assert await linked_pod(redis_client, "poster") == BROKEN_INDEX
    assert (await retry_counters(client, proxy))["retries"] == 0


async def test_written_get_retries_other_pod(
    launch_proxy: Any,
    broken_addresses: list[str],
    reset_pod: ScriptedPod,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch_proxy(retry_document(broken_addresses, redis_server.url))
    await link_users(redis_client, ["getter"], BROKEN_INDEX)
    url = f"{proxy.url}/profile"

    first = await request_json(client, url, routing_headers("getter"))
    second = await request_json(client, url, routing_headers("getter"))

    assert first.status == 200
    assert first.body["pod"] in (0, 1)
    assert first.headers["X-Routed-Pod"] == str(first.body["pod"])
    seen = pod_headers(first.body)
    assert seen["X-Route-Reason"] == "retry"
    assert seen["X-Route-Previous-Pod"] == str(BROKEN_INDEX)
    assert await linked_pod(redis_client, "getter") == first.body["pod"]
    assert second.status == 200
    assert second.body["pod"] == first.body["pod"]
    assert "X-Route-Reason" not in pod_headers(second.body)
    assert len(reset_pod.events("getter")) == 1
    assert (await retry_counters(client, proxy))["retries"] == 1


async def test_small_put_body_is_resent_whole(
    launch_proxy: Any,
    broken_addresses: list[str],
    reset_pod: ScriptedPod,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch_proxy(retry_document(broken_addresses, redis_server.url))
    await link_users(redis_client, ["putter"], BROKEN_INDEX)
    body = b"settings " * 1000

    async with client.put(
        f"{proxy.url}/upload", headers=routing_headers("putter"), data=body
    ) as response:
        status = response.status
        reply = await response.json()

    assert status == 200
    assert reply["pod"] in (0, 1)
    assert reply["method"] == "PUT"
    assert reply["length"] == len(body)
    assert reply["sha256"] == hashlib.sha256(body).hexdigest()
    assert len(reset_pod.events("putter")) == 1


async def test_retries_off_gives_502_once(
    launch_proxy: Any,
    broken_addresses: list[str],
    reset_pod: ScriptedPod,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    document = retry_document(broken_addresses, redis_server.url, retry_attempts=0)
    proxy = await launch_proxy(document)
    await link_users(redis_client, ["unretried"], BROKEN_INDEX)

    reply = await request_json(client, f"{proxy.url}/", routing_headers("unretried"))

    assert reply.status == 502
    assert len(reset_pod.events("unretried")) == 1
    assert await linked_pod(redis_client, "unretried") == BROKEN_INDEX


# A stopped pod: connections are refused, so nothing was written.


async def test_refused_post_moves_to_other_pod(
    tmp_path: Path,
    launch_proxy: Any,
    good_pods: list[PodProcess],
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    stopped = start_pods(1, tmp_path)
    stop_pods(stopped)
    addresses = [pod.address for pod in good_pods] + [stopped[0].address]
    proxy = await launch_proxy(retry_document(addresses, redis_server.url))
    await link_users(redis_client, ["uploader"], BROKEN_INDEX)
    # Larger than retry_buffer_bytes, so it is streamed and was not read
    # when the connection was refused.
    payload = bytes(range(256)) * 1024

    async with client.post(
        f"{proxy.url}/upload", headers=routing_headers("uploader"), data=payload
    ) as response:
        status = response.status
        reply = await response.json()

    assert status == 200
    assert reply["pod"] in (0, 1)
    assert reply["length"] == len(payload)
    assert reply["sha256"] == hashlib.sha256(payload).hexdigest()
    assert await linked_pod(redis_client, "uploader") == reply["pod"]


# The retry budget.


async def test_budget_caps_retries_in_burst(
    launch_proxy: Any,
    broken_addresses: list[str],
    reset_pod: ScriptedPod,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    document = retry_document(
        broken_addresses,
        redis_server.url,
        retry_budget_percent=float(BURST_PERCENT),
        retry_min_per_s=BURST_MIN_PER_S,
        # Passive ejection would move the users off the broken pod after a
        # few failures; this test measures the budget alone.
        consecutive_failures=0,
    )
    proxy = await launch_proxy(document)
    uids = [f"burst-{number}" for number in range(BURST_REQUESTS)]
    await link_users(redis_client, uids, BROKEN_INDEX)
    url = f"{proxy.url}/"

    replies = await asyncio.gather(
        *(request_json(client, url, routing_headers(uid)) for uid in uids)
    )

    statuses = Counter(reply.status for reply in replies)
    counters = await retry_counters(client, proxy)
    budget = BURST_REQUESTS * BURST_PERCENT // 100
    reached_broken_pod = [
        event for event in reset_pod.events() if event["uid"] in set(uids)
    ]
    assert len(reached_broken_pod) == BURST_REQUESTS
    assert counters["requests"] == BURST_REQUESTS
    assert 1 <= counters["retries"] <= budget
    assert counters["retries_rejected"] == BURST_REQUESTS - counters["retries"]
    assert statuses[200] == counters["retries"]
    assert statuses[502] == counters["retries_rejected"]
    assert "retry budget of service=game exhausted" in proxy.log()


# A keep-alive connection that the pod closed while it was idle.


async def test_stale_connection_get_succeeds(
    launch_proxy: Any,
    close_idle_pod: ScriptedPod,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch_proxy(
        retry_document([close_idle_pod.address], redis_server.url)
    )
    url = f"{proxy.url}/items"

    first = await request_json(client, url, routing_headers("idler"))
    second = await request_json(client, url, routing_headers("idler"))

    events = [event["event"] for event in close_idle_pod.events("idler")]
    assert first.status == 200
    assert second.status == 200
    assert second.body["pod"] == 0
    assert events == ["served", "closed", "served"]
    assert await linked_pod(redis_client, "idler") == 0
    assert (await retry_counters(client, proxy))["retries"] == 1


async def test_stale_connection_post_not_resent(
    launch_proxy: Any,
    close_idle_pod: ScriptedPod,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch_proxy(
        retry_document([close_idle_pod.address], redis_server.url)
    )
    url = f"{proxy.url}/items"

    first = await request_json(client, url, routing_headers("idle-poster"))
    second = await request_json(client, url, routing_headers("idle-poster"), "POST")

    events = [event["event"] for event in close_idle_pod.events("idle-poster")]
    assert first.status == 200
    assert second.status == 502
    assert events == ["served", "closed"]


# A client that goes away.


async def test_client_gone_is_not_retried(
    launch_proxy: Any,
    good_pods: list[PodProcess],
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    addresses = [pod.address for pod in good_pods]
    proxy = await launch_proxy(retry_document(addresses, redis_server.url))
    url = f"{proxy.url}/slow?ms={SLOW_REQUEST_MS}"
    abandoned = asyncio.create_task(
        request_json(client, url, routing_headers("leaver"))
    )
    started = await wait_for_in_flight(client, proxy)

    abandoned.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await abandoned
    deadline = time.monotonic() + IDLE_WAIT_S
    status = await request_json(client, f"{proxy.admin_url}/v1/status", {})
    while status.body["in_flight"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status = await request_json(client, f"{proxy.admin_url}/v1/status", {})

    assert started
    assert status.body["in_flight"] == 0
    assert status.body["retries"]["game"]["retries"] == 0
