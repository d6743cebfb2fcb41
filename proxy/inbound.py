"""The client side of the proxy port: which requests are read, and how long for.

aiohttp parses the requests. Its two parsers (the C one and the Python one
of ``AIOHTTP_NO_EXTENSIONS=1``) reject most malformed or ambiguous heads by
themselves, and this module rejects the rest before anything is forwarded,
so that both behave alike. Every rejection is a short JSON error with
``Connection: close``, logged as one line with the peer address. Limits:

- the request line, one header line, the whole head and the header count:
  431;
- a body beyond ``proxy.max_body_bytes``: 413, before anything is
  forwarded when its Content-Length is too large;
- a head that does not complete within ``proxy.header_timeout_s``: 408, and
  the connection closes without a pod being contacted;
- a body whose next bytes do not arrive within ``proxy.body_timeout_s``:
  408 when no response started, and the request to the pod is aborted.

It relies on internals of aiohttp's ``RequestHandler`` (``_messages``,
``_ErrInfo``, ``_current_request``, ``_request_in_progress``,
``_force_close``, ``_parser``) and of ``StreamResponse``
(``_write_headers``), read in aiohttp 3.14.5, and on both parsers giving
a request without a body the shared ``EMPTY_PAYLOAD``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import aiohttp.web_response
import orjson
from aiohttp import (
    HttpVersion10,
    HttpVersion11,
    StreamReader,
    hdrs,
    web,
    web_protocol,
)
from aiohttp.http import HttpRequestParser
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import istr
from mypy_extensions import mypyc_attr

from proxy.chunks import strict_chunk_lines
from proxy.config import ProxySettings
from proxy.connections import IdleSweepServer, OnDemandRequestHandler
from proxy.errors import StatefulRouteError

logger = logging.getLogger("stateful_route.inbound")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Maximum length of a client value quoted in an error message or log line.
_SHOWN_LENGTH = 100
# A Transfer-Encoding line as the proxy accepts it: exactly "chunked", after
# spaces only. The Python parser strips tabs and trailing spaces that the C
# parser rejects, so the raw head is checked too.
_TRANSFER_ENCODING_LINE = re.compile(rb"(?im)^transfer-encoding:(.*)$")
_CHUNKED_VALUE = re.compile(rb"(?i) *chunked\r?")
# Characters that the proxy rejects in a request target: controls, space,
# DEL and anything beyond ASCII, which a client must percent-encode.
_TARGET_FORBIDDEN = re.compile(r"[^\x21-\x7e]")
# The HTTP versions that the proxy serves. aiohttp's parsers also accept
# HTTP/0.9 and HTTP/2.0 request lines, and the Python parser any digit.digit.
SUPPORTED_VERSIONS = (HttpVersion10, HttpVersion11)
_VERSION_TOKEN = re.compile(rb"HTTP/([0-9])\.([0-9])")
# Header names as multidict's `istr`, which a lookup need not lowercase.
_HOST_KEY: Final = istr("Host")
_TRANSFER_ENCODING_KEY: Final = istr("Transfer-Encoding")
_CONTENT_LENGTH_KEY: Final = istr("Content-Length")


@dataclass(frozen=True, slots=True)
class Limits:
    """The request limits of one listener, from `ProxySettings`."""

    max_request_line_bytes: int
    max_header_field_bytes: int
    max_header_bytes: int
    max_header_count: int
    max_body_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> Limits:
        return cls(
            max_request_line_bytes=settings.max_request_line_bytes,
            max_header_field_bytes=settings.max_header_field_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            max_body_bytes=settings.max_body_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
        )


class RequestRejected(StatefulRouteError):
    """A client request that the proxy rejects before forwarding it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": code, "message": message})


