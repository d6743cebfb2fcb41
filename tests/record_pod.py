"""A pod on raw sockets that records what reaches it, for the request-side tests.

Usage: ``python tests/record_pod.py --port P --log FILE``. It listens on
127.0.0.1, prints one line when it accepts connections and stops on SIGTERM
or SIGINT. It appends one JSON object per line to FILE:

- ``{"event": "connection"}`` for each accepted connection;
- ``{"event": "request", "target", "headers", "length", "sha256"}`` for each
  request read whole, where ``target`` is the request target as it arrived,
  ``headers`` every ``[name, value]`` pair in order, and ``length`` and
  ``sha256`` describe the body after removing the chunked coding;
- ``{"event": "incomplete", "target", "received"}`` when the connection
  ended before the body did.

Each request gets a keep-alive 200 with the same JSON as its ``request``
record, so a test can also read what the pod saw from the response.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
# Maximum size of a request head or of one chunk-size line.
MAX_HEAD_BYTES = 1024 * 1024
READ_SIZE = 64 * 1024


class BodyEnded(Exception):
    """The connection ended before the end of the request body."""

    def __init__(self, received: int) -> None:
        super().__init__(f"body ended after {received} bytes")
        self.received = received


class Recorder:
    """Serves connections and appends their records to the log file."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def record(self, event: dict[str, Any]) -> None:
        with self.log_path.open("a") as log:
            log.write(json.dumps(event) + "\n")

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.record({"event": "connection"})
        try:
            while await self.serve_one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read one request and respond; return False when the client is gone."""
        try:
            block = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request_line, *lines = block[:-4].decode("latin-1").split("\r\n")
        _, target, _ = request_line.split(" ", 2)
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append([name, value.strip()])
        fields = {name.lower(): value for name, value in headers}

        digest = hashlib.sha256()
        try:
            if fields.get("transfer-encoding", "").lower() == "chunked":
                length = await read_chunked(reader, digest)
            else:
                length = await read_exactly(
                    reader, int(fields.get("content-length", "0")), digest
                )
        except BodyEnded as ended:
            self.record(
                {"event": "incomplete", "target": target, "received": ended.received}
            )
            return False

        seen = {
            "target": target,
            "headers": headers,
            "length": length,
            "sha256": digest.hexdigest(),
        }
        self.record({"event": "request", **seen})
        body = json.dumps(seen).encode()
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        return True


async def read_exactly(
    reader: asyncio.StreamReader, length: int, digest: Any, received: int = 0
) -> int:
    """Read `length` bytes into `digest`; raise BodyEnded at an early end."""
    left = length
    while left:
        chunk = await reader.read(min(left, READ_SIZE))
        if not chunk:
            raise BodyEnded(received + length - left)
        digest.update(chunk)
        left -= len(chunk)
    return length


async def read_chunked(reader: asyncio.StreamReader, digest: Any) -> int:
    """Read a chunked body into `digest` and return its decoded length."""
    length = 0
    while True:
        try:
            size_line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError:
            raise BodyEnded(length) from None
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            # Trailer fields, if any, end with an empty line.
            while True:
                try:
                    line = await reader.readuntil(b"\r\n")
                except asyncio.IncompleteReadError:
                    raise BodyEnded(length) from None
                if line == b"\r\n":
                    return length
        length += await read_exactly(reader, size, digest, length)
        end = await reader.read(2)
        if end != b"\r\n":
            raise BodyEnded(length)


async def serve(port: int, log_path: Path) -> None:
    """Serve on `port` until SIGTERM or SIGINT."""
    recorder = Recorder(log_path)
    server = await asyncio.start_server(
        recorder.handle, HOST, port, limit=MAX_HEAD_BYTES
    )
    print(f"record pod listening on {HOST}:{port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stopping.set)
    async with server:
        await stopping.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Recording pod for stateful-route.")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--log", type=Path, required=True, help="JSON lines log")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.log))


if __name__ == "__main__":
    main()
