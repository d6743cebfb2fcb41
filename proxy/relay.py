"""Relaying one request to one pod and the pod's response back to the client.

Bodies stream in both directions without being held whole or decompressed.
Hop-by-hop headers are dropped both ways. Failures before the response
starts become a JSON error naming the pod: 502 when the pod refused or broke
the exchange, 504 on a timeout. A failure after the response started closes
the client connection, because the status line is already sent.

`Relay.send` is the variant for retries: it raises `UpstreamError` with the
`Stage` the attempt reached, instead of sending the client an error. It also turns
off aiohttp's own resend (seen in aiohttp 3.14), which sends an idempotent
request a second time to the same pod after a broken connection, pooled or
not. That takes a client middleware, so aiohttp 3.12 or later. Which
connections came from the pool is learned from aiohttp's connection tracing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import StatefulRouteError
from proxy.inbound import (
    GuardedBody,
    Limits,
    Network,
    closing_error,
    request_target,
    set_forwarded_headers,
)
from proxy.pods import Pod
from proxy.retry import RequestBody, Stage

logger = logging.getLogger("stateful_route.relay")

# Maximum length of a client-supplied id in a log line.
_ID_SHOWN_LENGTH = 128

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

# Headers that the client session must not add on its own, so the pod gets
# the client's headers and nothing more.
_SKIP_AUTO_HEADERS = frozenset(
    {"Accept", "Accept-Encoding", "User-Agent", "Content-Type"}
)
_RELAY_CHUNK_SIZE = 64 * 1024


class UpstreamError(StatefulRouteError):
    """An attempt at a pod that failed before any response byte reached the client.

    `stage` is how far the attempt got, and `cause` is the aiohttp or OS
    error that ended it.
    """

    def __init__(self, pod: Pod, stage: Stage, cause: BaseException) -> None:
        self.pod = pod
        self.stage = stage
        self.cause = cause
        super().__init__(f"{pod}: {stage.value} failure: {cause!r}")

    @property
    def status(self) -> int:
        """Return the status the client gets for it: 504 on a timeout, else 502."""
        return 504 if isinstance(self.cause, TimeoutError) else 502


class _ConnectionNote:
    """The connection facts that the tracing recorded for one attempt."""

    __slots__ = ("connected", "reused")

    def __init__(self) -> None:
        self.connected = False
        self.reused = False


async def _on_connection_created(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceConnectionCreateEndParams,
) -> None:
    note = context.trace_request_ctx
    if isinstance(note, _ConnectionNote):
        note.connected = True


async def _on_connection_reused(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceConnectionReuseconnParams,
) -> None:
    note = context.trace_request_ctx
    if isinstance(note, _ConnectionNote):
        note.connected = True
        note.reused = True


def _connection_tracing() -> aiohttp.TraceConfig:
    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(_on_connection_created)
    tracing.on_connection_reuseconn.append(_on_connection_reused)
    tracing.freeze()
    return tracing


# One tracing for every session: it only marks `_ConnectionNote` contexts,
# so other requests of the session are unaffected.
_CONNECTION_TRACING = _connection_tracing()


class _SendFailed(aiohttp.ClientConnectionError):
    """A broken connection, re-raised under a type that aiohttp does not resend."""

    def __init__(self, cause: aiohttp.ClientConnectionError) -> None:
        self.cause = cause
        super().__init__(str(cause))


async def _send_once(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware that keeps aiohttp from resending a request by itself.

    aiohttp resends an idempotent request once after ClientOSError or
    ServerDisconnectedError, but any other error type ends the request.
    """
    try:
        return await handler(request)
    except aiohttp.ClientConnectorError:
        raise  # aiohttp never resends it, and it shows no connection was made
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise _SendFailed(exc) from exc


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

    It adds its connection tracing to the session's trace configs, where it
    only observes the requests of this class.

    :param session: the client session holding the keep-alive pod connections.
    :param routed_pod_header: response header set to the pod index; "" for none.
    """

    def __init__(self, session: aiohttp.ClientSession, routed_pod_header: str) -> None:
        self._session = session
        self._routed_pod_header = routed_pod_header
        if _CONNECTION_TRACING not in session.trace_configs:
            session.trace_configs.append(_CONNECTION_TRACING)

    async def relay(
        self,
        request: web.BaseRequest,
        pod: Pod,
        client_timeout: aiohttp.ClientTimeout,
        ids: dict[str, Any],
        extra_headers: Mapping[str, str] | None = None,
        removed_headers: Iterable[str] = (),
        trusted: tuple[Network, ...] = (),
        limits: Limits | None = None,
    ) -> web.StreamResponse:
        """Forward `request` to `pod` once and stream the response to the client.

        A failure before the response started returns the JSON error of
        `error_response`. aiohttp's own resend of idempotent requests stays
        on. `removed_headers` are dropped from the client's headers before
        `extra_headers` are set, so a client cannot supply them itself.
        `trusted` are the networks of peers whose X-Forwarded-* are kept.
        With `limits`, a body beyond ``max_body_bytes`` gets 413 and one
        that stalls for ``body_timeout_s`` gets 408.
        """
        headers = pod_request_headers(request, extra_headers, removed_headers, trusted)
        body: StreamReader | AsyncIterator[bytes] | bytes | None = None
        guard = None
        if request.body_exists:
            body = request.content
            if limits is not None:
                guard = GuardedBody(request.content, limits)
                body = RequestBody(content=guard).data()
        try:
            return await self._exchange(
                request, pod, client_timeout, ids, headers, body, send_once=False
            )
        except UpstreamError as exc:
            if guard is not None and guard.failure is not None:
                failure = guard.failure
                logger.info(
                    "rejected %s from %s with %d: %s %s",
                    request.method,
                    request.remote,
                    failure.status,
                    failure.message,
                    format_ids(ids),
                )
                return closing_error(failure.status, failure.code, failure.message)
            return self.error_response(exc, ids)

    async def send(
        self,
        request: web.BaseRequest,
        pod: Pod,
        client_timeout: aiohttp.ClientTimeout,
        ids: dict[str, Any],
        headers: CIMultiDict[str],
        body: RequestBody,
    ) -> web.StreamResponse:
        """Send one attempt of `request` to `pod` and stream the response back.

        Raises `UpstreamError` when the attempt fails before any response
        byte reached the client, so the caller can retry it or respond with
        `error_response`. A failure after that closes the client connection
        and returns the response. aiohttp never resends the request itself.
        """
        return await self._exchange(
            request, pod, client_timeout, ids, headers, body.data(), send_once=True
        )

    def error_response(self, error: UpstreamError, ids: dict[str, Any]) -> web.Response:
        """Log a failed attempt and return its JSON error, 504 on a timeout."""
        response = _upstream_error(error.cause, error.pod, ids)
        if self._routed_pod_header:
            response.headers[self._routed_pod_header] = str(error.pod.index)
        return response

    async def _exchange(
        self,
        request: web.BaseRequest,
        pod: Pod,
        client_timeout: aiohttp.ClientTimeout,
        ids: dict[str, Any],
        headers: CIMultiDict[str],
        body: bytes | StreamReader | AsyncIterator[bytes] | None,
        *,
        send_once: bool,
    ) -> web.StreamResponse:
        address = pod.address
        path, _, query = request_target(request).partition("?")
        url = URL.build(
            scheme="http",
            host=address.host,
            port=address.port,
            path=path,
            query_string=query,
            encoded=True,
        )
        note = _ConnectionNote()

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
                trace_request_ctx=note,
                middlewares=(_send_once,) if send_once else None,
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
            cause = exc.cause if isinstance(exc, _SendFailed) else exc
            raise UpstreamError(pod, _stage(cause, note), cause) from cause

    def _downstream_response(
        self, upstream: aiohttp.ClientResponse, pod: Pod
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(strip_hop_by_hop(upstream.headers))
        if self._routed_pod_header:
            response.headers[self._routed_pod_header] = str(pod.index)
        return response


def pod_request_headers(
    request: web.BaseRequest,
    extra_headers: Mapping[str, str] | None = None,
    removed_headers: Iterable[str] = (),
    trusted: tuple[Network, ...] = (),
) -> CIMultiDict[str]:
    """Return the headers of `request` for the pod.

    Those of `upstream_headers`, without `removed_headers`, then with
    `extra_headers` set.
    """
    headers = upstream_headers(request, trusted)
    for name in removed_headers:
        headers.popall(name, None)
    if extra_headers:
        headers.update(extra_headers)
    return headers


async def answer_expect(request: web.BaseRequest) -> web.Response | None:
    """Send ``100 Continue`` for ``Expect: 100-continue``; reject other expectations.

    The proxy handles the expectation itself, right before it reads the
    body, and never forwards Expect: aiohttp's client would take a pod's
    interim 100 for the final response. Returns a 417 response for an
    expectation other than 100-continue, else None.
    """
    expect = request.headers.get("Expect")
    if expect is None:
        return None
    if expect.strip().lower() != "100-continue":
        return error_response(
            417,
            "invalid_expect",
            f"Expect {expect[:100]!r} is not supported, only 100-continue",
            header="Expect",
        )
    if request.version >= (1, 1) and request.writer is not None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim response is not part of the final response's size.
        request.writer.output_size = 0
    return None


def upstream_headers(
    request: web.BaseRequest, trusted: tuple[Network, ...] = ()
) -> CIMultiDict[str]:
    """Return the client's headers for the pod, with the X-Forwarded-* set.

    `trusted` are the networks of proxies whose X-Forwarded-* are kept.
    """
    headers = strip_hop_by_hop(request.headers)
    headers.popall("Expect", None)
    set_forwarded_headers(headers, request, trusted)
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


def _stage(cause: BaseException, note: _ConnectionNote) -> Stage:
    """Return how far an attempt got before `cause` ended it."""
    if not note.connected:
        if isinstance(
            cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
        ):
            return Stage.CONNECT
        return Stage.OTHER
    if isinstance(cause, TimeoutError):
        return Stage.TIMEOUT
    if isinstance(cause, aiohttp.ClientConnectionError | ConnectionError):
        return Stage.STALE if note.reused else Stage.SENT
    return Stage.OTHER


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
    """Return ``name=value`` pairs for a log line; client values are made safe.

    A value that is long or has spaces or control characters, as a rejected
    UID can, is shown quoted and cut at `_ID_SHOWN_LENGTH` characters.
    """
    return " ".join(f"{name}={_safe_id(value)}" for name, value in ids.items())


def _safe_id(value: object) -> str:
    text = str(value)
    if len(text) <= _ID_SHOWN_LENGTH and text.isprintable() and " " not in text:
        return text
    shown = repr(text[:_ID_SHOWN_LENGTH])
    return shown + "..." if len(text) > _ID_SHOWN_LENGTH else shown
