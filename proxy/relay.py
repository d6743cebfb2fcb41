"""Relaying one request to one pod and the pod's response back to the client.

Bodies stream in both directions without being held whole or decompressed.
Hop-by-hop headers are dropped both ways. Failures before the response
starts become a JSON error naming the pod: 502 when the pod refused or broke
the exchange, 504 on a timeout. A failure after the response started aborts
the client connection, because the status line is already sent.

The response keeps the pod's framing where the client allows it: the pod's
Content-Length when it sent one, else chunked coding to an HTTP/1.1 client
and a body that ends with the connection to an HTTP/1.0 client. Each body
chunk is written to the client as soon as it arrives from the pod.

`Relay.send` is the variant for retries: it raises `UpstreamError` with the
`Stage` the attempt reached, instead of sending the client an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable, Mapping
from typing import Any, Final

import aiohttp
import aiohttp.web_response
import orjson
from aiohttp import StreamReader, web
from aiohttp.http import HttpVersion11
from multidict import istr
from mypy_extensions import mypyc_attr

from proxy.client_head import HOP_BY_HOP, ClientHeadEncoder, SentResponse
from proxy.errors import StatefulRouteError
from proxy.inbound import (
    GuardedBody,
    Limits,
    Network,
    RequestRejected,
    closing_error,
    request_target,
)
from proxy.logs import json_text
from proxy.pods import Pod
from proxy.request_head import pod_request_headers
from proxy.retry import RETRYABLE_METHODS, RequestBody, Stage
from proxy.tunnel import relay_tunnel, websocket_upgrade
from proxy.upstream import (
    InvalidRequestError,
    UpstreamFailure,
    UpstreamPool,
    UpstreamResponse,
)
from proxy.upstream_connection import (
    ClientBodyError,
    ConnectionClosedError,
    InvalidResponseError,
)

logger = logging.getLogger("stateful_route.relay")

# Maximum length of a client-supplied id in a log line.
_ID_SHOWN_LENGTH = 128
# Maximum length of the reason for a pod's failure in a 502 message.
_REASON_SHOWN_LENGTH = 128

_CONTINUE_LINE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Request key that marks a client that got its 100 Continue.
_CONTINUE_SENT = "stateful_route.continue_sent"
# Expect as multidict's `istr`, which a lookup need not lowercase. Final,
# so that mypyc reads it without a module dict lookup.
_EXPECT: Final = istr("Expect")


class UpstreamError(StatefulRouteError):
    """An attempt at a pod that failed before any response byte reached the client.

    `stage` is how far the attempt got, and `cause` is the error that ended
    it, from `proxy.upstream_connection` or the OS.
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


# Non-native like the aiohttp subclasses in proxy/connections.py, with the
# base named in its defining module for the same reason. NOTE: a native
# class was not tried here.
@mypyc_attr(native_class=False)
class _RelayedResponse(aiohttp.web_response.StreamResponse):
    """A pod's response, with the header changes of aiohttp undone.

    aiohttp 3.14's `StreamResponse._prepare_headers` sets Content-Type to
    application/octet-stream and Server to its own name when they are
    missing, and removes Content-Length from a 304. `_write_headers` runs
    right after it and restores what the pod sent. The Date that aiohttp
    adds stays, as RFC 9110 section 6.6.1 requires of a recipient that
    forwards a response without one.

    NOTE: aiohttp's header writer drops the bytes of a pod's header value
    that are not UTF-8, which the whole-response path of `client_head` keeps.
    """

    def keep_pod_headers(self) -> None:
        """Note the pod's headers that aiohttp would change, before `prepare`."""
        headers = self.headers
        self._pod_sent_type = "Content-Type" in headers
        self._pod_sent_server = "Server" in headers
        # RFC 9110 section 8.6 lets a 304 state the length of the 200.
        self._not_modified_length = (
            headers.get("Content-Length") if self.status == 304 else None
        )

    async def _write_headers(self) -> None:
        headers = self.headers
        if not getattr(self, "_pod_sent_type", True):
            headers.popall("Content-Type", None)
        if not getattr(self, "_pod_sent_server", True):
            headers.popall("Server", None)
        length = getattr(self, "_not_modified_length", None)
        if length is not None and "Content-Length" not in headers:
            headers["Content-Length"] = length
        await super()._write_headers()


