"""End-to-end tests of health checks and failover, with real pod processes.

The ``stateful-route`` command runs as a subprocess in front of three
``tests/health_pod_app.py`` processes of the test's own, with its links in a
real redis-server. The proxy probes ``/healthz`` every 0.1 s, so a failure
is detected within a few tenths of a second. Tests kill and restart pods,
or make them fail through their ``/_control`` endpoint, and read the
proxy's view through the admin API.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from conftest import LOOPBACK, RedisServer, free_port
from test_e2e import (
    Document,
    PodProcess,
    ProxyProcess,
    Reply,
    accepts_connections,
    log_tail,
    pod_headers,
    request_json,
    routing_headers,
    spawn,
    start_proxy,
    stop_pods,
    stop_process,
)

NAMESPACE = "default"
SERVICE = "game"
POD_APP = Path(__file__).with_name("health_pod_app.py")
POD_COUNT = 3
USERS = 30
CONCURRENCY = 16
SLOW_START_S = 2.0
# Bound of every wait below.
WAIT_S = 8.0
POLL_S = 0.02
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)


# Pods.


def spawn_pod(index: int, port: int, directory: Path) -> PodProcess:
    log_path = directory / f"pod-{index}.log"
    command = [sys.executable, str(POD_APP), "--index", str(index)]
    process = spawn([*command, "--port", str(port)], log_path)
    return PodProcess(index, port, process, log_path)


def wait_listening(pod: PodProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while not accepts_connections(pod.port):
        if pod.process.poll() is not None:
            pytest.fail(f"pod {pod.index} exited: {log_tail(pod.log_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"pod {pod.index} did not listen on {pod.address}")
        time.sleep(POLL_S)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[list[PodProcess]]:
    """Pod processes of one test, which it may kill, restart and break."""
    started: list[PodProcess] = []
    try:
        for index in range(POD_COUNT):
            started.append(spawn_pod(index, free_port(), tmp_path))
        for pod in started:
            wait_listening(pod)
        yield started
    finally:
        stop_pods(started)


def kill(pod: PodProcess) -> None:
    pod.process.send_signal(signal.SIGKILL)
    pod.process.wait(WAIT_S)


def restart(pods: list[PodProcess], index: int, directory: Path) -> None:
    """Start pod `index` again on its port, in place of the killed process."""
    pod = spawn_pod(index, pods[index].port, directory)
    pods[index] = pod
    wait_listening(pod)


async def control(
    client: aiohttp.ClientSession, pod: PodProcess, **fields: Any
) -> dict[str, Any]:
    """Set faults of a pod through its ``/_control`` endpoint; return its counters."""
    url = f"http://{pod.address}/_control"
    async with client.post(url, json=fields) as response:
        assert response.status == 200
        counters: dict[str, Any] = await response.json()
        return counters


# The proxy.


def failover_document(
    pods: list[PodProcess], redis_url: str, **service: object
) -> Document:
    """Return a configuration of service ``game`` with fast health checks.

    `service` overrides keys of ``[services.game]``.
    """
    game: dict[str, Any] = {
        "pods": [pod.address for pod in pods],
        "connect_timeout_s": 0.5,
        "read_timeout_s": 5.0,
        "health_check_path": "/healthz",
        "health_interval_s": 0.1,
        "health_timeout_s": 0.3,
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        "consecutive_failures": 3,
        "base_ejection_s": 2.0,
        "max_ejection_s": 4.0,
        "slow_start_s": SLOW_START_S,
        "max_moves_per_s": 50.0,
    }
    game.update(service)
    return {
        "proxy": {"host": LOOPBACK, "shutdown_timeout_s": 5.0},
        "admin": {"host": LOOPBACK},
        "store": {
            "backend": "redis",
            "redis_url": redis_url,
            "redis_timeout_s": 0.5,
            "redis_connect_timeout_s": 0.5,
            "temporary_link_ttl_s": 60.0,
            "local_cache_ttl_s": 30.0,
        },
        "log": {"level": "info"},
        "services": {SERVICE: game},
    }


@pytest.fixture
def redis_url(redis_server: RedisServer, redis_client: redis.asyncio.Redis) -> str:
    """URL of the shared Redis, emptied with FLUSHDB by `redis_client` first."""
    return redis_server.url


@pytest.fixture
async def proxy(
    pods: list[PodProcess], redis_url: str, tmp_path: Path
) -> AsyncIterator[ProxyProcess]:
    started = await start_proxy(tmp_path, failover_document(pods, redis_url), 0)
    try:
        yield started
    finally:
        stop_process(started.process)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


def link_key(uid: str) -> str:
    return f"sf:{{{NAMESPACE}:lk:{uid}}}{SERVICE}"


async def call_all(
    client: aiohttp.ClientSession, proxy: ProxyProcess, uids: list[str]
) -> dict[str, Reply]:
    """Send one request per UID, `CONCURRENCY` at a time, and return the replies."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def call(uid: str) -> Reply:
        async with limit:
            return await request_json(client, f"{proxy.url}/", routing_headers(uid))

    replies = await asyncio.gather(*(call(uid) for uid in uids))
    return dict(zip(uids, replies, strict=True))