# Non-native like the aiohttp subclasses in proxy/connections.py, with the
# base named in its defining module for the same reason. NOTE: a native
# class was not tried here.
@mypyc_attr(native_class=False)
class _ErrorResponse(aiohttp.web_response.Response):
    """A JSON error response, always with an HTTP/1.1 status line.

    aiohttp writes the request's version in the status line. For a 505 that
    is the version the proxy rejects, and for a parse error the HTTP/1.0 of
    the placeholder request that aiohttp builds. RFC 9110 section 6.2 has a
    server send the highest version it conforms to, here HTTP/1.1.
    """

    async def _write_headers(self) -> None:
        writer = self._payload_writer
        assert writer is not None
        status_line = f"HTTP/1.1 {self.status} {self.reason}"
        await writer.write_headers(status_line, self.headers)


def closing_error(status: int, code: str, message: str) -> web.Response:
    """Return a JSON error response that closes the client connection."""
    response = _ErrorResponse(
        status=status,
        body=json_error_body(code, message),
        content_type="application/json",
        headers={"Connection": "close"},
    )
    response.force_close()
    return response


def shown(value: str | bytes) -> str:
    """Return a client value for a message: quoted and cut when it is long."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = repr(value[:_SHOWN_LENGTH])
    return text + "..." if len(value) > _SHOWN_LENGTH else text


def peer_of(request: web.BaseRequest) -> str:
    return request.remote or "unknown"


# Checks of a parsed request.


def check_request(request: web.BaseRequest, limits: Limits) -> None:
    """Raise `RequestRejected` for a request that must not be forwarded.

    It covers what aiohttp's parsers accept, or accept only one of. That is
    an HTTP version other than 1.0 and 1.1, an unusual Transfer-Encoding or
    one in HTTP/1.0, and a missing Host. It is also an unsafe target or one
    that is not a path, and a head or a declared body beyond the limits.
    """
    version = request.version
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(f"HTTP/{version.major}.{version.minor}")
    target = request.raw_path
    # An ASCII string without space, controls and DEL needs no search.
    plain = target.isascii() and target.isprintable() and " " not in target
    if not plain and _TARGET_FORBIDDEN.search(target):
        raise RequestRejected(
            400,
            "invalid_target",
            f"request target {shown(target)} has a character outside printable ASCII",
        )
    if not target.startswith("/"):
        # Absolute-form, authority-form and asterisk-form targets: the first
        # two name a host, and the proxy only ever connects to configured pods.
        raise RequestRejected(
            400,
            "invalid_target",
            f"request target {shown(target)} must be a path starting with '/'",
        )
    head_bytes = len(request.method) + len(target) + 12
    for name, value in request.raw_headers:
        head_bytes += len(name) + len(value) + 4
    if head_bytes > limits.max_header_bytes:
        raise RequestRejected(
            431,
            "header_too_large",
            f"request head of {head_bytes} bytes exceeds the limit of "
            f"{limits.max_header_bytes} bytes",
        )

    headers = request.headers
    if version >= (1, 1) and _HOST_KEY not in headers:
        raise RequestRejected(400, "invalid_request", "missing Host header")
    codings = headers.getall(_TRANSFER_ENCODING_KEY, ())
    if codings and version == HttpVersion10:
        # RFC 9112, section 6.1: Transfer-Encoding in an HTTP/1.0 request
        # makes its framing faulty, so the connection must close after it.
        raise RequestRejected(
            400,
            "invalid_request",
            f"Transfer-Encoding {shown(', '.join(codings))} is not allowed in "
            "an HTTP/1.0 request",
        )
    if codings and (len(codings) > 1 or codings[0].lower() != "chunked"):
        raise RequestRejected(
            400,
            "invalid_request",
            f"Transfer-Encoding {shown(', '.join(codings))} is not supported, "
            "only a single chunked",
        )
    # `request.content_length` of aiohttp 3.14.5, without its property call.
    length_value = headers.get(_CONTENT_LENGTH_KEY)
    length = None if length_value is None else int(length_value)
    if limits.max_body_bytes and length is not None and length > limits.max_body_bytes:
        raise RequestRejected(
            413,
            "body_too_large",
            f"Content-Length {length} exceeds the limit of "
            f"{limits.max_body_bytes} bytes",
        )


class UnsupportedVersion(RequestRejected):
    """A request of an HTTP version other than 1.0 and 1.1 (505)."""

    def __init__(self, version: str) -> None:
        super().__init__(
            505,
            "unsupported_http_version",
            f"HTTP version {shown(version)} is not supported, only HTTP/1.0 "
            "and HTTP/1.1",
        )


def request_line_rejection(
    head: bytes, text: str | None = None
) -> RequestRejected | None:
    """Return the rejection of a raw request line without a supported version.

    aiohttp's C parser takes a request line without a version for HTTP/0.9,
    and the Python parser rejects it as a bad method, so the proxy checks
    the raw line itself for both. `text` is `head` decoded as Latin-1,
    when the caller has it.
    """
    if text is None:
        text = head.decode("latin-1")
    # The common case first, on str, whose methods mypyc calls directly,
    # where a bytes method costs about 1,000 instructions per call.
    if text and text[0] != "\r" and text[0] != "\n":
        end = text.find("\n")
        line_text = (text if end < 0 else text[:end]).removesuffix("\r")
        if line_text.endswith(" HTTP/1.1") or line_text.endswith(" HTTP/1.0"):
            return None
    if head[:1] in (b"\r", b"\n"):
        head = head.lstrip(b"\r\n")
    end = head.find(b"\n")
    line = (head if end < 0 else head[:end]).removesuffix(b"\r")
    if line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
        return None
    _, _, token = line.rpartition(b" ")
    match = _VERSION_TOKEN.fullmatch(token)
    if match is None:
        return RequestRejected(
            400,
            "invalid_request",
            f"request line {shown(line)} does not end with an HTTP version "
            "such as HTTP/1.1",
        )
    if match.group(1, 2) not in ((b"1", b"0"), (b"1", b"1")):
        return UnsupportedVersion(token.decode("ascii"))
    return None


def raw_head_problem(
    head: bytes, end: int | None = None, text: str | None = None
) -> str | None:
    """Return why a raw request head, up to offset `end`, is rejected, or None.

    Only the Transfer-Encoding lines are checked here, because the Python
    parser hides their whitespace. `text` is `head` decoded as Latin-1,
    when the caller has it.
    """
    if end is None:
        end = len(head)
    if text is None:
        text = head.decode("latin-1")
    # The search of the lowercased head is cheaper than the regular
    # expression, and most heads have no Transfer-Encoding. It runs on str,
    # whose methods mypyc calls directly. Lowercasing Latin-1 text keeps
    # its length and changes no other character into an ASCII letter, so
    # the offsets are those of `head`.
    if text.lower().find("transfer-encoding", 0, end) < 0:
        return None
    for match in _TRANSFER_ENCODING_LINE.finditer(head, 0, end):
        if _CHUNKED_VALUE.fullmatch(match.group(1)) is None:
            return (
                f"Transfer-Encoding {shown(match.group(1).strip())} is not "
                "supported, only a single chunked"
            )
    return None


def head_rejection(head: bytes, text: str | None = None) -> RequestRejected | None:
    """Return the rejection of one whole raw request head, or None.

    `text` is `head` decoded as Latin-1, when the caller has it.
    """
    if text is None:
        text = head.decode("latin-1")
    rejection = request_line_rejection(head, text)
    if rejection is None:
        problem = raw_head_problem(head, text=text)
        if problem is not None:
            rejection = RequestRejected(400, "invalid_request", problem)
    return rejection


def request_target(request: web.BaseRequest) -> str:
    """Return the request target for the pod, exactly as the client sent it."""
    return request.raw_path


# X-Forwarded-*.


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Return the networks of `cidrs`. Raises ValueError for an invalid one."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def is_trusted(peer: str, networks: tuple[Network, ...]) -> bool:
    if not networks or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


# The request body.


class BodyTooLargeError(RequestRejected):
    """A request body that grew beyond ``proxy.max_body_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, "body_too_large", f"request body exceeds the limit of {limit} bytes"
        )


