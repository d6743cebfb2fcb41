"""Client connections of aiohttp's server that keep little while they are idle.

aiohttp 3.14's `RequestHandler` runs one task per connection for the whole
life of the connection, and on Python 3.11 one more task per request. While
it waits for the next request, the connection task's frame still refers to
the last request, its parsed message, its writer and its response, and each
connection has a keep-alive timer of its own. With 10,000 idle keep-alive
connections that was most of the proxy's resident memory.

`OnDemandRequestHandler` runs a task only while requests are queued: the
task starts when the parser queues a request and ends when the queue is
empty, and the request handler runs in that task. An idle connection then
keeps its transport, the handler object and, until it drops it, its
parser, and nothing of the last request. `IdleSweepServer` replaces the
per-connection keep-alive timers with one timer per server that closes the
connections idle past their deadline, so a connection closes between
``keepalive_timeout`` and ``keepalive_timeout`` plus one sweep interval
after its last response.

A connection idle for a whole sweep interval is parked: a
`ParkedConnection`, which keeps only the server, the transport, the
connection's deadline and its request count, becomes the transport's
protocol. The handler with its parser, its queue and the addresses that
aiohttp cached on it is dropped. The next bytes from the client make a new
handler, and bytes that start no request leave the deadline as it was. Only
a connection whose last bytes ended with an empty line, with no request or
body in progress, is parked, so that no part of a pipelined request is lost.
A connection that cannot be parked still drops its parser when it may. With
10,000 idle connections, parking kept the resident memory of the proxy 5 MiB
lower than dropping only the parsers (benchmarks/idle_connections.py).

From `DROP_AT_ONCE_CONNECTIONS` open connections on, a connection drops its
parser as soon as it becomes idle. From `PARK_AT_ONCE_CONNECTIONS` on, it is
parked as soon as it becomes idle. Otherwise a burst of new connections
would leave thousands of handlers until the next sweep, and the process
keeps their memory after they are freed. Dropping the parser at the end of
every request costs 6 % more instructions per request under callgrind
(benchmarks/instructions.py), and making a new handler for a parked
connection takes about 5 µs, so neither happens at once with fewer
connections.

The request loop follows `RequestHandler.start()` and
`RequestHandler._handle_request()` of aiohttp 3.14.5 step by step. It uses
that class's internals ``_messages``, ``_task_handler``,
``_next_keepalive_close_time``, ``_make_error_handler``, ``_parser``,
``_cache``, ``_current_request``, ``_request_in_progress``,
``_handler_waiter``, ``_request_count``, ``_waiter``, ``_manager``,
``_request_handler`` and ``_request_factory``, ``_paused`` of
`BaseProtocol`, ``_connections`` of `web.Server`, and the module's ``ERROR``
and ``_PAYLOAD_ACCESS_ERROR``. The parser is made with the arguments of
`RequestHandler.__init__`. `fill_request_cache` writes ``_cache`` of
`BaseRequest` and reads its ``_transport_sslcontext`` and
``_transport_peername``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, cast

import aiohttp.web_protocol
import aiohttp.web_server
from aiohttp import StreamReader, web, web_protocol
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import ceil_timeout
from aiohttp.http import HttpRequestParser, StreamWriter
from aiohttp.streams import EmptyStreamReader
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_request import BaseRequest
from mypy_extensions import mypyc_attr

from proxy.client_head import SentResponse

logger = logging.getLogger("stateful_route.connections")

# The maximum time between two sweeps for idle connections. A shorter
# keep-alive timeout sweeps four times per timeout.
MAX_SWEEP_INTERVAL_S = 1.0
# From this many open connections on, a connection drops its parser as soon
# as it becomes idle, instead of at the next sweep.
DROP_AT_ONCE_CONNECTIONS = 1_000
# From this many open connections on, a connection is parked as soon as it
# becomes idle, instead of at the next sweep.
PARK_AT_ONCE_CONNECTIONS = 2_000
# aiohttp's default ``timeout_ceil_threshold`` in seconds, as a float:
# RequestHandler stores float(value), which is this object itself, where
# the default int 5 would give every connection a float of its own.
_TIMEOUT_CEIL_THRESHOLD_S = 5.0


class ParkedConnection:
    """The protocol of an idle client connection whose handler was dropped.

    It keeps the server, the transport, the connection's deadline and its
    request count, about 0.1 KiB where a handler keeps about 0.6 KiB. The
    first bytes from the client give the connection a new handler through
    `IdleSweepServer.unpark`, which makes it the transport's protocol again.

    :param server: the server that keeps the parked connections.
    :param transport: the connection's transport.
    :param close_time: the loop time at which the idle connection expires.
    :param request_count: the requests that the connection sent so far.
    """

    def __init__(
        self,
        server: IdleSweepServer,
        transport: asyncio.Transport,
        close_time: float,
        request_count: int,
    ) -> None:
        self.server = server
        self.transport = transport
        self.close_time = close_time
        self.request_count = request_count

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop calls this only on the protocol that a transport starts with,
        # which was the handler.
        pass

    def data_received(self, data: bytes) -> None:
        self.server.unpark(self, data)

    def eof_received(self) -> bool:
        # The client ended the connection between requests. False lets the
        # transport close it, as aiohttp's handler does.
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.parked_lost(self)

    def pause_writing(self) -> None:
        # Nothing is written to a parked connection.
        pass

    def resume_writing(self) -> None:
        pass


# Non-native, because mypyc 2.4.1 fails at import on a native subclass of
# aiohttp's RequestHandler ("mypyc classes can't have __slots__"). NOTE:
# web.Server was not tried as a native base. The base is named in its
# defining module, because mypyc's C for a non-native class with a
# re-exported base, such as web.Server, does not compile.
@mypyc_attr(native_class=False)
class IdleSweepServer(aiohttp.web_server.Server):
    """aiohttp's low-level server whose idle connections close in a sweep.

    :param keepalive_timeout: seconds an idle connection stays open. With 0
        or less, idle connections stay open until the client closes them.
    :param socket_options_set: whether the site sets TCP_NODELAY and
        SO_KEEPALIVE on each connection itself, as
        `proxy.listener.BatchAcceptSite` does. The handlers then skip
        aiohttp's own calls, which make uvloop keep a socket object per
        connection.
    """

    def __init__(
        self,
        *args: Any,
        keepalive_timeout: float,
        socket_options_set: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout_ceil_threshold", _TIMEOUT_CEIL_THRESHOLD_S)
        super().__init__(*args, keepalive_timeout=keepalive_timeout, **kwargs)
        self.socket_options_set = socket_options_set
        self.keepalive_timeout = keepalive_timeout
        self.sweep_interval_s = min(MAX_SWEEP_INTERVAL_S, max(keepalive_timeout, 0) / 4)
        self._sweep_handle: asyncio.TimerHandle | None = None
        # The idle connections whose handlers were dropped.
        self._parked: set[ParkedConnection] = set()

    def connection_made(
        self, handler: web_protocol.RequestHandler, transport: asyncio.Transport
    ) -> None:
        super().connection_made(handler, transport)
        if self._sweep_handle is None and self.keepalive_timeout > 0:
            self._sweep_handle = self._loop.call_later(
                self.sweep_interval_s, self._sweep
            )

    def open_connections(self) -> int:
        """Return how many client connections are open, parked ones included."""
        return len(self._connections) + len(self._parked)

    def client_transports(self) -> list[asyncio.Transport]:
        """Return the transports of the open client connections."""
        transports = [parked.transport for parked in self._parked]
        for handler in self._connections:
            if handler.transport is not None:
                transports.append(handler.transport)
        return transports

    def park(
        self, handler: web_protocol.RequestHandler, parked: ParkedConnection
    ) -> None:
        """Keep `parked` in place of the idle `handler`, which is dropped."""
        self._connections.pop(handler, None)
        self._parked.add(parked)

    def unpark(self, parked: ParkedConnection, data: bytes) -> None:
        """Give a parked connection a new handler, which reads `data` first."""
        self._parked.discard(parked)
        handler = self()
        # aiohttp logs a request that is not HTTP as an error, except as
        # the first of its connection.
        handler._request_count = parked.request_count
        transport = parked.transport
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(data)
        if handler._task_handler is None and handler.can_drop_parser():
            # Bytes that start no request, such as empty lines, keep the
            # deadline of the last response, as they do on a handler.
            handler._next_keepalive_close_time = parked.close_time
        # NOTE: bytes that end inside a line, such as a lone CRLF, leave the
        # new deadline in place, once, so such a client can hold the
        # connection for up to twice the keep-alive timeout.

    def parked_lost(self, parked: ParkedConnection) -> None:
        self._parked.discard(parked)

    def _sweep(self) -> None:
        """Close connections idle past their deadline, park the other idle ones."""
        now = self._loop.time()
        # An idle connection whose deadline is before this one has been idle
        # for at least a sweep interval.
        idle_before = now - self.sweep_interval_s + self.keepalive_timeout
        expired = []
        idle = []
        for handler in self._connections:
            if handler._task_handler is not None:
                continue
            close_time = handler._next_keepalive_close_time
            if close_time <= now:
                expired.append(handler)
            elif close_time <= idle_before:
                idle.append(handler)
        for handler in expired:
            handler.force_close()
        for handler in idle:
            cast(OnDemandRequestHandler, handler).park()
        for parked in [p for p in self._parked if p.close_time <= now]:
            # Its connection_lost removes it from the parked ones.
            parked.transport.close()
        if self._connections or self._parked:
            self._sweep_handle = self._loop.call_later(
                self.sweep_interval_s, self._sweep
            )
        else:
            self._sweep_handle = None

    def __call__(self) -> OnDemandRequestHandler:
        return OnDemandRequestHandler(self, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        self._close_parked()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        # The signature is aiohttp's, which the runner calls.
        await super().shutdown(timeout)
        self._close_parked()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def _close_parked(self) -> None:
        for parked in list(self._parked):
            parked.transport.close()


@mypyc_attr(native_class=False)
class OnDemandRequestHandler(aiohttp.web_protocol.RequestHandler):
    """aiohttp's connection handler with a task only while requests are queued.

    ``_task_handler`` is that task, or None while the connection is idle.
    ``_next_keepalive_close_time`` is the time at which an idle connection
    expires, which `IdleSweepServer` checks. ``_parser`` is None while the
    connection is idle and its parser was dropped.
    """

    __slots__ = (
        "_at_boundary",
        "_auto_decompress",
        "_close_after_request",
        "_last_payload",
    )

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._auto_decompress: bool = kwargs.get("auto_decompress", True)
        # The body of the last request that the parser queued.
        self._last_payload: StreamReader | None = None
        # Whether the last bytes received end with an empty line. With the
        # body of the last request complete, the parser then ended a message.
        self._at_boundary = True
        # Set by close() while a request is in progress.
        self._close_after_request = False

    def _new_parser(self) -> HttpRequestParser:
        """Return a request parser as `RequestHandler.__init__` makes it."""
        return HttpRequestParser(
            self,
            self._loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=web_protocol.RequestPayloadError,
            auto_decompress=self._auto_decompress,
            max_msg_queue_size=self._max_msg_queue_size,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # RequestHandler.connection_made without its timer and task.
        real_transport = cast(asyncio.Transport, transport)
        assert self._manager is not None
        manager = cast(IdleSweepServer, self._manager)
        if manager.socket_options_set:
            # BaseProtocol.connection_made without its TCP_NODELAY.
            self.transport = real_transport
        else:
            BaseProtocol.connection_made(self, transport)
            if self._tcp_keepalive:
                tcp_keepalive(real_transport)
        manager.connection_made(self, real_transport)
        # A client that never sends a request expires like an idle one.
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout

    def data_received(self, data: bytes) -> None:
        if self._parser is None and self._manager is not None:
            self._parser = self._new_parser()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._last_payload = self._messages[-1][1]
        if data:
            # A head ends with an empty line, and so does a chunked body.
            # After a body that ends without one, the parser stays.
            self._at_boundary = data.endswith(b"\r\n\r\n")
        self.start_queued()

    def can_drop_parser(self) -> bool:
        """Return whether the parser of the idle connection has no needed state."""
        last = self._last_payload
        return (
            self._at_boundary
            and (last is None or last.is_eof())
            and not self._messages
            and not self._upgraded
            and not self._message_tail
            and not self._close
            and not self._force_close
            and self._payload_parser is None
            and not self._reading_paused
        )

    def can_park(self) -> bool:
        """Return whether the connection is idle and may leave this handler."""
        transport = self.transport
        return (
            self._task_handler is None
            and transport is not None
            and not transport.is_closing()
            and self._manager is not None
            and not self._paused
            and not self._buffer_paused
            and self._waiter is None
            and self.can_drop_parser()
        )

    def park(self) -> None:
        """Hand the idle connection to a `ParkedConnection`, and let this handler go.

        A connection with state that the next request needs only drops what
        `drop_parser` may drop, and stays with this handler.
        """
        if not self.can_park():
            self.drop_parser()
            return
        transport = self.transport
        manager = self._manager
        assert transport is not None and manager is not None
        server = cast(IdleSweepServer, manager)
        parked = ParkedConnection(
            server, transport, self._next_keepalive_close_time, self._request_count
        )
        # It has the methods of asyncio.Protocol, but as a class that mypyc
        # compiles it cannot derive from it.
        transport.set_protocol(parked)  # type: ignore[arg-type]
        server.park(self, parked)
        # Clear what connection_lost would clear, so that the dropped handler
        # keeps nothing alive.
        self.transport = None
        self._manager = None
        self._request_handler = None
        self._request_factory = None
        self._parser = None
        self._last_payload = None

    def drop_parser(self) -> None:
        """Drop the parser and cached addresses of an idle connection.

        Nothing is dropped while the parser has state that the next request
        needs.

        `data_received` makes a new parser when the client sends again.
        """
        if self.can_drop_parser():
            self._parser = None
            self._last_payload = None
            # The peer and socket addresses that aiohttp cached for requests.
            self._cache.clear()

    def start_queued(self) -> None:
        """Start the task that serves the queued requests, unless it runs.

        The task first runs in the next iteration of the loop, so a subclass
        may still replace what `data_received` queued after calling it.
        """
        if self._messages and self._task_handler is None and not self._force_close:
            self._task_handler = self._loop.create_task(self.start())

    def close(self) -> None:
        """Close the connection now when it is idle, else after its request.

        The request in progress still gets the rest of its body, and a
        tunnel the client's bytes, where aiohttp's `close()` stops reading
        at once. Requests queued behind it are not served.
        """
        if self._task_handler is None:
            super().close()
            self.force_close()
        else:
            self._close_after_request = True

    async def start(self) -> None:
        """Serve the queued requests in order, then end until more arrive."""
        loop = self._loop
        manager = self._manager
        assert manager is not None
        factory = self._request_factory
        assert factory is not None
        park = False
        try:
            while self._messages and not self._force_close:
                served = await self._serve_one(loop, manager, factory)
                if (
                    not served
                    or not self._keepalive
                    or self._close
                    or self._close_after_request
                    or self._force_close
                ):
                    # The connection ends after this request, as in aiohttp.
                    if self.transport is not None and not self._force_close:
                        self.end_connection()
                    return
            self._next_keepalive_close_time = loop.time() + self._keepalive_timeout
            open_connections = len(manager._connections) + len(
                cast(IdleSweepServer, manager)._parked
            )
            if open_connections >= PARK_AT_ONCE_CONNECTIONS:
                park = True
            elif open_connections >= DROP_AT_ONCE_CONNECTIONS:
                self.drop_parser()
        finally:
            self._task_handler = None
        if park:
            self.park()

    async def _serve_one(
        self,
        loop: asyncio.AbstractEventLoop,
        manager: web.Server,
        factory: Any,
    ) -> bool:
        """Serve the first queued request. Return False when the client went away."""
        # aiohttp's C parser makes RawRequestMessage a C class, not the
        # NamedTuple of its annotations, and mypyc checks a NamedTuple as a
        # tuple, so the message is Any.
        message: Any
        message, payload = self._messages.popleft()
        # Free a parser slot, and read again once the queue drained to
        # its low-water mark, as aiohttp's start() does.
        if self._parser is not None:
            self._parser.message_consumed()
        if self._buffer_paused and len(self._messages) <= self._msg_queue_resume_size:
            self._resume_reading_if_drained()

        started = loop.time() if self._logging_enabled else None
        manager.requests_count += 1
        writer = StreamWriter(self, loop)
        if isinstance(message, web_protocol._ErrInfo):
            request_handler = self._make_error_handler(message)
            # getattr, so that mypyc does not check the value as a tuple.
            message = getattr(web_protocol, "ERROR")  # noqa: B009
        else:
            assert self._request_handler is not None
            request_handler = self._request_handler
        request = factory(message, payload, self, writer, self._task_handler)
        if request_handler is self._request_handler and type(request) is BaseRequest:
            fill_request_cache(request, message, payload)
        try:
            try:
                response, reset = await self._respond(request, started, request_handler)
            except ConnectionError:
                self.log_debug("client went away before its response")
                return False
            if reset:
                self.log_debug("client went away while its response was written")
                return False
            self._keepalive = bool(response.keep_alive)
            if not payload.is_eof():
                # The handler may have left a task that sends the body to the
                # pod and waits for its next bytes. A pod that responded
                # early has it cancelled, which takes effect in the next
                # iteration of the loop, so the body is drained only after it.
                await asyncio.sleep(0)
                if self.lingers_after(response):
                    await self._linger(loop, payload)
                else:
                    self.force_close()
            payload.set_exception(web_protocol._PAYLOAD_ACCESS_ERROR)
        except asyncio.CancelledError:
            self.log_debug("client went away before its response")
            self.force_close()
            raise
        except Exception as exc:
            self.log_exception("unexpected error serving a request", exc_info=exc)
            self.force_close()
        except BaseException:
            self.force_close()
            raise
        finally:
            # The request refers to the task; breaking that cycle lets both
            # go as soon as the request ends.
            request._task = None
        return True

    async def _respond(
        self,
        request: BaseRequest,
        started: float | None,
        request_handler: Any,
    ) -> tuple[web.StreamResponse, bool]:
        """Run the request handler and finish its response.

        `RequestHandler._handle_request` of aiohttp 3.14.5, compiled with
        this module, because the interpreted coroutine cost instructions on
        every request and on every resumption of the handler. It leaves out
        aiohttp's DeprecationWarning for a handler that returns an
        HTTPException, which this proxy's handlers never do. Each except
        clause binds a name of its own, because mypyc 2.4.1 gives a name
        bound by several clauses the type of the first.
        """
        response: web.StreamResponse
        self._request_in_progress = True
        try:
            try:
                try:
                    self._current_request = request
                    response = await request_handler(request)
                finally:
                    self._current_request = None
            except web.HTTPException as http_exc:
                response = http_exc
            except asyncio.CancelledError:
                raise
            except TimeoutError as timeout_exc:
                self.log_debug("Request handler timed out.", exc_info=timeout_exc)
                response = self.handle_error(request, 504)
            except Exception as handler_exc:
                response = self.handle_error(request, 500, handler_exc)
            return await self.finish_response(request, response, started)
        finally:
            self._request_in_progress = False
            if self._handler_waiter is not None:
                self._handler_waiter.set_result(None)

    def end_connection(self) -> None:
        """Close the connection after its last response."""
        assert self.transport is not None
        self.transport.close()

    def lingers_after(self, response: web.StreamResponse) -> bool:
        """Return whether the unread body is read on after `response`.

        Reading on lets the client see the response instead of a reset.
        When this returns False, the connection closes at once.
        """
        return True

    async def finish_response(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        start_time: float | None,
    ) -> tuple[web.StreamResponse, bool]:
        """Finish a response as aiohttp does, or at once for a `SentResponse`.

        The relay already wrote the whole of a `SentResponse`, so its
        `prepare` and `write_eof` coroutines, which do nothing, are not
        called. After an upgrade request, aiohttp's method also feeds the
        bytes that followed it to the parser, so that case goes to it.
        """
        if type(resp) is not SentResponse or self._upgraded:
            return await super().finish_response(request, resp, start_time)
        request._finish()
        self.log_access(request, resp, start_time)
        return resp, False

    async def _linger(
        self, loop: asyncio.AbstractEventLoop, payload: StreamReader
    ) -> None:
        """Read and drop the unread rest of a request body, for a while.

        A rest that does not end within ``lingering_time`` closes the
        connection after the response.
        """
        lingering_time = self._lingering_time
        if not self._force_close and lingering_time:
            now = loop.time()
            end = now + lingering_time
            try:
                while not payload.is_eof() and now < end:
                    async with ceil_timeout(end - now):
                        await payload.readany()
                    now = loop.time()
            except (asyncio.CancelledError, TimeoutError):
                task = asyncio.current_task()
                if sys.version_info >= (3, 11) and task and task.cancelling():
                    raise
        if not payload.is_eof() and not self._force_close:
            self.log_debug("request body not read to the end, closing")
            self.close()


def fill_request_cache(
    request: BaseRequest, message: Any, payload: StreamReader
) -> None:
    """Store the values of a new request's most often read properties in its cache.

    aiohttp 3.14.5's `BaseRequest` computes each of these properties with a
    Python call on its first read and keeps the value in ``_cache``
    (propcache's ``reify``). These are the values that the properties
    compute. A cache that the request filled itself, for an absolute-form
    target, is left alone. An empty one is replaced by a dict built whole,
    which costs less than setting its keys one by one.
    """
    if request._cache:
        return
    peer = request._transport_peername
    remote: str | None
    if peer is None:
        remote = None
    elif isinstance(peer, (list, tuple)):
        remote = str(peer[0])
    else:
        remote = str(peer)
    request._cache = {
        "headers": message.headers,
        "raw_headers": message.raw_headers,
        "method": message.method,
        "version": message.version,
        "raw_path": message.path,
        "keep_alive": not message.should_close,
        "content": payload,
        "body_exists": type(payload) is not EmptyStreamReader,
        "scheme": "https" if request._transport_sslcontext else "http",
        "remote": remote,
    }
