"""An HTTP/1.1 client for relaying requests to pods over pooled connections.

`UpstreamPool` keeps up to a limit of keep-alive connections per pod and
sends one request at a time on each. The request line carries the target
exactly as given and the headers go out in their order. The response is
parsed by httptools (llhttp), which rejects a repeated Content-Length and a
Content-Length next to Transfer-Encoding. Interim 1xx responses are skipped.
The body streams chunk by chunk, and reading from the pod pauses while the
caller lags behind.

Every failure raises `UpstreamFailure` with the `Stage` the attempt reached,
so the caller can decide on a retry. The connection protocol lives in
`proxy.upstream_connection`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from typing import Any

from aiohttp import StreamReader

from proxy.retry import Stage
from proxy.upstream_connection import (
    Connection,
    ConnectTimeoutError,
    InvalidRequestError,
    PoolTimeoutError,
    UpstreamFailure,
    UpstreamResponse,
)

__all__ = [
    "InvalidRequestError",
    "UpstreamBody",
    "UpstreamFailure",
    "UpstreamPool",
    "UpstreamResponse",
    "encode_head",
]

logger = logging.getLogger("stateful_route.upstream")

UpstreamBody = bytes | StreamReader | AsyncIterator[bytes] | None
# Characters that may not appear in a request target or a header, because
# they would end the line or split it (RFC 9112, section 3.2, and RFC 9110,
# section 5.5).
_LINE_BREAKERS = ("\r", "\n", "\0")


class _PodPool:
    """The connections to one pod: idle ones, newest last, and a count of all."""

    __slots__ = ("address", "idle", "limit", "open", "waiters")

    def __init__(self, address: tuple[str, int], limit: int) -> None:
        self.address = address
        self.limit = limit
        self.idle: list[Connection] = []
        # Connections open or being opened, idle ones included.
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to pods, and requests over them.

    :param connections_per_pod: maximum open connections to one pod; a
        request waits for a free one beyond that.
    :param idle_timeout_s: seconds after which an idle connection is closed.
    """

    def __init__(self, connections_per_pod: int, idle_timeout_s: float) -> None:
        self._limit = connections_per_pod
        self._idle_timeout_s = idle_timeout_s
        self._pools: dict[tuple[str, int], _PodPool] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def request(
        self,
        address: tuple[str, int],
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] | bytes,
        body: UpstreamBody,
        *,
        content_length: int | None,
        connect_timeout_s: float | None,
        read_timeout_s: float | None,
        on_continue: Callable[[], Awaitable[None]] | None = None,
        upgrade: bool = False,
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """Send one request to the pod at `address` and return its final response.

        `headers` are written as given: (name, value) pairs, or encoded
        lines that each end with CRLF and contain no other CR, LF or NUL.
        They must not contain Content-Length
        or Transfer-Encoding unless `content_length` is their value. A body
        gets ``Content-Length: content_length`` when that is known (for a
        bytes body, its length), else chunked coding. With `on_continue`,
        the request carries ``Expect: 100-continue`` and its body is sent
        only after the pod's 100 (or a short wait without one), right after
        awaiting `on_continue`. The caller must call `release` on the
        response. With `upgrade`, a 101 response opens a tunnel (see
        `UpstreamResponse.tunnel`), and `headers` must carry the Upgrade and
        Connection headers. Raises `InvalidRequestError` for a target or
        header that cannot be written, and `UpstreamFailure` for anything
        else. `InvalidRequestError` is raised by the call itself. The caller
        awaits the returned coroutine at once. With an idle connection at
        hand, it is the connection's exchange, which saves a coroutine.
        """
        if isinstance(body, bytes) and content_length is None:
            content_length = len(body)
        if body is None:
            on_continue = None
        if isinstance(headers, bytes):
            head = _encode_head_lines(method, target, headers, body, content_length)
            if on_continue is not None:
                head = head[:-2] + b"Expect: 100-continue\r\n\r\n"
        else:
            framing: list[tuple[str, str]] = []
            if body is not None:
                if content_length is None:
                    framing.append(("Transfer-Encoding", "chunked"))
                elif not any(name.lower() == "content-length" for name, _ in headers):
                    framing.append(("Content-Length", str(content_length)))
            if on_continue is not None:
                framing.append(("Expect", "100-continue"))
            head = encode_head(
                method, target, [*headers, *framing] if framing else headers
            )

        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = _PodPool(address, self._limit)
        chunked = body is not None and content_length is None
        head_only = method == "HEAD"
        connection = _take_idle(pool)
        if connection is not None:
            # Called directly, because calling a partial with these keyword
            # arguments builds a dict of them on every request.
            return connection.exchange(
                head,
                body,
                chunked=chunked,
                head_only=head_only,
                upgrade=upgrade,
                read_timeout_s=read_timeout_s,
                on_continue=on_continue,
            )
        exchange = functools.partial(
            Connection.exchange,
            head=head,
            body=body,
            chunked=chunked,
            head_only=head_only,
            upgrade=upgrade,
            read_timeout_s=read_timeout_s,
            on_continue=on_continue,
        )
        return self._exchange_on_acquired(
            pool, connect_timeout_s, read_timeout_s, exchange
        )

    async def _exchange_on_acquired(
        self,
        pool: _PodPool,
        connect_timeout_s: float | None,
        wait_timeout_s: float | None,
        exchange: Callable[[Connection], Awaitable[UpstreamResponse]],
    ) -> UpstreamResponse:
        """Wait for a connection of `pool` or open one, then run `exchange` on it."""
        connection = await self._acquire(pool, connect_timeout_s, wait_timeout_s)
        return await exchange(connection)

    def idle_connections(self, address: tuple[str, int]) -> int:
        """Return the number of idle pooled connections to the pod at `address`."""
        pool = self._pools.get(address)
        return 0 if pool is None else len(pool.idle)

    async def close(self) -> None:
        """Close every connection; requests in flight fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            for connection in pool.idle:
                connection.close()
            pool.idle.clear()
            for waiter in pool.waiters:
                if not waiter.done():
                    waiter.cancel()
        # Give the transports one loop turn to report connection_lost.
        await asyncio.sleep(0)

    async def _acquire(
        self,
        pool: _PodPool,
        connect_timeout_s: float | None,
        wait_timeout_s: float | None,
    ) -> Connection:
        """Return an idle connection to the pod, or open one within the limit.

        Waits up to `wait_timeout_s` for a connection when the limit is
        reached, and raises `UpstreamFailure` at the CONNECT stage when none
        came free, or when a new connection fails or times out.
        """
        while True:
            idle_connection = _take_idle(pool)
            if idle_connection is not None:
                return idle_connection
            if pool.open < pool.limit:
                break
            waiter = asyncio.get_running_loop().create_future()
            pool.waiters.append(waiter)
            try:
                async with asyncio.timeout(wait_timeout_s):
                    await waiter
            except TimeoutError:
                raise UpstreamFailure(
                    Stage.CONNECT,
                    PoolTimeoutError(
                        f"no free connection to {pool.address[0]}:"
                        f"{pool.address[1]} within {wait_timeout_s}s, "
                        f"{pool.limit} in use"
                    ),
                ) from None

        pool.open += 1
        try:
            return await self._connect(pool, connect_timeout_s)
        except BaseException:
            pool.open -= 1
            pool.wake_one()
            raise

    async def _connect(
        self, pool: _PodPool, connect_timeout_s: float | None
    ) -> Connection:
        loop = asyncio.get_running_loop()
        host, port = pool.address
        try:
            async with asyncio.timeout(connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(self, pool), host, port
                )
        except TimeoutError:
            raise UpstreamFailure(
                Stage.CONNECT,
                ConnectTimeoutError(
                    f"connect to {host}:{port} timed out after {connect_timeout_s}s"
                ),
            ) from None
        except OSError as exc:
            raise UpstreamFailure(Stage.CONNECT, exc) from exc
        connection.counted = True
        self._schedule_sweep()
        return connection

    def release(self, connection: Connection, reusable: bool) -> None:
        """Take a connection back after a response, to reuse or close it."""
        pool = connection.pool
        if reusable and not self._closed and connection.usable:
            # The connection's loop, because asyncio.get_running_loop() of
            # CPython 3.11 makes a getpid system call on every call.
            connection.idle_since = connection.loop_time()
            pool.idle.append(connection)
        else:
            connection.close()
        pool.wake_one()

    def close_idle(self, pool: _PodPool) -> None:
        """Close the idle connections to one pod."""
        while pool.idle:
            pool.idle.pop().close()

    def forget(self, connection: Connection) -> None:
        """Drop a closed connection from its pool's idle list and count."""
        pool = connection.pool
        if not connection.counted:
            return
        connection.counted = False
        pool.open -= 1
        if connection in pool.idle:
            pool.idle.remove(connection)
            logger.debug(
                "pod %s:%d closed an idle connection", pool.address[0], pool.address[1]
            )
        pool.wake_one()

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and not self._closed:
            interval = max(self._idle_timeout_s / 4, 0.05)
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the idle timeout."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        any_open = False
        for pool in self._pools.values():
            # The oldest idle connections are first, because release appends.
            while pool.idle and now - pool.idle[0].idle_since >= self._idle_timeout_s:
                pool.idle.pop(0).close()
            any_open = any_open or pool.open > 0
        if any_open:
            self._schedule_sweep()


