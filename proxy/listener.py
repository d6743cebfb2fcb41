"""The listening sockets of the proxy ports, which accept connections in batches.

Under uvloop 0.23, a burst of connections is accepted slowly while the loop
is busy with requests. With 1,000 clients connecting at once to a bare
aiohttp server under load, the last tenth was accepted 3.8 to 4 s after the
first, and the first requests of those clients waited that long. asyncio's
own loop accepted all of them within 0.06 s, because it accepts up to its
backlog on each readiness event of the listening socket. `BatchAcceptSite`
does the same on any loop: it accepts up to `ACCEPT_BATCH` connections per
event and hands each one to the loop with ``connect_accepted_socket``.
Measured with ``wrk -t1 -c1000`` against that server on a 2-core machine,
p99 fell from 2.9 s to 45 ms.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from yarl import URL

from proxy.connections import IdleSweepServer

logger = logging.getLogger("stateful_route.listener")

# Connections accepted per readiness event of a listening socket, so that a
# flood of connections cannot hold the loop for long in one callback.
ACCEPT_BATCH = 512
# Seconds to pause accepting after the process ran out of file descriptors
# or memory, as asyncio does, instead of spinning on the readable socket.
ACCEPT_RETRY_S = 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def set_socket_options(sock: socket.socket) -> None:
    """Set TCP_NODELAY and SO_KEEPALIVE, as aiohttp's handlers set them.

    aiohttp sets them through the transport's "socket" extra info, which
    uvloop 0.23 creates on request and then keeps for the life of the
    connection, about 70 bytes each.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class _Listener(asyncio.AbstractServer):
    """The bound sockets of a site, read by a loop reader each.

    :param sockets: listening, non-blocking sockets.
    :param server: aiohttp's low-level server, which makes the protocol of
        each accepted connection and keeps the open ones.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        server: web.Server,
    ) -> None:
        self._loop = loop
        self._sockets = sockets
        self._server = server
        self._serving = False
        self._paused: list[asyncio.TimerHandle] = []
        # Hand-overs to the loop in progress, kept so they are not collected.
        self._connecting: set[asyncio.Task[Any]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def serve_forever(self) -> None:
        raise NotImplementedError("serve through aiohttp's runner instead")

    def close(self) -> None:
        """Stop accepting and close the sockets. Accepted connections stay open."""
        if not self._sockets:
            return
        self._serving = False
        for handle in self._paused:
            handle.cancel()
        self._paused.clear()
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    async def wait_closed(self) -> None:
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)

    # Python 3.13 added close_clients and abort_clients to asyncio's
    # AbstractServer, and typeshed declares them abstract there. NOTE: they
    # act on every connection of the aiohttp server, so with several sites
    # on one runner they also close those of the other sites. The proxy
    # runs one site per runner.
    def close_clients(self) -> None:
        """Close the accepted connections that are still open."""
        for transport in self._client_transports():
            transport.close()

    def abort_clients(self) -> None:
        """Abort the accepted connections that are still open, dropping unsent data."""
        for transport in self._client_transports():
            transport.abort()

    def _client_transports(self) -> list[asyncio.Transport]:
        if isinstance(self._server, IdleSweepServer):
            return self._server.client_transports()
        return [
            handler.transport
            for handler in self._server.connections
            if handler.transport is not None
        ]

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self._pause(listening, exc)
                return
            sock.setblocking(False)
            set_socket_options(sock)
            task = self._loop.create_task(self._connect(sock))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._server, sock)
        except OSError as exc:
            # The client left before the hand-over, for example with a reset.
            logger.debug("accepted connection closed before its start: %r", exc)
            sock.close()

    def _pause(self, listening: socket.socket, exc: OSError) -> None:
        logger.warning(
            "cannot accept connections on %s: %s. Accepting again in %gs",
            listening.getsockname(),
            exc,
            ACCEPT_RETRY_S,
        )
        fileno = listening.fileno()
        self._loop.remove_reader(fileno)

        def resume() -> None:
            self._paused.remove(handle)
            if self._serving:
                self._loop.add_reader(fileno, self._accept, listening)

        handle = self._loop.call_later(ACCEPT_RETRY_S, resume)
        self._paused.append(handle)


class BatchAcceptSite(web.BaseSite):
    """An aiohttp TCP site whose sockets accept connections in batches.

    Every accepted socket gets the options of `set_socket_options`, so a
    server whose handlers would set them can skip that (the
    ``socket_options_set`` of `proxy.connections.IdleSweepServer`).

    :param runner: the set-up runner whose server handles the connections.
    :param host: the address to bind; every address it resolves to is bound.
    :param port: the port; 0 for a free one.
    :param backlog: the listen backlog, which the kernel caps.
    :param reuse_port: set SO_REUSEPORT, so several processes share the port.
    """

    __slots__ = ("_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        backlog: int,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        infos = await loop.getaddrinfo(
            self._host,
            self._port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        sockets = _bind(
            dict.fromkeys((family, address) for family, *_, address in infos),
            self._backlog,
            self._reuse_port,
        )
        listener = _Listener(loop, sockets, server)
        self._server = listener
        await listener.start_serving()


def _bind(
    addresses: Iterable[tuple[int, Any]], backlog: int, reuse_port: bool
) -> list[socket.socket]:
    """Return listening, non-blocking sockets bound to `addresses`.

    Closes the sockets bound so far when one address fails, and raises its
    OSError.
    """
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio does: the IPv6 socket takes no IPv4 connections,
                # so binding the host's IPv4 address as well does not conflict.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: {reason}",
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