def pods_of(replies: dict[str, Reply]) -> dict[str, int]:
    return {uid: reply.body["pod"] for uid, reply in replies.items()}


def moved_from(reply: Reply) -> tuple[str | None, str | None]:
    """Return the X-Route-Previous-Pod and X-Route-Reason the pod received."""
    headers = pod_headers(reply.body)
    return headers.get("X-Route-Previous-Pod"), headers.get("X-Route-Reason")


def uids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{number}" for number in range(count)]


async def admin_json(
    client: aiohttp.ClientSession, proxy: ProxyProcess, path: str
) -> Any:
    reply = await request_json(client, f"{proxy.admin_url}{path}", {})
    assert reply.status == 200, reply.body
    return reply.body


async def history(
    client: aiohttp.ClientSession, proxy: ProxyProcess
) -> list[dict[str, Any]]:
    body = await admin_json(client, proxy, f"/v1/services/{SERVICE}/history")
    events: list[dict[str, Any]] = body["events"]
    return events


async def health(client: aiohttp.ClientSession, proxy: ProxyProcess) -> dict[str, Any]:
    body: dict[str, Any] = await admin_json(
        client, proxy, f"/v1/services/{SERVICE}/health"
    )
    return body


async def wait_for_event(
    client: aiohttp.ClientSession, proxy: ProxyProcess, kind: str, pod: int
) -> dict[str, Any]:
    """Poll the history until an event of `kind` for `pod` appears; return it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for event in await history(client, proxy):
            if event["type"] == kind and event["pod"] == pod:
                return event
        await asyncio.sleep(POLL_S)
    pytest.fail(
        f"no {kind} of pod {pod} within {WAIT_S} s:\n{log_tail(proxy.log_path)}"
    )


# A pod process is killed.


async def test_killed_pod_users_move_once(
    proxy: ProxyProcess,
    pods: list[PodProcess],
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    linked = pods_of(await call_all(client, proxy, uids("user", USERS)))
    leaving = sorted(uid for uid, pod in linked.items() if pod == 1)
    staying = sorted(uid for uid, pod in linked.items() if pod != 1)

    kill(pods[1])
    await wait_for_event(client, proxy, "POD_FAILURE", 1)
    first = await call_all(client, proxy, leaving + staying)
    second = await call_all(client, proxy, leaving)
    migrated = await wait_for_event(client, proxy, "USER_MIGRATED", 1)

    assert len(leaving) == 10
    assert {reply.status for reply in first.values()} == {200}
    moved_to = {uid: first[uid].body["pod"] for uid in leaving}
    assert [uid for uid, pod in moved_to.items() if pod not in (0, 2)] == []
    assert {uid: moved_from(first[uid]) for uid in leaving} == dict.fromkeys(
        leaving, ("1", "failover")
    )
    assert pods_of(second) == moved_to
    assert [uid for uid in leaving if moved_from(second[uid]) != (None, None)] == []
    assert migrated["users"] == 10
    links = {uid: await redis_client.get(link_key(uid)) for uid in leaving + staying}
    assert {uid: links[uid] for uid in leaving} == {
        uid: str(pod) for uid, pod in moved_to.items()
    }
    assert {uid: links[uid] for uid in staying} == {
        uid: str(linked[uid]) for uid in staying
    }
    assert {uid: first[uid].body["pod"] for uid in staying} == {
        uid: linked[uid] for uid in staying
    }
    assert [uid for uid in staying if moved_from(first[uid]) != (None, None)] == []


async def test_history_records_failure_and_moves(
    proxy: ProxyProcess, pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    linked = pods_of(await call_all(client, proxy, uids("user", USERS)))
    leaving = sorted(uid for uid, pod in linked.items() if pod == 1)

    kill(pods[1])
    failure = await wait_for_event(client, proxy, "POD_FAILURE", 1)
    migrated = await wait_for_event(client, proxy, "USER_MIGRATED", 1)
    events = await history(client, proxy)

    assert [event["type"] for event in events] == ["USER_MIGRATED", "POD_FAILURE"]
    assert failure["users"] == 10
    assert sorted(failure["sample"]) == leaving
    assert failure["address"] == pods[1].address
    assert "probes in a row" in failure["reason"]
    assert migrated["namespace"] == NAMESPACE
    assert sorted(migrated["sample"]) == leaving
    assert f"pod=1 service={SERVICE} at {pods[1].address} is now" in proxy.log()


# The pod comes back.


async def test_recovered_pod_ramps_up_gently(
    proxy: ProxyProcess,
    pods: list[PodProcess],
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    linked = pods_of(await call_all(client, proxy, uids("user", USERS)))
    leaving = sorted(uid for uid, pod in linked.items() if pod == 1)
    kill(pods[1])
    await wait_for_event(client, proxy, "POD_FAILURE", 1)
    await wait_for_event(client, proxy, "USER_MIGRATED", 1)
    moved_to = {uid: (await redis_client.get(link_key(uid))) for uid in leaving}

    restart(pods, 1, tmp_path)
    recovery = await wait_for_event(client, proxy, "POD_RECOVERY", 1)
    early = pods_of(await call_all(client, proxy, uids("early", 60)))
    after = await call_all(client, proxy, leaving)
    ends_at = recovery["time_ms"] / 1000 + SLOW_START_S + 0.2
    await asyncio.sleep(max(0.0, ends_at - time.time()))
    late = pods_of(await call_all(client, proxy, uids("late", 60)))

    assert Counter(early.values())[1] < 20
    assert Counter(late.values())[1] == 20
    assert {uid: str(reply.body["pod"]) for uid, reply in after.items()} == moved_to
    # The first request after the handler's move learns of that move only.
    assert {uid: moved_from(after[uid]) for uid in leaving} == dict.fromkeys(
        leaving, ("1", "failover")
    )
    assert "is now healthy (was unhealthy)" in proxy.log()


# A pod that fails some probes.


async def test_sparse_probe_failures_change_nothing(
    proxy: ProxyProcess,
    pods: list[PodProcess],
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    linked = pods_of(await call_all(client, proxy, uids("user", USERS)))
    on_pod_1 = sorted(uid for uid, pod in linked.items() if pod == 1)
    kinds = ["status", "reset", "timeout"]

    await control(client, pods[1], probe_every=5, probe_kinds=kinds)
    deadline = time.monotonic() + WAIT_S
    counters = await control(client, pods[1])
    while sum(counters["injected_probe_failures"].values()) < 6:
        assert time.monotonic() < deadline, counters
        await asyncio.sleep(0.1)
        counters = await control(client, pods[1])
    # The last injected failure may be a probe that is still timing out.
    await asyncio.sleep(0.5)
    view = await health(client, proxy)
    again = await call_all(client, proxy, on_pod_1)

    assert counters["injected_probe_failures"] == dict.fromkeys(kinds, 2)
    pod_1 = view["pods"][1]
    assert pod_1["probe"]["failed_probes"] >= 6
    assert pod_1["usable"] is True
    assert pod_1["transitions"] == {"down": 0, "up": 0}
    assert await history(client, proxy) == []
    assert pods_of(again) == dict.fromkeys(on_pod_1, 1)
    links = [await redis_client.get(link_key(uid)) for uid in on_pod_1]
    assert links == ["1"] * len(on_pod_1)


# Every pod fails.


async def test_failing_pool_keeps_serving_pods(
    pods: list[PodProcess],
    redis_url: str,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # Probes need 4 failures, so passive detection ejects a pod first.
    document = failover_document(pods, redis_url, unhealthy_threshold=4)
    proxy = await start_proxy(tmp_path, document, 1)
    try:
        await check_failing_pool(proxy, pods, client)
    finally:
        stop_process(proxy.process)


async def check_failing_pool(
    proxy: ProxyProcess, pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    users = uids("user", USERS)
    await call_all(client, proxy, users)

    for pod in pods:
        await control(client, pod, status=503)
    during: list[dict[str, Reply]] = []
    max_ejected = 0
    panic_seen = False
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        during.append(await call_all(client, proxy, users))
        view = await health(client, proxy)
        ejected = [pod for pod in view["pods"] if pod["passive"]["ejected"]]
        max_ejected = max(max_ejected, len(ejected))
        panic_seen = panic_seen or view["panic"]

    # The pod that answers 200 again is the one with the most users among
    # those not ejected: failover may have emptied the others.
    view = await health(client, proxy)
    not_ejected = [p["index"] for p in view["pods"] if not p["passive"]["ejected"]]
    users_on = Counter(reply.body["pod"] for reply in during[-1].values())
    back = max(not_ejected, key=lambda index: users_on[index])
    await control(client, pods[back], status=0)
    switched_at = time.monotonic()
    first_after = await call_all(client, proxy, users)
    resumed = await wait_until_all_ok(client, proxy, users)
    resumed_s = time.monotonic() - switched_at

    statuses = {reply.status for replies in during for reply in replies.values()}
    injected = {
        reply.body.get("injected") for replies in during for reply in replies.values()
    }
    assert statuses == {503}
    assert injected == {503}
    assert max_ejected == 1
    assert panic_seen
    linked_back = [
        uid for uid, reply in during[-1].items() if reply.body["pod"] == back
    ]
    assert linked_back != []
    assert {first_after[uid].status for uid in linked_back} == {200}
    assert set(pods_of(resumed).values()) == {back}
    assert resumed_s < 3.0
    assert "panic mode for service=game" in proxy.log()


async def wait_until_all_ok(
    client: aiohttp.ClientSession, proxy: ProxyProcess, users: list[str]
) -> dict[str, Reply]:
    """Send rounds of requests until every user gets 200; return the last round."""
    deadline = time.monotonic() + WAIT_S
    while True:
        replies = await call_all(client, proxy, users)
        if {reply.status for reply in replies.values()} == {200}:
            return replies
        if time.monotonic() > deadline:
            pytest.fail(f"not every user got 200 within {WAIT_S} s")
        await asyncio.sleep(0.05)
