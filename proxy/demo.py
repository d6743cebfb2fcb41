"""The ``demo`` command: demo pods and a proxy in front of them, in one process.

Each demo pod responds to every request with a JSON object naming its pod index
and the UID it received, so a newcomer can watch users stick to pods.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import orjson
from aiohttp import web

from proxy.config import (
    AdminSettings,
    Config,
    ProxySettings,
    ServiceSettings,
    StoreSettings,
)
from proxy.server import ProxyServer

DEMO_SERVICE = "demo"


def demo_pod_app(index: int) -> web.Application:
    """Return the app of one demo pod: it echoes its index and the request's ids."""

    async def answer(request: web.Request) -> web.Response:
        body = {
            "pod": index,
            "uid": request.headers.get("X-Uid"),
            "service": request.headers.get("X-Service", DEMO_SERVICE),
            "method": request.method,
            "path": request.path_qs,
        }
        return web.Response(
            body=orjson.dumps(body) + b"\n", content_type="application/json"
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def start_demo_pods(
    count: int, host: str
) -> tuple[list[web.AppRunner], list[str]]:
    """Start `count` demo pods on free ports of `host`; return runners and addresses."""
    runners: list[web.AppRunner] = []
    addresses: list[str] = []
    for index in range(count):
        runner = web.AppRunner(demo_pod_app(index), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = runner.addresses[0][1]
        runners.append(runner)
        addresses.append(f"{host}:{port}")
    return runners, addresses


def demo_config(
    pod_addresses: list[str], host: str, port: int, admin_port: int
) -> Config:
    """Return the configuration of the demo proxy: memory store, one service."""
    service = ServiceSettings(name=DEMO_SERVICE, pods=tuple(pod_addresses))
    return Config(
        proxy=ProxySettings(host=host, port=port, default_service=DEMO_SERVICE),
        admin=AdminSettings(host="127.0.0.1", port=admin_port),
        store=StoreSettings(backend="memory"),
        services={DEMO_SERVICE: service},
        source="demo",
    )


def _instructions(proxy_address: str, admin_address: str, pods: int) -> str:
    base = f"http://{proxy_address}"
    return "\n".join(
        [
            f"stateful-route demo: proxy on {base} in front of {pods} demo pods, "
            "links in memory.",
            "Each user sticks to one pod; try:",
            f"  curl -s -H 'X-Uid: alice' {base}/hello",
            f"  curl -s -H 'X-Uid: alice' {base}/hello   # same pod again",
            f"  curl -s -H 'X-Uid: bob' {base}/hello",
            f"  curl -s -H 'X-Uid: carol' {base}/hello",
            f"  curl -si {base}/hello                    # no UID: 400",
            f"  curl -si -H 'X-Uid: dave' -H 'X-Service: nope' {base}/   # 404",
            f"Admin API: curl -s http://{admin_address}/v1/services",
            "Press Ctrl+C to stop.",
        ]
    )


async def run_demo(host: str, port: int, pods: int, admin_port: int) -> None:
    """Run the demo until SIGINT or SIGTERM."""
    runners, addresses = await start_demo_pods(pods, "127.0.0.1")
    server = ProxyServer(demo_config(addresses, host, port, admin_port))
    try:
        await server.start()
        server.log_started()
        print(
            _instructions(server.proxy_address, server.admin_address, pods), flush=True
        )

        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, stopping.set)
        await stopping.wait()
    finally:
        await server.stop()
        for runner in runners:
            await runner.cleanup()
    print("stateful-route demo stopped", file=sys.stderr, flush=True)
