"""The fast path for a pod response that arrived whole: one write to the client.

When the pod's whole response, with its Content-Length, arrived with its
head, the relay encodes the client's status line and headers itself and
writes them with the body in one transport write. That skips aiohttp's
response preparation: with a 9-byte response, callgrind counted about 8 %
fewer instructions per proxied request. The bytes are those of
`proxy.relay`'s path through aiohttp 3.14's `StreamResponse` for the same
response, with three differences. The reason phrase and header values keep the
pod's bytes exactly, where aiohttp's writer drops bytes that are not UTF-8.
Each header line is copied as the pod sent it, with the spaces or tabs after
its colon, where aiohttp's path writes one space.
The order differs in two cases. The routed pod header comes after the pod's
headers, where aiohttp puts it in place of a pod header of that name. A 304
keeps its Content-Length where the pod put it, where aiohttp's path puts it
last.

Any other response goes through aiohttp's `StreamResponse`.
"""

from __future__ import annotations

from typing import Final

import aiohttp.web_response
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDict
from mypy_extensions import mypyc_attr

from proxy.upstream_connection import UpstreamResponse

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
# Statuses whose responses carry no Content-Length to the client, as aiohttp
# 3.14's `should_remove_content_length` decides for the statuses a pod can
# send as final responses. A 304 keeps it (RFC 9110, section 8.6).
_NO_LENGTH_STATUSES: Final = frozenset({204})
# The Connection line of nginx and of other pods that keep connections open,
# lowercased. Final, so that mypyc puts the string and its length in the code.
_KEEP_ALIVE_LINE: Final = "\r\nconnection: keep-alive"
_STATUS_PREFIXES: Final = {HttpVersion11: b"HTTP/1.1", HttpVersion10: b"HTTP/1.0"}


