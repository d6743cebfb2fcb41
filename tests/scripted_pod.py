"""A pod on raw sockets that responds to each request with scripted bytes.

The first path segment of the request target names the script in
`SCRIPTS`: ``GET /short-length`` responds with a Content-Length larger than
the body and closes. A script is a list of steps: bytes to write, a pause
in seconds, `CLOSE`, `RESET` (SO_LINGER 0, so the kernel sends RST),
`STALL` (wait until the client closes), `READ_BODY` (read the request body
now, for Expect scripts that answer first) and `ECHO` (write a 200 whose
body is the raw request head and body). The request body is read before the
first step unless the script starts with `HEAD_ONLY`. After the last step
the connection stays open for the next request.

Every request is recorded as a `PodEvent` with the connection number, so
tests can tell a reused connection from a new one. Use it in-process with
`ScriptedPod`, or as a process: ``python tests/scripted_pod.py --port P
--log FILE``, which appends each event to FILE as one JSON line and stops
on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
# Maximum size of a request head or of one chunk-size line.
MAX_LINE = 64 * 1024

CLOSE = "close"
RESET = "reset"
STALL = "stall"
READ_BODY = "read-body"
HEAD_ONLY = "head-only"
ECHO = "echo"

Step = bytes | float | str

_OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
_CHUNKED_HEAD = _OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
# 40 header lines of 2,015 bytes, 80,600 bytes in all.
_FILLER = b"".join(b"X-Filler-%02d: %b\r\n" % (i, b"f" * 2000) for i in range(40))
_FILLER_LINE = len(_FILLER) // 40


def _head_of(size: int, separator: bytes = b": ") -> bytes:
    """Return a 200 response head of exactly `size` bytes, with a 2-byte body.

    Padding lines of 60 bytes, and a last one of 61 to 120, fill it. Each
    uses `separator` between name and value.
    """
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    left = size - len(start) - 2
    lines = []
    while left > 0:
        line_size = 60 if left > 120 else left
        name = b"X-Pad-%d" % len(lines)
        value = b"p" * (line_size - len(name) - len(separator) - 2)
        lines.append(name + separator + value + b"\r\n")
        left -= line_size
    return start + b"".join(lines) + b"\r\n"


SCRIPTS: dict[str, list[Step]] = {
    "length": [_OK_HEAD + b"Content-Length: 5\r\n\r\nhello"],
    "bare": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
    "with-server": [
        b"HTTP/1.1 200 OK\r\nServer: game/2\r\nContent-Length: 2\r\n\r\nok"
    ],
    "chunked": [_CHUNKED_HEAD + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"],
    "close-delimited": [_OK_HEAD + b"Connection: close\r\n\r\nhello world", CLOSE],
    "idle-close": [_OK_HEAD + b"Content-Length: 5\r\n\r\nhello", 0.1, CLOSE],
    "connection-close": [
        _OK_HEAD + b"Content-Length: 5\r\nConnection: close\r\n\r\nhello"
    ],
    "long-coding": [_OK_HEAD + b"Transfer-Encoding: " + b"x" * 300 + b"\r\n\r\n"],
    "status-099": [b"HTTP/1.1 099 Weird\r\nContent-Length: 2\r\n\r\nok"],
    "nul-reason": [b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok"],
    "trailer-close": [
        _CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nConnection: close\r\n\r\n"
    ],
    "short-length": [_OK_HEAD + b"Content-Length: 10\r\n\r\nhello", CLOSE],
    "cut-chunked": [_CHUNKED_HEAD + b"5\r\nhello\r\n", CLOSE],
    "reset-in-body": [_OK_HEAD + b"Content-Length: 10\r\n\r\nhello", 0.05, RESET],
    "stall-in-body": [_OK_HEAD + b"Content-Length: 10\r\n\r\nhello", STALL],
    "duplicate-length": [
        _OK_HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    ],
    "conflicting-length": [
        _OK_HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ],
    "length-and-chunked": [
        _OK_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    ],
    "interim": [
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        0.05,
        _OK_HEAD + b"Content-Length: 5\r\nX-Final: yes\r\n\r\nfinal",
    ],
    # At and one over the proxy's bound of 100 interim responses.
    "interim-100": [
        b"HTTP/1.1 102 Processing\r\n\r\n" * 100,
        _OK_HEAD + b"Content-Length: 5\r\n\r\nfinal",
    ],
    "interim-101": [
        b"HTTP/1.1 102 Processing\r\n\r\n" * 101,
        _OK_HEAD + b"Content-Length: 5\r\n\r\nfinal",
    ],
    "dated": [
        b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
        b"Content-Length: 2\r\n\r\nok"
    ],
    "routed-by-pod": [
        b"HTTP/1.1 200 OK\r\nX-Routed-Pod: 99\r\nContent-Length: 2\r\n\r\nok"
    ],
    "raw-bytes": [b"HTTP/1.1 200 OK\r\nX-Raw: caf\xe9\r\nContent-Length: 2\r\n\r\nok"],
    "utf8-reason": [b"HTTP/1.1 200 Caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nok"],
    "raw-reason": [b"HTTP/1.1 200 Caf\xe9\r\nContent-Length: 2\r\n\r\nok"],
    "utf8-reason-chunked": [
        b"HTTP/1.1 200 Caf\xc3\xa9\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ],
    "no-content-length": [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Kept: 204\r\n\r\n"
    ],
    "no-content": [b"HTTP/1.1 204 No Content\r\nX-Kept: 204\r\n\r\n"],
    "not-modified": [b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-Kept: 304\r\n\r\n'],
    "not-modified-length": [
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n"
    ],
    "head": [_OK_HEAD + b"Content-Length: 1234\r\nX-Kept: head\r\n\r\n"],
    "nginx-style": [
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\n"
        b"Connection: Keep-Alive\r\n\r\nok"
    ],
    "hop-by-hop": [
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Pod-Scoped\r\n"
        b"Keep-Alive: timeout=5\r\nX-Pod-Scoped: 1\r\nproxy-connection: x\r\n"
        b"Proxy-Authenticate: Basic\r\nTE: trailers\r\nTRAILER: X-Sum\r\n"
        b"Upgrade: h2c\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok"
    ],
    "connection-twice": [
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-Pod-Scoped: 1\r\n"
        b"X-End-To-End: kept\r\nconnection: x-pod-scoped\r\n"
        b"Content-Length: 2\r\n\r\nok"
    ],
    "connection-content-length": [
        b"HTTP/1.1 200 OK\r\nConnection: content-length, x-pod-scoped\r\n"
        b"X-Pod-Scoped: 1\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok"
    ],
    "connection-prefix": [
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive-ish\r\n"
        b"Keep-Alive-Ish: 1\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok"
    ],
    "spaced-headers": [
        b"HTTP/1.1 200 OK\r\nX-Spaced:   wide\r\nX-Tabbed:\tvalue\t\r\n"
        b"Content-Length: 2\r\n\r\nok"
    ],
    "split-head": [
        b"HTTP/1.1 200 Fi",
        0.05,
        b"ne\r\nX-Split: on",
        0.05,
        b"e piece\r\nContent-Length: 2\r\n\r\nok",
    ],
    "interim-together": [
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"\r\nHTTP/1.1 200 OK\r\nX-Final: yes\r\nContent-Length: 5\r\n\r\nfinal"
    ],
    "no-reason": [b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok"],
    # Response heads above and below the proxy's limit of 64 KiB, in three
    # writes or in one.
    "huge-head": [
        _OK_HEAD + _FILLER[: 20 * _FILLER_LINE],
        0.05,
        _FILLER[20 * _FILLER_LINE :],
        0.05,
        b"Content-Length: 2\r\n\r\nok",
    ],
    "huge-head-whole": [_OK_HEAD + _FILLER + b"Content-Length: 2\r\n\r\nok"],
    # Heads of exactly the proxy's limit of 65,536 bytes and one byte more,
    # with and without a space after each colon.
    "head-65536": [_head_of(65_536) + b"ok"],
    "head-65537": [_head_of(65_537) + b"ok"],
    "head-65536-nospace": [_head_of(65_536, b":") + b"ok"],
    "head-65537-nospace": [_head_of(65_537, b":") + b"ok"],
    # Within the limit: one header line of 20,000 bytes, and 2,000 lines.
    "long-header-line": [
        _OK_HEAD + b"X-Long: " + b"l" * 20_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    ],
    "many-headers": [
        _OK_HEAD
        + b"".join(b"X-%d: v\r\n" % i for i in range(2_000))
        + b"Content-Length: 2\r\n\r\nok"
    ],
    "large-head": [
        _OK_HEAD + _FILLER[: 15 * _FILLER_LINE],
        0.05,
        _FILLER[15 * _FILLER_LINE : 30 * _FILLER_LINE],
        0.05,
        b"Content-Length: 2\r\n\r\nok",
    ],
    "slow-stream": [
        _CHUNKED_HEAD,
        *[step for _ in range(8) for step in (0.2, b"4\r\ntick\r\n")],
        b"0\r\n\r\n",
    ],
    "first-then-wait": [_CHUNKED_HEAD + b"6\r\nevent1\r\n", 8.0, b"0\r\n\r\n"],
    "silent": [STALL],
    "reset": [RESET],
    "close": [CLOSE],
    "echo": [ECHO],
    "expect-reject": [
        HEAD_ONLY,
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\ndenied",
        CLOSE,
    ],
    "expect-accept": [
        HEAD_ONLY,
        b"HTTP/1.1 100 Continue\r\n\r\n",
        READ_BODY,
        ECHO,
    ],
}


@dataclass
class PodEvent:
    """One request the pod received."""

    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body_length: int


class _Request:
    def __init__(self, raw_head: bytes) -> None:
        self.raw_head = raw_head
        request_line, *lines = raw_head.decode("latin-1").split("\r\n")
        self.method, self.target, _ = request_line.split(" ", 2)
        self.headers: list[tuple[str, str]] = []
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                self.headers.append((name, value.strip()))
        self.body = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def script(self) -> str:
        return self.target.lstrip("/").split("?")[0].split("/")[0]


async def _read_body(reader: asyncio.StreamReader, request: _Request) -> None:
    if (request.header("transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                request.body = body
                return
            body += (await reader.readexactly(size + 2))[:-2]
    length = int(request.header("content-length") or "0")
    request.body = await reader.readexactly(length) if length else b""


class ScriptedPod:
    """Serves `SCRIPTS` on a free loopback port, in the running event loop.

    :param log_path: file each event is appended to as a JSON line; None
        keeps the events in `events` only.
    """

    def __init__(self, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self.events: list[PodEvent] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(
            self._handle, HOST, port, limit=MAX_LINE
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    def _record(self, connection: int, request: _Request) -> None:
        event = PodEvent(
            connection,
            request.method,
            request.target,
            request.headers,
            len(request.body),
        )
        self.events.append(event)
        if self.log_path is not None:
            with self.log_path.open("a") as log:
                log.write(json.dumps(asdict(event)) + "\n")

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        connection = self.connections
        self._writers.add(writer)
        try:
            while await self._serve_one(connection, reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _serve_one(
        self,
        connection: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Respond to one request; return False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request = _Request(head)
        steps = SCRIPTS.get(request.script, [ECHO])
        if steps[:1] == [HEAD_ONLY]:
            steps = steps[1:]
        else:
            await _read_body(reader, request)
        self._record(connection, request)

        for step in steps:
            if isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
            elif isinstance(step, float):
                await asyncio.sleep(step)
            elif step == READ_BODY:
                await _read_body(reader, request)
            elif step == ECHO:
                body = request.raw_head + request.body
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(body), body)
                )
                await writer.drain()
            elif step == CLOSE:
                writer.close()
                return False
            elif step == RESET:
                sock = writer.get_extra_info("socket")
                linger = struct.pack("ii", 1, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                writer.transport.abort()
                return False
            elif step == STALL:
                await reader.read()
                return False
        return True


async def _serve(port: int, log_path: Path) -> None:
    pod = ScriptedPod(log_path)
    await pod.start(port)
    print(f"scripted pod listening on {HOST}:{pod.port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stopping.set)
    await stopping.wait()
    await pod.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Pod that responds with scripts.")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument(
        "--log", type=Path, required=True, help="file that events are appended to"
    )
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.log))


if __name__ == "__main__":
    main()
