"""End-to-end tests of routing on pod state, and of the pod-side sidecar.

The ``stateful-route`` command runs as a subprocess in front of three
``tests/pod_app.py`` processes, with its links and the pod state records in a
real redis-server. The tests play the pods' publishers themselves: they write
state records into the hash ``sf:{<ns>:state:<svc>}``, or drain a pod through
the admin API, and watch the proxy route on them. The last group runs the
sidecar in its pod role and reads what it publishes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
    pod_headers,
    raw_request,
    read_response,
    request_json,
    routing_headers,
    start_pods,
    start_proxy,
    stop_process,
    wait_for_in_flight,
)

from proxy.podstate import PodState, Routing, Workload, now_ms

NAMESPACE = "default"
SERVICE = "game"
STATE_KEY = f"sf:{{{NAMESPACE}:state:{SERVICE}}}"
WORKLOAD_KEY = f"sf:{{{NAMESPACE}:workload:{SERVICE}}}"
POD_COUNT = 3
REFRESH_S = 0.2
# Bound of every poll below. A state change shows up within a few refreshes.
WAIT_S = 6.0
POLL_S = 0.02
CONCURRENCY = 16
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
PUBLISH_PERIOD_S = 0.5
DRAIN_S = 1.5
# Drain of the sidecars whose stop is not under test, so teardown is quick.
SHORT_DRAIN_S = 0.1

Launch = Callable[[Document], Awaitable[ProxyProcess]]


def link_key(uid: str) -> str:
    return f"sf:{{{NAMESPACE}:lk:{uid}}}{SERVICE}"


def status_line(index: int, reason: str) -> str:
    """Return the log text of the proxy seeing a pod's status change."""
    return f"pod={index} service={SERVICE} namespace={NAMESPACE} is now {reason}"


# Configuration.


def state_document(
    pod_processes: list[PodProcess], redis_url: str, **service: object
) -> Document:
    """Return a configuration of service ``game`` on `pod_processes`.

    The proxy re-reads the state records every `REFRESH_S`.

    `service` overrides keys of ``[services.game]``, and a value of None
    removes the key.
    """
    game: dict[str, Any] = {
        "pods": [pod.address for pod in pod_processes],
        "state_refresh_s": REFRESH_S,
        "read_timeout_s": 10.0,
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
        "services": {
            SERVICE: {key: value for key, value in game.items() if value is not None}
        },
    }


def sidecar_document(app: PodProcess, redis_url: str, **pod: object) -> Document:
    """Return a configuration with only a ``[pod]`` role in front of `app`.

    `pod` overrides keys of ``[pod]``, and a value of None removes the key.
    """
    inbound_port = free_port()
    settings: dict[str, Any] = {
        "namespace": NAMESPACE,
        "service": SERVICE,
        "index": 1,
        "app_address": app.address,
        "host": LOOPBACK,
        "port": inbound_port,
        "advertise_address": f"{LOOPBACK}:{inbound_port}",
        "publish_period_s": PUBLISH_PERIOD_S,
        "drain_s": SHORT_DRAIN_S,
    }
    settings.update(pod)
    return {
        "proxy": {"host": LOOPBACK, "shutdown_timeout_s": 5.0},
        "admin": {"host": LOOPBACK},
        "store": {"backend": "redis", "redis_url": redis_url},
        "log": {"level": "info"},
        "pod": {key: value for key, value in settings.items() if value is not None},
    }


# Records.


async def write_record(
    client: redis.asyncio.Redis,
    index: int,
    routing: str,
    *,
    load: int = 0,
    age_s: float = 0.0,
    address: str | None = None,
) -> None:
    """Write one pod's record as a publisher would, `age_s` seconds old."""
    record: dict[str, Any] = {
        "load": load,
        "routing": routing,
        "updated_ms": now_ms() - int(age_s * 1000),
    }
    if address is not None:
        record["address"] = address
    await client.hset(STATE_KEY, str(index), json.dumps(record))


async def read_record(client: redis.asyncio.Redis, index: int) -> PodState | None:
    text = await client.hget(STATE_KEY, str(index))
    return None if text is None else PodState.decode(text)


