"""One keep-alive HTTP/1.1 connection to a pod, as an asyncio protocol.

A connection carries one exchange at a time: it writes the request with
write backpressure, parses the response with httptools, and buffers body
chunks for the reader, pausing the transport when the buffer grows past
`_HIGH_WATER` bytes. An idle-read timer restarts on every received byte
and on every request body chunk written, so a slow but active stream is
never cut.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Final, cast

import httptools
from aiohttp import StreamReader
from mypy_extensions import mypyc_attr

from proxy.errors import StatefulRouteError
from proxy.retry import Stage

if TYPE_CHECKING:
    from proxy.upstream import UpstreamBody, UpstreamPool, _PodPool

# Buffered response bytes above which reading from the pod pauses, and
# below which it resumes.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER = 64 * 1024
# Seconds to wait for the pod's 100 Continue before sending the body
# anyway, as RFC 9110, section 10.1.1 lets a client do. curl waits 1 s.
_EXPECT_WAIT_S = 1.0
# Statuses whose responses never have a body (RFC 9110, section 6.4.1).
_BODYLESS_STATUSES: Final = frozenset({204, 304})
_NO_TOKENS: frozenset[str] = frozenset()
_CONTENT_LENGTH: Final = "\r\ncontent-length:"
_LINE_BREAK_BYTES = (ord("\r"), ord("\n"))
_SPACE: Final = 0x20
# Maximum size of the bytes that `split_head` searches in a decoded copy.
_DECODED_SEARCH_BYTES: Final = 1024
# Largest response head, final or interim, taken from a pod; a larger one
# is a 502. .NET's HttpClient also takes at most 64 KiB by default
# (HttpClientHandler.MaxResponseHeadersLength).
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024
# Maximum interim (1xx) responses before the final one of a request. More are
# a 502. Ruby's net-http has the same bound
# (Net::HTTPResponse::MAX_INFORMATIONAL_RESPONSES).
MAX_INTERIM_RESPONSES = 100


class UpstreamFailure(StatefulRouteError):
    """A request to a pod that failed; `stage` is how far it got."""

    def __init__(self, stage: Stage, cause: BaseException) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"{stage.value} failure: {cause!r}")


class InvalidRequestError(StatefulRouteError, ValueError):
    """A request target or header that cannot go into a request unchanged."""

    def __init__(self, part: str, value: str) -> None:
        self.part = part
        self.value = value
        super().__init__(
            f"invalid {part} {value[:200]!r}: it contains a space, CR, LF, NUL "
            "or another control character"
        )


# mypyc 2.4.1 compiles a subclass of TimeoutError or ConnectionError only
# as a non-native class.
@mypyc_attr(native_class=False)
class ConnectTimeoutError(StatefulRouteError, TimeoutError):
    """A connection to a pod that was not established within the connect timeout."""


@mypyc_attr(native_class=False)
class PoolTimeoutError(StatefulRouteError, TimeoutError):
    """No pooled connection to a pod came free within the wait."""


@mypyc_attr(native_class=False)
class ReadTimeoutError(StatefulRouteError, TimeoutError):
    """A pod that sent no byte within the read timeout."""


class InvalidResponseError(StatefulRouteError, ValueError):
    """A response that is not valid HTTP/1.1, or one the proxy does not relay."""


@mypyc_attr(native_class=False)
class ConnectionClosedError(StatefulRouteError, ConnectionError):
    """A pod connection that closed or was reset before the response ended."""


class ClientBodyError(StatefulRouteError):
    """Reading the client's request body failed, so the request was cut off."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(f"reading the client's request body failed: {cause!r}")


class _HeadResponseDone(Exception):
    """Raised from the parser callback to stop after the head of a HEAD response."""


