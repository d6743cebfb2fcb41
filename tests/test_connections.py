"""Tests of client connections that keep little while idle, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from conftest import LOOPBACK

from proxy import connections
from proxy.connections import (
    IdleSweepServer,
    OnDemandRequestHandler,
    ParkedConnection,
)

# Short enough for a test, long enough that a loaded machine responds to a
# request well within it.
KEEPALIVE_S = 1.0
# Four sweeps of one second each before an idle connection closes.
LONG_KEEPALIVE_S = 4.0
WAIT_S = 10.0


@dataclass
class Served:
    """A running server and the requests its handler saw."""

    server: IdleSweepServer
    port: int
    targets: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def handlers(self) -> list[OnDemandRequestHandler]:
        return [
            handler
            for handler in self.server.connections
            if isinstance(handler, OnDemandRequestHandler)
        ]


ServeFactory = Callable[..., Awaitable[Served]]
Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    runners: list[web.ServerRunner] = []

    async def start(keepalive_s: float = KEEPALIVE_S) -> Served:
        served: Served

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            served.targets.append(request.raw_path)
            served.bodies.append(await request.read())
            if request.raw_path == "/broken-stream":
                response = web.StreamResponse(headers={"Content-Length": "100"})
                await response.prepare(request)
                await response.write(b"0123456789")
                raise RuntimeError("the stream broke off")
            if request.raw_path == "/not-found":
                raise web.HTTPNotFound(text="no such page")
            if request.raw_path == "/timeout":
                raise TimeoutError("the handler gave up")
            if request.raw_path == "/error":
                raise RuntimeError("the handler failed")
            if request.raw_path == "/slow":
                try:
                    await asyncio.sleep(keepalive_s * 3)
                except asyncio.CancelledError:
                    served.cancelled.append(request.raw_path)
                    raise
            return web.Response(body=request.raw_path.encode())

        server = IdleSweepServer(
            handle, keepalive_timeout=keepalive_s, handler_cancellation=True
        )
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        served = Served(server, runner.addresses[0][1])
        return served

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def post(target: str, body: bytes) -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def read_body(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return await reader.readexactly(length)


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[Client]:
    """Open a client connection to `port`, and close it at the end."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(WAIT_S):
            return await reader.read(1024) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll `condition`, which server callbacks change, for up to `WAIT_S`."""
    async with asyncio.timeout(WAIT_S):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def parked(served: Served) -> list[ParkedConnection]:
    return list(served.server._parked)


async def test_idle_connection_parked_after_interval(
    serve: ServeFactory,
) -> None:
    served = await serve(keepalive_s=LONG_KEEPALIVE_S)
    async with connected(served.port) as (reader, writer):
        writer.write(get("/first"))
        assert await read_body(reader) == b"/first"
        [handler] = served.handlers()
        await wait_until(lambda: handler._task_handler is None)
        # The sweep parks the connection after a whole interval of idleness.
        await wait_until(lambda: not served.server.connections)

        [connection] = parked(served)
        assert connection.transport.get_protocol() is connection
        assert handler.transport is None
        assert handler._parser is None
        assert served.server.open_connections() == 1
        assert served.server.client_transports() == [connection.transport]
        writer.write(get("/second"))
        assert await read_body(reader) == b"/second"
        [second_handler] = served.handlers()
        assert second_handler is not handler
        assert not parked(served)
        assert connection.transport.get_protocol() is second_handler

    assert served.targets == ["/first", "/second"]


async def test_many_connections_park_at_once(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "PARK_AT_ONCE_CONNECTIONS", 1)
    # No sweep runs during the test, so only the end of a request parks.
    monkeypatch.setattr(connections, "MAX_SWEEP_INTERVAL_S", 60.0)
    served = await serve(keepalive_s=240.0)
    async with connected(served.port) as (reader, writer):
        for target in ["/first", "/second", "/third"]:
            writer.write(get(target))
            assert await read_body(reader) == target.encode()
            await wait_until(lambda: len(parked(served)) == 1)
            assert not served.server.connections

    assert served.targets == ["/first", "/second", "/third"]


async def test_drop_parser_at_once_below_parking(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "DROP_AT_ONCE_CONNECTIONS", 1)
    monkeypatch.setattr(connections, "MAX_SWEEP_INTERVAL_S", 60.0)
    served = await serve(keepalive_s=240.0)
    async with connected(served.port) as (reader, writer):
        writer.write(get("/first"))
        assert await read_body(reader) == b"/first"
        [handler] = served.handlers()
        await wait_until(lambda: handler._task_handler is None)

        assert handler._parser is None
        assert not parked(served)
        writer.write(get("/second"))
        assert await read_body(reader) == b"/second"
        assert served.handlers() == [handler]


async def park_one(served: Served, client: Client) -> ParkedConnection:
    """Send one request on `client` and return its connection once parked."""
    reader, writer = client
    writer.write(get("/first"))
    assert await read_body(reader) == b"/first"
    await wait_until(lambda: len(parked(served)) == 1)
    return parked(served)[0]


async def test_parked_connection_reads_pipelined_requests(
    serve: ServeFactory,
) -> None:
    served = await serve(keepalive_s=LONG_KEEPALIVE_S)
    async with connected(served.port) as (reader, writer):
        await park_one(served, (reader, writer))
        writer.write(get("/second") + post("/third", b"body") + get("/fourth"))
        answered = [await read_body(reader) for _ in range(3)]

    assert answered == [b"/second", b"/third", b"/fourth"]
    assert served.bodies == [b"", b"", b"body", b""]


async def test_parked_connection_reads_head_in_pieces(serve: ServeFactory) -> None:
    served = await serve(keepalive_s=LONG_KEEPALIVE_S)
    async with connected(served.port) as (reader, writer):
        await park_one(served, (reader, writer))
        request = post("/upload", b"0123456789")
        for start in range(0, len(request), 7):
            writer.write(request[start : start + 7])
            await writer.drain()
            await asyncio.sleep(0.01)
        assert await read_body(reader) == b"/upload"

    assert served.bodies[-1] == b"0123456789"


async def test_parked_connection_closed_after_keepalive(serve: ServeFactory) -> None:
    served = await serve()
    async with connected(served.port) as (reader, writer):
        writer.write(get("/only"))
        assert await read_body(reader) == b"/only"
        started = asyncio.get_running_loop().time()
        await wait_until(lambda: len(parked(served)) == 1)
        closed = await closed_by_peer(reader)
        idle_s = asyncio.get_running_loop().time() - started

    assert closed
    assert idle_s >= KEEPALIVE_S * 0.9
    await wait_until(lambda: served.server.open_connections() == 0)
    await wait_until(lambda: served.server._sweep_handle is None)


@pytest.mark.parametrize("ending", ["close", "half_close"])
async def test_client_ends_parked_connection(serve: ServeFactory, ending: str) -> None:
    served = await serve(keepalive_s=LONG_KEEPALIVE_S)
    reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
    try:
        await park_one(served, (reader, writer))
        if ending == "close":
            writer.close()
        else:
            writer.write_eof()
            # The server closes its side too.
            assert await closed_by_peer(reader)
        await wait_until(lambda: served.server.open_connections() == 0)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("step", ["pre_shutdown", "shutdown"])
async def test_shutdown_closes_parked_connection(
    serve: ServeFactory, step: str
) -> None:
    served = await serve(keepalive_s=60.0)
    async with connected(served.port) as (reader, writer):
        await park_one(served, (reader, writer))
        if step == "pre_shutdown":
            served.server.pre_shutdown()
        else:
            await served.server.shutdown(WAIT_S)
        closed = await closed_by_peer(reader)

    assert closed
    await wait_until(lambda: served.server.open_connections() == 0)


async def test_partial_pipelined_head_survives_idle(serve: ServeFactory) -> None:
    served = await serve(keepalive_s=LONG_KEEPALIVE_S)
    async with connected(served.port) as (reader, writer):
        second = get("/second")
        writer.write(get("/first") + second[:10])
        assert await read_body(reader) == b"/first"
        [handler] = served.handlers()
        await wait_until(lambda: handler._task_handler is None)
        # Two sweeps pass, and neither may park the connection or drop the
        # parser with its part of the second head.
        await asyncio.sleep(served.server.sweep_interval_s * 2.2)
        assert handler._parser is not None
        assert served.handlers() == [handler]
        assert not parked(served)

        writer.write(second[10:])
        assert await read_body(reader) == b"/second"

    assert served.targets == ["/first", "/second"]


async def test_body_split_over_reads_arrives_whole(serve: ServeFactory) -> None:
    served = await serve()
    async with connected(served.port) as (reader, writer):
        request = post("/upload", b"0123456789")
        writer.write(request[:-4])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(request[-4:] + get("/after"))
        assert await read_body(reader) == b"/upload"
        assert await read_body(reader) == b"/after"

    assert served.bodies == [b"0123456789", b""]


async def test_broken_stream_closes_connection(serve: ServeFactory) -> None:
    # Far beyond WAIT_S, so only the close after the error ends the read.
    served = await serve(keepalive_s=60.0)
    async with connected(served.port) as (reader, writer):
        writer.write(get("/broken-stream"))
        async with asyncio.timeout(WAIT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        # The client must see the response cut short, not wait for the rest.
        async with asyncio.timeout(WAIT_S):
            rest = await reader.read()

    assert head.startswith(b"HTTP/1.1 200 ")
    assert rest == b"0123456789"


async def test_pipelined_requests_answered_in_order(serve: ServeFactory) -> None:
    served = await serve()
    targets = [f"/pipelined-{number}" for number in range(40)]
    async with connected(served.port) as (reader, writer):
        writer.write(b"".join(get(target) for target in targets))
        answered = [(await read_body(reader)).decode() for _ in targets]

    assert answered == targets


async def test_idle_connection_closed_after_keepalive(serve: ServeFactory) -> None:
    served = await serve()
    async with connected(served.port) as (reader, writer):
        writer.write(get("/only"))
        assert await read_body(reader) == b"/only"
        started = asyncio.get_running_loop().time()
        closed = await closed_by_peer(reader)
        idle_s = asyncio.get_running_loop().time() - started

    assert closed
    # Closed no earlier than the timeout, measured from before the read.
    assert idle_s >= KEEPALIVE_S * 0.9


async def test_silent_connection_closed_after_keepalive(serve: ServeFactory) -> None:
    served = await serve()
    async with connected(served.port) as (reader, _):
        closed = await closed_by_peer(reader)

    assert closed
    await wait_until(lambda: not served.server.connections)


async def test_request_in_progress_outlives_keepalive(serve: ServeFactory) -> None:
    served = await serve()
    async with connected(served.port) as (reader, writer):
        writer.write(get("/slow"))
        body = await read_body(reader)

    assert body == b"/slow"
    assert served.cancelled == []


async def test_client_gone_cancels_handler(serve: ServeFactory) -> None:
    served = await serve()
    _, writer = await asyncio.open_connection(LOOPBACK, served.port)
    writer.write(get("/slow"))
    await writer.drain()
    await wait_until(lambda: served.targets == ["/slow"])
    writer.close()
    await writer.wait_closed()

    await wait_until(lambda: served.cancelled == ["/slow"])
    await wait_until(lambda: not served.server.connections)


async def test_close_ends_idle_connection_at_once(serve: ServeFactory) -> None:
    served = await serve(keepalive_s=60.0)
    async with connected(served.port) as (reader, writer):
        writer.write(get("/first"))
        assert await read_body(reader) == b"/first"
        [handler] = served.handlers()
        await wait_until(lambda: handler._task_handler is None)
        served.server.pre_shutdown()
        closed = await closed_by_peer(reader)

    assert closed


async def test_close_lets_request_in_progress_finish(serve: ServeFactory) -> None:
    served = await serve(keepalive_s=0.3)
    async with connected(served.port) as (reader, writer):
        writer.write(get("/slow"))
        await wait_until(lambda: served.targets == ["/slow"])
        served.server.pre_shutdown()
        body = await read_body(reader)
        closed = await closed_by_peer(reader)

    assert body == b"/slow"
    assert closed


async def test_close_lets_request_body_arrive(serve: ServeFactory) -> None:
    served = await serve(keepalive_s=60.0)
    async with connected(served.port) as (reader, writer):
        request = post("/upload", b"0123456789")
        writer.write(request[:-4])
        await writer.drain()
        await wait_until(lambda: served.targets == ["/upload"])
        served.server.pre_shutdown()
        writer.write(request[-4:])
        await writer.drain()
        body = await read_body(reader)
        closed = await closed_by_peer(reader)

    assert body == b"/upload"
    assert served.bodies == [b"0123456789"]
    assert closed


async def test_sweep_stops_without_connections(serve: ServeFactory) -> None:
    served = await serve(keepalive_s=0.2)
    async with connected(served.port) as (reader, writer):
        writer.write(get("/only"))
        assert await read_body(reader) == b"/only"
        assert served.server._sweep_handle is not None

    await wait_until(lambda: not served.server.connections)
    await wait_until(lambda: served.server._sweep_handle is None)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Return the status line and the body of one response with a length."""
    async with asyncio.timeout(WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return head.split(b"\r\n", 1)[0], await reader.readexactly(length)


@pytest.mark.parametrize(
    ("target", "status_line", "body_part"),
    [
        ("/not-found", b"HTTP/1.1 404 Not Found", b"no such page"),
        # aiohttp's handle_error sends a 504 without a body.
        ("/timeout", b"HTTP/1.1 504 Gateway Timeout", b""),
        ("/error", b"HTTP/1.1 500 Internal Server Error", b"500"),
    ],
)
async def test_handler_exception_gives_error_response(
    serve: ServeFactory, target: str, status_line: bytes, body_part: bytes
) -> None:
    served = await serve()
    async with connected(served.port) as (reader, writer):
        writer.write(get(target))
        status, body = await read_response(reader)

    assert status == status_line
    assert body_part in body


async def test_shutdown_waits_for_response_in_progress(serve: ServeFactory) -> None:
    served = await serve(keepalive_s=0.3)
    async with connected(served.port) as (reader, writer):
        writer.write(get("/slow"))
        await wait_until(lambda: served.targets == ["/slow"])
        [handler] = served.handlers()
        assert handler._request_in_progress
        await served.server.shutdown(WAIT_S)
        body = await read_body(reader)

    assert body == b"/slow"
    assert served.cancelled == []
    assert not handler._request_in_progress


async def test_empty_lines_do_not_renew_keepalive(serve: ServeFactory) -> None:
    served = await serve()
    loop = asyncio.get_running_loop()
    async with connected(served.port) as (reader, writer):
        writer.write(get("/only"))
        assert await read_body(reader) == b"/only"
        started = loop.time()
        # Empty lines start no request, so the connection stays idle since
        # its response, parked or not, and closes at its deadline.
        closed = False
        while not closed and loop.time() - started < KEEPALIVE_S * 4:
            try:
                writer.write(b"\r\n\r\n")
                await writer.drain()
                async with asyncio.timeout(KEEPALIVE_S * 0.4):
                    closed = await reader.read(1024) == b""
            except TimeoutError:
                pass
            except ConnectionError:
                closed = True

    assert closed