class Publisher:
    """Stand-in for the publishers of live pods, rewriting their records every period.

    A pod removed with `stop` keeps its last record, which turns stale.
    """

    def __init__(self, client: redis.asyncio.Redis, period_s: float = 0.2) -> None:
        self._client = client
        self._period_s = period_s
        self._records: dict[int, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def publish(self, index: int, routing: str = "READY", **fields: Any) -> None:
        """Write the record of `index` now, and again every period from now on."""
        self._records[index] = {"routing": routing, **fields}
        await write_record(self._client, index, routing, **fields)

    def stop(self, index: int) -> None:
        del self._records[index]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._stopping = True
        task = self._task
        if task is None:
            return
        task.cancel()
        # In two full runs this teardown waited forever while the loop kept
        # writing, so the cancel was lost, likely inside a Redis command.
        # The flag ends the loop at its next turn even then.
        await asyncio.wait([task])
        if not task.cancelled():
            # Retrieved so that asyncio does not log it as never retrieved.
            task.exception()

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._period_s)
            for index, fields in list(self._records.items()):
                await write_record(self._client, index, **fields)


async def set_routing_by_admin(
    client: aiohttp.ClientSession, proxy: ProxyProcess, index: int, action: str
) -> Reply:
    """Drain or undrain a pod through the proxy's admin API."""
    url = (
        f"{proxy.admin_url}/v1/services/{SERVICE}/pods/{index}/{action}"
        f"?namespace={NAMESPACE}"
    )
    return await request_json(client, url, {}, method="POST")


async def pod_status(
    client: aiohttp.ClientSession, proxy: ProxyProcess, index: int
) -> dict[str, Any]:
    """Return one pod's entry of the admin API's pod list."""
    url = f"{proxy.admin_url}/v1/services/{SERVICE}/pods?namespace={NAMESPACE}"
    reply = await request_json(client, url, {})
    [entry] = [pod for pod in reply.body["pods"] if pod["index"] == index]
    return dict(entry)


# Waiting.


async def wait_for_log(proxy: ProxyProcess, text: str) -> None:
    """Poll the proxy's log until it contains `text`."""
    deadline = time.monotonic() + WAIT_S
    while text not in proxy.log():
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in the log within {WAIT_S} s:\n{proxy.log()}")
        await asyncio.sleep(POLL_S)


