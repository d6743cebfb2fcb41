"""A pod for the end-to-end tests, run as its own process.

Usage: ``python tests/pod_app.py --index I --port P [--delay-ms D]``. It
listens on 127.0.0.1, prints one line when it accepts connections and stops
on SIGTERM or SIGINT. With ``--delay-ms``, every request waits D
milliseconds before its handler runs. Endpoints:

- any path not listed below: JSON ``{"pod", "uid", "method", "path",
  "headers"}``, where ``path`` is the raw request target with its query and
  ``headers`` lists every request header as a ``[name, value]`` pair.
- ``POST /upload`` and ``PUT /upload``: reads the body as a stream, as it
  arrived and never decompressed, and returns JSON ``{"pod", "method",
  "length", "sha256"}``.
- ``GET /download?size=N``: N bytes of `pattern_bytes`, with Content-Length.
- ``GET /cookies``: three ``Set-Cookie`` headers, in the order of `COOKIES`.
- ``GET /slow?ms=N``: sleeps N milliseconds, then returns the same JSON as
  any other path.
- ``GET /redirect``: 302 to `REDIRECT_LOCATION`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

from proxy.config import ProxySettings

HOST = "127.0.0.1"
CHUNK_SIZE = 64 * 1024
COOKIES = ("first=1; Path=/", "second=2; HttpOnly", "third=3; Max-Age=60")
REDIRECT_LOCATION = "/landing?from=redirect"
# Seconds that in-flight requests get to finish when the pod stops.
SHUTDOWN_TIMEOUT_S = 1.0
# The proxy's default request limits, so that every head the proxy forwards
# reaches the handlers instead of aiohttp's smaller defaults (8190 bytes).
PROXY_DEFAULTS = ProxySettings()


def pattern_bytes(size: int) -> bytes:
    """Return `size` pseudo-random bytes, the same for the same size.

    A seeded generator, not a short repeating pattern, so chunks that arrive
    reordered or duplicated change the checksum.
    """
    return random.Random(size).randbytes(size)


def build_app(index: int, delay_ms: int = 0) -> web.Application:
    """Return the application of pod `index`, delaying each request by `delay_ms`."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pod": index,
                "uid": request.headers.get("X-Uid"),
                "method": request.method,
                "path": request.raw_path,
                "headers": [[name, value] for name, value in request.headers.items()],
            }
        )

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "pod": index,
                "method": request.method,
                "length": length,
                "sha256": digest.hexdigest(),
            }
        )

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        body = pattern_bytes(size)
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.content_length = size
        await response.prepare(request)
        for start in range(0, size, CHUNK_SIZE):
            await response.write(body[start : start + CHUNK_SIZE])
        await response.write_eof()
        return response

    async def cookies(request: web.Request) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        for cookie in COOKIES:
            headers.add("Set-Cookie", cookie)
        return web.Response(
            body=json.dumps({"pod": index}).encode(),
            content_type="application/json",
            headers=headers,
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.query["ms"]) / 1000)
        return await echo(request)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": REDIRECT_LOCATION})

    @web.middleware
    async def delay(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        await asyncio.sleep(delay_ms / 1000)
        return await handler(request)

    app = web.Application(middlewares=[delay] if delay_ms else [])
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/slow", slow)
    app.router.add_get("/redirect", redirect)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(index: int, port: int, delay_ms: int = 0) -> None:
    """Serve pod `index` on `port` until SIGTERM or SIGINT."""
    runner = web.AppRunner(
        build_app(index, delay_ms),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        max_line_size=PROXY_DEFAULTS.max_request_line_bytes,
        max_field_size=PROXY_DEFAULTS.max_header_field_bytes,
        max_headers=PROXY_DEFAULTS.max_header_count,
        # /upload reports the body bytes as they arrived, also compressed ones.
        auto_decompress=False,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port).start()
        print(f"pod {index} listening on {HOST}:{port}", flush=True)

        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stopping.set)
        await stopping.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="Test pod for stateful-route.")
    parser.add_argument("--index", type=int, required=True, help="pod index")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument(
        "--delay-ms",
        type=int,
        default=0,
        help="milliseconds every request waits before its handler runs",
    )
    args = parser.parse_args()
    asyncio.run(serve(args.index, args.port, args.delay_ms))


if __name__ == "__main__":
    main()
