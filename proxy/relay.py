"""Relaying one request to one pod and the pod's response back to the client.

Bodies stream in both directions without being held whole or decompressed.
Hop-by-hop headers are dropped both ways. Failures before the response
starts become a JSON error naming the pod: 502 when the pod refused or broke
the exchange, 504 on a timeout. A failure after the response started closes
the client connection, because the status line is already sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.pods import Pod

logger = logging.getLogger("stateful_route.relay")

# Hop-by-hop headers (RFC 9110, section 7.6.1) apply to one connection and
# are never relayed. Headers named in Connection are dropped as well.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Headers that the client session must not add on its own, so the pod sees
# the client's headers and nothing more.
_SKIP_AUTO_HEADERS = frozenset(
    {"Accept", "Accept-Encoding", "User-Agent", "Content-Type"}
)
_RELAY_CHUNK_SIZE = 64 * 1024


def error_response(
    status: int, code: str, message: str, **details: str | int
) -> web.Response:
    """Return a response with a short JSON body describing a failure."""
    body = orjson.dumps({"error": code, "message": message, **details})
    return web.Response(status=status, body=body, content_type="application/json")


def strip_hop_by_hop(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Return a copy of `headers` without hop-by-hop headers, order kept."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(","))
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in HOP_BY_HOP and lowered not in named:
            kept.add(name, value)
    return kept


class Relay:
    """Sends requests to pods over the pooled connections of one client session.

    :param session: the client session holding the keep-alive pod connections.
    :param routed_pod_header: response header set to the pod index; "" for none.
    """

    def __init__(self, session: aiohttp.ClientSession, routed_pod_header: str) -> None:
        self._session = session
        self._routed_pod_header = routed_pod_header

    async def relay(
        self,
        request: web.BaseRequest,
        pod: Pod,
        client_timeout: aiohttp.ClientTimeout,
        ids: dict[str, Any],
        extra_headers: Mapping[str, str] | None = None,
        removed_headers: Iterable[str] = (),
    ) -> web.StreamResponse:
        """Forward `request` to `pod` and stream the response to the client.

        `removed_headers` are dropped from the client's headers before
        `extra_headers` are set, so a client cannot supply them itself.
        """
        address = pod.address
        path, _, query = request.raw_path.partition("?")
        url = URL.build(
            scheme="http",
            host=address.host,
            port=address.port,
            path=path,
            query_string=query,
            encoded=True,
        )
        headers = upstream_headers(request)
        for name in removed_headers:
            headers.popall(name, None)
        if extra_headers:
            headers.update(extra_headers)
        body = request.content if request.body_exists else None

        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=client_timeout,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
            ) as upstream:
                response = self._downstream_response(upstream, pod)
                # Errors of the pod's side come from reading upstream.content;
                # the writes below fail only when the client is gone.
                if not await _client_write(response.prepare(request), ids):
                    return response
                async for chunk in upstream.content.iter_chunked(_RELAY_CHUNK_SIZE):
                    if not await _client_write(response.write(chunk), ids):
                        return response
                await _client_write(response.write_eof(), ids)
                return response
        except asyncio.CancelledError:
            logger.debug(
                "client went away, cancelled upstream request %s", format_ids(ids)
            )
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if response is not None and response.prepared:
                return _abort_relay(request, response, exc, ids)
            error = _upstream_error(exc, pod, ids)
            if self._routed_pod_header:
                error.headers[self._routed_pod_header] = str(pod.index)
            return error

    def _downstream_response(
        self, upstream: aiohttp.ClientResponse, pod: Pod
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(strip_hop_by_hop(upstream.headers))
        if self._routed_pod_header:
            response.headers[self._routed_pod_header] = str(pod.index)
        return response


def upstream_headers(request: web.BaseRequest) -> CIMultiDict[str]:
    """Return the client's headers for the pod, with the X-Forwarded-* set."""
    headers = strip_hop_by_hop(request.headers)
    peer = request.remote or ""
    forwarded_for = ", ".join(headers.getall("X-Forwarded-For", ()))
    headers.popall("X-Forwarded-For", None)
    headers["X-Forwarded-For"] = f"{forwarded_for}, {peer}" if forwarded_for else peer
    headers["X-Forwarded-Proto"] = request.scheme
    host = request.headers.get("Host")
    if host is not None:
        headers["X-Forwarded-Host"] = host
    return headers


async def _client_write(write: Awaitable[object], ids: dict[str, Any]) -> bool:
    """Await one write to the client; return False when the client is gone."""
    try:
        await write
    except ConnectionError as exc:
        logger.debug(
            "client went away during the response %s: %r", format_ids(ids), exc
        )
        return False
    return True


def _upstream_error(exc: BaseException, pod: Pod, ids: dict[str, Any]) -> web.Response:
    if isinstance(exc, TimeoutError):
        kind = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "read"
        logger.warning("%s timeout from %s %s", kind, pod, format_ids(ids))
        return error_response(
            504, "pod_timeout", f"{kind} timeout from pod {pod.index}", pod=pod.index
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        logger.warning(
            "cannot connect to %s %s: %s", pod, format_ids(ids), exc.os_error
        )
        return error_response(
            502, "pod_unreachable", f"cannot connect to pod {pod.index}", pod=pod.index
        )
    logger.warning("request to %s failed %s: %r", pod, format_ids(ids), exc)
    return error_response(
        502,
        "pod_error",
        f"pod {pod.index} failed: {type(exc).__name__}",
        pod=pod.index,
    )


def _abort_relay(
    request: web.BaseRequest,
    response: web.StreamResponse,
    exc: BaseException,
    ids: dict[str, Any],
) -> web.StreamResponse:
    """Close the client connection of a response whose body broke off.

    The status line is already sent, so the only honest signal left is a
    connection closed before the end of the body.
    """
    logger.warning("response from pod broke off %s: %r", format_ids(ids), exc)
    transport = request.transport
    if transport is not None:
        transport.abort()
    return response


def format_ids(ids: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in ids.items())