class BodyTimeoutError(RequestRejected):
    """A request body whose next bytes did not arrive in time.

    Not a TimeoutError, so that it is never taken for a pod's timeout.
    """

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            "body_timeout",
            f"no request body bytes arrived for {timeout_s:g}s",
        )


class GuardedBody:
    """The client's body stream, with the body limit and inactivity timeout.

    A read that passes the limit or waits longer than the timeout raises
    `BodyTooLargeError` or `BodyTimeoutError`, and `failure` keeps it, so
    the handler can still find it after an HTTP client wrapped it.

    :param content: the request's body stream.
    :param limits: the limits of the listener.
    """

    __slots__ = ("_content", "_limits", "_received", "failure")

    def __init__(self, content: StreamReader, limits: Limits) -> None:
        self._content = content
        self._limits = limits
        self._received = 0
        self.failure: RequestRejected | None = None

    async def readany(self) -> bytes:
        return self._count(await self._wait(self._content.readany()))

    async def readexactly(self, size: int) -> bytes:
        return self._count(await self._wait(self._content.readexactly(size)))

    async def _wait(self, read: Awaitable[bytes]) -> bytes:
        if self.failure is not None:
            raise self.failure
        try:
            async with asyncio.timeout(self._limits.body_timeout_s):
                return await read
        except TimeoutError:
            self.failure = BodyTimeoutError(self._limits.body_timeout_s)
            raise self.failure from None

    def _count(self, chunk: bytes) -> bytes:
        self._received += len(chunk)
        limit = self._limits.max_body_bytes
        if limit and self._received > limit:
            self.failure = BodyTooLargeError(limit)
            raise self.failure
        return chunk


