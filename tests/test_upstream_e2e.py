"""End-to-end tests of the response side: how pod responses reach the client.

Each test starts ``stateful-route run`` as a subprocess in front of one
``tests/scripted_pod.py`` process, whose scripts write exact response bytes,
pause, close or reset. Clients are raw sockets, so the tests see the exact
framing the proxy sends, or aiohttp where the point is what an HTTP library
reports. Service ``game`` has a read timeout of 5 s and ``quick`` of 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import LOOPBACK, free_port
from multidict import CIMultiDict
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

SCRIPTED_POD = Path(__file__).with_name("scripted_pod.py")
RAW_TIMEOUT_S = 10.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)


class PodLog:
    """The events that the scripted pod process appended to its log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self, marker: str) -> list[dict[str, Any]]:
        """Return the events of requests whose target contains `marker`."""
        if not self.path.exists():
            return []
        events = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [event for event in events if marker in event["target"]]


@pytest.fixture(scope="module")
def scripted_pod(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, PodLog]]:
    directory = tmp_path_factory.mktemp("scripted")
    port = free_port()
    log = PodLog(directory / "events.jsonl")
    command = [sys.executable, str(SCRIPTED_POD), "--port", str(port)]
    output = directory / "pod.log"
    process = spawn([*command, "--log", str(log.path)], output)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not accepts_connections(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"scripted pod did not start: {log_tail(output)}")
            time.sleep(0.02)
        yield port, log
    finally:
        stop_process(process)


@pytest.fixture
async def proxy(
    tmp_path: Path, scripted_pod: tuple[int, PodLog]
) -> AsyncIterator[ProxyProcess]:
    address = f"{LOOPBACK}:{scripted_pod[0]}"
    document: Document = {
        "proxy": {"host": LOOPBACK, "shutdown_timeout_s": 2.0},
        "admin": {"host": LOOPBACK},
        "store": {"backend": "memory"},
        "log": {"level": "info"},
        "services": {
            "game": {"pods": [address], "read_timeout_s": 5.0},
            "quick": {"pods": [address], "read_timeout_s": 1.0},
        },
    }
    started = await start_proxy(tmp_path, document, 0)
    try:
        yield started
    finally:
        stop_process(started.process)


@pytest.fixture
def pod_log(scripted_pod: tuple[int, PodLog]) -> PodLog:
    return scripted_pod[1]


def request_head(
    target: str,
    *,
    method: str = "GET",
    version: str = "1.1",
    service: str = "game",
    extra: str = "",
) -> bytes:
    return (
        f"{method} {target} HTTP/{version}\r\n"
        f"Host: {LOOPBACK}\r\n"
        "X-Uid: reader\r\n"
        f"X-Service: {service}\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")


class RawResponse:
    """One response as the client received it."""

    def __init__(self, status_line: str, headers: CIMultiDict[str], body: bytes):
        self.status_line = status_line
        self.status = int(status_line.split()[1])
        self.headers = headers
        self.body = body


async def read_head(reader: asyncio.StreamReader) -> tuple[str, CIMultiDict[str]]:
    block = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = block.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.add(name, value.strip())
    return status_line, headers