def _take_idle(pool: _PodPool) -> Connection | None:
    """Return the newest usable idle connection of `pool`, or None.

    Unusable ones leave the list unclosed, because they are already closing
    and `UpstreamPool.forget` updates the count when they are lost.
    """
    idle = pool.idle
    while idle:
        connection = idle.pop()
        if connection.usable:
            connection.reused = True
            return connection
    return None


def lines_intact(block: str, count: int) -> bool:
    """Return whether `block`, `count` lines joined by CRLF, has no other CR, LF or NUL.

    Counting the line breaks of the joined block is cheaper than checking
    each line, and a line with CR, LF or NUL would split or end the head.
    """
    separators = count - 1
    return (
        block.count("\r") == separators
        and block.count("\n") == separators
        and "\0" not in block
    )


def _encode_head_lines(
    method: str,
    target: str,
    lines: bytes,
    body: UpstreamBody,
    content_length: int | None,
) -> bytes:
    """Return the head of a request whose header lines are already encoded.

    Adds the framing of `body` as `UpstreamPool.request` describes.
    Raises `InvalidRequestError` for a target that `encode_head` rejects.
    """
    if not target or not target.isprintable() or " " in target:
        raise InvalidRequestError("target", target)
    request_line = f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
    if body is None:
        return request_line + lines + b"\r\n"
    if content_length is None:
        framing = b"Transfer-Encoding: chunked\r\n\r\n"
    elif (b"\r\n" + lines.lower()).find(b"\r\ncontent-length:") >= 0:
        framing = b"\r\n"
    else:
        framing = b"Content-Length: %d\r\n\r\n" % content_length
    return request_line + lines + framing


def encode_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """Return the request line and header block of a request.

    Raises `InvalidRequestError` when the target contains a space or a
    control character, or a header contains CR, LF or NUL, because either
    would change how the pod splits the request.
    """
    if not target or not target.isprintable() or " " in target:
        raise InvalidRequestError("target", target)
    # str.join on each (name, value) pair formats the lines without a
    # Python frame per header.
    lines = [f"{method} {target} HTTP/1.1", *map(": ".join, headers)]
    block = "\r\n".join(lines)
    if not lines_intact(block, len(lines)):
        for name, value in headers:
            if any(char in name or char in value for char in _LINE_BREAKERS):
                raise InvalidRequestError("header", name)
    # aiohttp decodes header bytes as UTF-8 with surrogate escapes, so this
    # restores the client's bytes exactly.
    return (block + "\r\n\r\n").encode("utf-8", "surrogateescape")
