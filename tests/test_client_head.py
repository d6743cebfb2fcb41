"""Tests of the client's response head for a pod response that arrived whole."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11

from proxy.client_head import HOP_BY_HOP, ClientHeadEncoder, SentResponse
from proxy.upstream import UpstreamPool, _PodPool
from proxy.upstream_connection import Connection, UpstreamResponse, split_head

DATE = b"Date: Tue, 01 Dec 2026 10:00:00 GMT\r\n"


class _Request:
    """The one attribute of a request that the encoder reads."""

    def __init__(self, version: HttpVersion) -> None:
        self.version = version


def unused_connection() -> Connection:
    """Return a connection that never connects, made in a loop that then closes.

    The encoder never reads it, but a module compiled with mypyc checks that
    `UpstreamResponse` gets a `Connection`.
    """

    async def create() -> Connection:
        return Connection(UpstreamPool(1, 1.0), _PodPool(("127.0.0.1", 9), 1))

    return asyncio.run(create())


def encode(
    head: bytes,
    *,
    version: HttpVersion = HttpVersion11,
    keep_alive: bool = True,
    routed_pod_header: str = "X-Routed-Pod",
) -> bytes | None:
    status_line, block, _ = split_head(head)
    status = int(status_line[1:4])
    upstream = UpstreamResponse(unused_connection(), status, status_line, block, True)
    encoder = ClientHeadEncoder(routed_pod_header)
    request = cast(web.BaseRequest, _Request(version))
    return encoder.encode(request, upstream, 2, keep_alive)


def test_plain_block_copied_whole() -> None:
    head = b"HTTP/1.1 200 OK\r\nServer: s\r\n" + DATE + b"Content-Length: 2\r\n\r\n"

    assert encode(head) == (
        b"HTTP/1.1 200 OK\r\nServer: s\r\n"
        + DATE
        + b"Content-Length: 2\r\nX-Routed-Pod: 2\r\n\r\n"
    )


def test_keep_alive_line_cut() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + DATE + b"Connection: Keep-Alive\r\nA: 1\r\n\r\n"

    assert encode(head, routed_pod_header="") == (
        b"HTTP/1.1 200 OK\r\n" + DATE + b"A: 1\r\n\r\n"
    )


def test_named_and_hop_by_hop_lines_cut() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Scoped\r\nX-Scoped: 1\r\n"
        b"Keep-Alive: timeout=5\r\nA: 1\r\nx-routed-pod: 9\r\nCONNECTION: close\r\n"
        b"Trailer: X-Sum\r\nUpgrade: h2c\r\nproxy-connection: x\r\n" + DATE + b"\r\n"
    )

    assert encode(head) == (
        b"HTTP/1.1 200 OK\r\nA: 1\r\n" + DATE + b"X-Routed-Pod: 2\r\n\r\n"
    )


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_every_hop_by_hop_line_cut(name: str) -> None:
    head = b"HTTP/1.1 200 OK\r\nA: 1\r\n%s: x\r\n" % name.title().encode() + DATE

    assert encode(head + b"\r\n", routed_pod_header="") == (
        b"HTTP/1.1 200 OK\r\nA: 1\r\n" + DATE + b"\r\n"
    )


def test_second_connection_header_honoured() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-Scoped: 1\r\n"
        b"Connection: x-scoped\r\n" + DATE + b"\r\n"
    )

    assert encode(head, routed_pod_header="") == (
        b"HTTP/1.1 200 OK\r\n" + DATE + b"\r\n"
    )


def test_no_content_loses_length() -> None:
    head = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nA: 1\r\n" + DATE + b"\r\n"

    assert encode(head, routed_pod_header="") == (
        b"HTTP/1.1 204 No Content\r\nA: 1\r\n" + DATE + b"\r\n"
    )


def test_date_added_when_missing() -> None:
    encoded = encode(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n", routed_pod_header="")

    assert encoded is not None
    assert encoded.startswith(b"HTTP/1.1 200 OK\r\nA: 1\r\nDate: ")
    assert encoded.endswith(b" GMT\r\n\r\n")


@pytest.mark.parametrize(
    ("version", "keep_alive", "connection"),
    [
        (HttpVersion11, True, b""),
        (HttpVersion11, False, b"Connection: close\r\n"),
        (HttpVersion10, True, b"Connection: keep-alive\r\n"),
        (HttpVersion10, False, b""),
    ],
)
def test_connection_follows_client(
    version: HttpVersion, keep_alive: bool, connection: bytes
) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + DATE + b"\r\n"

    encoded = encode(head, version=version, keep_alive=keep_alive, routed_pod_header="")

    prefix = f"HTTP/{version.major}.{version.minor} 200 OK\r\n".encode()
    assert encoded == prefix + DATE + connection + b"\r\n"


def test_nul_in_reason_falls_back() -> None:
    assert encode(b"HTTP/1.1 200 O\x00K\r\n" + DATE + b"\r\n") is None


def test_sent_response_has_stream_response_attributes() -> None:
    sent = SentResponse(200, "OK", False, ("X-Routed-Pod", "2"))

    assert set(vars(web.StreamResponse(status=200, reason="OK"))) <= set(vars(sent))
    assert sent.status == 200
    assert sent.reason == "OK"
    assert sent.keep_alive is False
    assert sent.prepared
    assert dict(sent.headers) == {"X-Routed-Pod": "2"}