@mypyc_attr(native_class=False)
class _CoalescedResponse(_RelayedResponse):
    """A response whose head goes out with its first body bytes, in one write.

    For a body that arrived whole with the head. `_send_headers_immediately`
    is the switch aiohttp's own `web.Response` uses (aiohttp 3.14).
    """

    _send_headers_immediately = False


def error_response(
    status: int, code: str, message: str, **details: str | int
) -> web.Response:
    """Return a response with a short JSON body describing a failure."""
    fields: dict[str, str | int] = {"error": code, "message": message, **details}
    try:
        body = orjson.dumps(fields)
    except TypeError:
        # A client value with bytes that are not UTF-8, which aiohttp keeps
        # as surrogates.
        body = orjson.dumps(
            {
                name: json_text(value) if isinstance(value, str) else value
                for name, value in fields.items()
            }
        )
    return web.Response(status=status, body=body, content_type="application/json")


class Relay:
    """Sends requests to pods over the pooled connections of an `UpstreamPool`.

    :param pool: the keep-alive pod connections.
    :param routed_pod_header: response header set to the pod index; "" for none.
    """

    def __init__(self, pool: UpstreamPool, routed_pod_header: str) -> None:
        self._pool = pool
        self._routed_pod_header = routed_pod_header
        # The name as multidict's `istr`, which `SentResponse` puts in its
        # `CIMultiDict` without lowercasing it.
        self._routed_key = istr(routed_pod_header)
        self._client_head = ClientHeadEncoder(routed_pod_header)

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
        """Forward `request` to `pod` and stream the response to the client.

        A failure before the response started returns the JSON error of
        `error_response`. A bodyless idempotent request that hit a pooled
        connection the pod had closed goes once more on a new connection.
        `removed_headers` are dropped from the client's headers before
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
            try:
                return await self._exchange(
                    request, pod, client_timeout, ids, headers, body
                )
            except UpstreamError as exc:
                if not (
                    exc.stage is Stage.STALE
                    and body is None
                    and request.method in RETRYABLE_METHODS
                ):
                    raise
                logger.debug(
                    "resending %s: pooled connection to %s was closed %s",
                    request.method,
                    pod,
                    format_ids(ids),
                )
            return await self._exchange(
                request, pod, client_timeout, ids, headers, body
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

    def send(
        self,
        request: web.BaseRequest,
        pod: Pod,
        client_timeout: aiohttp.ClientTimeout,
        ids: dict[str, Any],
        headers: bytes,
        body: RequestBody,
    ) -> Coroutine[Any, Any, web.StreamResponse]:
        """Send one attempt of `request` to `pod` and stream the response back.

        Raises `UpstreamError` when the attempt fails before any response
        byte reached the client, so the caller can retry it or respond with
        `error_response`. A failure after that aborts the client connection
        and returns the response. The request is sent once. It returns the
        coroutine of `_exchange` itself, which saves a coroutine per request.
        """
        return self._exchange(request, pod, client_timeout, ids, headers, body.data())

    def error_response(self, error: UpstreamError, ids: dict[str, Any]) -> web.Response:
        """Log a failed attempt and return its JSON error, 504 on a timeout."""
        response = _upstream_error(error, ids)
        if self._routed_pod_header:
            response.headers[self._routed_pod_header] = str(error.pod.index)
        return response

    async def _exchange(
        self,
        request: web.BaseRequest,
        pod: Pod,
        client_timeout: aiohttp.ClientTimeout,
        ids: dict[str, Any],
        headers: bytes,
        body: bytes | StreamReader | AsyncIterator[bytes] | None,
    ) -> web.StreamResponse:
        address = pod.address
        upgrade = websocket_upgrade(request)
        if upgrade is not None:
            upgrade_lines = f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n"
            headers += upgrade_lines.encode("utf-8", "surrogateescape")
        streamed = body is not None and not isinstance(body, bytes)
        on_continue = None
        if streamed and expects_continue(request):

            async def on_continue() -> None:
                await send_continue(request)

        try:
            upstream = await self._pool.request(
                (address.host, address.port),
                request.method,
                request_target(request),
                headers,
                body,
                content_length=request.content_length if body is not None else None,
                connect_timeout_s=client_timeout.sock_connect,
                read_timeout_s=client_timeout.sock_read,
                on_continue=on_continue,
                upgrade=upgrade is not None,
            )
        except asyncio.CancelledError:
            logger.debug(
                "client went away, cancelled upstream request %s", format_ids(ids)
            )
            raise
        except InvalidRequestError as invalid:
            # A name of its own: mypyc 2.4.1 gives an async function one
            # variable per name, typed by its first except clause.
            logger.info("rejected a request with 400: %s %s", invalid, format_ids(ids))
            return error_response(
                400, f"invalid_{invalid.part}", str(invalid), value=invalid.value[:200]
            )
        except UpstreamFailure as exc:
            body_error = exc.cause
            if isinstance(body_error, ClientBodyError) and not isinstance(
                body_error.cause, RequestRejected
            ):
                return _client_body_failed(request, body_error, ids)
            # A body beyond the limit or stalled raises `RequestRejected` in the
            # forwarder's `GuardedBody`. The forwarder reads it from `failure`
            # and returns its 408 or 413.
            raise UpstreamError(pod, exc.stage, exc.cause) from exc.cause

        if (
            upstream.complete
            and upstream.length_known
            and not upstream.tunnel
            and (on_continue is None or upstream.request_sent)
        ):
            # The common case, without the coroutine of `_stream`.
            try:
                sent = self._write_whole(request, upstream, pod, ids)
            except BaseException:
                upstream.release()
                raise
            if sent is not None:
                # The body was taken whole, so the pod connection is free.
                upstream.release()
                # `request.protocol`, read without its property call.
                if request._protocol.writing_paused:
                    await _client_write(request.writer.drain(), ids)
                return sent
        try:
            return await self._stream(request, upstream, pod, ids, on_continue)
        except asyncio.CancelledError:
            logger.debug(
                "client went away, cancelled upstream response %s", format_ids(ids)
            )
            raise
        finally:
            upstream.release()

    async def _stream(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        pod: Pod,
        ids: dict[str, Any],
        on_continue: object,
    ) -> web.StreamResponse:
        """Relay the pod's response head and body to the client."""
        whole = upstream.complete
        # A pod that responded to an Expect request before its body leaves the
        # client's body unsent, so the client connection cannot carry more.
        unread_body = on_continue is not None and not upstream.request_sent
        response = _CoalescedResponse() if whole else _RelayedResponse()
        response.set_status(upstream.status, upstream.reason)
        response.headers.extend(_relayed_headers(upstream))
        response.keep_pod_headers()
        if self._routed_pod_header:
            response.headers[self._routed_pod_header] = str(pod.index)
        if upstream.tunnel:
            return await relay_tunnel(request, upstream, response, format_ids(ids))
        if unread_body:
            response.force_close()

        if whole:
            # Errors of the pod's side come from upstream.read(); the writes
            # fail only when the client is gone.
            data = await upstream.read()
            if await _client_write(response.prepare(request), ids):
                await _client_write(response.write_eof(data), ids)
            if unread_body:
                # Closes after the buffered response is flushed, instead of
                # aiohttp's lingering wait for a body that never comes.
                request.protocol.force_close()
            return response
        if not await _client_write(response.prepare(request), ids):
            return response
        try:
            while chunk := await upstream.read():
                if not await _client_write(response.write(chunk), ids):
                    return response
        except (ConnectionError, TimeoutError, ValueError, ClientBodyError) as exc:
            return _abort_relay(request, response, exc, ids)
        await _client_write(response.write_eof(), ids)
        if unread_body:
            request.protocol.force_close()
        return response

    def _write_whole(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        pod: Pod,
        ids: dict[str, Any],
    ) -> web.StreamResponse | None:
        """Write a response that arrived whole in one write; None to fall back.

        It falls back, before anything is written, for a head that
        `ClientHeadEncoder` does not encode. The caller waits for the
        client's buffer to drain.
        """
        keep_alive = request.keep_alive
        head = self._client_head.encode(request, upstream, pod.index, keep_alive)
        if head is None:
            return None
        data = upstream.read_complete()
        routed = self._routed_key
        response = SentResponse(
            upstream.status,
            upstream.reason,
            keep_alive,
            (routed, str(pod.index)) if routed else None,
        )
        # `request.transport` and `request.writer` of aiohttp 3.14.5, read
        # without their property calls.
        protocol = request._protocol
        transport = None if protocol is None else protocol.transport
        if transport is None or transport.is_closing():
            logger.debug("client went away before the response %s", format_ids(ids))
            return response
        sent = head + data if data else head
        transport.write(sent)
        # aiohttp's writer counts what went out, so that an error after this
        # point breaks the connection off instead of appending an error
        # response (`InboundRequestHandler.handle_error`).
        request._payload_writer.output_size += len(sent)
        return response


