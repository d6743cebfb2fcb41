"""End-to-end tests: the ``stateful-route`` process in front of real pods.

Each test starts the command line as a subprocess with a configuration
generated in its temporary directory. The proxy forwards to pod processes
running ``tests/pod_app.py`` and keeps its links in a real redis-server.
Tests talk to it over loopback with aiohttp, or with a raw socket where the
exact bytes matter, and read links from Redis with a client of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from conftest import LOOPBACK, RedisServer, free_port, free_ports
from multidict import CIMultiDict
from pod_app import COOKIES, REDIRECT_LOCATION, pattern_bytes

from proxy.hashing import rank
from proxy.pods import Pod, parse_address

REPOSITORY = Path(__file__).resolve().parents[1]
POD_APP = Path(__file__).with_name("pod_app.py")
POD_COUNT = 3
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
RAW_TIMEOUT_S = 10.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
LINK_TTL_S = 60
FIVE_MB = 5 * 1024 * 1024

Document = dict[str, Any]
Launch = Callable[[Document], Awaitable["ProxyProcess"]]


# Processes.


def stop_process(
    process: subprocess.Popen[bytes], signal_number: int = signal.SIGTERM
) -> int:
    """Send a signal to a child process and kill it if it does not exit in time.

    Returns the exit code; a process that had already exited is only reaped.
    """
    if process.poll() is None:
        process.send_signal(signal_number)
        try:
            return process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(STOP_TIMEOUT_S)


def stop_pods(pods: list[PodProcess]) -> None:
    """Stop pod processes, signalling all of them before waiting for any."""
    for pod in pods:
        if pod.process.poll() is None:
            pod.process.terminate()
    for pod in pods:
        stop_process(pod.process)


def spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `command` with stdout and stderr appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPOSITORY,
        )


def log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:] or "(empty log)"


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class PodProcess:
    """One ``tests/pod_app.py`` process."""

    index: int
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def start_pods(count: int, directory: Path) -> list[PodProcess]:
    """Start `count` pod processes on free ports and wait until they listen."""
    pods: list[PodProcess] = []
    try:
        for index in range(count):
            port = free_port()
            log_path = directory / f"pod-{index}.log"
            command = [sys.executable, str(POD_APP), "--index", str(index)]
            process = spawn([*command, "--port", str(port)], log_path)
            pods.append(PodProcess(index, port, process, log_path))

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


@dataclass
class ProxyProcess:
    """One ``stateful-route run`` process."""

    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def wait_until_healthy(
    admin_url: str, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    """Poll ``/healthz`` of the admin API until it returns 200."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"process exited with {process.returncode}: {log_tail(log_path)}"
                )
            try:
                async with session.get(f"{admin_url}/healthz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{admin_url}/healthz not ready within {READY_TIMEOUT_S} s: "
                    f"{log_tail(log_path)}"
                )
            await asyncio.sleep(0.05)


async def wait_until_refused(port: int, timeout_s: float) -> bool:
    """Return whether connections to `port` are refused within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.02)
    return False


async def wait_for_in_flight(
    client: aiohttp.ClientSession, proxy: ProxyProcess, timeout_s: float = 5.0
) -> bool:
    """Return whether the admin API counts a request in flight within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counters = await request_json(client, f"{proxy.admin_url}/v1/status", {})
        if counters.body["in_flight"] >= 1:
            return True
        await asyncio.sleep(0.02)
    return False