class UpstreamResponse:
    """The final response of a pod: status, reason, headers and a streamed body.

    `header_block` keeps the pod's header lines as received, each one
    preceded by CRLF, and ends with CRLF. llhttp accepted every byte of it,
    so it has no CR or LF outside the line ends, no NUL and no obs-fold.
    `status_line` is the pod's status line after its protocol version, such
    as ``b" 200 OK"``.
    """

    __slots__ = (
        "_connection",
        "_headers",
        "_released",
        "_tokens",
        "header_block",
        "length_known",
        "lowered_block",
        "request_sent",
        "status",
        "status_line",
    )

    def __init__(
        self,
        connection: Connection,
        status: int,
        status_line: bytes,
        header_block: bytes,
        length_known: bool,
    ) -> None:
        self._connection = connection
        self._released = False
        self.status = status
        self.status_line = status_line
        self.header_block = header_block
        # `header_block` decoded as Latin-1 and lowercased, so its offsets
        # are those of `header_block`. `in` finds header names in it, which
        # is cheaper than in bytes (see `proxy.client_head`).
        self.lowered_block = header_block.decode("latin-1").lower()
        # Whether `content_length` is not None, known without parsing it.
        self.length_known = length_known
        self._headers: list[tuple[str, str]] | None = None
        self._tokens: frozenset[str] | None = None
        # False when the pod responded before the whole request body was sent.
        self.request_sent = False

    @property
    def reason(self) -> str:
        """The reason phrase, "" when the pod sent none."""
        return self.status_line[5:].decode("utf-8", "surrogateescape")

    @property
    def content_length(self) -> int | None:
        """The pod's Content-Length, or 0 for a bodyless response without one."""
        lowered = self.lowered_block
        if _CONTENT_LENGTH in lowered:
            # llhttp rejects a second Content-Length and any value that is not
            # digits, so this is the only one and int() takes it.
            return int(lowered.partition(_CONTENT_LENGTH)[2].partition("\r\n")[0])
        return 0 if self.length_known else None

    @property
    def connection_tokens(self) -> frozenset[str]:
        """The lowercased options of the pod's Connection headers.

        They name the headers that apply to the pod's connection only.
        """
        tokens = self._tokens
        if tokens is None:
            tokens = self._tokens = connection_tokens(self.lowered_block)
        return tokens

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Every header line in order, repeats included.

        Values lose their leading spaces and tabs, as llhttp's header
        callbacks give them, and keep their trailing ones.
        """
        headers = self._headers
        if headers is None:
            headers = self._headers = parse_header_block(self.header_block)
        return headers

    @property
    def complete(self) -> bool:
        """Whether the whole body is buffered, so `read` will not wait."""
        return self._connection.message_complete

    async def read(self) -> bytes:
        """Return the body bytes buffered so far, waiting for some; b"" at the end.

        Raises `ConnectionClosedError` when the pod ended the body early,
        `ReadTimeoutError` after the read timeout, and `InvalidResponseError`
        for an invalid body.
        """
        return await self._connection.read_body()

    def read_complete(self) -> bytes:
        """Return the whole body of a `complete` response without waiting."""
        if not self._connection.message_complete:
            raise RuntimeError("read_complete() needs a complete response")
        return self._connection.take_body()

    @property
    def tunnel(self) -> bool:
        """Whether the pod switched protocols (101), so the body is raw bytes."""
        return self._connection.tunnel

    def write(self, data: bytes) -> None:
        """Write raw bytes to the pod through a tunnel opened by a 101."""
        self._connection.write_tunnel(data)

    def release(self) -> None:
        """Return the connection to the pool, or close it if it cannot be reused.

        It is reused only after a complete response without
        ``Connection: close`` to a request that was sent whole.
        """
        if self._released:
            return
        self._released = True
        self._connection.finish()


class Connection(asyncio.Protocol):
    """One TCP connection to a pod, carrying one exchange at a time."""

    def __init__(self, owner: UpstreamPool, pool: _PodPool) -> None:
        self.owner = owner
        self.pool = pool
        self.reused = False
        # Set once the pool counts the connection in its pool's `open`.
        self.counted = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._broken = False
        self._active = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.tunnel = False
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout_s: float | None = None
        self._last_activity = 0.0
        self._chunks: deque[bytes] = deque()
        # The bytes received from the start of the response head in
        # progress, kept until llhttp has parsed the final response head.
        self._head_parts: list[bytes] = []
        self._reset_exchange()

    def loop_time(self) -> float:
        """Return the time of the loop that runs this connection."""
        return self._loop.time()

    def _reset_exchange(self) -> None:
        self._head_only = False
        self._upgrade = False
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._continue_waiter: asyncio.Future[None] | None = None
        self._response: UpstreamResponse | None = None
        self._head_parts.clear()
        self._head_size = 0
        self._interim_count = 0
        self._transfer_encoding: str | None = None
        self._keep_alive = False
        self._received = False
        self._chunks.clear()
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self.message_complete = False
        self._error: BaseException | None = None
        self._sender: asyncio.Task[None] | None = None
        self._request_sent = False
        # Set while the sender of a streamed body waits for the client's
        # next bytes, when a silent pod is not the one to blame.
        self._awaiting_client = False

    @property
    def usable(self) -> bool:
        """Whether the connection is open, idle and fit to carry a request."""
        transport = self._transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self._broken
            and not self._active
        )

    # Exchange.

    async def exchange(
        self,
        head: bytes,
        body: UpstreamBody,
        *,
        chunked: bool,
        head_only: bool,
        upgrade: bool,
        read_timeout_s: float | None,
        on_continue: Callable[[], Awaitable[None]] | None,
    ) -> UpstreamResponse:
        """Send one request and return its final response once its head arrived.

        With `upgrade`, a 101 response turns the connection into a tunnel
        whose bytes `read` and `write` carry. A failure closes the
        connection.
        """
        if self._transport is None or self._active:
            self.close()
            raise RuntimeError("exchange() needs an open and idle connection")
        self._active = True
        self._head_only = head_only
        self._upgrade = upgrade
        self._read_timeout_s = read_timeout_s
        head_waiter = self._head_waiter = self._loop.create_future()
        try:
            self._write_request(head, body, chunked, on_continue is not None)
            if on_continue is not None:
                await self._await_continue(head_waiter, on_continue, body, chunked)
            elif isinstance(body, bytes):
                await self._drain()
            self._start_timer()
            await head_waiter
            return self._head_result(head_waiter)
        except BaseException:
            # No caller awaits the head now, so a later failure must not
            # leave an exception that is never retrieved.
            if not head_waiter.done():
                head_waiter.cancel()
            self.close()
            raise

    def _write_request(
        self, head: bytes, body: UpstreamBody, chunked: bool, expect: bool
    ) -> None:
        """Write the head and a bytes body, or start the sender of a streamed one.

        With `expect`, only the head is written, and the body waits for the
        pod's 100 Continue in `_await_continue`.
        """
        transport = self._transport
        assert transport is not None
        if expect:
            self._continue_waiter = self._loop.create_future()
            transport.write(head)
        elif body is None:
            transport.write(head)
            self._request_sent = True
        elif isinstance(body, bytes):
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
            self._request_sent = True
        else:
            transport.write(head)
            self._sender = self._loop.create_task(self._send_body(body, chunked))

    async def _await_continue(
        self,
        head_waiter: asyncio.Future[UpstreamResponse],
        on_continue: Callable[[], Awaitable[None]],
        body: UpstreamBody,
        chunked: bool,
    ) -> None:
        """Wait for the pod's 100 Continue or final response, then send the body.

        A final response that comes first ends the wait, and the body is
        never sent.
        """
        continued = self._continue_waiter
        assert continued is not None
        self._start_timer()
        # A pod need not send 100 Continue, so the read timeout does not run
        # while the proxy keeps the body back.
        self._awaiting_client = True
        try:
            await asyncio.wait(
                (head_waiter, continued),
                timeout=_EXPECT_WAIT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self._awaiting_client = False
        self._last_activity = self._loop.time()
        if head_waiter.done():
            # The pod sent a final response before the body, so the body is
            # never sent and the connection cannot carry another one.
            self._broken = True
            return
        await on_continue()
        self._sender = self._loop.create_task(self._send_body(body, chunked))

    def _head_result(
        self, waiter: asyncio.Future[UpstreamResponse]
    ) -> UpstreamResponse:
        response = waiter.result()
        response.request_sent = self._request_sent
        return response

    async def _send_body(self, body: UpstreamBody, chunked: bool) -> None:
        """Write a streamed body, then mark the request sent.

        A failed read of the client's body aborts the connection, so the pod
        receives a cut request, and fails the exchange with `ClientBodyError`.
        """
        chunks: AsyncIterator[bytes]
        if isinstance(body, StreamReader):
            chunks = body.iter_any()
        elif isinstance(body, bytes):
            chunks = _OneChunk(body)
        else:
            assert body is not None
            chunks = body
        transport = self._transport
        assert transport is not None
        self._awaiting_client = True
        try:
            async for chunk in chunks:
                self._awaiting_client = False
                if chunk and not self._closed:
                    if chunked:
                        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    else:
                        transport.write(chunk)
                    # An upload in progress keeps the read timeout from
                    # firing, because a pod may respond only after the whole
                    # body. A pod that stops reading it stalls the drain,
                    # and the read timeout runs.
                    self._last_activity = self._loop.time()
                    await self._drain()
                self._awaiting_client = True
            # The pod's read timeout runs from the end of the request.
            self._awaiting_client = False
            self._last_activity = self._loop.time()
            if chunked and not self._closed:
                transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise
        except ConnectionClosedError:
            # The pod closed the connection, which connection_lost reports.
            return
        except Exception as exc:
            self._fail(ClientBodyError(exc))
            self.close()
            return
        finally:
            self._awaiting_client = False
        self._request_sent = True
        if self._response is not None:
            self._response.request_sent = True

    async def read_body(self) -> bytes:
        while not self._chunks:
            if self.message_complete:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._body_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._body_waiter = None
        return self.take_body()

    def take_body(self) -> bytes:
        """Return the body bytes buffered so far without waiting; b"" for none."""
        chunks = self._chunks
        if not chunks:
            return b""
        if len(chunks) == 1:
            data = chunks.popleft()
        else:
            data = b"".join(chunks)
            chunks.clear()
        self._buffered = 0
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    def write_tunnel(self, data: bytes) -> None:
        if not self.tunnel:
            raise RuntimeError("write() needs a tunnel opened by a 101 response")
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def finish(self) -> None:
        """End the exchange: back to the pool when reusable, else closed."""
        reusable = (
            self.message_complete
            and self._keep_alive
            and self._request_sent
            and not self._head_only
            and not self.tunnel
            and not self._broken
            and not self._closed
            and self._error is None
        )
        sender = self._sender
        if sender is not None and not sender.done():
            sender.cancel()
            reusable = False
        if not reusable:
            self._cancel_timer()
        self._reset_exchange()
        self._active = False
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        self.owner.release(self, reusable)

    def close(self) -> None:
        self._broken = True
        if self._transport is not None and not self._closed:
            self._transport.abort()

    # Write backpressure.

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _drain(self) -> None:
        if self._closed:
            raise ConnectionClosedError("the pod closed the connection")
        if not self._write_paused:
            return
        waiter = self._drain_waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None
        if self._closed:
            raise ConnectionClosedError("the pod closed the connection")

    # Protocol callbacks.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if not self._active or self.message_complete:
            # Bytes that no request asked for mean the connection is out of step.
            self.close()
            return
        self._received = True
        if self.tunnel:
            self.on_body(data)
            return
        if self._response is None:
            self._head_parts.append(data)
            self._head_size += len(data)
        try:
            self._parser.feed_data(data)
            if self._response is None and self._active:
                self._check_head_size()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadResponseDone):
                self._complete_message()
                return
            if not isinstance(cause, InvalidResponseError):
                cause = InvalidResponseError(f"invalid response: {exc}")
            self._fail(cause)
            self.close()
        except httptools.HttpParserUpgrade as upgrade:
            if not self.tunnel:
                self._fail(InvalidResponseError("unexpected upgrade in a response"))
                self.close()
                return
            offset = int(upgrade.args[0])
            if offset < len(data):
                self.on_body(data[offset:])
        except httptools.HttpParserError as parse_error:
            self._fail(InvalidResponseError(f"invalid response: {parse_error}"))
            self.close()

    def _check_head_size(self) -> None:
        """Fail the exchange once a response head in progress is too large.

        Until the head is complete, every byte in `_head_parts` is a head
        byte, and `_head_size` counts them, so a head sent in many small
        reads costs no more than one sent whole.
        """
        if self._head_size > MAX_RESPONSE_HEAD_BYTES:
            self._fail(InvalidResponseError(_head_too_large()))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._broken = True
        self._cancel_timer()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._active and not self.message_complete:
            if self._close_delimited and exc is None:
                self._complete_message()
            else:
                self._fail(self._closed_error(exc))
        self.owner.forget(self)

    @property
    def _close_delimited(self) -> bool:
        """Whether the body in progress ends when the pod closes the connection."""
        return self._response is not None and (
            self.tunnel
            or (
                self._response.content_length is None
                and self._transfer_encoding is None
            )
        )

    def _closed_error(self, exc: Exception | None) -> ConnectionClosedError:
        reason = "reset" if isinstance(exc, ConnectionResetError) else "closed"
        if self._response is not None:
            return ConnectionClosedError(
                f"the pod {reason} the connection before the end of the body"
            )
        if self._received:
            return ConnectionClosedError(
                f"the pod {reason} the connection in the middle of the response head"
            )
        return ConnectionClosedError(
            f"the pod {reason} the connection before responding"
        )

    # Parser callbacks, called by httptools during feed_data.

    # httptools calls only the callbacks that the protocol defines. There is
    # no on_status, on_header or on_message_begin, because each call from
    # llhttp into Python costs thousands of instructions. The head's bytes
    # come from `_head_parts` once llhttp has accepted the whole head.

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        parts = self._head_parts
        received = parts[0] if len(parts) == 1 else b"".join(parts)
        if received[0] in _LINE_BREAK_BYTES:
            # llhttp skips CR and LF bytes before a status line.
            received = received.lstrip(b"\r\n")
        status_line, block, head_end = split_head(received)
        if head_end > MAX_RESPONSE_HEAD_BYTES:
            raise InvalidResponseError(_head_too_large())
        if status < 100:
            # llhttp takes any three digits, and 0xx is no status class.
            raise InvalidResponseError(f"status {status} below 100")
        if 0 in status_line:
            # llhttp accepts NUL in a reason phrase, which no client gets.
            raise InvalidResponseError("NUL in the status line")
        if status == 101 and self._upgrade:
            # A tunnel has no read timeout, because a WebSocket may stay
            # quiet for long.
            self.tunnel = True
            self._cancel_timer()
            parts.clear()
            response = UpstreamResponse(self, status, status_line, block, False)
            self._response = response
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(response)
            return

        if status < 200:
            if status == 101:
                raise InvalidResponseError("101 Switching Protocols without Upgrade")
            self._interim_count += 1
            if self._interim_count > MAX_INTERIM_RESPONSES:
                # Each one restarts the read timeout, so without a bound a
                # pod could keep the request open forever.
                raise InvalidResponseError(
                    f"more than {MAX_INTERIM_RESPONSES} interim responses"
                )
            # The next response head starts after this one, which has no body.
            parts[:] = (received[head_end:],)
            self._head_size = len(parts[0])
            # An interim response is skipped. A 100 lets an Expect request
            # send its body.
            continued = self._continue_waiter
            if status == 100 and continued is not None and not continued.done():
                continued.set_result(None)
            return

        parts.clear()
        response = UpstreamResponse(self, status, status_line, block, False)
        lowered = response.lowered_block
        if "\r\ntransfer-encoding:" in lowered:
            coding = lowered.rpartition("\r\ntransfer-encoding:")[2].partition("\r\n")
            self._transfer_encoding = coding[0].strip()
            if self._transfer_encoding != "chunked":
                raise InvalidResponseError(
                    f"unsupported Transfer-Encoding {self._transfer_encoding!r}"
                )
        self._keep_alive = self._parser.should_keep_alive()
        response.length_known = (
            _CONTENT_LENGTH in lowered
            or self._head_only
            or status in _BODYLESS_STATUSES
        )
        self._response = response
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self._head_only:
            # llhttp would wait for a body of Content-Length bytes, because it
            # does not know the request was HEAD. NOTE: the parser cannot go
            # on after this stop, so a connection is never reused after HEAD.
            raise _HeadResponseDone

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        # llhttp also ends the message of a 101, but a tunnel ends at close.
        if self._response is not None and not self.tunnel:
            # A Connection: close in the trailer section ends keep-alive too.
            self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
            self._complete_message()

    # Internals.

    def _complete_message(self) -> None:
        # The read timer stays armed and stops when it fires, so that a
        # keep-alive connection schedules one timer per read timeout instead
        # of one per request.
        self.message_complete = True
        self._wake_reader()

    def _fail(self, error: BaseException) -> None:
        if self._error is not None or self.message_complete:
            return
        self._error = error
        self._cancel_timer()
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamFailure(self._stage(error), error))
        continued = self._continue_waiter
        if continued is not None and not continued.done():
            continued.set_result(None)
        self._wake_reader()

    def _stage(self, error: BaseException) -> Stage:
        if isinstance(error, ReadTimeoutError):
            return Stage.TIMEOUT
        if isinstance(error, ConnectionClosedError) and not self._received:
            if not self.reused:
                return Stage.SENT
            # The pod most likely closed its idle connections, as on a
            # restart, so the retry of a stale request gets a new one.
            self.owner.close_idle(self.pool)
            return Stage.STALE
        if isinstance(error, ConnectionClosedError) and self._response is None:
            return Stage.SENT
        return Stage.OTHER

    def _wake_reader(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _start_timer(self) -> None:
        """Start the read timeout of an exchange, reusing a timer still armed."""
        timeout = self._read_timeout_s
        if timeout is None or self.tunnel:
            self._cancel_timer()
            return
        now = self._last_activity = self._loop.time()
        if self._timer is not None:
            if self._timer.when() <= now + timeout:
                return
            # An earlier exchange had a longer timeout.
            self._timer.cancel()
        self._timer = self._loop.call_at(now + timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        timeout = self._read_timeout_s
        if timeout is None or not self._active or self.message_complete:
            # The exchange ended, so nothing waits for the pod.
            self._timer = None
            return
        now = self._loop.time()
        if self._reading_paused or (self._awaiting_client and self._response is None):
            # The caller lags behind, or the client has not sent the whole
            # request yet, so the pod is not the one that is silent. A client
            # that stops sending gets its 408 after `body_timeout_s`.
            self._last_activity = now
        if now - self._last_activity < timeout:
            self._timer = self._loop.call_at(
                self._last_activity + timeout, self._check_timeout
            )
            return
        self._timer = None
        self._fail(ReadTimeoutError(f"no data from the pod for {timeout}s"))
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _head_too_large() -> str:
    return f"response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes"


class _OneChunk:
    """An async iterator over one body, since mypyc 2.4.1 has no async generators."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __aiter__(self) -> _OneChunk:
        return self

    async def __anext__(self) -> bytes:
        body = self._body
        if body is None:
            raise StopAsyncIteration
        self._body = None
        return body