def _relayed_headers(upstream: UpstreamResponse) -> list[tuple[str, str]]:
    """Return the pod's response headers without hop-by-hop ones, order kept."""
    named = upstream.connection_tokens
    return [
        item
        for item in upstream.headers
        if (lowered := item[0].lower()) not in HOP_BY_HOP and lowered not in named
    ]


def _client_body_failed(
    request: web.BaseRequest, error: ClientBodyError, ids: dict[str, Any]
) -> web.Response:
    logger.info(
        "rejected %s %s with 400: request body ended early or is invalid %s: %r",
        request.method,
        request.raw_path[:200],
        format_ids(ids),
        error.cause,
    )
    response = error_response(
        400, "invalid_body", "the request body ended early or is invalid"
    )
    response.force_close()
    return response


def answer_expect(request: web.BaseRequest) -> web.Response | None:
    """Return a 417 response for an expectation other than 100-continue, else None.

    ``Expect: 100-continue`` is forwarded to the pod by the relay, which
    sends the client its ``100 Continue`` only once the pod sent one.
    """
    expect = request.headers.get(_EXPECT)
    if expect is None or expect.strip().lower() == "100-continue":
        return None
    return error_response(
        417,
        "invalid_expect",
        f"Expect {expect[:100]!r} is not supported, only 100-continue",
        header="Expect",
    )