# Non-native like the aiohttp subclasses in proxy/connections.py, with the
# base named in its defining module for the same reason. NOTE: a native
# class was not tried here.
@mypyc_attr(native_class=False)
class SentResponse(aiohttp.web_response.StreamResponse):
    """A response whose head and body were already written to the transport.

    aiohttp's `RequestHandler` still gets a response object for its
    keep-alive decision and the access log, and
    `proxy.connections.OnDemandRequestHandler` neither prepares it nor
    writes its end. `prepare` and `write_eof` do nothing, and `headers`
    hold only the routed pod header, the one header the access log reads.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        keep_alive: bool,
        routed: tuple[str, str] | None,
    ) -> None:
        # StreamResponse.__init__ is not called, because its keyword
        # arguments and reason phrase check cost instructions on every
        # request, for a response that aiohttp never writes. These are the
        # attributes it sets (aiohttp 3.14), and a test compares them with
        # those of a StreamResponse.
        self._state = {}
        self._headers = CIMultiDict((routed,)) if routed else CIMultiDict()
        self._status = status
        self._reason = reason
        self._sent_keep_alive = keep_alive

    @property
    def keep_alive(self) -> bool:
        return self._sent_keep_alive

    @property
    def prepared(self) -> bool:
        return True

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class ClientHeadEncoder:
    """Encodes the client's status line and headers for a pod response.

    :param routed_pod_header: the header set to the pod index; "" for none.
    """

    def __init__(self, routed_pod_header: str) -> None:
        self._routed_prefix = (
            f"{routed_pod_header}: ".encode("ascii") if routed_pod_header else None
        )
        # With no routed pod header this is "\r\n:", which a header block
        # never contains, because llhttp rejects an empty header name.
        self._routed_line = f"\r\n{routed_pod_header.lower()}:"
        self._dropped = set(HOP_BY_HOP)
        if routed_pod_header:
            self._dropped.add(routed_pod_header.lower())

    def encode(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        pod_index: int,
        keep_alive: bool,
    ) -> bytes | None:
        """Return the status line and headers for the client, or None to fall back.

        The pod's header lines keep their order and bytes, without the
        hop-by-hop ones and those its Connection header names. The routed
        pod header replaces every pod header of its name. Date is added when
        the pod sent none, as RFC 9110, section 6.6.1 requires of a
        recipient that forwards such a response. Connection follows the
        client's HTTP version and `keep_alive`. Returns None when the
        reason phrase contains NUL, which llhttp accepts there, so that
        aiohttp's writer handles it as before.
        """
        status_line = upstream.status_line
        if 0 in status_line:
            # NUL, which llhttp accepts in a reason phrase.
            return None
        version = request.version
        prefix = _STATUS_PREFIXES.get(version)
        if prefix is None:
            prefix = f"HTTP/{version.major}.{version.minor}".encode("ascii")
        parts = [prefix, status_line]
        if len(status_line) == 4:
            # A status line without a reason keeps the space before it.
            parts.append(b" ")
        parts.append(self._end_to_end_lines(upstream))
        if self._routed_prefix is not None:
            parts.append(b"%s%d\r\n" % (self._routed_prefix, pod_index))
        if "\r\ndate:" not in upstream.lowered_block:
            parts.append(f"Date: {rfc822_formatted_time()}\r\n".encode("ascii"))
        if keep_alive:
            if version == HttpVersion10:
                parts.append(b"Connection: keep-alive\r\n")
        elif version == HttpVersion11:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _end_to_end_lines(self, upstream: UpstreamResponse) -> bytes:
        """Return the pod's header block without the lines the client never gets.

        The common cases, a block with no such line or with nginx's single
        ``Connection: keep-alive``, take a few substring searches. They
        search str, because `in` on bytes with a bytes operand first tries
        the operand as an integer and formats a TypeError (CPython 3.11),
        about 2,000 instructions more per check under callgrind. Each search
        scans the block, so the three names that start with "t" share one
        search for "\r\nt" first, and one count finds whether the block has
        no Connection line, exactly one, or more.
        """
        block = upstream.header_block
        lowered = upstream.lowered_block
        if (
            upstream.status in _NO_LENGTH_STATUSES
            or "\r\nkeep-alive:" in lowered
            or "\r\nproxy-" in lowered
            or (
                "\r\nt" in lowered
                and (
                    "\r\nte:" in lowered
                    or "\r\ntrailer:" in lowered
                    or "\r\ntransfer-encoding:" in lowered
                )
            )
            or "\r\nupgrade:" in lowered
            or self._routed_line in lowered
        ):
            return _cut_lines(block, lowered, self._dropped_names(upstream))
        connection_lines = lowered.count("\r\nconnection:")
        if connection_lines == 0:
            return block
        if connection_lines == 1:
            # The one Connection line, when its value is exactly keep-alive.
            start = lowered.find(_KEEP_ALIVE_LINE)
            end = start + len(_KEEP_ALIVE_LINE)
            if start >= 0 and lowered.find("\r\n", end) == end:
                return block[:start] + block[end:]
        return _cut_lines(block, lowered, self._dropped_names(upstream))

    def _dropped_names(self, upstream: UpstreamResponse) -> set[str]:
        """Return the lowercased names of the pod headers the client never gets."""
        names = self._dropped | upstream.connection_tokens
        # An empty option, as in "Connection: close,", names no header.
        names.discard("")
        if upstream.status in _NO_LENGTH_STATUSES:
            names.add("content-length")
        else:
            # The client's framing: a pod that names it in Connection would
            # leave a keep-alive response without a length.
            names.discard("content-length")
        return names


def _cut_lines(block: bytes, lowered: str, names: set[str]) -> bytes:
    """Return `block` without the header lines of `names`.

    `lowered` is `block` decoded as Latin-1 and lowercased, with the same
    offsets, and `names` are lowercase.
    """
    spans = []
    for name in names:
        needle = f"\r\n{name}:"
        start = lowered.find(needle)
        while start >= 0:
            # Every line of a header block ends with CRLF.
            end = lowered.find("\r\n", start + 2)
            spans.append((start, end))
            start = lowered.find(needle, end)
    if not spans:
        return block
    spans.sort()
    pieces = []
    position = 0
    for start, end in spans:
        pieces.append(block[position:start])
        position = end
    pieces.append(block[position:])
    return b"".join(pieces)
