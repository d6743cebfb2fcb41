"""Tests of the batch-accepting site of the proxy ports, over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from conftest import LOOPBACK

from proxy import listener
from proxy.connections import IdleSweepServer
from proxy.listener import BatchAcceptSite

BURST = 300


async def hello(request: web.BaseRequest) -> web.Response:
    return web.Response(body=b"hello")


@pytest.fixture
async def runner() -> AsyncIterator[web.ServerRunner]:
    server_runner = web.ServerRunner(web.Server(hello), handle_signals=False)
    await server_runner.setup()
    try:
        yield server_runner
    finally:
        await server_runner.cleanup()


async def get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        return await reader.readexactly(5)
    finally:
        writer.close()
        await writer.wait_closed()


def bound_port(runner: web.ServerRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


async def test_site_serves_on_free_port(runner: web.ServerRunner) -> None:
    site = BatchAcceptSite(runner, LOOPBACK, 0, backlog=128)
    await site.start()
    port = bound_port(runner)

    assert port != 0
    assert await get(port) == b"hello"


async def test_site_accepts_burst_beyond_batch(
    runner: web.ServerRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ten connections per readiness event, so the burst needs many events.
    monkeypatch.setattr(listener, "ACCEPT_BATCH", 10)
    site = BatchAcceptSite(runner, LOOPBACK, 0, backlog=BURST)
    await site.start()
    port = bound_port(runner)

    async with asyncio.timeout(30.0):
        bodies = await asyncio.gather(*(get(port) for _ in range(BURST)))

    assert bodies == [b"hello"] * BURST


async def test_site_in_use_port_names_address(runner: web.ServerRunner) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        site = BatchAcceptSite(runner, LOOPBACK, port, backlog=128)

        with pytest.raises(OSError, match=rf"bind on address \('{LOOPBACK}', {port}\)"):
            await site.start()


async def test_stopped_site_refuses_connections(runner: web.ServerRunner) -> None:
    site = BatchAcceptSite(runner, LOOPBACK, 0, backlog=128)
    await site.start()
    port = bound_port(runner)
    await site.stop()

    with pytest.raises(ConnectionRefusedError):
        await get(port)


async def test_accepted_socket_gets_nodelay_and_keepalive() -> None:
    options: list[tuple[int, int]] = []

    async def record_options(request: web.BaseRequest) -> web.Response:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        options.append(
            (
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            )
        )
        return web.Response(body=b"hello")

    # A server whose handlers would set neither option themselves.
    server = IdleSweepServer(
        record_options, keepalive_timeout=5.0, socket_options_set=True
    )
    server_runner = web.ServerRunner(server, handle_signals=False)
    await server_runner.setup()
    try:
        site = BatchAcceptSite(server_runner, LOOPBACK, 0, backlog=128)
        await site.start()
        body = await get(bound_port(server_runner))
    finally:
        await server_runner.cleanup()

    assert body == b"hello"
    assert len(options) == 1
    nodelay, keepalive = options[0]
    assert nodelay != 0
    assert keepalive != 0


async def open_idle_connection(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Return a keep-alive connection that received one response and is idle."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(5) == b"hello"
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Return what the server sent before closing, b"" after a reset too."""
    try:
        async with asyncio.timeout(10.0):
            return await reader.read()
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("method", ["close_clients", "abort_clients"])
async def test_listener_closes_clients(runner: web.ServerRunner, method: str) -> None:
    site = BatchAcceptSite(runner, LOOPBACK, 0, backlog=128)
    await site.start()
    port = bound_port(runner)
    connections = [await open_idle_connection(port) for _ in range(3)]
    server = runner.server
    assert server is not None
    assert len(server.connections) == 3

    getattr(site._server, method)()

    for reader, writer in connections:
        assert await read_until_closed(reader) == b""
        writer.close()
    # The listening socket still accepts new connections.
    assert await get(port) == b"hello"


async def test_listener_closes_client_mid_request() -> None:
    started = asyncio.Event()

    async def stall(request: web.BaseRequest) -> web.Response:
        started.set()
        await asyncio.sleep(60.0)
        return web.Response(body=b"late")

    server = IdleSweepServer(stall, keepalive_timeout=5.0, handler_cancellation=True)
    server_runner = web.ServerRunner(server, handle_signals=False)
    await server_runner.setup()
    try:
        site = BatchAcceptSite(server_runner, LOOPBACK, 0, backlog=128)
        await site.start()
        reader, writer = await asyncio.open_connection(
            LOOPBACK, bound_port(server_runner)
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        async with asyncio.timeout(10.0):
            await started.wait()

        site._server.close_clients()

        received = await read_until_closed(reader)
        writer.close()
    finally:
        await server_runner.cleanup()

    assert received == b""


@pytest.mark.parametrize("method", ["close_clients", "abort_clients"])
async def test_listener_closes_parked_clients(method: str) -> None:
    server = IdleSweepServer(hello, keepalive_timeout=4.0)
    server_runner = web.ServerRunner(server, handle_signals=False)
    await server_runner.setup()
    try:
        site = BatchAcceptSite(server_runner, LOOPBACK, 0, backlog=128)
        await site.start()
        port = bound_port(server_runner)
        connections = [await open_idle_connection(port) for _ in range(3)]
        # Idle for a sweep interval, the connections leave their handlers.
        async with asyncio.timeout(10.0):
            while True:
                if not server.connections:
                    break
                await asyncio.sleep(0.05)
        assert server.open_connections() == 3

        getattr(site._server, method)()

        for reader, writer in connections:
            assert await read_until_closed(reader) == b""
            writer.close()
    finally:
        await server_runner.cleanup()
