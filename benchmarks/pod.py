"""A minimal pod for load runs: responds with 9 bytes and remembers the UIDs it saw.

``GET /__uids`` returns the UIDs seen so far as a JSON list. Run as
``python benchmarks/pod.py --index I --port P``.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop
from aiohttp import web


async def serve(index: int, port: int) -> None:
    seen: set[str] = set()
    body = f"pod {index}\n".encode().ljust(9)[:9]

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.path == "/__uids":
            return web.Response(body=orjson.dumps(sorted(seen)))
        uid = request.headers.get("X-Uid")
        if uid is not None:
            seen.add(uid)
        return web.Response(body=body)

    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.index, args.port))


if __name__ == "__main__":
    main()
