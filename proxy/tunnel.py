"""WebSocket upgrades: the client's handshake completes only after the pod's 101.

The relay forwards an upgrade request like any other. When the pod responds
with 101, the client gets that response head and the connection becomes a byte
tunnel in both directions, so frames, subprotocol, close codes and reasons
pass unchanged. A pod that responds with another status sends an ordinary
response, and the client's connection stays HTTP.
"""

from __future__ import annotations

import logging
from typing import Final, cast

from aiohttp import web
from aiohttp.http_websocket import WebSocketReader
from multidict import istr

from proxy.upstream import UpstreamResponse

# Request key set once the client got the pod's 101. A tunnel usually ends
# with the client closing its connection, which cancels the handler, so
# the handler's caller cannot take the status from a returned response.
TUNNEL_OPENED = "stateful_route.tunnel_opened"
# The name as multidict's `istr`, which a lookup need not lowercase. Final,
# so that mypyc reads it without a module dict lookup.
_UPGRADE: Final = istr("Upgrade")

logger = logging.getLogger("stateful_route.relay")


def websocket_upgrade(request: web.BaseRequest) -> str | None:
    """Return the Upgrade value of a WebSocket upgrade request, else None.

    Only ``Upgrade: websocket`` on an HTTP/1.1 GET with ``Connection:
    upgrade`` counts, the upgrade that aiohttp's server hands over to its
    handler. RFC 9110 section 7.8 has a server ignore Upgrade in an HTTP/1.0
    request, so such a request goes to the pod as a plain one.
    """
    upgrade = request.headers.get(_UPGRADE)
    if upgrade is None or request.method != "GET" or request.version < (1, 1):
        return None
    if upgrade.strip().lower() != "websocket":
        return None
    tokens = {
        token.strip().lower()
        for value in request.headers.getall("Connection", ())
        for token in value.split(",")
    }
    return upgrade if "upgrade" in tokens else None


class _ClientBytes:
    """Takes the client's bytes from aiohttp's server, in place of its parser."""

    __slots__ = ("_upstream",)

    def __init__(self, upstream: UpstreamResponse) -> None:
        self._upstream = upstream

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._upstream.write(data)
        return False, b""

    def feed_eof(self) -> None:
        # aiohttp cancels the handler when the client connection is lost,
        # and the handler then closes the pod connection.
        pass


async def relay_tunnel(
    request: web.BaseRequest,
    upstream: UpstreamResponse,
    response: web.StreamResponse,
    ids_text: str,
) -> web.StreamResponse:
    """Send the pod's 101 to the client, then relay bytes until either side closes.

    `response` has the pod's status and end-to-end headers. A pod connection
    that breaks aborts the client connection. `ids_text` names the request
    in the log.
    """
    upgrade = next(
        (value for name, value in upstream.headers if name.lower() == "upgrade"),
        "websocket",
    )
    response.headers["Connection"] = "Upgrade"
    response.headers["Upgrade"] = upgrade
    # The connection never returns to HTTP after the tunnel.
    response.force_close()
    await response.prepare(request)
    request[TUNNEL_OPENED] = True
    # NOTE: bytes from the client go to the pod without write backpressure;
    # a client that outpaces the pod grows the pod connection's buffer.
    request.protocol.set_parser(cast(WebSocketReader, _ClientBytes(upstream)))
    try:
        while data := await upstream.read():
            await response.write(data)
    except (ConnectionError, ValueError) as exc:
        logger.warning("tunnel to the pod broke off %s: %r", ids_text, exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response
