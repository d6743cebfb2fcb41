"""A pod for the failover tests: `pod_app` with a probe endpoint and faults.

Usage: ``python tests/health_pod_app.py --index I --port P``. It serves the
endpoints of ``tests/pod_app.py`` and two more:

- ``GET /healthz``: the probe endpoint, 200 ``{"pod", "ok": true}``.
- ``POST /_control`` with a JSON object sets faults and returns the
  counters; ``GET /_control`` only returns them. Fields:

  - ``status``: every request but ``/_control`` gets this status with the
    JSON body ``{"pod", "injected": status}``; 0 turns it off.
  - ``probe_every`` and ``probe_kinds``: every ``probe_every``-th probe
    fails, with the next kind of ``probe_kinds`` in turn: ``"status"``
    (500), ``"reset"`` (the connection is aborted without a response) or
    ``"timeout"`` (no response for ``probe_delay_ms``, 1,000 by default).
    ``probe_every`` 0 turns it off.

  The counters are ``probes`` (probe requests received) and
  ``injected_probe_failures`` (probe failures by kind).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pod_app import HOST, SHUTDOWN_TIMEOUT_S, build_app

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Faults:
    """The faults that ``/_control`` sets, and what they counted."""

    def __init__(self) -> None:
        self.status = 0
        self.probe_every = 0
        self.probe_kinds: list[str] = []
        self.probe_delay_ms = 1000
        self.probes = 0
        self.injected: Counter[str] = Counter()

    def counters(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "probes": self.probes,
            "injected_probe_failures": dict(self.injected),
        }

    def update(self, fields: dict[str, Any]) -> None:
        self.status = int(fields.get("status", self.status))
        self.probe_every = int(fields.get("probe_every", self.probe_every))
        self.probe_kinds = list(fields.get("probe_kinds", self.probe_kinds))
        self.probe_delay_ms = int(fields.get("probe_delay_ms", self.probe_delay_ms))

    def probe_fault(self) -> str | None:
        """Count one probe; return the kind of fault it gets, if any."""
        self.probes += 1
        if not self.probe_every or not self.probe_kinds:
            return None
        if self.probes % self.probe_every:
            return None
        failures = sum(self.injected.values())
        kind = self.probe_kinds[failures % len(self.probe_kinds)]
        self.injected[kind] += 1
        return kind


def build_health_app(index: int) -> web.Application:
    faults = Faults()

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            faults.update(await request.json())
        return web.json_response(faults.counters())

    async def healthz(request: web.Request) -> web.StreamResponse:
        if faults.status:
            return web.json_response(
                {"pod": index, "injected": faults.status}, status=faults.status
            )
        kind = faults.probe_fault()
        if kind == "status":
            return web.json_response({"pod": index, "injected": 500}, status=500)
        if kind == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if kind == "timeout":
            await asyncio.sleep(faults.probe_delay_ms / 1000)
        return web.json_response({"pod": index, "ok": True})

    @web.middleware
    async def inject(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path == "/_control":
            return await control(request)
        if request.path == "/healthz":
            return await healthz(request)
        if faults.status:
            return web.json_response(
                {"pod": index, "injected": faults.status}, status=faults.status
            )
        return await handler(request)

    app = build_app(index)
    app.middlewares.append(inject)
    return app


async def serve(index: int, port: int) -> None:
    runner = web.AppRunner(
        build_health_app(index),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
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
    parser = argparse.ArgumentParser(description="Failover test pod.")
    parser.add_argument("--index", type=int, required=True, help="pod index")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    args = parser.parse_args()
    asyncio.run(serve(args.index, args.port))


if __name__ == "__main__":
    main()
