"""A scripted pod on raw sockets that breaks connections, for the retry tests.

Usage: ``python tests/reset_pod.py --index I --port P --log FILE --mode M``.
It listens on 127.0.0.1, prints one line when it accepts connections and
stops on SIGTERM or SIGINT. Each event is appended to FILE as one JSON
object per line, with ``event``, ``method``, ``path`` and ``uid``. Modes:

- ``reset``: reads each request whole (head, and a body framed by
  Content-Length or chunked), logs ``"event": "request"``, then resets the
  connection (SO_LINGER 0, so the kernel sends RST) without responding.
- ``close-idle``: responds to the first request of each connection with a
  keep-alive 200 JSON ``{"pod", "uid", "method", "path"}`` and logs
  ``"served"``. When the next request arrives on that connection it logs
  ``"closed"`` and closes the connection without answering, as a pod does
  that closed an idle connection just before the client reused it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
from pathlib import Path

HOST = "127.0.0.1"
# Maximum size of a request head or of one chunk-size line.
MAX_LINE = 64 * 1024


class Request:
    """The parts of one request that the pod logs."""

    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.headers = headers


async def read_head(reader: asyncio.StreamReader) -> Request | None:
    """Read a request head; return None when the client closed the connection."""
    try:
        block = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    request_line, *lines = block.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return Request(method, path, headers)


async def read_body(reader: asyncio.StreamReader, request: Request) -> None:
    """Read and drop the body of `request`, framed by Content-Length or chunked."""
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            await reader.readexactly(size + 2)
    length = int(request.headers.get("content-length", "0"))
    if length:
        await reader.readexactly(length)


class ScriptedPod:
    """Serves one mode and appends its events to the log file."""

    def __init__(self, index: int, mode: str, log_path: Path) -> None:
        self.index = index
        self.mode = mode
        self.log_path = log_path

    def log(self, event: str, request: Request) -> None:
        record = {
            "event": event,
            "method": request.method,
            "path": request.path,
            "uid": request.headers.get("x-uid"),
        }
        with self.log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if self.mode == "reset":
                await self.reset_after_reading(reader, writer)
            else:
                await self.close_when_reused(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def reset_after_reading(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await read_head(reader)
        if request is None:
            writer.close()
            return
        await read_body(reader, request)
        self.log("request", request)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def close_when_reused(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await read_head(reader)
        if request is None:
            writer.close()
            return
        await read_body(reader, request)
        body = json.dumps(
            {
                "pod": self.index,
                "uid": request.headers.get("x-uid"),
                "method": request.method,
                "path": request.path,
            }
        ).encode()
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n"
        )
        # Logged before the response is written, so a client that has read
        # the response always finds the event in the log.
        self.log("served", request)
        writer.write(head.encode("latin-1") + body)
        await writer.drain()

        reused = await read_head(reader)
        if reused is not None:
            self.log("closed", reused)
        writer.close()


async def serve(index: int, port: int, mode: str, log_path: Path) -> None:
    """Serve `mode` on `port` until SIGTERM or SIGINT."""
    pod = ScriptedPod(index, mode, log_path)
    server = await asyncio.start_server(pod.handle, HOST, port, limit=MAX_LINE)
    async with server:
        print(f"scripted pod {index} ({mode}) listening on {HOST}:{port}", flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stopping.set)
        await stopping.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Scripted pod for retry tests.")
    parser.add_argument("--index", type=int, required=True, help="pod index")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument(
        "--log", type=Path, required=True, help="file that events are appended to"
    )
    parser.add_argument(
        "--mode",
        choices=("reset", "close-idle"),
        required=True,
        help="reset every request after reading it, or close reused connections",
    )
    args = parser.parse_args()
    asyncio.run(serve(args.index, args.port, args.mode, args.log))


if __name__ == "__main__":
    main()
