"""End-to-end tests of WebSocket upgrades through ``stateful-route run``.

The proxy runs as a subprocess in front of one ``tests/ws_pod_app.py`` pod.
The tests use aiohttp's WebSocket client, and a raw socket where the exact
bytes of a refused upgrade matter.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import LOOPBACK, free_port
from test_e2e import (
    READY_TIMEOUT_S,
    Document,
    ProxyProcess,
    accepts_connections,
    log_tail,
    spawn,
    start_proxy,
    stop_process,
)
from test_upstream_e2e import close_client, read_framed

WS_POD = Path(__file__).with_name("ws_pod_app.py")
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
ROUTING = {"X-Uid": "talker", "X-Service": "chat"}


@pytest.fixture(scope="module")
def ws_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    directory = tmp_path_factory.mktemp("ws-pod")
    port = free_port()
    output = directory / "pod.log"
    process = spawn([sys.executable, str(WS_POD), "--port", str(port)], output)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not accepts_connections(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"WebSocket pod did not start: {log_tail(output)}")
            time.sleep(0.02)
        yield port
    finally:
        stop_process(process)


@pytest.fixture
async def proxy(tmp_path: Path, ws_pod: int) -> AsyncIterator[ProxyProcess]:
    document: Document = {
        "proxy": {"host": LOOPBACK, "shutdown_timeout_s": 2.0},
        "admin": {"host": LOOPBACK},
        "store": {"backend": "memory"},
        "log": {"level": "info"},
        # The short read timeout shows that a quiet WebSocket outlives it.
        "services": {"chat": {"pods": [f"{LOOPBACK}:{ws_pod}"], "read_timeout_s": 1.0}},
    }
    started = await start_proxy(tmp_path, document, 0)
    try:
        yield started
    finally:
        stop_process(started.process)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


async def test_websocket_frames_relayed_both_ways(
    proxy: ProxyProcess, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(
        f"{proxy.url}/ws", headers=ROUTING, protocols=("chat.v1",)
    ) as socket:
        protocol = socket.protocol
        replies = []
        for text in ("one", "two", "three"):
            await socket.send_str(text)
            replies.append(await socket.receive_str(timeout=5))
        await socket.send_bytes(b"\x00\xffbinary")
        binary = await socket.receive_bytes(timeout=5)

    assert protocol == "chat.v1"
    assert replies == ["echo:one", "echo:two", "echo:three"]
    assert binary == b"\x00\xffbinary"


async def test_websocket_close_code_and_reason_kept(
    proxy: ProxyProcess, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(f"{proxy.url}/ws", headers=ROUTING) as socket:
        await socket.send_str("close-me")
        message = await socket.receive(timeout=5)

    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == 4001
    assert message.extra == "bye"


async def test_quiet_websocket_outlives_read_timeout(
    proxy: ProxyProcess, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(
        f"{proxy.url}/ws", headers=ROUTING, autoping=False
    ) as socket:
        # Quiet for longer than the service's 1 s read timeout.
        await asyncio.sleep(1.5)
        await socket.send_str("still here")
        reply = await socket.receive_str(timeout=5)

    assert reply == "echo:still here"


async def requests_counted(
    client: aiohttp.ClientSession, proxy: ProxyProcess, line: str
) -> list[str]:
    """Return the lines of /metrics that start with `line`, once there are any."""
    metrics_url = f"http://{LOOPBACK}:{proxy.admin_port}/metrics"
    deadline = time.monotonic() + 5.0
    while True:
        async with client.get(metrics_url) as response:
            text = await response.text()
        counted = [row for row in text.splitlines() if row.startswith(line)]
        if counted or time.monotonic() > deadline:
            return counted
        await asyncio.sleep(0.05)


TUNNELS_COUNTED = (
    'stateful_route_requests_total{pod="0",service="chat",status_class="1xx"}'
)


async def test_closed_websocket_counted_as_1xx(
    proxy: ProxyProcess, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(f"{proxy.url}/ws", headers=ROUTING) as socket:
        await socket.send_str("one")
        await socket.receive_str(timeout=5)

    counted = await requests_counted(client, proxy, TUNNELS_COUNTED)

    assert counted == [f"{TUNNELS_COUNTED} 1.0"]


async def test_dropped_websocket_counted_as_1xx(
    proxy: ProxyProcess, client: aiohttp.ClientSession
) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: chat\r\nX-Uid: dropper\r\n"
        b"X-Service: chat\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    # The client drops the connection without a close frame, so the pod
    # keeps its side open and the proxy's handler is cancelled.
    writer.transport.abort()

    counted = await requests_counted(client, proxy, TUNNELS_COUNTED)

    assert head.startswith(b"HTTP/1.1 101 ")
    assert counted == [f"{TUNNELS_COUNTED} 1.0"]


def upgrade_head(path: str, version: str, connection: str) -> bytes:
    """Return the head of a WebSocket upgrade request routed to the pod."""
    return (
        f"GET {path} {version}\r\n"
        f"Host: {LOOPBACK}\r\n"
        "X-Uid: talker\r\n"
        "X-Service: chat\r\n"
        f"Connection: {connection}\r\n"
        "Upgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "\r\n"
    ).encode("latin-1")


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [("/ws-denied", 401, b"no ticket"), ("/ws-missing", 404, b"404: Not Found")],
)
async def test_refused_upgrade_stays_http(
    proxy: ProxyProcess, path: str, status: int, body: bytes
) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        writer.write(upgrade_head(path, "HTTP/1.1", "Upgrade"))
        await writer.drain()
        refused = await read_framed(reader)
        writer.write(
            f"GET /plain HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
            "X-Uid: talker\r\nX-Service: chat\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        after = await read_framed(reader)
    finally:
        await close_client(writer)

    assert refused.status == status
    assert refused.body.startswith(body)
    assert "Upgrade" not in refused.headers
    assert after.status == 200
    assert after.body == b"plain"


async def test_http10_upgrade_ignored(proxy: ProxyProcess) -> None:
    # RFC 9110 section 7.8: a server ignores Upgrade in an HTTP/1.0 request,
    # so the pod gets a plain GET, and the connection serves the next one.
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        writer.write(upgrade_head("/ws", "HTTP/1.0", "Upgrade, keep-alive"))
        await writer.drain()
        ignored = await read_framed(reader)
        writer.write(
            f"GET /plain HTTP/1.0\r\nHost: {LOOPBACK}\r\n"
            "X-Uid: talker\r\nX-Service: chat\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        after = await asyncio.wait_for(reader.read(), 10)
    finally:
        await close_client(writer)

    assert ignored.status == 400
    assert ignored.body.startswith(b"No WebSocket UPGRADE hdr")
    assert "Upgrade" not in ignored.headers
    assert after.startswith(b"HTTP/1.0 200 ")
    assert after.endswith(b"\r\n\r\nplain")
