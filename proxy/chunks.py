"""Chunk-size lines checked as strictly by aiohttp's Python parser as by its C one.

aiohttp's C parser (llhttp) rejects a control character or a bare CR in a
chunk extension, and a chunk size beyond 64 bits. Its Python parser, which
runs under ``AIOHTTP_NO_EXTENSIONS=1`` or without the C extension, rejects
only a LF in an extension, and waits for the data of any size (both read in
aiohttp 3.14.5). `strict_chunk_lines` makes a Python request parser
reject both. Before each piece of a chunked body reaches aiohttp's payload
parser, the offending byte is replaced by a LF, which aiohttp then rejects
with TransferEncodingError. So the client gets the same 400 as from the C
parser, and nothing new is forwarded.

It relies on internals of ``aiohttp.http_parser``: the request parser's
``_payload_parser`` attribute, and the payload parser's ``_type``,
``_chunk``, ``_chunk_size`` and ``_chunk_tail``.
"""

from __future__ import annotations

import re

from aiohttp import http_parser
from aiohttp.http_parser import ChunkState, HttpPayloadParser, ParseState

# Controls other than HTAB, and DEL: RFC 9112 allows none of them in the
# token or quoted string of a chunk extension. LF is listed too, though
# aiohttp's Python parser rejects it itself.
_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]+")
# llhttp keeps a chunk size in an unsigned 64-bit integer.
_MAX_CHUNK_SIZE = 2**64 - 1


def first_bad_byte(data: bytes, state: int, remaining: int) -> int | None:
    """Return the index in `data` of the first byte that makes a chunk line invalid.

    That is a forbidden byte of a chunk extension, or the first digit of a
    chunk size beyond 64 bits. `data` continues a chunked body whose parser
    is in the `ChunkState` `state`, with `remaining` bytes of the current
    chunk still to come. The scan stops with None at an incomplete line, at
    a malformed one, which aiohttp rejects by itself, and at the last chunk.
    """
    position = 0
    while True:
        if state == ChunkState.PARSE_CHUNKED_SIZE:
            end = data.find(b"\r\n", position)
            if end < 0:
                return None
            semicolon = data.find(b";", position, end)
            if semicolon >= 0:
                bad = _FORBIDDEN.search(data, semicolon, end)
                if bad is not None:
                    return bad.start()
                size_text = data[position:semicolon]
            else:
                size_text = data[position:end]
            if not _HEX_DIGITS.fullmatch(size_text):
                return None
            remaining = int(size_text, 16)
            if remaining > _MAX_CHUNK_SIZE:
                return position
            if remaining == 0:
                return None
            position = end + 2
            state = ChunkState.PARSE_CHUNKED_CHUNK
        elif state == ChunkState.PARSE_CHUNKED_CHUNK:
            if len(data) - position < remaining:
                return None
            position += remaining
            state = ChunkState.PARSE_CHUNKED_CHUNK_EOF
        elif state == ChunkState.PARSE_CHUNKED_CHUNK_EOF:
            if data[position : position + 2] != b"\r\n":
                return None
            position += 2
            state = ChunkState.PARSE_CHUNKED_SIZE
        else:
            return None


class StrictPayloadParser(HttpPayloadParser):
    """aiohttp's Python payload parser, with the chunk line check."""

    def feed_data(
        self, chunk: bytes, SEP: bytes = b"\r\n", CHUNK_EXT: bytes = b";"
    ) -> tuple[http_parser.PayloadState, bytes]:
        if self._type == ParseState.PARSE_CHUNKED and chunk:
            chunk = self._mark_bad_byte(chunk)
        return super().feed_data(chunk, SEP, CHUNK_EXT)  # type: ignore[arg-type]

    def _mark_bad_byte(self, chunk: bytes) -> bytes:
        # aiohttp keeps an incomplete line in _chunk_tail and puts it in
        # front of the next data, so a line can start in the tail.
        tail = self._chunk_tail
        index = first_bad_byte(tail + chunk, self._chunk, self._chunk_size)
        if index is None:
            return chunk
        if index < len(tail):
            self._chunk_tail = tail[:index] + b"\n" + tail[index + 1 :]
            return chunk
        index -= len(tail)
        return chunk[:index] + b"\n" + chunk[index + 1 :]


class _StrictRequestParser(http_parser.HttpRequestParserPy):
    """aiohttp's Python request parser, whose chunked bodies get the check."""

    @property
    def _payload_parser(self) -> HttpPayloadParser | None:
        parser: HttpPayloadParser | None = self.__dict__.get("_strict_payload")
        return parser

    @_payload_parser.setter
    def _payload_parser(self, parser: HttpPayloadParser | None) -> None:
        if type(parser) is HttpPayloadParser:
            parser.__class__ = StrictPayloadParser
        self.__dict__["_strict_payload"] = parser


def strict_chunk_lines(parser: object) -> None:
    """Give a Python request parser the check; leave a C parser as it is."""
    if type(parser) is http_parser.HttpRequestParserPy:
        payload = parser.__dict__.pop("_payload_parser", None)
        parser.__class__ = _StrictRequestParser
        parser._payload_parser = payload