# The server.


@mypyc_attr(native_class=False)
class InboundServer(IdleSweepServer):
    """aiohttp's low-level server with the checks and limits of `Limits`.

    :param handler: the request handler, called for checked requests only.
    :param limits: the limits of this listener.
    """

    def __init__(self, handler: Handler, limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        self._checked_handler = handler
        # A method, not a closure, because mypyc 2.4.1 crashes on a nested
        # function in a method of a non-native class.
        super().__init__(
            self._check_and_handle,
            keepalive_timeout=limits.keepalive_timeout_s,
            max_line_size=limits.max_request_line_bytes,
            max_field_size=limits.max_header_field_bytes,
            max_headers=limits.max_header_count,
            # The pod gets the body bytes as the client sent them, whatever
            # their Content-Encoding. By default aiohttp 3.14 decompresses the
            # codings it supports, and the forwarded length no longer fits.
            auto_decompress=False,
            **kwargs,
        )

    async def _check_and_handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Respond with an error to a rejected request, else call the handler."""
        try:
            check_request(request, self.limits)
        except RequestRejected as exc:
            return _rejected(request, exc)
        return await self._checked_handler(request)

    def __call__(self) -> InboundRequestHandler:
        return InboundRequestHandler(self, loop=self._loop, **self._kwargs)


# The states of a client connection's bytes, as `_follow` reads them. The
# bytes are in a request head, at a chunk's size line, in a chunked body's
# trailer section, at a whole head that waits for aiohttp's message, or
# behind an upgrade request. _LOST stops the checks, and _BROKEN drops the
# bytes after a failed body or an error response.
# Final, so that mypyc puts the values in the code instead of reading the
# module's globals.
_HEAD: Final = 0
_CHUNK_SIZE: Final = 1
_TRAILERS: Final = 2
_WAITING: Final = 3
_UPGRADED: Final = 4
_LOST: Final = 5
_BROKEN: Final = 6
_LINE_ENDS: Final = b"\r\n"


def _error_message(
    rejection: RequestRejected, payload: StreamReader = EMPTY_PAYLOAD
) -> tuple[web_protocol._ErrInfo, StreamReader]:
    """Return the queue entry that makes aiohttp respond with `rejection`."""
    error = web_protocol._ErrInfo(
        status=rejection.status, exc=rejection, message=rejection.message
    )
    return error, payload


# Non-native, because mypyc 2.4.1 cannot compile a native subclass of list.
@mypyc_attr(native_class=False)
class _MessageQueue(list[Any]):
    """The parsed requests of one connection that wait for aiohttp's `start()`.

    It replaces aiohttp's `deque`, which takes about 0.7 KiB even when
    empty, where an empty list takes no buffer. aiohttp 3.14.5 calls
    append and popleft on it and tests its length and truth. This module
    also uses pop and [-1]. The parser stops at 32 queued requests, so
    `popleft` moves few items.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


@mypyc_attr(native_class=False)
class InboundRequestHandler(OnDemandRequestHandler):
    """aiohttp's connection handler with JSON errors and a header timeout."""

    __slots__ = (
        "_head",
        "_head_timer",
        "_limits",
        "_mode",
        "_refeed",
        "_skip",
    )

    def __init__(self, manager: InboundServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        strict_chunk_lines(self._parser)
        # aiohttp declares a deque, and uses only what _MessageQueue has.
        self._messages = _MessageQueue()  # type: ignore[assignment]
        self._limits = manager.limits
        # The bytes of an incomplete request head. An empty bytes object
        # until one arrives, so that an idle connection keeps no buffer.
        self._head: bytes | bytearray = b""
        self._head_timer: asyncio.TimerHandle | None = None
        # The state of the connection's bytes after the next `_skip` bytes
        # of a body (see `_follow`).
        self._mode = _HEAD
        self._skip = 0
        # Whether the bytes after the request in progress go to the parser
        # again when it ends, after an upgrade that the parser declined.
        self._refeed = False

    def _new_parser(self) -> HttpRequestParser:
        parser = super()._new_parser()
        strict_chunk_lines(parser)
        return parser

    def can_drop_parser(self) -> bool:
        return (
            not self._head
            and self._head_timer is None
            and not self._skip
            and self._mode in (_HEAD, _LOST)
            and super().can_drop_parser()
        )

    def drop_parser(self) -> None:
        super().drop_parser()
        if self._parser is None:
            # A new parser starts at a request head, and so do the checks.
            self._mode = _HEAD

    def lingers_after(self, response: web.StreamResponse) -> bool:
        # A client whose body stalled for body_timeout_s gets its 408 and
        # the close, instead of a wait of up to aiohttp's lingering_time.
        return not (isinstance(response, _ErrorResponse) and response.status == 408)

    async def _linger(
        self, loop: asyncio.AbstractEventLoop, payload: StreamReader
    ) -> None:
        if self._mode != _BROKEN and payload.exception() is None:
            try:
                await super()._linger(loop, payload)
                return
            except Exception:
                # The body failed while it was read and dropped, as below.
                pass
        # The body failed, here or in the parser, so nothing more is parsed
        # and data_received drops what still comes. `end_connection` then
        # closes the connection, also after a pod's keep-alive response.
        self._mode = _BROKEN
        self._head = b""
        self._keepalive = False

    def end_connection(self) -> None:
        """Close the connection, after the client's close when its request failed.

        After an error response, the end of the response is sent and what
        the client still sends is dropped until it closes the connection or
        lingering_time passes. An immediate close would make the kernel
        reset the connection at the client's next bytes, and the client
        could lose the response.
        """
        transport = self.transport
        assert transport is not None
        if self._mode != _BROKEN or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._cancel_head_timer()
        self._head_timer = self._loop.call_later(self._lingering_time, transport.close)

    def _awaiting_head(self) -> bool:
        """Return whether the next bytes of the connection start a request head.

        NOTE: the head of a request pipelined behind one still in progress
        is not timed here. The keep-alive timeout bounds it instead.
        """
        last = self._last_payload
        return (
            not self._messages
            and self._current_request is None
            and not self._request_in_progress
            and (last is None or last.is_eof())
        )

    def data_received(self, data: bytes) -> None:
        if self._mode == _BROKEN:
            return
        if self._force_close or self._close:
            super().data_received(data)
            return
        messages = self._messages
        queued = len(messages)
        previous = self._last_payload
        super().data_received(data)
        if (
            previous is not None
            and len(messages) > queued
            and isinstance(messages[-1][0], web_protocol._ErrInfo)
            and not previous.is_eof()
            and previous.exception() is None
        ):
            # aiohttp queues a parse error in the body's trailers, such as a
            # line beyond its limit, as a request of its own, and the body
            # would wait for bytes that never come.
            self._last_payload = previous
            self._break_body(messages[-1][0].message)
            return
        mode = self._mode
        if mode >= _UPGRADED:
            return
        if (
            mode == _HEAD
            and not self._skip
            and not self._head
            and len(messages) == queued + 1
            and messages[queued][1] is EMPTY_PAYLOAD
            and data.endswith(b"\r\n\r\n")
            and data[0] not in _LINE_ENDS
        ):
            # The common case: one whole request without a body, in one piece.
            # The first empty line is searched in str, whose find mypyc calls
            # directly, where bytes.find costs about 1,000 instructions more.
            text = data.decode("latin-1")
            # Any, because mypyc would check the C parser's RawRequestMessage
            # as a tuple, which it is not.
            message: Any = messages[queued][0]
            if (
                text.find("\r\n\r\n") == len(text) - 4
                and not isinstance(message, web_protocol._ErrInfo)
                and not message.upgrade
            ):
                problem = head_rejection(data, text)
                if problem is None:
                    if self._head_timer is not None:
                        self._cancel_head_timer()
                    return
        found = self._follow(data, queued)
        if found is not None:
            position, error, rest = found
            for _ in range(len(messages) - position):
                messages.pop()
            if error is None:
                self.data_received(rest)
                return
            messages.append(error)
            self._mode = _LOST
            self._head = b""
            self._cancel_head_timer()
            return
        if self._mode != _HEAD or not self._head:
            self._cancel_head_timer()
            return
        # An incomplete head.
        if len(self._head) > self._limits.max_header_bytes:
            too_large = (
                f"request head exceeds the limit of "
                f"{self._limits.max_header_bytes} bytes"
            )
            if self._awaiting_head():
                self._close_early(431, "header_too_large", too_large)
            else:
                # Behind a request in progress, which the error follows.
                rejected = RequestRejected(431, "header_too_large", too_large)
                self._messages.append(_error_message(rejected))
                self._mode = _LOST
                self._head = b""
        elif (
            self._head_timer is None
            and self.transport is not None
            and self._awaiting_head()
        ):
            self._head_timer = self._loop.call_later(
                self._limits.header_timeout_s, self._on_head_timeout
            )

    def _follow(self, data: bytes, queued: int) -> tuple[int, Any, bytes] | None:
        """Follow `data` through the request heads and bodies of the connection.

        Each head that `data` completes is checked raw, with the message
        that aiohttp parsed from it, the queued message at `position`.
        Returns None when every head passed. Otherwise returns the position
        in the queue from which the messages are replaced, the rejection
        that replaces them, and, when the rejection is None, the bytes that
        the parser reads again instead.
        """
        messages = self._messages
        position = queued
        if self._mode == _WAITING:
            # The bytes from the waiting head on were not followed yet.
            data = bytes(self._head) + data
            self._head = b""
            self._mode = _HEAD
        pos = 0
        end = len(data)
        while pos < end:
            skip = self._skip
            if skip:
                step = min(skip, end - pos)
                self._skip = skip - step
                pos += step
                if self._refeed and not self._skip and self._mode == _HEAD:
                    # The body of the declined upgrade ended here.
                    self._refeed = False
                    if pos < end:
                        return position, None, data[pos:]
                continue
            mode = self._mode
            buffered = len(self._head)
            if buffered:
                # Extended in place, so that a head in many small writes
                # is not copied again with each.
                chunk: bytes | bytearray = self._head
                search_from = max(buffered - 3, 0)
                if pos:
                    chunk += data[pos:]
                else:
                    chunk += data
            else:
                if mode == _HEAD:
                    # Empty lines before a request line are skipped.
                    while pos < end and data[pos] in _LINE_ENDS:
                        pos += 1
                    if pos == end:
                        break
                chunk = data[pos:] if pos else data
                search_from = 0
            if mode == _CHUNK_SIZE:
                stop = chunk.find(b"\r\n", search_from)
                if stop < 0:
                    self._head = bytearray(chunk) if not buffered else chunk
                    if len(chunk) > self._limits.max_header_field_bytes:
                        self._break_body(
                            "chunk size line exceeds the limit of "
                            f"{self._limits.max_header_field_bytes} bytes"
                        )
                    break
                self._head = b""
                pos += stop + 2 - buffered
                try:
                    size = int(chunk[:stop].partition(b";")[0], 16)
                except ValueError:
                    # The parser failed the body as well.
                    self._mode = _LOST
                    break
                if size:
                    self._skip = size + 2
                else:
                    self._mode = _TRAILERS
                continue
            if mode == _TRAILERS and chunk[:2] == b"\r\n":
                self._head = b""
                pos += 2 - buffered
                self._mode = _HEAD
                if self._refeed:
                    # The chunked body of the declined upgrade ended here.
                    self._refeed = False
                    if pos < end:
                        return position, None, data[pos:]
                continue
            stop = chunk.find(b"\r\n\r\n", search_from)
            if stop < 0:
                self._head = bytearray(chunk) if not buffered else chunk
                if mode == _TRAILERS and len(chunk) > self._limits.max_header_bytes:
                    self._break_body(
                        "trailer section exceeds the limit of "
                        f"{self._limits.max_header_bytes} bytes"
                    )
                break
            self._head = b""
            pos += stop + 4 - buffered
            if mode == _TRAILERS:
                self._mode = _HEAD
                # aiohttp's C parser (3.14.5) adds the last trailer field to
                # the headers of the next request. A new parser starts clean.
                self._parser = self._new_parser()
                self._refeed = False
                if pos < end:
                    # The messages after the trailers came from the old
                    # parser, so the new one reads their bytes again.
                    return position, None, data[pos:]
                continue
            # A whole request head, from `mode` _HEAD or _WAITING.
            if position == len(messages):
                # The parser queued no message for it yet, as it stops at a
                # full queue. It is checked when the message comes.
                self._head = chunk
                self._mode = _WAITING
                return None
            head = chunk if not buffered and pos == end else bytes(chunk[: stop + 4])
            assert isinstance(head, bytes)
            # Any for the same reason as in data_received.
            message: Any = messages[position][0]
            problem = head_rejection(head)
            if problem is not None:
                return position, _error_message(problem, messages[position][1]), b""
            position += 1
            self._mode = _HEAD
            if isinstance(message, web_protocol._ErrInfo) or (
                message.method == hdrs.METH_CONNECT
            ):
                # The connection closes after the error.
                self._mode = _LOST
                break
            if message.upgrade:
                if self._upgraded:
                    # The bytes after it belong to the tunnel, or, when the
                    # pod declines the upgrade, to `finish_response`.
                    self._mode = _UPGRADED
                    break
                # The parser declined it itself and reads on. aiohttp's C
                # parser (3.14.5) then drops the bytes after the end of this
                # request in the read where it ends, so they are fed again.
                self._refeed = not isinstance(self._parser, HttpRequestParserPy)
            if message.chunked:
                self._mode = _CHUNK_SIZE
            else:
                length = message.headers.get(hdrs.CONTENT_LENGTH)
                if length:
                    self._skip = int(length)
                elif self._refeed:
                    self._refeed = False
                    if pos < end:
                        return position, None, data[pos:]
        if position != len(messages):
            # aiohttp queued a message where no head was found: stop checking
            # rather than check the wrong bytes.
            self._mode = _LOST
            self._head = b""
        return None

    async def finish_response(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        start_time: float | None,
    ) -> tuple[web.StreamResponse, bool]:
        if (
            self._upgraded
            and not self._messages
            and self._payload_parser is None
            and self._parser is not None
        ):
            # The upgrade was declined. aiohttp would parse the bytes behind
            # it here, so they are parsed through data_received instead, and
            # checked like any others.
            self._parser.set_upgraded(False)
            self._upgraded = False
            tail = self._message_tail
            self._message_tail = b""
            if self._mode == _UPGRADED:
                self._mode = _HEAD
            if tail:
                self.data_received(tail)
        return await super().finish_response(request, resp, start_time)

    def _peer_host(self) -> Any:
        """Return the client's address without its port, for a log line."""
        peer = self.peername
        return peer[0] if isinstance(peer, tuple) else peer

    def _break_body(self, problem: str) -> None:
        """Fail the request body in progress, and ignore the rest of the connection.

        The handler reads the failure from the body and responds with 400.
        Nothing more is parsed, so a client that keeps sending costs no
        memory, and the connection closes after the response.
        """
        self._mode = _BROKEN
        self._head = b""
        logger.info("rejected request body from %s: %s", self._peer_host(), problem)
        payload = self._last_payload
        if payload is not None and not payload.is_eof():
            payload.set_exception(TransferEncodingError(problem))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self._awaiting_head() and self._mode == _HEAD and self._head:
            self._close_early(
                408,
                "header_timeout",
                f"request head not complete within {self._limits.header_timeout_s:g}s",
            )

    def _close_early(self, status: int, code: str, message: str) -> None:
        """Write an error response outside aiohttp's flow and close the connection.

        Only called while no request is in progress, so nothing else is
        written on the connection.
        """
        self._cancel_head_timer()
        self._head = b""
        logger.info(
            "closed connection from %s with %d: %s", self._peer_host(), status, message
        )
        transport = self.transport
        if transport is not None:
            body = json_error_body(code, message)
            reason = HTTPStatus(status).phrase
            transport.write(
                f"HTTP/1.1 {status} {reason}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("ascii")
                + body
            )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Return the JSON error for a request that aiohttp could not handle.

        A parse error is logged as one line with the peer and the reason.
        Only an unexpected handler error (500) is logged with its traceback.
        The connection ends after the error, so nothing more is parsed.
        """
        self._mode = _BROKEN
        self._head = b""
        if request.writer.output_size > 0:
            # aiohttp's own behaviour: a response already started, so the
            # connection can only be broken off.
            raise ConnectionError("response already started, cannot send an error")
        if isinstance(exc, RequestRejected):
            return _rejected(request, exc)
        if isinstance(exc, HttpProcessingError) and status == 400:
            status, code = _parse_error_status(exc)
            reason = (exc.message or type(exc).__name__)[:200]
            logger.info(
                "rejected request from %s with %d: %s",
                peer_of(request),
                status,
                reason,
            )
            return closing_error(status, code, reason)
        if status == 500:
            logger.error(
                "unexpected error handling request from %s",
                peer_of(request),
                exc_info=exc,
            )
            return closing_error(500, "internal_error", "internal proxy error")
        phrase = HTTPStatus(status).phrase
        logger.info("request from %s ended with %d", peer_of(request), status)
        return closing_error(status, "request_failed", phrase)


def _parse_error_status(exc: HttpProcessingError) -> tuple[int, str]:
    """Return the status and error code of an aiohttp parse error."""
    # Both parsers raise LineTooLong for a long line and the same
    # BadHttpMessage text for too many headers (aiohttp 3.14.5).
    if isinstance(exc, LineTooLong) or exc.message == "Too many headers received":
        return 431, "header_too_large"
    # The C parser's error for a version it does not know, such as HTTP/1.2,
    # in a request pipelined behind another (the first is checked raw).
    if isinstance(exc, BadStatusLine) and "Invalid HTTP version" in exc.message:
        return 505, "unsupported_http_version"
    return 400, "invalid_request"


def _rejected(request: web.BaseRequest, exc: RequestRejected) -> web.Response:
    """Log a rejected request and return its error response, which closes."""
    logger.info(
        "rejected request from %s with %d: %s",
        peer_of(request),
        exc.status,
        exc.message,
    )
    return closing_error(exc.status, exc.code, exc.message)