def expects_continue(request: web.BaseRequest) -> bool:
    """Return whether the client waits for ``100 Continue`` before its body."""
    expect = request.headers.get(_EXPECT)
    return (
        expect is not None
        and request.version >= HttpVersion11
        and expect.strip().lower() == "100-continue"
    )


async def send_continue(request: web.BaseRequest) -> None:
    """Send the client ``100 Continue``, at most once per request."""
    if request.get(_CONTINUE_SENT) or request.writer is None:
        return
    request[_CONTINUE_SENT] = True
    await request.writer.write(_CONTINUE_LINE)
    # The interim response is not part of the final response's size.
    request.writer.output_size = 0


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


def _upstream_error(error: UpstreamError, ids: dict[str, Any]) -> web.Response:
    pod = error.pod
    if isinstance(error.cause, TimeoutError):
        kind = "connect" if error.stage is Stage.CONNECT else "read"
        logger.warning("%s timeout from %s %s", kind, pod, format_ids(ids))
        return error_response(
            504, "pod_timeout", f"{kind} timeout from pod {pod.index}", pod=pod.index
        )
    if error.stage is Stage.CONNECT:
        logger.warning("cannot connect to %s %s: %r", pod, format_ids(ids), error.cause)
        return error_response(
            502, "pod_unreachable", f"cannot connect to pod {pod.index}", pod=pod.index
        )
    logger.warning("request to %s failed %s: %s", pod, format_ids(ids), error.cause)
    return error_response(
        502,
        "pod_error",
        f"pod {pod.index} failed: {_failure_reason(error.cause)}",
        pod=pod.index,
    )


def _failure_reason(cause: BaseException) -> str:
    """Return the reason for a pod's failure, as the client's 502 shows it.

    The proxy's own messages of an invalid response or a closed connection
    name the fault, such as a response head over the limit. Other errors,
    from the OS for example, show only their type.
    """
    if isinstance(cause, (InvalidResponseError, ConnectionClosedError)):
        reason = str(cause)
        if len(reason) > _REASON_SHOWN_LENGTH:
            return reason[:_REASON_SHOWN_LENGTH] + "..."
        if reason:
            return reason
    return type(cause).__name__


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