async def read_framed(
    reader: asyncio.StreamReader, *, bodyless: bool = False
) -> RawResponse:
    """Read one response by its own framing; `bodyless` for HEAD, 204 and 304."""
    async with asyncio.timeout(RAW_TIMEOUT_S):
        status_line, headers = await read_head(reader)
        if bodyless:
            body = b""
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += (await reader.readexactly(size + 2))[:-2]
        elif "Content-Length" in headers:
            body = await reader.readexactly(int(headers["Content-Length"]))
        else:
            body = await reader.read()
    return RawResponse(status_line, headers, body)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Return every byte until the proxy closes or aborts the connection."""
    data = b""
    async with asyncio.timeout(RAW_TIMEOUT_S):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def open_client(
    proxy: ProxyProcess,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # A line limit above the proxy's 64 KiB response heads, to which the
    # proxy adds its own headers.
    return await asyncio.open_connection(LOOPBACK, proxy.port, limit=1024 * 1024)


async def close_client(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def exchange(
    proxy: ProxyProcess, head: bytes, *, bodyless: bool = False
) -> RawResponse:
    """Send `head` on a new connection and read one framed response."""
    reader, writer = await open_client(proxy)
    try:
        writer.write(head)
        await writer.drain()
        return await read_framed(reader, bodyless=bodyless)
    finally:
        await close_client(writer)


# Exactly one framing per response.


async def test_pod_length_kept_without_chunking(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/length"))

    assert response.status == 200
    assert response.headers.getall("Content-Length") == ["5"]
    assert "Transfer-Encoding" not in response.headers
    assert response.body == b"hello"


async def test_no_content_type_or_server_added(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/bare"))

    assert response.status == 200
    assert "Content-Type" not in response.headers
    assert "Server" not in response.headers
    assert "Date" in response.headers
    assert response.body == b"ok"


async def test_pod_server_header_kept(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/with-server"))

    assert response.headers.getall("Server") == ["game/2"]


async def test_chunked_pod_body_chunked_without_length(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/chunked"))

    assert response.status == 200
    assert response.headers.getall("Transfer-Encoding") == ["chunked"]
    assert "Content-Length" not in response.headers
    assert response.body == b"hello world"


async def test_close_delimited_pod_body_chunked_to_http11(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/close-delimited"))

    assert response.headers.getall("Transfer-Encoding") == ["chunked"]
    assert "Content-Length" not in response.headers
    assert response.body == b"hello world"


@pytest.mark.parametrize("script", ["chunked", "close-delimited"])
async def test_http10_client_gets_no_chunked_coding(
    proxy: ProxyProcess, script: str
) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head(f"/{script}", version="1.0"))
        await writer.drain()
        raw = await read_until_closed(reader)
    finally:
        await close_client(writer)

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"hello world"


async def test_pod_date_kept_once(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/dated"))

    assert response.headers.getall("Date") == ["Tue, 01 Dec 2026 10:00:00 GMT"]
    assert response.body == b"ok"


async def test_pod_routed_header_replaced(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/routed-by-pod"))

    assert response.headers.getall("X-Routed-Pod") == ["0"]


async def test_pod_header_bytes_kept_exactly(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/raw-bytes"))
        await writer.drain()
        async with asyncio.timeout(RAW_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        await close_client(writer)

    assert b"\r\nX-Raw: caf\xe9\r\n" in head


async def test_pod_hop_by_hop_headers_dropped(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/hop-by-hop"))

    assert response.status == 200
    for name in (
        "Connection",
        "Keep-Alive",
        "X-Pod-Scoped",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "TE",
        "Trailer",
        "Upgrade",
    ):
        assert name not in response.headers
    assert response.headers.getall("X-End-To-End") == ["kept"]
    assert response.body == b"ok"


@pytest.mark.parametrize(
    ("script", "kept", "dropped"),
    [
        ("nginx-style", ["Server"], ["Connection"]),
        ("connection-twice", ["X-End-To-End"], ["Connection", "X-Pod-Scoped"]),
        ("connection-prefix", ["X-End-To-End"], ["Connection", "Keep-Alive-Ish"]),
        # The client's framing stays, or the next response would join the body.
        (
            "connection-content-length",
            ["X-End-To-End", "Content-Length"],
            ["Connection", "X-Pod-Scoped"],
        ),
    ],
)
async def test_pod_connection_header_dropped(
    proxy: ProxyProcess, script: str, kept: list[str], dropped: list[str]
) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head(f"/{script}") + request_head("/length"))
        await writer.drain()
        response = await read_framed(reader)
        next_response = await read_framed(reader)
    finally:
        await close_client(writer)

    assert response.status == 200
    for name in kept:
        assert name in response.headers
    for name in dropped:
        assert name not in response.headers
    assert response.body == b"ok"
    assert next_response.body == b"hello"


async def test_pod_header_lines_copied_with_spaces(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/spaced-headers"))
        await writer.drain()
        async with asyncio.timeout(RAW_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        await close_client(writer)

    assert b"\r\nX-Spaced:   wide\r\n" in head
    assert b"\r\nX-Tabbed:\tvalue\t\r\n" in head


async def test_pod_head_split_across_reads(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/split-head"))
        await writer.drain()
        async with asyncio.timeout(RAW_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        await close_client(writer)

    assert head.startswith(b"HTTP/1.1 200 Fine\r\n")
    assert b"\r\nX-Split: one piece\r\n" in head


async def test_interim_response_in_same_read_skipped(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/interim-together"))

    assert response.status_line == "HTTP/1.1 200 OK"
    assert "Link" not in response.headers
    assert response.headers.get("X-Final") == "yes"
    assert response.body == b"final"


async def test_pod_status_without_reason_relayed(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/no-reason"))
        await writer.drain()
        async with asyncio.timeout(RAW_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        await close_client(writer)

    assert head.startswith(b"HTTP/1.1 200 \r\n")


@pytest.mark.parametrize(
    ("script", "status_line"),
    [
        ("utf8-reason", b"HTTP/1.1 200 Caf\xc3\xa9\r\n"),
        ("raw-reason", b"HTTP/1.1 200 Caf\xe9\r\n"),
        ("utf8-reason-chunked", b"HTTP/1.1 200 Caf\xc3\xa9\r\n"),
    ],
)
async def test_pod_reason_bytes_kept_exactly(
    proxy: ProxyProcess, script: str, status_line: bytes
) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head(f"/{script}"))
        await writer.drain()
        async with asyncio.timeout(RAW_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        await close_client(writer)

    assert head.startswith(status_line)


async def test_http10_keep_alive_client_reuses_connection(
    proxy: ProxyProcess,
) -> None:
    keep_alive = "Connection: keep-alive\r\n"
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/length", version="1.0", extra=keep_alive))
        await writer.drain()
        first = await read_framed(reader)
        writer.write(request_head("/bare", version="1.0", extra=keep_alive))
        await writer.drain()
        second = await read_framed(reader)
    finally:
        await close_client(writer)

    assert first.status_line == "HTTP/1.0 200 OK"
    assert first.headers.getall("Connection") == ["keep-alive"]
    assert first.body == b"hello"
    assert second.body == b"ok"


async def test_http10_client_without_keep_alive_closed(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/length", version="1.0"))
        await writer.drain()
        raw = await read_until_closed(reader)
    finally:
        await close_client(writer)

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\r\nconnection:" not in head.lower()
    assert body == b"hello"


async def test_connection_close_request_closed(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/length", extra="Connection: close\r\n"))
        await writer.drain()
        raw = await read_until_closed(reader)
    finally:
        await close_client(writer)

    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert body == b"hello"


# Bodyless responses.


async def test_head_keeps_pod_content_length(
    proxy: ProxyProcess,
) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/head", method="HEAD") + request_head("/length"))
        await writer.drain()
        head_response = await read_framed(reader, bodyless=True)
        next_response = await read_framed(reader)
    finally:
        await close_client(writer)

    assert head_response.status == 200
    assert head_response.headers.getall("Content-Length") == ["1234"]
    assert head_response.headers.get("X-Kept") == "head"
    # Any body byte after the HEAD response would corrupt this status line.
    assert next_response.status_line == "HTTP/1.1 200 OK"
    assert next_response.body == b"hello"


@pytest.mark.parametrize(
    ("script", "status"),
    [("no-content", 204), ("no-content-length", 204), ("not-modified", 304)],
)
async def test_no_content_and_not_modified_send_no_body(
    proxy: ProxyProcess, script: str, status: int
) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head(f"/{script}") + request_head("/length"))
        await writer.drain()
        bodyless = await read_framed(reader, bodyless=True)
        next_response = await read_framed(reader)
    finally:
        await close_client(writer)

    assert bodyless.status == status
    assert bodyless.headers.get("X-Kept") == str(status)
    assert "Transfer-Encoding" not in bodyless.headers
    if status == 204:
        assert "Content-Length" not in bodyless.headers
    assert next_response.status_line == "HTTP/1.1 200 OK"
    assert next_response.body == b"hello"


async def test_not_modified_keeps_pod_length(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/not-modified-length") + request_head("/length"))
        await writer.drain()
        bodyless = await read_framed(reader, bodyless=True)
        next_response = await read_framed(reader)
    finally:
        await close_client(writer)

    assert bodyless.status == 304
    assert bodyless.headers.getall("Content-Length") == ["1234"]
    assert next_response.body == b"hello"


# Interim responses.


async def test_hundred_interim_responses_skipped(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/interim-100"))

    assert response.status == 200
    assert response.body == b"final"


async def test_interim_responses_not_taken_for_final(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/interim", extra="Connection: close\r\n"))
        await writer.drain()
        raw = await read_until_closed(reader)
    finally:
        await close_client(writer)

    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.count(b"HTTP/1.1 ") == 1
    assert b"X-Final: yes\r\n" in raw
    assert raw.endswith(b"\r\n\r\nfinal")


# Responses the pod ends early.


@pytest.mark.parametrize("script", ["short-length", "cut-chunked", "reset-in-body"])
async def test_body_ended_early_aborts_client(proxy: ProxyProcess, script: str) -> None:
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client,
        client.get(
            f"{proxy.url}/{script}",
            headers={"X-Uid": "reader", "X-Service": "game"},
        ) as response,
    ):
        status = response.status
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    assert status == 200


@pytest.mark.parametrize("script", ["short-length", "cut-chunked"])
async def test_body_ended_early_never_finished_cleanly(
    proxy: ProxyProcess, script: str
) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head(f"/{script}"))
        await writer.drain()
        raw = await read_until_closed(reader)
    finally:
        await close_client(writer)

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if b"content-length: 10" in head.lower():
        assert len(body) < 10
    else:
        assert not body.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("script", ["close", "reset"])
async def test_nothing_sent_yet_gives_502(proxy: ProxyProcess, script: str) -> None:
    response = await exchange(proxy, request_head(f"/{script}?rule=early-502"))

    assert response.status == 502
    assert json.loads(response.body)["error"] == "pod_error"


# Ambiguous lengths from the pod.


async def fail_then_follow(
    proxy: ProxyProcess, pod_log: PodLog, script: str, marker: str
) -> tuple[RawResponse, RawResponse, list[int]]:
    """Send `script`, then a good request on the same client connection.

    Returns both responses and the pod connection of each request.
    """
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head(f"/{script}?{marker}"))
        await writer.drain()
        failed = await read_framed(reader)
        writer.write(request_head(f"/length?{marker}"))
        await writer.drain()
        after = await read_framed(reader)
    finally:
        await close_client(writer)
    connections = [event["connection"] for event in pod_log.events(marker)]
    return failed, after, connections


async def test_pod_head_under_limit_relayed(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/large-head"))

    assert response.status == 200
    assert response.body == b"ok"
    assert response.headers["X-Filler-29"] == "f" * 2000


@pytest.mark.parametrize("script", ["head-65536", "head-65536-nospace"])
async def test_pod_head_at_limit_relayed(proxy: ProxyProcess, script: str) -> None:
    response = await exchange(proxy, request_head(f"/{script}"))

    assert response.status == 200
    assert response.body == b"ok"
    assert "X-Pad-0" in response.headers


async def test_pod_head_with_long_line_relayed(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/long-header-line"))

    assert response.status == 200
    assert response.body == b"ok"
    assert response.headers["X-Long"] == "l" * 20_000


async def test_pod_head_with_many_lines_relayed(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/many-headers"))

    assert response.status == 200
    assert response.body == b"ok"
    assert response.headers["X-1999"] == "v"


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("duplicate-length", "invalid response: Duplicate Content-Length"),
        ("conflicting-length", "invalid response: Duplicate Content-Length"),
        (
            "length-and-chunked",
            "invalid response: Transfer-Encoding can't be present with Content-Length",
        ),
        # Response heads over the 64 KiB limit.
        ("huge-head", "response head larger than 65536 bytes"),
        ("huge-head-whole", "response head larger than 65536 bytes"),
        ("head-65537", "response head larger than 65536 bytes"),
        ("head-65537-nospace", "response head larger than 65536 bytes"),
        ("interim-101", "more than 100 interim responses"),
        # A reason over 128 characters is cut.
        ("long-coding", f"unsupported Transfer-Encoding '{'x' * 300}'"[:128] + "..."),
    ],
)
async def test_invalid_pod_head_gives_502_and_new_connection(
    proxy: ProxyProcess, pod_log: PodLog, script: str, reason: str
) -> None:
    failed, after, connections = await fail_then_follow(
        proxy, pod_log, script, f"invalid-{script}"
    )

    assert failed.status == 502
    assert json.loads(failed.body)["error"] == "pod_error"
    assert json.loads(failed.body)["message"] == f"pod 0 failed: {reason}"
    assert after.status == 200
    assert len(connections) == 2
    assert connections[0] != connections[1]


@pytest.mark.parametrize("script", ["status-099", "nul-reason"])
async def test_invalid_pod_status_line_gives_502(
    proxy: ProxyProcess, pod_log: PodLog, script: str
) -> None:
    # llhttp accepts both lines, which the proxy rejects itself.
    failed, after, connections = await fail_then_follow(
        proxy, pod_log, script, f"status-{script}"
    )

    assert failed.status == 502
    assert json.loads(failed.body)["error"] == "pod_error"
    assert after.status == 200
    assert len(connections) == 2
    assert connections[0] != connections[1]
    assert "Traceback" not in proxy.log()


# Streaming.


async def test_stream_chunk_flushed_on_arrival(proxy: ProxyProcess) -> None:
    # The pod sends "event1", then delays the end of the stream by 8 s.
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/first-then-wait"))
        await writer.drain()
        async with asyncio.timeout(5.0):
            _, headers = await read_head(reader)
            size_line = await reader.readuntil(b"\r\n")
            first = await reader.readexactly(int(size_line, 16))
    finally:
        await close_client(writer)

    assert headers.get("Transfer-Encoding") == "chunked"
    assert first == b"event1"


async def test_no_compression_added(proxy: ProxyProcess) -> None:
    response = await exchange(
        proxy, request_head("/chunked", extra="Accept-Encoding: gzip, br\r\n")
    )

    assert "Content-Encoding" not in response.headers
    assert response.body == b"hello world"


async def test_silent_stream_ended_by_read_timeout(proxy: ProxyProcess) -> None:
    reader, writer = await open_client(proxy)
    try:
        writer.write(request_head("/stall-in-body", service="quick"))
        await writer.drain()
        raw = await read_until_closed(reader)
    finally:
        await close_client(writer)

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"hello"


async def test_active_stream_outlives_read_timeout(proxy: ProxyProcess) -> None:
    # Eight pieces 0.2 s apart under service "quick": longer than its 1 s
    # read timeout in total, but never silent for that long.
    response = await exchange(proxy, request_head("/slow-stream", service="quick"))

    assert response.status == 200
    assert response.body == b"tick" * 8


async def test_client_header_lines_reach_pod_as_sent(proxy: ProxyProcess) -> None:
    head = (
        "GET /echo HTTP/1.1\r\n"
        f"host: {LOOPBACK}\r\n"
        "x-uid: reader\r\n"
        "x-service: game\r\n"
        "accept-ENCODING: identity\r\n"
        "X-Raw: caf\xe9\r\n"
        "\r\n"
    ).encode("latin-1")

    response = await exchange(proxy, head)

    assert response.status == 200
    assert response.body.startswith(
        f"GET /echo HTTP/1.1\r\nhost: {LOOPBACK}\r\nx-uid: reader\r\n"
        "x-service: game\r\naccept-ENCODING: identity\r\n".encode()
    )
    assert b"\r\nX-Raw: caf\xe9\r\n" in response.body
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in response.body
    assert b"\r\nX-Forwarded-Proto: http\r\n" in response.body
    assert f"\r\nX-Forwarded-Host: {LOOPBACK}\r\n".encode() in response.body


@pytest.mark.parametrize(
    ("body_parts", "delay_s", "pieces"),
    [
        # Eight chunks 0.2 s apart, 1.6 s in all, but never silent for 1 s.
        ([b"5\r\npiece\r\n"] * 8, 0.2, 8),
        # A pause longer than the 1 s read timeout between two chunks.
        ([b"5\r\npiece\r\n", b"5\r\npiece\r\n"], 1.5, 2),
        # A chunk extension sent a byte at a time, where the body yields no
        # data to forward for 1.6 s.
        ([b"5;x", *[b"x"] * 15, b"\r\npiece\r\n"], 0.1, 1),
    ],
    ids=["slow-upload", "pause", "extension-drip"],
)
async def test_client_pause_is_not_a_pod_timeout(
    proxy: ProxyProcess, body_parts: list[bytes], delay_s: float, pieces: int
) -> None:
    # The pod responds only after the whole body, so until the client has
    # sent it, the pod's silence is the client's doing.
    head = request_head(
        "/echo?client-pause",
        method="POST",
        service="quick",
        extra="Transfer-Encoding: chunked\r\n",
    )
    reader, writer = await open_client(proxy)
    try:
        writer.write(head)
        for part in body_parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(delay_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        response = await read_framed(reader)
    finally:
        await close_client(writer)

    assert response.status == 200
    assert response.body.endswith(b"\r\n\r\n" + b"piece" * pieces)


async def test_silent_pod_gives_504(proxy: ProxyProcess) -> None:
    response = await exchange(proxy, request_head("/silent", service="quick"))

    assert response.status == 504
    assert json.loads(response.body)["error"] == "pod_timeout"


# Pooled connections that the pod closed.


async def test_idle_closed_connection_replaced(
    proxy: ProxyProcess, pod_log: PodLog
) -> None:
    first = await exchange(proxy, request_head("/idle-close?idle-closed"))
    # The pod closes its side 0.1 s after the response.
    await asyncio.sleep(0.5)
    second = await exchange(proxy, request_head("/length?idle-closed"))

    connections = [event["connection"] for event in pod_log.events("idle-closed")]
    assert first.status == 200
    assert second.status == 200
    assert second.body == b"hello"
    assert len(connections) == 2
    assert connections[0] != connections[1]


# Expect: 100-continue.


async def test_expect_final_status_before_upload(
    proxy: ProxyProcess, pod_log: PodLog
) -> None:
    head = request_head(
        "/expect-reject?expect-final",
        method="POST",
        extra="Expect: 100-continue\r\nContent-Length: 11\r\n",
    )
    reader, writer = await open_client(proxy)
    try:
        writer.write(head)
        await writer.drain()
        raw = await read_until_closed(reader)
    finally:
        await close_client(writer)

    events = pod_log.events("expect-final")
    assert raw.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"100 Continue" not in raw
    assert raw.endswith(b"\r\n\r\ndenied")
    assert len(events) == 1
    assert ["Expect", "100-continue"] in events[0]["headers"]


async def upload_after_continue(
    proxy: ProxyProcess, head: bytes
) -> tuple[bytes, RawResponse]:
    """Send an Expect head, then "upload body" after the interim response.

    Returns the interim response's bytes and the final response.
    """
    reader, writer = await open_client(proxy)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(RAW_TIMEOUT_S):
            interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"upload body")
        await writer.drain()
        final = await read_framed(reader)
    finally:
        await close_client(writer)
    return interim, final


async def test_expect_continue_relayed_once(
    proxy: ProxyProcess, pod_log: PodLog
) -> None:
    head = request_head(
        "/expect-accept?expect-once",
        method="POST",
        extra="Expect: 100-continue\r\nContent-Length: 11\r\n",
    )
    interim, final = await upload_after_continue(proxy, head)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.status == 200
    assert final.body.count(b"Expect: 100-continue\r\n") == 1
    assert final.body.endswith(b"\r\n\r\nupload body")


async def test_expect_wait_outlives_short_read_timeout(proxy: ProxyProcess) -> None:
    # The pod sends no 100 Continue, so the proxy sends its own after 1 s,
    # the read timeout of service "quick".
    head = request_head(
        "/echo?expect-silent",
        method="POST",
        service="quick",
        extra="Expect: 100-continue\r\nContent-Length: 11\r\n",
    )
    interim, final = await upload_after_continue(proxy, head)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.status == 200
    assert final.body.endswith(b"\r\n\r\nupload body")


async def test_other_expectation_gets_417(proxy: ProxyProcess) -> None:
    response = await exchange(
        proxy,
        request_head(
            "/echo", method="POST", extra="Expect: teapot\r\nContent-Length: 0\r\n"
        ),
    )

    assert response.status == 417
    assert json.loads(response.body)["error"] == "invalid_expect"
