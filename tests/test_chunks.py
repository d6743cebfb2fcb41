"""The chunk line check added to aiohttp's Python parser.

The payload parser is fed directly, in pieces as a socket may deliver them,
so the check is shown to follow aiohttp's own state across pieces.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import TransferEncodingError
from aiohttp.http_parser import ChunkState, HeadersParser
from aiohttp.streams import StreamReader

from proxy.chunks import StrictPayloadParser, first_bad_byte

# The last chunk's size has more than 16 digits but is 0, which is valid.
VALID = (
    b'5;name=value\r\nhello\r\n6;a;b="q\tx"\r\n world\r\n'
    b"00000000000000000000;end\r\n\r\n"
)


def new_parser() -> tuple[StrictPayloadParser, StreamReader]:
    loop = asyncio.get_running_loop()
    payload = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    parser = StrictPayloadParser(payload, chunked=True, headers_parser=HeadersParser())
    return parser, payload


def feed_in_pieces(parser: StrictPayloadParser, body: bytes, size: int) -> None:
    for start in range(0, len(body), size):
        parser.feed_data(body[start : start + size])


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(VALID)])
async def test_valid_extensions_pass_in_pieces(size: int) -> None:
    parser, payload = new_parser()

    feed_in_pieces(parser, VALID, size)

    assert payload.is_eof()
    assert await payload.read() == b"hello world"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
@pytest.mark.parametrize(
    "body",
    [
        b"5;a=\x01\r\nhello\r\n0\r\n\r\n",
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n6;x=\x7f\r\n world\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0;end\x00\r\n\r\n",
        b"10000000000000000\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["control", "bare-cr", "del-in-second", "nul-in-last", "size-65-bits"],
)
async def test_invalid_chunk_line_rejected(body: bytes, size: int) -> None:
    parser, _ = new_parser()

    with pytest.raises(TransferEncodingError):
        feed_in_pieces(parser, body, size)


def test_scan_skips_chunk_data() -> None:
    # A ";" and a control byte inside chunk data are no extension.
    body = b"4\r\n;\x01;\x02\r\n0\r\n\r\n"

    assert first_bad_byte(body, ChunkState.PARSE_CHUNKED_SIZE, 0) is None


def test_scan_continues_a_chunk() -> None:
    body = b"lo\r\n3;\x01\r\nabc\r\n"

    index = first_bad_byte(body, ChunkState.PARSE_CHUNKED_CHUNK, 2)

    assert index == body.index(b"\x01")