async def wait_for_record(
    client: redis.asyncio.Redis,
    index: int,
    accept: Callable[[PodState], bool],
    timeout_s: float = WAIT_S,
) -> PodState | None:
    """Poll the record of `index` until `accept` takes it, or return None on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await read_record(client, index)
        if state is not None and accept(state):
            return state
        await asyncio.sleep(POLL_S)
    return None


# Requests.


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


async def send_at_once(ports: list[int], uid: str) -> list[tuple[int, Any]]:
    """Send one request of `uid` per port entry, all written before any is read.

    Every request has a connection of its own, opened first, so the proxies
    receive them together. Returns the status and JSON body of each.
    """
    head = (
        "GET / HTTP/1.1\r\n"
        f"Host: {LOOPBACK}\r\n"
        f"X-Uid: {uid}\r\n"
        f"X-Service: {SERVICE}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode()
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for port in ports:
            connections.append(await asyncio.open_connection(LOOPBACK, port))
        for _, writer in connections:
            writer.write(head)
        await asyncio.gather(*(writer.drain() for _, writer in connections))
        responses = await asyncio.gather(
            *(read_response(reader) for reader, _ in connections)
        )
    finally:
        for _, writer in connections:
            writer.close()
            await writer.wait_closed()
    return [(status, json.loads(body)) for status, _, body in responses]


def pods_of(replies: dict[str, Reply]) -> dict[str, int]:
    return {uid: reply.body["pod"] for uid, reply in replies.items()}


def statuses_of(replies: dict[str, Reply]) -> set[int]:
    return {reply.status for reply in replies.values()}


def moved_lines(proxy: ProxyProcess, uid: str) -> list[str]:
    return [
        line
        for line in proxy.log().splitlines()
        if f"moved uid={uid} service={SERVICE} " in line
    ]


def uids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{number}" for number in range(count)]


# Fixtures.


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    """Pod processes shared by the tests of this module. No test stops them."""
    started = start_pods(POD_COUNT, tmp_path_factory.mktemp("pods"))
    try:
        yield started
    finally:
        for pod in started:
            stop_process(pod.process)


@pytest.fixture
def redis_url(redis_server: RedisServer, redis_client: redis.asyncio.Redis) -> str:
    """URL of the shared Redis, emptied with FLUSHDB by `redis_client` first."""
    return redis_server.url


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """Start proxies for one test, and stop every one still running after it."""
    started: list[ProxyProcess] = []

    async def start(document: Document) -> ProxyProcess:
        proxy = await start_proxy(tmp_path, document, len(started))
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            stop_process(proxy.process)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


@pytest.fixture
async def publisher(redis_client: redis.asyncio.Redis) -> AsyncIterator[Publisher]:
    running = Publisher(redis_client)
    running.start()
    try:
        yield running
    finally:
        await running.close()


# Draining: DENY_NEW_CALL.


async def test_draining_pod_keeps_linked_users(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    document = state_document(pods, redis_url)
    # Without the local cache every request reads its link from Redis.
    document["store"]["local_cache_ttl_s"] = 0.0
    proxy = await launch(document)
    linked = pods_of(await call_all(client, proxy, uids("early", 30)))
    on_pod_1 = [uid for uid, pod in linked.items() if pod == 1]
    assert len(on_pod_1) == 10

    drained = await set_routing_by_admin(client, proxy, 1, "drain")
    again = await call_all(client, proxy, on_pod_1)

    assert drained.status == 200
    assert statuses_of(again) == {200}
    assert [again[uid].body["pod"] for uid in on_pod_1] == [1] * 10
    moved_headers = [
        uid
        for uid in on_pod_1
        if "X-Route-Previous-Pod" in pod_headers(again[uid].body)
    ]
    assert moved_headers == []
    assert [await redis_client.get(link_key(uid)) for uid in on_pod_1] == ["1"] * 10


async def test_draining_pod_gets_no_new_users(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch(state_document(pods, redis_url))
    await call_all(client, proxy, uids("early", 30))

    drained = await set_routing_by_admin(client, proxy, 1, "drain")
    status = await pod_status(client, proxy, 1)
    newcomers = await call_all(client, proxy, uids("new", 300))

    assert drained.status == 200
    assert (status["available"], status["routable"]) == (True, False)
    assert status["reason"] == "draining"
    record = await read_record(redis_client, 1)
    assert record is not None
    assert record.routing is Routing.DENY_NEW_CALL
    assert record.drained_by == "admin"
    placed = Counter(pods_of(newcomers).values())
    assert statuses_of(newcomers) == {200}
    assert placed[1] == 0
    assert sorted(placed) == [0, 2]
    assert sum(placed.values()) == 300


# Shutdown: users move once and stay moved.


async def test_shutdown_moves_each_user_once(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch(state_document(pods, redis_url))
    linked = pods_of(await call_all(client, proxy, uids("early", 30)))
    leaving = [uid for uid, pod in linked.items() if pod == 1]
    staying = [uid for uid, pod in linked.items() if pod != 1]
    assert len(leaving) == 10

    await write_record(redis_client, 1, "SHUTDOWN")
    await wait_for_log(proxy, status_line(1, "shutdown"))
    first = await call_all(client, proxy, leaving)
    moved_to = pods_of(first)
    repeat = await call_all(client, proxy, leaving)
    stayed = await call_all(client, proxy, staying)

    assert statuses_of(first) == {200}
    assert [pod for pod in moved_to.values() if pod not in (0, 2)] == []
    seen = {uid: pod_headers(first[uid].body) for uid in leaving}
    assert [seen[uid].get("X-Route-Previous-Pod") for uid in leaving] == ["1"] * 10
    assert [seen[uid].get("X-Route-Reason") for uid in leaving] == ["shutdown"] * 10
    assert pods_of(repeat) == moved_to
    repeated_headers = [
        uid
        for uid in leaving
        if "X-Route-Previous-Pod" in pod_headers(repeat[uid].body)
    ]
    assert repeated_headers == []
    links = {uid: await redis_client.get(link_key(uid)) for uid in leaving}
    assert links == {uid: str(pod) for uid, pod in moved_to.items()}
    assert {uid: len(moved_lines(proxy, uid)) for uid in leaving} == dict.fromkeys(
        leaving, 1
    )
    assert pods_of(stayed) == {uid: linked[uid] for uid in staying}
    assert [uid for uid in staying if moved_lines(proxy, uid)] == []


async def test_moved_users_stay_after_recovery(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    document = state_document(pods, redis_url)
    # Without the local cache every request reads its link from Redis.
    document["store"]["local_cache_ttl_s"] = 0.0
    proxy = await launch(document)
    linked = pods_of(await call_all(client, proxy, uids("early", 30)))
    leaving = [uid for uid, pod in linked.items() if pod == 1]
    await write_record(redis_client, 1, "SHUTDOWN")
    await wait_for_log(proxy, status_line(1, "shutdown"))
    moved_to = pods_of(await call_all(client, proxy, leaving))

    await write_record(redis_client, 1, "READY")
    await wait_for_log(proxy, f"{status_line(1, 'ready')} (was shutdown)")
    after = await call_all(client, proxy, leaving)
    newcomers = await call_all(client, proxy, uids("new", 30))

    assert statuses_of(after) == {200}
    assert pods_of(after) == moved_to
    links = {uid: await redis_client.get(link_key(uid)) for uid in leaving}
    assert links == {uid: str(pod) for uid, pod in moved_to.items()}
    assert {uid: len(moved_lines(proxy, uid)) for uid in leaving} == dict.fromkeys(
        leaving, 1
    )
    # The recovered pod is routable again for users without a link.
    assert 1 in set(pods_of(newcomers).values())


@pytest.mark.parametrize("reason", ["shutdown", "stale"])
async def test_concurrent_requests_relink_once(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    publisher: Publisher,
    client: aiohttp.ClientSession,
    reason: str,
) -> None:
    if reason == "stale":
        for index in range(POD_COUNT):
            await publisher.publish(index)
        document = state_document(
            pods, redis_url, require_pod_state=True, state_stale_after_s=1.0
        )
    else:
        document = state_document(pods, redis_url)
    proxies = [await launch(document), await launch(document)]
    linked = [
        await request_json(client, f"{proxy.url}/", routing_headers("crowd"))
        for proxy in proxies
    ]
    old_pod = linked[0].body["pod"]
    assert linked[1].body["pod"] == old_pod

    if reason == "stale":
        publisher.stop(old_pod)
    else:
        await write_record(redis_client, old_pod, "SHUTDOWN")
    for proxy in proxies:
        await wait_for_log(proxy, status_line(old_pod, reason))
    replies = await send_at_once(
        [proxy.port for proxy in proxies for _ in range(10)], "crowd"
    )

    assert {status for status, _ in replies} == {200}
    new_pods = {body["pod"] for _, body in replies}
    assert len(new_pods) == 1
    [new_pod] = new_pods
    assert new_pod != old_pod
    assert await redis_client.get(link_key("crowd")) == str(new_pod)
    moves = [line for proxy in proxies for line in moved_lines(proxy, "crowd")]
    assert len(moves) == 1
    assert f"from pod={old_pod} ({reason}) to pod={new_pod}" in moves[0]


# Stale and missing records.


async def test_stale_record_makes_pod_unavailable(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    publisher: Publisher,
    client: aiohttp.ClientSession,
) -> None:
    await publisher.publish(0)
    await publisher.publish(2)
    await write_record(redis_client, 1, "READY", age_s=10.0)
    proxy = await launch(state_document(pods, redis_url, state_stale_after_s=2.0))

    while_stale = await call_all(client, proxy, uids("early", 60))
    await publisher.publish(1)
    await wait_for_log(proxy, f"{status_line(1, 'ready')} (was stale)")
    when_fresh = await call_all(client, proxy, uids("late", 60))

    assert statuses_of(while_stale) == {200}
    assert Counter(pods_of(while_stale).values())[1] == 0
    assert statuses_of(when_fresh) == {200}
    assert Counter(pods_of(when_fresh).values())[1] > 0


async def test_required_record_missing_gets_nobody(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    publisher: Publisher,
    client: aiohttp.ClientSession,
) -> None:
    await publisher.publish(0)
    await publisher.publish(2)
    document = state_document(
        pods, redis_url, require_pod_state=True, state_stale_after_s=2.0
    )
    proxy = await launch(document)

    replies = await call_all(client, proxy, uids("new", 60))

    placed = Counter(pods_of(replies).values())
    assert statuses_of(replies) == {200}
    assert placed[1] == 0
    assert sorted(placed) == [0, 2]


async def test_optional_record_missing_gets_users(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    publisher: Publisher,
    client: aiohttp.ClientSession,
) -> None:
    await publisher.publish(0)
    await publisher.publish(2)
    document = state_document(
        pods, redis_url, require_pod_state=False, state_stale_after_s=2.0
    )
    proxy = await launch(document)

    replies = await call_all(client, proxy, uids("new", 60))

    placed = Counter(pods_of(replies).values())
    assert statuses_of(replies) == {200}
    assert placed == {0: 20, 1: 20, 2: 20}


# Balancing on published loads.


async def test_lowest_load_uses_window_only(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    for index, load in enumerate((900, 100, 550)):
        await write_record(redis_client, index, "READY", load=load)
    document = state_document(pods, redis_url, strategy="lowest_load", load_range=500)
    proxy = await launch(document)

    replies = await call_all(client, proxy, uids("new", 60))

    placed = Counter(pods_of(replies).values())
    assert statuses_of(replies) == {200}
    assert placed[0] == 0
    assert placed[1] > 0
    assert placed[2] > 0
    assert placed[1] + placed[2] == 60


# Registry discovery: the pods are the records.


def registry_document(redis_url: str) -> Document:
    return state_document(
        [],
        redis_url,
        pods=None,
        discovery="registry",
        state_stale_after_s=2.0,
    )


async def publish_addresses(publisher: Publisher, pods: list[PodProcess]) -> None:
    for pod in pods:
        await publisher.publish(pod.index, address=pod.address)


async def test_registry_routes_to_published_pods(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    publisher: Publisher,
    client: aiohttp.ClientSession,
) -> None:
    await publish_addresses(publisher, pods)
    proxy = await launch(registry_document(redis_url))

    replies = await call_all(client, proxy, uids("new", 30))

    assert statuses_of(replies) == {200}
    assert sorted(set(pods_of(replies).values())) == [0, 1, 2]
    mismatched = [
        uid
        for uid, reply in replies.items()
        if reply.headers.get("X-Routed-Pod") != str(reply.body["pod"])
    ]
    assert mismatched == []


async def test_unpublished_pod_leaves_registry(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    publisher: Publisher,
    client: aiohttp.ClientSession,
) -> None:
    await publish_addresses(publisher, pods)
    proxy = await launch(registry_document(redis_url))
    linked = pods_of(await call_all(client, proxy, uids("early", 30)))
    leaving = [uid for uid, pod in linked.items() if pod == 2]

    publisher.stop(2)
    await wait_for_log(
        proxy, f"pod=2 service={SERVICE} namespace={NAMESPACE} left the pod set"
    )
    moved = await call_all(client, proxy, leaving)
    newcomers = await call_all(client, proxy, uids("new", 60))

    assert statuses_of(moved) == {200}
    assert [pod for pod in pods_of(moved).values() if pod == 2] == []
    reasons = {
        pod_headers(reply.body).get("X-Route-Reason") for reply in moved.values()
    }
    assert reasons == {"missing"}
    assert statuses_of(newcomers) == {200}
    assert Counter(pods_of(newcomers).values())[2] == 0


@pytest.mark.parametrize(
    "request_line",
    [
        "GET http://evil.example/steal HTTP/1.1",
        f"GET http://{LOOPBACK}:6379/ HTTP/1.1",
        "CONNECT evil.example:443 HTTP/1.1",
    ],
    ids=["absolute-form", "absolute-form-loopback", "authority-form"],
)
async def test_registry_rejects_client_named_target(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    publisher: Publisher,
    request_line: str,
) -> None:
    await publish_addresses(publisher, pods)
    proxy = await launch(registry_document(redis_url))
    head = (
        f"{request_line}\r\n"
        "Host: evil.example\r\n"
        "X-Uid: intruder\r\n"
        f"X-Service: {SERVICE}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )

    status, _, body = await raw_request(proxy.port, head)

    assert status == 400
    assert json.loads(body)["error"] == "invalid_target"


async def test_host_header_cannot_pick_pod(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    publisher: Publisher,
) -> None:
    await publish_addresses(publisher, pods)
    proxy = await launch(registry_document(redis_url))
    head = (
        "GET /where HTTP/1.1\r\n"
        "Host: evil.example\r\n"
        "X-Uid: visitor\r\n"
        f"X-Service: {SERVICE}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )

    status, headers, body = await raw_request(proxy.port, head)

    reply = json.loads(body)
    assert status == 200
    assert reply["pod"] in range(POD_COUNT)
    assert headers.get("X-Routed-Pod") == str(reply["pod"])
    assert reply["path"] == "/where"


async def test_registry_serves_listed_namespaces_only(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    publisher: Publisher,
    client: aiohttp.ClientSession,
) -> None:
    await publish_addresses(publisher, pods)
    document = registry_document(redis_url)
    document["services"][SERVICE]["namespaces"] = [NAMESPACE]
    proxy = await launch(document)

    listed = await request_json(
        client, f"{proxy.url}/", routing_headers("local", namespace=NAMESPACE)
    )
    other = await request_json(
        client, f"{proxy.url}/", routing_headers("remote", namespace="elsewhere")
    )

    assert listed.status == 200
    assert listed.body["pod"] in range(POD_COUNT)
    assert other.status == 404
    assert other.body["error"] == "unknown_namespace"


# The pod role: publishing and draining.


async def test_sidecar_publishes_ready_on_start(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
) -> None:
    document = sidecar_document(pods[0], redis_url)
    await launch(document)

    state = await read_record(redis_client, 1)

    assert state is not None
    assert state.routing is Routing.READY
    assert state.address == document["pod"]["advertise_address"]
    assert abs(now_ms() - state.updated_ms) < 5_000


async def test_sidecar_republishes_every_period(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
) -> None:
    await launch(sidecar_document(pods[0], redis_url))
    updates: list[int] = []

    deadline = time.monotonic() + 4 * PUBLISH_PERIOD_S + 2.0
    while len(updates) < 3 and time.monotonic() < deadline:
        state = await read_record(redis_client, 1)
        if state is not None and (not updates or state.updated_ms != updates[-1]):
            updates.append(state.updated_ms)
        await asyncio.sleep(POLL_S)

    assert len(updates) == 3
    gaps_ms = [later - earlier for earlier, later in itertools.pairwise(updates)]
    assert min(gaps_ms) >= 0.8 * PUBLISH_PERIOD_S * 1000
    assert max(gaps_ms) <= 3 * PUBLISH_PERIOD_S * 1000


async def test_sidecar_relays_inbound_to_app(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    document = sidecar_document(pods[2], redis_url)
    await launch(document)
    inbound = f"http://{LOOPBACK}:{document['pod']['port']}"

    reply = await request_json(client, f"{inbound}/hello?x=1", {"X-Uid": "guest"})

    assert reply.status == 200
    assert reply.body["pod"] == 2
    assert reply.body["path"] == "/hello?x=1"
    assert reply.body["uid"] == "guest"


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [((), "127.0.0.1"), (("127.0.0.0/8",), "203.0.113.7, 127.0.0.1")],
    ids=["untrusted-router", "trusted-router"],
)
async def test_sidecar_forwarded_for_follows_trust(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    client: aiohttp.ClientSession,
    trusted: tuple[str, ...],
    expected: str,
) -> None:
    document = sidecar_document(pods[2], redis_url, trusted_proxies=list(trusted))
    await launch(document)
    inbound = f"http://{LOOPBACK}:{document['pod']['port']}"
    headers = {"X-Uid": "guest", "X-Forwarded-For": "203.0.113.7"}

    reply = await request_json(client, f"{inbound}/where", headers)

    assert reply.status == 200
    assert pod_headers(reply.body).getall("X-Forwarded-For") == [expected]


async def test_pod_zero_publishes_workload(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
) -> None:
    await write_record(redis_client, 1, "DENY_NEW_CALL", load=30)
    await launch(sidecar_document(pods[0], redis_url, index=0))

    text = await redis_client.get(WORKLOAD_KEY)

    assert text is not None
    workload = Workload.decode(text)
    assert workload.pods == 2
    assert workload.ready == 1
    assert workload.load >= 30
    assert abs(now_ms() - workload.updated_ms) < 5_000


async def test_other_pods_skip_workload(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
) -> None:
    await launch(sidecar_document(pods[0], redis_url, index=1))

    assert await read_record(redis_client, 1) is not None
    assert await redis_client.get(WORKLOAD_KEY) is None


async def test_index_defaults_to_pod_name(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAME", "game-2")
    await launch(sidecar_document(pods[0], redis_url, index=None))

    fields = await redis_client.hkeys(STATE_KEY)

    assert fields == ["2"]


async def test_sigterm_drains_then_shuts_down(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    document = sidecar_document(pods[0], redis_url, drain_s=DRAIN_S)
    sidecar = await launch(document)
    inbound = f"http://{LOOPBACK}:{document['pod']['port']}"
    slow = asyncio.create_task(request_json(client, f"{inbound}/slow?ms=1000", {}))
    assert await wait_for_in_flight(client, sidecar)

    signalled = time.monotonic()
    sidecar.process.send_signal(signal.SIGTERM)
    draining = await wait_for_record(
        redis_client, 1, lambda state: state.routing is not Routing.READY
    )
    during_drain = await request_json(client, f"{inbound}/during", {})
    shut_down = await wait_for_record(
        redis_client, 1, lambda state: state.routing is Routing.SHUTDOWN
    )
    shut_down_after_s = time.monotonic() - signalled
    reply = await slow
    exit_code = await asyncio.to_thread(sidecar.process.wait, 10.0)

    assert draining is not None
    assert draining.routing is Routing.DENY_NEW_CALL
    assert during_drain.status == 200
    assert shut_down is not None
    assert shut_down.updated_ms > draining.updated_ms
    assert 0.8 * DRAIN_S <= shut_down_after_s <= DRAIN_S + 2.0
    assert reply.status == 200
    assert reply.body["path"] == "/slow?ms=1000"
    assert exit_code == 0


async def test_reported_load_is_published(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await launch(sidecar_document(pods[0], redis_url))

    async with client.put(
        f"{sidecar.admin_url}/v1/pod/state", json={"load": -77}
    ) as response:
        status = response.status
    state = await wait_for_record(redis_client, 1, lambda state: state.load == -77)
    later = await wait_for_record(
        redis_client,
        1,
        lambda later: state is not None and later.updated_ms > state.updated_ms,
    )

    assert status == 200
    assert state is not None
    assert state.routing is Routing.READY
    assert later is not None
    assert later.load == -77


async def test_reported_drain_is_published(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await launch(sidecar_document(pods[0], redis_url))

    async with client.put(
        f"{sidecar.admin_url}/v1/pod/state", json={"routing": "DENY_NEW_CALL"}
    ) as response:
        status = response.status
    state = await read_record(redis_client, 1)

    assert status == 200
    assert state is not None
    assert state.routing is Routing.DENY_NEW_CALL
    assert state.drained_by is None


async def test_sidecar_keeps_admin_drain(
    launch: Launch,
    pods: list[PodProcess],
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    await launch(sidecar_document(pods[1], redis_url, index=1))
    router = await launch(state_document(pods, redis_url, require_pod_state=False))

    # A record written after the admin API returned is the sidecar's own,
    # whether the API rewrote the record or deleted it.
    drained = await set_routing_by_admin(client, router, 1, "drain")
    drained_ms = now_ms()
    after_drain = await wait_for_record(
        redis_client, 1, lambda state: state.updated_ms > drained_ms
    )
    undrained = await set_routing_by_admin(client, router, 1, "undrain")
    undrained_ms = now_ms()
    ready = await wait_for_record(
        redis_client, 1, lambda state: state.updated_ms > undrained_ms
    )

    assert drained.status == 200
    assert after_drain is not None
    assert after_drain.routing is Routing.DENY_NEW_CALL
    assert after_drain.drained_by == "admin"
    assert undrained.status == 200
    assert ready is not None
    assert ready.routing is Routing.READY
    assert ready.drained_by is None
