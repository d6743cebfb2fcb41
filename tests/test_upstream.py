"""Protocol tests of the upstream HTTP/1.1 client against a scripted raw-socket pod.

The pod (`tests/scripted_pod.py`) runs in the test's event loop and writes
exact bytes, pauses, closes or resets, so each test pins down one case of
framing, keep-alive reuse, early close or timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httptools
import pytest
from conftest import LOOPBACK, free_port
from scripted_pod import ScriptedPod

from proxy.retry import Stage
from proxy.upstream import (
    InvalidRequestError,
    UpstreamBody,
    UpstreamFailure,
    UpstreamPool,
    UpstreamResponse,
)
from proxy.upstream_connection import (
    ConnectionClosedError,
    InvalidResponseError,
    ReadTimeoutError,
    parse_header_block,
    split_head,
)

READ_TIMEOUT_S = 5.0
# Polls of 0.02 s while waiting for the pool to see a close: 5 s at most.
WAIT_STEPS = 250


@pytest.fixture
async def pod() -> AsyncIterator[ScriptedPod]:
    scripted = ScriptedPod()
    await scripted.start()
    try:
        yield scripted
    finally:
        await scripted.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    upstream = UpstreamPool(connections_per_pod=8, idle_timeout_s=30.0)
    try:
        yield upstream
    finally:
        await upstream.close()


async def send(
    pool: UpstreamPool,
    pod: ScriptedPod,
    target: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: UpstreamBody = None,
    content_length: int | None = None,
    read_timeout_s: float = READ_TIMEOUT_S,
) -> UpstreamResponse:
    return await pool.request(
        (LOOPBACK, pod.port),
        method,
        target,
        headers if headers is not None else [("Host", "pod")],
        body,
        content_length=content_length,
        connect_timeout_s=2.0,
        read_timeout_s=read_timeout_s,
    )


async def read_all(response: UpstreamResponse) -> bytes:
    """Read the whole body, then release the connection."""
    try:
        data = b""
        while chunk := await response.read():
            data += chunk
        return data
    finally:
        response.release()


async def fetch(
    pool: UpstreamPool, pod: ScriptedPod, target: str, **options: object
) -> tuple[UpstreamResponse, bytes]:
    response = await send(pool, pod, target, **options)  # type: ignore[arg-type]
    return response, await read_all(response)


def header(response: UpstreamResponse, name: str) -> list[str]:
    return [value for key, value in response.headers if key.lower() == name.lower()]


# Framing.


async def test_length_framed_body_read_whole(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    response, body = await fetch(pool, pod, "/length")

    assert response.status == 200
    assert response.reason == "OK"
    assert response.content_length == 5
    assert body == b"hello"


async def test_chunked_body_decoded(pool: UpstreamPool, pod: ScriptedPod) -> None:
    response, body = await fetch(pool, pod, "/chunked")

    assert response.status == 200
    assert response.content_length is None
    assert header(response, "Transfer-Encoding") == ["chunked"]
    assert body == b"hello world"


async def test_close_delimited_body_ends_at_close(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    response, body = await fetch(pool, pod, "/close-delimited")

    assert response.status == 200
    assert response.content_length is None
    assert body == b"hello world"


# Keep-alive reuse.


async def test_connection_reused_after_complete_response(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    for _ in range(3):
        _, body = await fetch(pool, pod, "/length")
        assert body == b"hello"

    assert [event.connection for event in pod.events] == [1, 1, 1]
    assert pool.idle_connections((LOOPBACK, pod.port)) == 1


async def test_connection_close_response_not_reused(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    await fetch(pool, pod, "/connection-close")
    await fetch(pool, pod, "/length")

    assert [event.connection for event in pod.events] == [1, 2]


async def test_trailer_connection_close_not_reused(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    _, body = await fetch(pool, pod, "/trailer-close")
    await fetch(pool, pod, "/length")

    assert body == b"hello"
    assert [event.connection for event in pod.events] == [1, 2]


async def test_unread_body_not_reused(pool: UpstreamPool, pod: ScriptedPod) -> None:
    response = await send(pool, pod, "/first-then-wait")
    response.release()
    await fetch(pool, pod, "/length")

    assert [event.connection for event in pod.events] == [1, 2]


async def test_idle_close_leaves_pool(pool: UpstreamPool, pod: ScriptedPod) -> None:
    await fetch(pool, pod, "/idle-close")
    # The pod closes the connection 0.1 s after its response.
    for _ in range(WAIT_STEPS):
        if not pool.idle_connections((LOOPBACK, pod.port)):
            break
        await asyncio.sleep(0.02)
    idle_after_close = pool.idle_connections((LOOPBACK, pod.port))

    _, body = await fetch(pool, pod, "/length")

    assert idle_after_close == 0
    assert body == b"hello"
    assert [event.connection for event in pod.events] == [1, 2]


async def test_idle_connection_swept_after_timeout(pod: ScriptedPod) -> None:
    # Long enough that a loaded machine sends the second request well
    # within it, and short enough for the wait below (5 s at most).
    idle_timeout_s = 2.0
    upstream = UpstreamPool(connections_per_pod=8, idle_timeout_s=idle_timeout_s)
    try:
        await fetch(upstream, pod, "/length")
        # Reused within the timeout.
        await fetch(upstream, pod, "/length")
        idle_before_timeout = upstream.idle_connections((LOOPBACK, pod.port))
        # The sweep runs every quarter of the timeout, so the connection
        # closes between one and one and a quarter timeouts after its release.
        for _ in range(WAIT_STEPS):
            if not upstream.idle_connections((LOOPBACK, pod.port)):
                break
            await asyncio.sleep(0.02)
        idle_after_timeout = upstream.idle_connections((LOOPBACK, pod.port))
        await fetch(upstream, pod, "/length")
    finally:
        await upstream.close()

    assert idle_before_timeout == 1
    assert idle_after_timeout == 0
    assert [event.connection for event in pod.events] == [1, 1, 2]


async def test_stale_pooled_connection_is_stale_stage(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    await fetch(pool, pod, "/length")

    with pytest.raises(UpstreamFailure) as failure:
        await send(pool, pod, "/close")

    assert failure.value.stage is Stage.STALE
    assert isinstance(failure.value.cause, ConnectionClosedError)
    assert [event.connection for event in pod.events] == [1, 1]


# Early close.


@pytest.mark.parametrize("script", ["close", "reset"])
async def test_new_connection_closed_before_response_is_sent_stage(
    pool: UpstreamPool, pod: ScriptedPod, script: str
) -> None:
    with pytest.raises(UpstreamFailure) as failure:
        await send(pool, pod, f"/{script}")

    assert failure.value.stage is Stage.SENT
    assert isinstance(failure.value.cause, ConnectionError)


@pytest.mark.parametrize("script", ["short-length", "cut-chunked", "reset-in-body"])
async def test_body_ended_early_raises(
    pool: UpstreamPool, pod: ScriptedPod, script: str
) -> None:
    response = await send(pool, pod, f"/{script}")

    with pytest.raises(ConnectionClosedError):
        await read_all(response)
    assert response.status == 200


async def test_connect_refused_is_connect_stage(pool: UpstreamPool) -> None:
    with pytest.raises(UpstreamFailure) as failure:
        await pool.request(
            (LOOPBACK, free_port()),
            "GET",
            "/",
            [],
            None,
            content_length=None,
            connect_timeout_s=2.0,
            read_timeout_s=2.0,
        )

    assert failure.value.stage is Stage.CONNECT
    assert isinstance(failure.value.cause, ConnectionRefusedError)


# Invalid responses.


@pytest.mark.parametrize(
    "script", ["duplicate-length", "conflicting-length", "length-and-chunked"]
)
async def test_ambiguous_length_is_protocol_error(
    pool: UpstreamPool, pod: ScriptedPod, script: str
) -> None:
    with pytest.raises(UpstreamFailure) as failure:
        await send(pool, pod, f"/{script}")
    await fetch(pool, pod, "/length")

    assert failure.value.stage is Stage.OTHER
    assert isinstance(failure.value.cause, InvalidResponseError)
    assert [event.connection for event in pod.events] == [1, 2]


# Response heads.


async def test_head_split_across_reads_parsed_whole(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    response, body = await fetch(pool, pod, "/split-head")

    assert response.reason == "Fine"
    assert header(response, "X-Split") == ["one piece"]
    assert response.content_length == 2
    assert body == b"ok"


async def test_header_values_match_llhttp(pool: UpstreamPool, pod: ScriptedPod) -> None:
    response, _ = await fetch(pool, pod, "/spaced-headers")

    assert header(response, "X-Spaced") == ["wide"]
    assert header(response, "X-Tabbed") == ["value\t"]


async def test_connection_tokens_of_every_header(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    response, _ = await fetch(pool, pod, "/connection-twice")

    assert response.connection_tokens == {"keep-alive", "x-pod-scoped"}


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 404 Not  Found \r\nA:b\r\nB:  \t c d \t\r\nC:\r\n\r\n",
        b"\r\n\nHTTP/1.1 200 OK\r\nX-Raw: caf\xe9\r\nx-raw: \xc3\xa9\r\n\r\n",
        b"ICE/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n\r\n",
    ],
)
def test_split_head_matches_llhttp_callbacks(head: bytes) -> None:
    seen = _LlhttpHead()
    httptools.HttpResponseParser(seen).feed_data(head)

    received = head.lstrip(b"\r\n")
    status_line, block, end = split_head(received)

    assert end == len(received)
    assert status_line[5:] == seen.reason
    assert parse_header_block(block) == seen.headers


class _LlhttpHead:
    """Collects what llhttp's status and header callbacks report for a head."""

    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[tuple[str, str]] = []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(
            (
                name.decode("utf-8", "surrogateescape"),
                value.decode("utf-8", "surrogateescape"),
            )
        )


