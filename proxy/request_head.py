"""The header lines that a pod receives with a client's request.

The client's headers reach the pod in the client's order, as aiohttp's
request parser read them (`BaseRequest.raw_headers`), so a name keeps the
client's letter case. Hop-by-hop headers, those named in Connection, Expect
and the headers a caller removes are dropped, and X-Forwarded-For, -Proto
and -Host follow as `forwarded_headers` sets them.

The lines are returned encoded, each ending with CRLF. aiohttp 3.14's
request parsers, the C one and the Python one, reject CR, LF and NUL in
header names and values, so the client's lines are not checked again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from aiohttp import web
from multidict import CIMultiDictProxy, istr

from proxy.client_head import HOP_BY_HOP
from proxy.inbound import Network, is_trusted
from proxy.upstream import InvalidRequestError, lines_intact

# No header names, for the common case of a Connection header naming none.
_NOTHING: frozenset[str] = frozenset()
# Client headers that the pod gets as `forwarded_headers` sets them.
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# The results of `_dropped_names` by its argument, at most `_MAX_DROPPED_NAMES`.
_DROPPED_NAMES: Final[dict[tuple[str, ...], tuple[frozenset[str], frozenset[str]]]] = {}
_MAX_DROPPED_NAMES = 32
# Host as multidict's `istr`, which a lookup need not lowercase. Final, so
# that mypyc reads it without a module dict lookup.
_HOST: Final = istr("Host")


def pod_request_headers(
    request: web.BaseRequest,
    extra_headers: Mapping[str, str] | None = None,
    removed_headers: Iterable[str] = (),
    trusted: tuple[Network, ...] = (),
    kept_headers: Iterable[str] = (),
) -> bytes:
    """Return the header lines of `request` for the pod, in the client's order.

    The client's lines lose the hop-by-hop ones, those named in Connection,
    Expect (the relay sets it itself when it forwards 100-continue) and
    `removed_headers`. Then X-Forwarded-For, -Proto and -Host follow as
    `forwarded_headers` sets them for the `trusted` networks, then
    `extra_headers`. Last come those of `kept_headers` that the client sent
    but the rules above dropped, such as a routing header named in
    Connection, with their first value. Raises `InvalidRequestError` for an
    extra header that contains CR, LF or NUL.
    """
    removed = tuple(removed_headers)
    names_pair = _DROPPED_NAMES.get(removed)
    if names_pair is None:
        names_pair = _dropped_names(removed)
    dropped, screened = names_pair
    raw = request.raw_headers
    has_host = False
    screened_found = False
    for raw_name, _ in raw:
        # mypyc calls these two str methods directly, where `bytes.lower`
        # costs a generic method call. aiohttp 3.14's request parsers accept
        # only token characters in a header name, which are ASCII.
        name = raw_name.decode("latin-1").lower()
        if name in screened:
            screened_found = True
            break
        if name == "host":
            has_host = True
    if has_host and not screened_found:
        # Nothing to drop and no X-Forwarded-* of the client's, so the
        # client's lines go through whole. `kept_headers` add nothing,
        # because the client sent none of the dropped names.
        # mypyc calls bytes concatenation directly, where each `bytes.join`
        # of a name and its value would be a generic method call.
        client_lines = [name + b": " + value + b"\r\n" for name, value in raw]
        added = (
            f"X-Forwarded-For: {request.remote or ''}\r\n"
            f"X-Forwarded-Proto: {request.scheme}\r\n"
            f"X-Forwarded-Host: {request.headers.get(_HOST)}\r\n"
        )
        if extra_headers:
            added += _extra_lines(extra_headers)
        client_lines.append(added.encode("utf-8", "surrogateescape"))
        return b"".join(client_lines)

    source = request.headers
    named = _connection_options(source)
    headers = _client_headers(request, dropped | named, trusted)
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
    if extra_headers:
        lines += _extra_lines(extra_headers)
    for name in kept_headers:
        lowered = name.lower()
        if lowered in dropped or lowered in named:
            value = source.get(name)
            if value is not None:
                lines += f"{name}: {value}\r\n"
    # aiohttp decodes header bytes as UTF-8 with surrogate escapes, so this
    # restores the client's bytes exactly.
    return lines.encode("utf-8", "surrogateescape")


def _connection_options(source: CIMultiDictProxy[str]) -> frozenset[str] | set[str]:
    """Return the lowercased options of the client's Connection headers."""
    if "Connection" not in source:
        return _NOTHING
    options = {
        token.strip().lower()
        for value in source.getall("Connection")
        for token in value.split(",")
    }
    # The pod always gets the one Host line, which HTTP/1.1 requires.
    options.discard("host")
    return options