# Configuration.


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string.
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def toml_text(document: Document, prefix: str = "") -> str:
    """Format nested dicts as TOML, one table per dict."""
    lines: list[str] = []
    if prefix:
        lines.append(f"[{prefix}]")
    tables: list[tuple[str, Document]] = []
    for key, value in document.items():
        if isinstance(value, dict):
            tables.append((f"{prefix}.{key}" if prefix else key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    for name, table in tables:
        text += "\n" + toml_text(table, name)
    return text


def proxy_document(pods: list[PodProcess], redis_url: str) -> Document:
    """Return a configuration with services ``game`` and ``open`` on `pods`.

    The ports are set when the proxy starts. ``open`` accepts requests
    without a UID.
    """
    addresses = [pod.address for pod in pods]
    return {
        "proxy": {
            "host": LOOPBACK,
            "default_service": "",
            "shutdown_timeout_s": 5.0,
        },
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
            "game": {"pods": addresses, "read_timeout_s": 10.0},
            "open": {"pods": addresses, "allow_without_uid": True},
        },
    }


def write_config(directory: Path, document: Document, name: str) -> Path:
    path = directory / name
    path.write_text(toml_text(document))
    return path


async def start_proxy(directory: Path, document: Document, number: int) -> ProxyProcess:
    """Start ``stateful-route run`` on free ports and wait until it is healthy."""
    port, admin_port = free_ports(2)
    document["proxy"]["port"] = port
    document["admin"]["port"] = admin_port
    config_path = write_config(directory, document, f"proxy-{number}.toml")
    log_path = directory / f"proxy-{number}.log"
    command = [sys.executable, "-m", "proxy", "run", "--config", str(config_path)]
    process = spawn(command, log_path)
    proxy = ProxyProcess(process, port, admin_port, log_path)
    try:
        await wait_until_healthy(proxy.admin_url, process, log_path)
    except BaseException:
        stop_process(process)
        raise
    return proxy


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``stateful-route`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *arguments],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S + STOP_TIMEOUT_S,
        cwd=REPOSITORY,
        check=False,
    )


# HTTP helpers.


def routing_headers(
    uid: str | None, service: str = "game", namespace: str | None = None
) -> dict[str, str]:
    headers = {"X-Service": service}
    if uid is not None:
        headers["X-Uid"] = uid
    if namespace is not None:
        headers["X-Namespace"] = namespace
    return headers


@dataclass
class Reply:
    """A response of the proxy with its JSON body."""

    status: int
    headers: CIMultiDict[str]
    body: Any


async def request_json(
    client: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    method: str = "GET",
) -> Reply:
    async with client.request(
        method, url, headers=headers, allow_redirects=False
    ) as response:
        body = await response.json(content_type=None)
        return Reply(response.status, CIMultiDict(response.headers), body)


def pod_headers(body: Any) -> CIMultiDict[str]:
    """Return the request headers that the pod reported in an echo body."""
    return CIMultiDict((name, value) for name, value in body["headers"])


async def raw_request(port: int, head: str) -> tuple[int, CIMultiDict[str], bytes]:
    """Send `head` unchanged on a new connection and read the response."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(head.encode("latin-1"))
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()


async def read_response(
    reader: asyncio.StreamReader,
) -> tuple[int, CIMultiDict[str], bytes]:
    """Read one HTTP/1.1 response, framed by Content-Length or chunked."""
    async with asyncio.timeout(RAW_TIMEOUT_S):
        header_block = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = header_block.decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers.add(name, value.strip())
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = await read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers["Content-Length"]))
    return int(status_line.split()[1]), headers, body


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


# Fixtures.


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    """Pod processes shared by the tests of this module. No test stops them."""
    started = start_pods(POD_COUNT, tmp_path_factory.mktemp("pods"))
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture
def own_pods(tmp_path: Path) -> Iterator[list[PodProcess]]:
    """Pod processes of one test, which it may stop."""
    started = start_pods(POD_COUNT, tmp_path)
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
    """The configuration of a proxy on the shared pods and the shared Redis.

    It depends on `redis_client` for the FLUSHDB, so every test starts with
    no links.
    """
    return proxy_document(pods, redis_server.url)


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


# Sticky routing and links.


async def test_users_stick_and_spread_evenly(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)
    uids = [f"user-{number}" for number in range(200)]
    limit = asyncio.Semaphore(16)

    async def call(uid: str) -> Reply:
        async with limit:
            return await request_json(client, f"{proxy.url}/play", routing_headers(uid))

    rounds = [await asyncio.gather(*(call(uid) for uid in uids)) for _ in range(5)]

    replies = [reply for round_replies in rounds for reply in round_replies]
    assert {reply.status for reply in replies} == {200}
    mismatched = [
        reply.body
        for reply in replies
        if reply.headers.get("X-Routed-Pod") != str(reply.body["pod"])
    ]
    assert mismatched == []
    wrong_uid = [
        uid
        for uid, reply in zip(uids, rounds[0], strict=True)
        if reply.body["uid"] != uid
    ]
    assert wrong_uid == []

    pods_of_uid = {
        uid: {round_replies[position].body["pod"] for round_replies in rounds}
        for position, uid in enumerate(uids)
    }
    moved = {uid: pods for uid, pods in pods_of_uid.items() if len(pods) != 1}
    assert moved == {}

    first_pods = Counter(reply.body["pod"] for reply in rounds[0])
    assert sorted(first_pods) == [0, 1, 2]
    assert max(first_pods.values()) - min(first_pods.values()) <= 1


async def test_concurrent_first_requests_share_pod(
    launch_proxy: Launch,
    pods: list[PodProcess],
    private_redis_server: RedisServer,
) -> None:
    document = proxy_document(pods, private_redis_server.url)
    document["store"]["redis_timeout_s"] = 5.0
    proxy = await launch_proxy(document)
    head = (
        "GET /join HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{proxy.port}\r\n"
        "X-Uid: racer\r\n"
        "X-Service: game\r\n"
        "\r\n"
    ).encode()
    connections = [
        await asyncio.open_connection(LOOPBACK, proxy.port) for _ in range(20)
    ]

    # Redis is paused while the twenty requests arrive, so every one of them
    # reads "no link" before any of them writes one.
    try:
        private_redis_server.pause()
        try:
            for _, writer in connections:
                writer.write(head)
            await asyncio.sleep(0.3)
        finally:
            private_redis_server.resume()
        responses = await asyncio.gather(
            *(read_response(reader) for reader, _ in connections)
        )
    finally:
        for _, writer in connections:
            writer.close()
            await writer.wait_closed()

    assert [status for status, _, _ in responses] == [200] * 20
    reached = {json.loads(body)["pod"] for _, _, body in responses}
    assert len(reached) == 1
    inspector = redis.asyncio.from_url(private_redis_server.url, decode_responses=True)
    try:
        linked = await inspector.get("sf:{default:lk:racer}game")
    finally:
        await inspector.aclose()
    assert linked == str(reached.pop())


async def test_temporary_links_follow_key_layout(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    proxy = await launch_proxy(document)
    namespace = "eu-west"
    linked: dict[str, int] = {}
    for uid in ("alice", "bob", "carol", "dave"):
        headers = routing_headers(uid, namespace=namespace)
        reply = await request_json(client, f"{proxy.url}/", headers)
        assert reply.status == 200
        linked[uid] = reply.body["pod"]

    link_keys = {f"sf:{{{namespace}:lk:{uid}}}game" for uid in linked}
    index_keys = {f"sf:{{{namespace}:podlinks:game:{pod}}}" for pod in linked.values()}
    assert set(await redis_client.keys("*")) <= link_keys | index_keys
    assert set(await redis_client.keys("sf:{*:lk:*")) == link_keys
    for uid, pod in linked.items():
        key = f"sf:{{{namespace}:lk:{uid}}}game"
        assert await redis_client.get(key) == str(pod)
        ttl_ms = await redis_client.pttl(key)
        assert 0 < ttl_ms <= LINK_TTL_S * 1000
        assert await redis_client.exists(f"sf:{{{namespace}:lk:{uid}}}") == 0
        index_key = f"sf:{{{namespace}:podlinks:game:{pod}}}"
        assert await redis_client.zscore(index_key, uid) is not None


# Rejected requests.


async def test_missing_uid_gets_400(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)

    reply = await request_json(client, f"{proxy.url}/", routing_headers(None))

    assert reply.status == 400
    assert reply.body["error"] == "missing_uid"
    assert reply.body["header"] == "X-Uid"


@pytest.mark.parametrize(
    "uid",
    ["user{1}", "user}", "a" * 129, "two words"],
    ids=["open-brace", "close-brace", "129-characters", "space"],
)
async def test_invalid_uid_gets_400(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
    uid: str,
) -> None:
    proxy = await launch_proxy(document)

    reply = await request_json(client, f"{proxy.url}/", routing_headers(uid))

    assert reply.status == 400
    assert reply.body["error"] == "invalid_uid"
    assert reply.body["header"] == "X-Uid"
    assert await redis_client.dbsize() == 0


async def test_uid_of_128_characters_accepted(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)
    uid = "u" * 128

    reply = await request_json(client, f"{proxy.url}/", routing_headers(uid))

    assert reply.status == 200
    assert reply.body["uid"] == uid


async def test_unknown_service_gets_404(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)

    headers = routing_headers("alice", service="nope")
    reply = await request_json(client, f"{proxy.url}/", headers)

    assert reply.status == 404
    assert reply.body["error"] == "unknown_service"
    assert reply.body["value"] == "nope"
    assert "'nope'" in reply.body["message"]


async def test_uid_optional_service_creates_no_link(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    proxy = await launch_proxy(document)

    headers = routing_headers(None, service="open")
    reply = await request_json(client, f"{proxy.url}/anonymous", headers)

    assert reply.status == 200
    assert reply.body["pod"] in range(POD_COUNT)
    assert reply.body["uid"] is None
    assert await redis_client.dbsize() == 0


# Pod failures.


async def test_stopped_pod_without_retries_gives_502(
    launch_proxy: Launch,
    own_pods: list[PodProcess],
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    client: aiohttp.ClientSession,
) -> None:
    document = proxy_document(own_pods, redis_server.url)
    # Without the local cache every request reads its link from Redis.
    document["store"]["local_cache_ttl_s"] = 0.0
    # With retries on, a refused request moves to another pod instead
    # (tests/test_retry_e2e.py).
    document["services"]["game"]["retry_attempts"] = 0
    proxy = await launch_proxy(document)
    uids = [f"player-{number}" for number in range(12)]
    linked: dict[str, int] = {}
    for uid in uids:
        reply = await request_json(client, f"{proxy.url}/", routing_headers(uid))
        linked[uid] = reply.body["pod"]
    links_before = {
        key: await redis_client.get(key)
        for key in await redis_client.keys("sf:{*:lk:*")
    }

    stop_process(own_pods[1].process)
    replies = {
        uid: await request_json(client, f"{proxy.url}/", routing_headers(uid))
        for uid in uids
    }

    stopped_users = [uid for uid in uids if linked[uid] == 1]
    other_users = [uid for uid in uids if linked[uid] != 1]
    assert len(stopped_users) == 4
    assert [replies[uid].status for uid in stopped_users] == [502] * 4
    assert [replies[uid].body["pod"] for uid in stopped_users] == [1] * 4
    assert [replies[uid].status for uid in other_users] == [200] * 8
    assert [replies[uid].body["pod"] for uid in other_users] == [
        linked[uid] for uid in other_users
    ]
    links_after = {
        key: await redis_client.get(key)
        for key in await redis_client.keys("sf:{*:lk:*")
    }
    assert links_after == links_before


async def test_slow_pod_gives_504(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    document["services"]["game"]["read_timeout_s"] = 0.5
    proxy = await launch_proxy(document)
    headers = routing_headers("patient")
    linked = await request_json(client, f"{proxy.url}/", headers)

    started = time.monotonic()
    reply = await request_json(client, f"{proxy.url}/slow?ms=3000", headers)
    elapsed_s = time.monotonic() - started

    assert reply.status == 504
    assert reply.body["error"] == "pod_timeout"
    assert reply.body["pod"] == linked.body["pod"]
    assert elapsed_s < 2.5


# Bodies and response headers.


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upload_passes_byte_identical(
    launch_proxy: Launch,
    document: Document,
    client: aiohttp.ClientSession,
    framing: str,
) -> None:
    proxy = await launch_proxy(document)
    data = random.Random(7).randbytes(FIVE_MB)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    # A BytesIO body is sent with Content-Length, a generator chunked.
    body: io.BytesIO | AsyncIterator[bytes] = (
        io.BytesIO(data) if framing == "content-length" else pieces()
    )
    async with client.post(
        f"{proxy.url}/upload", data=body, headers=routing_headers("uploader")
    ) as response:
        status = response.status
        result = await response.json()

    assert status == 200
    assert result["length"] == FIVE_MB
    assert result["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_early_response_keeps_connection(
    launch_proxy: Launch, document: Document, framing: str
) -> None:
    # The pod's echo path responds without reading the body, while the rest
    # of the body is still on its way to the proxy.
    proxy = await launch_proxy(document)
    body = b"x" * 200_000
    if framing == "chunked":
        framing_header = "Transfer-Encoding: chunked"
        payload = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        framing_header = f"Content-Length: {len(body)}"
        payload = body
    post = (
        f"POST /echo HTTP/1.1\r\nHost: {LOOPBACK}\r\nX-Service: game\r\n"
        f"X-Uid: early\r\n{framing_header}\r\n\r\n"
    ).encode("latin-1")
    get = f"GET /after HTTP/1.1\r\nHost: {LOOPBACK}\r\nX-Service: game\r\n"
    get += "X-Uid: early\r\n\r\n"
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        half = len(payload) // 2
        writer.write(post + payload[:half])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(payload[half:])
        await writer.drain()
        status, _, _ = await read_response(reader)
        writer.write(get.encode("latin-1"))
        await writer.drain()
        second_status, _, second_body = await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()

    assert status == 200
    assert second_status == 200
    assert json.loads(second_body)["path"] == "/after"
    assert "unexpected error" not in proxy.log()


async def test_download_passes_byte_identical(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)

    async with client.get(
        f"{proxy.url}/download?size={FIVE_MB}", headers=routing_headers("downloader")
    ) as response:
        status = response.status
        content_length = response.headers.get("Content-Length")
        data = await response.read()

    assert status == 200
    assert content_length == str(FIVE_MB)
    assert len(data) == FIVE_MB
    assert (
        hashlib.sha256(data).digest() == hashlib.sha256(pattern_bytes(FIVE_MB)).digest()
    )


async def test_set_cookie_headers_keep_order(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)

    reply = await request_json(client, f"{proxy.url}/cookies", routing_headers("eater"))

    assert reply.status == 200
    assert reply.headers.getall("Set-Cookie") == list(COOKIES)


async def test_redirect_is_relayed_not_followed(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)

    async with client.get(
        f"{proxy.url}/redirect",
        headers=routing_headers("traveller"),
        allow_redirects=False,
    ) as response:
        status = response.status
        location = response.headers.get("Location")
        routed_pod = response.headers.get("X-Routed-Pod")

    assert status == 302
    assert location == REDIRECT_LOCATION
    assert routed_pod in {"0", "1", "2"}


# Request headers and targets.


async def test_pod_sees_forwarded_headers(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)
    headers = {
        **routing_headers("forwarded"),
        "X-Forwarded-For": "203.0.113.7",
        "Host": "game.example.test:8443",
    }

    reply = await request_json(client, f"{proxy.url}/where", headers)

    seen = pod_headers(reply.body)
    assert reply.status == 200
    # The test client is no trusted proxy, so its own value is replaced.
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.get("X-Forwarded-Proto") == "http"
    assert seen.get("X-Forwarded-Host") == "game.example.test:8443"


async def test_large_cookie_reaches_pod(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)
    # Beyond aiohttp's default of 8190 bytes, within the proxy's limits.
    cookie = "session=" + "c" * (30 * 1024)
    headers = {**routing_headers("cookie-eater"), "Cookie": cookie}

    reply = await request_json(client, f"{proxy.url}/cookie", headers)

    assert reply.status == 200
    assert pod_headers(reply.body).get("Cookie") == cookie


async def test_hop_by_hop_headers_not_forwarded(
    launch_proxy: Launch, document: Document
) -> None:
    proxy = await launch_proxy(document)
    hop_by_hop = {
        "Keep-Alive": "timeout=5",
        "X-Connection-Scoped": "1",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Proxy-Connection": "keep-alive",
    }
    head = (
        "GET /hop HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{proxy.port}\r\n"
        "X-Uid: hopper\r\n"
        "X-Service: game\r\n"
        "Connection: keep-alive, X-Connection-Scoped\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in hop_by_hop.items())
        + "X-End-To-End: kept\r\n"
        "\r\n"
    )

    status, _, body = await raw_request(proxy.port, head)

    seen = pod_headers(json.loads(body))
    assert status == 200
    assert [name for name in hop_by_hop if name in seen] == []
    assert "x-connection-scoped" not in seen.get("Connection", "").lower()
    assert seen.get("X-End-To-End") == "kept"


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/../c?x=%20&b=1&a=2",
        "/double//slash/./dot",
        "/semi;v=1/plus+sign?q=a+b&q=%2B&empty=",
        "/%7Euser/%E2%82%AC?%3D=%26",
    ],
    ids=["encoded-slash-dots", "double-slash", "semicolon-plus", "percent-escapes"],
)
async def test_raw_target_reaches_pod_unchanged(
    launch_proxy: Launch, document: Document, target: str
) -> None:
    proxy = await launch_proxy(document)
    head = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{proxy.port}\r\n"
        "X-Uid: walker\r\n"
        "X-Service: game\r\n"
        "\r\n"
    )

    status, _, body = await raw_request(proxy.port, head)

    assert status == 200
    assert json.loads(body)["path"] == target


# Process lifecycle.


async def test_unreachable_redis_fails_startup(
    pods: list[PodProcess], tmp_path: Path
) -> None:
    document = proxy_document(pods, f"redis://{LOOPBACK}:{free_port()}/0")
    document["proxy"]["port"], document["admin"]["port"] = free_ports(2)
    config_path = write_config(tmp_path, document, "proxy.toml")

    result = run_cli("run", "--config", str(config_path))

    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "store.redis_url" in result.stderr
    assert "Traceback" not in result.stderr


async def test_check_lists_each_problem(pods: list[PodProcess], tmp_path: Path) -> None:
    document = proxy_document(pods, "redis://127.0.0.1:6379/0")
    document["proxy"]["listen_port"] = 8080
    document["proxy"]["shutdown_timeout_s"] = "soon"
    document["store"]["redis_retries"] = 99
    config_path = write_config(tmp_path, document, "invalid.toml")

    result = run_cli("check", "--config", str(config_path))

    lines = result.stderr.splitlines()
    assert result.returncode == 2
    assert len(lines) == 3
    for key in ("proxy.listen_port", "proxy.shutdown_timeout_s", "store.redis_retries"):
        assert len([line for line in lines if key in line]) == 1, key


async def test_check_accepts_valid_config(
    pods: list[PodProcess], tmp_path: Path
) -> None:
    document = proxy_document(pods, "redis://127.0.0.1:6379/0")
    config_path = write_config(tmp_path, document, "valid.toml")

    result = run_cli("check", "--config", str(config_path))

    assert result.returncode == 0
    assert result.stderr == ""
    assert "valid" in result.stdout


async def test_sigterm_drains_in_flight_request(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)
    slow = asyncio.create_task(
        request_json(client, f"{proxy.url}/slow?ms=2000", routing_headers("lingerer"))
    )
    assert await wait_for_in_flight(client, proxy)

    proxy.process.send_signal(signal.SIGTERM)
    refused = await wait_until_refused(proxy.port, timeout_s=1.5)
    refused_while_draining = not slow.done()
    reply = await slow
    exit_code = await asyncio.to_thread(proxy.process.wait, STOP_TIMEOUT_S)

    assert refused
    assert refused_while_draining
    assert reply.status == 200
    assert reply.body["path"] == "/slow?ms=2000"
    assert exit_code == 0


async def test_shutdown_timeout_cancels_slow_request(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    document["proxy"]["shutdown_timeout_s"] = 0.5
    proxy = await launch_proxy(document)
    slow = asyncio.create_task(
        request_json(client, f"{proxy.url}/slow?ms=5000", routing_headers("overstayer"))
    )
    assert await wait_for_in_flight(client, proxy)

    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(proxy.process.wait, STOP_TIMEOUT_S)
    stop_s = time.monotonic() - started
    [outcome] = await asyncio.gather(slow, return_exceptions=True)

    assert exit_code == 0
    assert stop_s < 2.5
    assert isinstance(outcome, aiohttp.ClientError)


async def test_redis_outage_places_by_hash_logged_once(
    launch_proxy: Launch,
    pods: list[PodProcess],
    private_redis_server: RedisServer,
    client: aiohttp.ClientSession,
) -> None:
    document = proxy_document(pods, private_redis_server.url)
    document["store"]["redis_timeout_s"] = 0.3
    document["store"]["redis_connect_timeout_s"] = 0.3
    proxy = await launch_proxy(document)
    url = f"{proxy.url}/"
    cached = await request_json(client, url, routing_headers("regular"))
    assert cached.status == 200
    pod_list = [Pod(pod.index, parse_address(pod.address)) for pod in pods]
    newcomers = [f"newcomer-{number}" for number in range(5)]
    hashed = {uid: rank(uid, pod_list)[0].index for uid in newcomers}

    private_redis_server.stop()
    during = [
        await request_json(client, url, routing_headers(uid)) for uid in newcomers
    ]
    repeated = [
        await request_json(client, url, routing_headers(newcomers[0])) for _ in range(3)
    ]
    cached_during = await request_json(client, url, routing_headers("regular"))
    warnings = [line for line in proxy.log().splitlines() if "level=WARNING" in line]

    assert [reply.status for reply in during] == [200] * 5
    placed = {
        uid: reply.body["pod"] for uid, reply in zip(newcomers, during, strict=True)
    }
    assert placed == hashed
    assert [reply.body["pod"] for reply in repeated] == [hashed[newcomers[0]]] * 3
    assert cached_during.status == 200
    assert cached_during.body["pod"] == cached.body["pod"]
    assert len(warnings) == 1, warnings
    assert "unavailable" in warnings[0]

    private_redis_server.start()
    link = f"sf:{{default:lk:{newcomers[0]}}}game"
    linked: str | None = None
    async with redis.asyncio.from_url(
        private_redis_server.url, decode_responses=True
    ) as redis_client:
        deadline = time.monotonic() + 5
        while linked is None and time.monotonic() < deadline:
            recovered = await request_json(client, url, routing_headers(newcomers[0]))
            linked = await redis_client.get(link)
            if linked is None:
                await asyncio.sleep(0.1)
    after = [
        await request_json(client, url, routing_headers(f"returner-{number}"))
        for number in range(4)
    ]
    reachable = [line for line in proxy.log().splitlines() if "is reachable" in line]

    assert recovered.status == 200
    assert recovered.body["pod"] == hashed[newcomers[0]]
    assert linked == str(hashed[newcomers[0]])
    assert [reply.status for reply in after] == [200] * 4
    assert len(reachable) == 1, reachable
    assert "level=INFO" in reachable[0]


async def test_demo_keeps_users_sticky(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    port, admin_port = free_ports(2)
    log_path = tmp_path / "demo.log"
    command = [sys.executable, "-m", "proxy", "demo", "--port", str(port)]
    command += ["--pods", "3", "--admin-port", str(admin_port)]
    process = spawn(command, log_path)
    try:
        await wait_until_healthy(f"http://{LOOPBACK}:{admin_port}", process, log_path)
        url = f"http://{LOOPBACK}:{port}/hello"
        replies = {
            uid: [await request_json(client, url, {"X-Uid": uid}) for _ in range(4)]
            for uid in ("alice", "bob", "carol", "dave")
        }
        without_uid = await request_json(client, url, {})
        exit_code = stop_process(process, signal.SIGINT)
    finally:
        stop_process(process)

    statuses = {
        reply.status for uid_replies in replies.values() for reply in uid_replies
    }
    assert statuses == {200}
    pods_of_uid = {
        uid: {reply.body["pod"] for reply in uid_replies}
        for uid, uid_replies in replies.items()
    }
    moved = {uid: pods for uid, pods in pods_of_uid.items() if len(pods) != 1}
    assert moved == {}
    assert without_uid.status == 400
    assert without_uid.body["error"] == "missing_uid"
    assert exit_code == 0


# Logs.


async def test_access_log_has_one_line_per_request(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    document["log"] = {"access_log": True, "format": "json"}
    proxy = await launch_proxy(document)

    reply = await request_json(client, f"{proxy.url}/play?x=1", routing_headers("ann"))
    missing = await request_json(client, f"{proxy.url}/play", routing_headers(None))
    await asyncio.sleep(0.2)

    records = [json.loads(line) for line in proxy.log().splitlines() if line]
    access = [r["msg"] for r in records if r["logger"] == "stateful_route.access"]
    assert reply.status == 200
    assert missing.status == 400
    assert len(access) == 2
    assert access[0].startswith(
        f'method=GET path="/play?x=1" status=200 pod={reply.body["pod"]} uid=ann '
    )
    assert "status=400 pod=- uid=- " in access[1]


async def test_access_log_off_by_default(
    launch_proxy: Launch, document: Document, client: aiohttp.ClientSession
) -> None:
    proxy = await launch_proxy(document)

    reply = await request_json(client, f"{proxy.url}/", routing_headers("ann"))
    await asyncio.sleep(0.2)

    assert reply.status == 200
    assert "stateful_route.access" not in proxy.log()
