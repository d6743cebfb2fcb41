"""A pod with WebSocket endpoints, for the upgrade tests of the proxy.

Usage: ``python tests/ws_pod_app.py --port P``. Endpoints:

- ``/ws``: accepts the subprotocol ``chat.v1``. It echoes text as
  ``echo:<text>`` and binary as is. On the text ``close-me`` it closes with
  code 4001 and reason ``bye``.
- ``/ws-denied``: responds to the upgrade with 401 and the body ``no ticket``.
- any other path: 404 with the body ``no such endpoint``, or for a plain
  request ``GET /plain``, 200 with ``plain``.
"""

from __future__ import annotations

import argparse

from aiohttp import WSMsgType, web


async def websocket(request: web.Request) -> web.WebSocketResponse:
    socket = web.WebSocketResponse(protocols=("chat.v1",))
    await socket.prepare(request)
    async for message in socket:
        if message.type is WSMsgType.TEXT:
            if message.data == "close-me":
                await socket.close(code=4001, message=b"bye")
                break
            await socket.send_str(f"echo:{message.data}")
        elif message.type is WSMsgType.BINARY:
            await socket.send_bytes(message.data)
    return socket


async def denied(request: web.Request) -> web.Response:
    return web.Response(status=401, text="no ticket")


async def plain(request: web.Request) -> web.Response:
    return web.Response(text="plain")


def main() -> None:
    parser = argparse.ArgumentParser(description="Pod with WebSocket endpoints.")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/ws", websocket)
    app.router.add_get("/ws-denied", denied)
    app.router.add_get("/plain", plain)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