# Interim and bodyless responses.


async def test_interim_responses_skipped(pool: UpstreamPool, pod: ScriptedPod) -> None:
    response, body = await fetch(pool, pod, "/interim")

    assert response.status == 200
    assert header(response, "X-Final") == ["yes"]
    assert header(response, "Link") == []
    assert body == b"final"


@pytest.mark.parametrize(
    ("method", "script", "status"),
    [("HEAD", "head", 200), ("GET", "no-content", 204), ("GET", "not-modified", 304)],
)
async def test_bodyless_response_keeps_headers(
    pool: UpstreamPool, pod: ScriptedPod, method: str, script: str, status: int
) -> None:
    response, body = await fetch(pool, pod, f"/{script}", method=method)
    _, after = await fetch(pool, pod, "/length")

    assert response.status == status
    assert body == b""
    assert header(response, "X-Kept") == [script if method == "HEAD" else str(status)]
    assert after == b"hello"


async def test_head_keeps_content_length(pool: UpstreamPool, pod: ScriptedPod) -> None:
    response, body = await fetch(pool, pod, "/head", method="HEAD")

    assert header(response, "Content-Length") == ["1234"]
    assert response.content_length == 1234
    assert body == b""


async def test_no_content_connection_reused(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    await fetch(pool, pod, "/no-content")
    await fetch(pool, pod, "/not-modified")
    await fetch(pool, pod, "/length")

    assert [event.connection for event in pod.events] == [1, 1, 1]


# Timeouts.


async def test_silent_pod_times_out(pool: UpstreamPool, pod: ScriptedPod) -> None:
    with pytest.raises(UpstreamFailure) as failure:
        await send(pool, pod, "/silent", read_timeout_s=0.3)

    assert failure.value.stage is Stage.TIMEOUT
    assert isinstance(failure.value.cause, ReadTimeoutError)


async def test_stall_in_body_times_out(pool: UpstreamPool, pod: ScriptedPod) -> None:
    response = await send(pool, pod, "/stall-in-body", read_timeout_s=0.3)

    with pytest.raises(ReadTimeoutError):
        await read_all(response)


async def test_active_stream_outlives_read_timeout(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    # Eight pieces 0.2 s apart: the stream lasts longer than the timeout,
    # but no gap comes close to it.
    response, body = await fetch(pool, pod, "/slow-stream", read_timeout_s=1.0)

    assert response.status == 200
    assert body == b"tick" * 8


async def test_reused_connection_takes_shorter_timeout(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    # The first exchange leaves its 30 s read timer armed on the pooled
    # connection; the second one must still time out after 0.3 s.
    await fetch(pool, pod, "/length", read_timeout_s=30.0)
    with pytest.raises(UpstreamFailure) as failure:
        async with asyncio.timeout(10.0):
            await send(pool, pod, "/silent", read_timeout_s=0.3)

    assert failure.value.stage is Stage.TIMEOUT
    assert isinstance(failure.value.cause, ReadTimeoutError)
    assert [event.connection for event in pod.events] == [1, 1]


async def test_idle_connection_outlives_read_timeout(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    await fetch(pool, pod, "/length", read_timeout_s=0.2)
    # The read timer fires while the connection is idle in the pool.
    await asyncio.sleep(0.5)
    response, body = await fetch(pool, pod, "/length", read_timeout_s=0.2)

    assert response.status == 200
    assert body == b"hello"
    assert [event.connection for event in pod.events] == [1, 1]


# Requests.


async def test_target_and_headers_sent_verbatim(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    target = "/echo/a%2Fb/../c?x=%20&b=1&a=2"
    headers = [("Host", "pod"), ("X-B", "2"), ("x-a", "1"), ("X-B", "3")]

    _, body = await fetch(pool, pod, target, headers=headers)

    assert (
        body
        == (
            f"GET {target} HTTP/1.1\r\nHost: pod\r\nX-B: 2\r\nx-a: 1\r\nX-B: 3\r\n\r\n"
        ).encode()
    )


@pytest.mark.parametrize(
    "target", ["/a\r\nX-Injected: 1", "/a\nb", "/a\x00b", "/a b", "/a\tb", ""]
)
async def test_invalid_target_rejected(
    pool: UpstreamPool, pod: ScriptedPod, target: str
) -> None:
    with pytest.raises(InvalidRequestError):
        await send(pool, pod, target)

    assert pod.connections == 0


async def test_header_with_line_break_rejected(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    with pytest.raises(InvalidRequestError):
        await send(pool, pod, "/echo", headers=[("X-A", "1\r\nX-Injected: 1")])

    assert pod.connections == 0


async def test_bodyless_request_has_no_framing(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    _, body = await fetch(pool, pod, "/echo")

    assert b"content-length" not in body.lower()
    assert b"transfer-encoding" not in body.lower()


async def test_bytes_body_sent_with_length(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    _, body = await fetch(pool, pod, "/echo", method="POST", body=b"payload")

    assert body.endswith(b"Content-Length: 7\r\n\r\npayload")
    assert pod.events[0].body_length == 7


async def test_streamed_body_sent_chunked(pool: UpstreamPool, pod: ScriptedPod) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"one", b"", b"two", b"three"):
            yield piece

    _, body = await fetch(pool, pod, "/echo", method="POST", body=pieces())

    assert b"Transfer-Encoding: chunked\r\n" in body
    assert body.endswith(b"\r\n\r\nonetwothree")


async def test_streamed_body_with_length_not_chunked(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    _, body = await fetch(
        pool,
        pod,
        "/echo",
        method="PUT",
        headers=[("Host", "pod"), ("Content-Length", "6")],
        body=pieces(),
        content_length=6,
    )

    assert body.count(b"Content-Length: 6") == 1
    assert b"chunked" not in body
    assert body.endswith(b"\r\n\r\nabcdef")


# Expect: 100-continue.


async def test_expect_body_sent_after_pod_continue(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    continued: list[int] = []

    async def on_continue() -> None:
        continued.append(len(pod.events))

    response = await pool.request(
        (LOOPBACK, pod.port),
        "POST",
        "/expect-accept",
        [("Host", "pod")],
        b"late body",
        content_length=None,
        connect_timeout_s=2.0,
        read_timeout_s=READ_TIMEOUT_S,
        on_continue=on_continue,
    )
    body = await read_all(response)

    assert response.status == 200
    assert continued == [1]
    assert b"Expect: 100-continue\r\n" in body
    assert body.endswith(b"late body")
    assert response.request_sent


async def test_expect_final_status_skips_body(
    pool: UpstreamPool, pod: ScriptedPod
) -> None:
    continued: list[bool] = []

    async def on_continue() -> None:
        continued.append(True)

    async def never_read() -> AsyncIterator[bytes]:
        raise AssertionError("the body must not be read")
        yield b""

    response = await pool.request(
        (LOOPBACK, pod.port),
        "POST",
        "/expect-reject",
        [("Host", "pod")],
        never_read(),
        content_length=None,
        connect_timeout_s=2.0,
        read_timeout_s=READ_TIMEOUT_S,
        on_continue=on_continue,
    )
    body = await read_all(response)

    assert response.status == 401
    assert body == b"denied"
    assert continued == []
    assert not response.request_sent