def split_head(received: bytes) -> tuple[bytes, bytes, int]:
    """Split a response head that llhttp accepted at the start of `received`.

    Returns the status line after the protocol version (``b" 200 OK"``),
    the header block (each header line preceded by CRLF, then a final
    CRLF) and the offset after the head's empty line. llhttp ends the
    status line and every header line with CRLF and rejects CR or LF
    anywhere else, so the first empty line ends the head.
    """
    if len(received) <= _DECODED_SEARCH_BYTES:
        # mypyc calls str.find directly, where bytes.find costs about 1,000
        # instructions more, which is more than decoding a short read.
        # Latin-1 keeps the offsets of the bytes.
        text = received.decode("latin-1")
        end = text.find("\r\n\r\n")
        line_end = text.find("\r\n")
    else:
        end = received.find(b"\r\n\r\n")
        line_end = received.find(b"\r\n")
    if end < 0:
        # llhttp accepted a head that this function does not see as one.
        raise InvalidResponseError("response head not found in the received bytes")
    # llhttp 9 accepts the versions HTTP/d.d and RTSP/d.d, 8 bytes, and
    # ICE/d.d, 7 bytes.
    version_end = 7 if received[7] == _SPACE else 8
    return received[version_end:line_end], received[line_end : end + 2], end + 4


def connection_tokens(lowered: str) -> frozenset[str]:
    """Return the options of every Connection header of a lowercased header block."""
    tokens: set[str] = set()
    for value in lowered.split("\r\nconnection:")[1:]:
        options = value.partition("\r\n")[0].split(",")
        tokens.update(option.strip() for option in options)
    return frozenset(tokens) if tokens else _NO_TOKENS


def parse_header_block(block: bytes) -> list[tuple[str, str]]:
    """Return the (name, value) pairs of a header block, decoded as UTF-8.

    Bytes that are not UTF-8 become surrogate escapes, so encoding with
    ``surrogateescape`` restores them.
    """
    headers = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.partition(b":")
        headers.append(
            (
                name.decode("utf-8", "surrogateescape"),
                value.lstrip(b" \t").decode("utf-8", "surrogateescape"),
            )
        )
    return headers