def _client_headers(
    request: web.BaseRequest,
    dropped: frozenset[str] | set[str],
    trusted: tuple[Network, ...],
) -> list[tuple[str, str]]:
    """Return the client's headers but `dropped`, then the X-Forwarded-* ones."""
    headers: list[tuple[str, str]] = []
    forwarded: list[tuple[str, str]] = []
    for raw_name, raw_value in request.raw_headers:
        name = raw_name.decode("utf-8", "surrogateescape")
        lowered = name.lower()
        if lowered in dropped:
            continue
        value = raw_value.decode("utf-8", "surrogateescape")
        if lowered in _FORWARDED:
            forwarded.append((lowered, value))
        headers.append((name, value))
    # The pod gets HTTP/1.1, which requires Host (RFC 9112, section 3.2). An
    # HTTP/1.0 request without one names no authority, so the value is empty.
    if "Host" not in request.headers:
        headers.append(("Host", ""))
    forwarded_headers(headers, forwarded, request, trusted)
    return headers


def _extra_lines(extra_headers: Mapping[str, str]) -> str:
    """Return the lines of `extra_headers`, which must not contain CR, LF or NUL."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in extra_headers.items()])
    if not lines_intact(lines[:-2], len(extra_headers)):
        for name, value in extra_headers.items():
            if not lines_intact(f"{name}: {value}", 1):
                raise InvalidRequestError("header", name)
    return lines


def _dropped_names(
    removed_headers: tuple[str, ...],
) -> tuple[frozenset[str], frozenset[str]]:
    """Return the lowercased client header names that need the slower path.

    The first set has the headers the pod never gets: the hop-by-hop ones,
    Expect (the relay sets it itself when it forwards 100-continue) and
    `removed_headers`. The second set adds the X-Forwarded-* names, so it
    has every name whose presence takes the slower path. The callers pass a
    few fixed tuples, so each result is kept in `_DROPPED_NAMES`, which a
    plain dict lookup reads faster than `functools.lru_cache` would.
    """
    dropped = HOP_BY_HOP | {"expect"} | {name.lower() for name in removed_headers}
    screened = dropped | _FORWARDED
    if len(_DROPPED_NAMES) >= _MAX_DROPPED_NAMES:
        _DROPPED_NAMES.clear()
    _DROPPED_NAMES[removed_headers] = dropped, screened
    return dropped, screened


def forwarded_headers(
    headers: list[tuple[str, str]],
    received: list[tuple[str, str]],
    request: web.BaseRequest,
    networks: tuple[Network, ...],
) -> None:
    """Set X-Forwarded-For, -Proto and -Host on the pod's `headers`.

    `received` are the client's X-Forwarded-* headers in `headers`, with
    lowercase names. From a peer in `networks` the client's values are kept:
    the peer is appended to its X-Forwarded-For, joined into one line at the
    end, and its X-Forwarded-Proto and -Host stay in place when they appear
    once. From any other peer all three are replaced by what the proxy saw
    itself, at the end.
    """
    peer = request.remote or ""
    trusted = bool(received) and is_trusted(peer, networks)
    chain = ""
    replaced = {"x-forwarded-for"}
    if received:
        counts = {name: 0 for name in _FORWARDED}
        for name, _ in received:
            counts[name] += 1
        if trusted:
            chain = ", ".join(v for n, v in received if n == "x-forwarded-for")
        for name in ("x-forwarded-proto", "x-forwarded-host"):
            if not trusted or counts[name] != 1:
                replaced.add(name)
        headers[:] = [item for item in headers if item[0].lower() not in replaced]
    else:
        replaced.update(_FORWARDED)
    headers.append(("X-Forwarded-For", f"{chain}, {peer}" if chain else peer))
    if "x-forwarded-proto" in replaced:
        headers.append(("X-Forwarded-Proto", request.scheme))
    if "x-forwarded-host" in replaced:
        host = request.headers.get("Host")
        if host is not None:
            headers.append(("X-Forwarded-Host", host))
