"""The health, history and migrate endpoints of the admin API.

A `ProxyServer` runs in this process with the memory store, in front of
in-process pods. Tests change health directly in the service's table, as
failed probes would, and read it back over the admin port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import LOOPBACK

from proxy.config import parse_config
from proxy.pods import Pod
from proxy.server import ProxyServer
from proxy.services import Service

NS = "default"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)
WAIT_S = 5.0


@dataclass
class Reply:
    status: int
    body: Any


class Proxy:
    def __init__(self, server: ProxyServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    @property
    def service(self) -> Service:
        return self.server.services["game"]

    def pod(self, index: int) -> Pod:
        pods = self.service.pods(NS)
        assert pods is not None
        return pods[index]

    def fail(self, index: int) -> None:
        for _ in range(self.service.settings.unhealthy_threshold):
            self.service.health.record_probe(self.pod(index), "status 503")

    async def call(self, method: str, path: str, json: Any = None) -> Reply:
        url = f"http://{self.server.admin_address}{path}"
        data = None if json is None else orjson.dumps(json)
        async with self.session.request(method, url, data=data) as response:
            text = await response.read()
            return Reply(response.status, orjson.loads(text) if text else None)

    async def route(self, uid: str) -> int:
        url = f"http://{self.server.proxy_address}/"
        headers = {"X-Uid": uid, "X-Service": "game"}
        async with self.session.get(url, headers=headers) as response:
            assert response.status == 200
            pod: int = (await response.json())["pod"]
            return pod


@pytest.fixture
async def pod_addresses() -> AsyncIterator[list[str]]:
    runners: list[web.AppRunner] = []
    addresses: list[str] = []

    def handler(index: int) -> Any:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response({"pod": index})

        return handle

    try:
        for index in range(3):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler(index))
            runner = web.AppRunner(app, access_log=None)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, LOOPBACK, 0).start()
            addresses.append(f"{LOOPBACK}:{runner.addresses[0][1]}")
        yield addresses
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def proxy(pod_addresses: list[str]) -> AsyncIterator[Proxy]:
    document = {
        "proxy": {"host": LOOPBACK, "port": 0},
        "admin": {"host": LOOPBACK, "port": 0},
        "services": {
            "game": {"pods": pod_addresses, "slow_start_s": 0.0},
            "registry": {"discovery": "registry"},
        },
    }
    server = ProxyServer(parse_config(document, environ={}))
    session = aiohttp.ClientSession(timeout=CLIENT_TIMEOUT)
    try:
        await server.start()
        yield Proxy(server, session)
    finally:
        await session.close()
        await server.stop()


async def wait_for_events(proxy: Proxy, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        reply = await proxy.call("GET", "/v1/services/game/history")
        events: list[dict[str, Any]] = reply.body["events"]
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} history events: {events}")
        await asyncio.sleep(0.01)


# GET /v1/services/{service}/health


async def test_health_lists_every_pod(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/services/game/health")

    assert reply.status == 200
    assert [pod["index"] for pod in reply.body["pods"]] == [0, 1, 2]
    assert [pod["usable"] for pod in reply.body["pods"]] == [True] * 3
    assert reply.body["panic"] is False
    assert reply.body["active_checks"] is False


async def test_health_shows_unhealthy_pod(proxy: Proxy) -> None:
    proxy.fail(1)

    reply = await proxy.call("GET", "/v1/services/game/health?namespace=default")

    pod = reply.body["pods"][1]
    assert pod["usable"] is False
    assert pod["state"] == "unhealthy"
    assert pod["probe"]["consecutive_failures"] == 3
    assert pod["probe"]["last_error"] == "status 503"
    assert pod["passive"]["ejected"] is False


async def test_health_shows_ejection_deadline(proxy: Proxy) -> None:
    for _ in range(proxy.service.settings.consecutive_failures):
        proxy.service.health.record(proxy.pod(2), False, "status 502")

    reply = await proxy.call("GET", "/v1/services/game/health")

    passive = reply.body["pods"][2]["passive"]
    assert reply.body["pods"][2]["state"] == "ejected"
    assert passive["ejections"] == 1
    assert passive["last_failure"] == "status 502"
    remaining_ms = passive["ejected_until_ms"] - time.time() * 1000
    assert 25_000 < remaining_ms <= 30_000


async def test_health_counts_transitions(proxy: Proxy) -> None:
    proxy.fail(0)
    await wait_for_events(proxy, 1)

    reply = await proxy.call("GET", "/v1/services/game/health")

    assert reply.body["pods"][0]["transitions"] == {"down": 1, "up": 0}


async def test_health_shows_panic_mode(proxy: Proxy) -> None:
    for index in range(3):
        proxy.fail(index)
    routed = await proxy.route("alice")

    reply = await proxy.call("GET", "/v1/services/game/health")

    assert routed in (0, 1, 2)
    assert reply.body["panic"] is True
    assert reply.body["panic_entries"] == 1
    assert reply.body["panic_routes"] == 1


async def test_health_of_unknown_service_is_404(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/services/chess/health")

    assert reply.status == 404
    assert reply.body["error"] == "unknown_service"


async def test_health_rejects_unknown_parameter(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/services/game/health?ns=default")

    assert reply.status == 400
    assert reply.body["error"] == "invalid_parameter"


# GET /v1/services/{service}/history


async def test_history_starts_empty(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/services/game/history")

    assert reply.status == 200
    assert reply.body == {"service": "game", "history_size": 100, "events": []}


async def test_history_lists_moves_newest_first(proxy: Proxy) -> None:
    routed = {uid: await proxy.route(uid) for uid in ("a", "b", "c")}
    leaving = [uid for uid, pod in routed.items() if pod == 1]

    proxy.fail(1)
    events = await wait_for_events(proxy, 2)

    assert [event["type"] for event in events] == ["USER_MIGRATED", "POD_FAILURE"]
    assert events[0]["sample"] == leaving
    assert events[0]["namespace"] == NS
    assert events[1]["users"] == len(leaving)
    assert events[1]["address"] == str(proxy.pod(1).address)


# POST /v1/links/{namespace}/{uid}/{service}/migrate


async def test_migrate_moves_link(proxy: Proxy) -> None:
    first = await proxy.route("alice")
    target = (first + 1) % 3

    reply = await proxy.call(
        "POST", "/v1/links/default/alice/game/migrate", {"pod": target}
    )
    routed = await proxy.route("alice")

    assert reply.status == 200
    assert reply.body == {
        "namespace": NS,
        "uid": "alice",
        "service": "game",
        "pod": target,
        "previous": first,
        "moved": True,
        "persistent": False,
    }
    assert routed == target


async def test_migrate_to_unhealthy_pod_is_409(proxy: Proxy) -> None:
    first = await proxy.route("alice")
    target = (first + 1) % 3
    proxy.fail(target)

    reply = await proxy.call(
        "POST", "/v1/links/default/alice/game/migrate", {"pod": target}
    )

    assert reply.status == 409
    assert reply.body["error"] == "pod_unhealthy"
    assert reply.body["pod"] == target


async def test_migrate_without_link_is_404(proxy: Proxy) -> None:
    reply = await proxy.call(
        "POST", "/v1/links/default/nobody/game/migrate", {"pod": 0}
    )

    assert reply.status == 404
    assert reply.body["error"] == "no_link"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "invalid_field"),
        ({"pod": "1"}, "invalid_field"),
        ({"pod": 3}, "invalid_pod"),
        ({"pod": 1, "ttl_s": 5}, "invalid_field"),
    ],
)
async def test_migrate_rejects_invalid_body(
    proxy: Proxy, body: dict[str, Any], error: str
) -> None:
    reply = await proxy.call("POST", "/v1/links/default/alice/game/migrate", body)

    assert reply.status == 400
    assert reply.body["error"] == error


async def test_migrate_rejects_invalid_uid(proxy: Proxy) -> None:
    reply = await proxy.call(
        "POST", "/v1/links/default/al%7Bice/game/migrate", {"pod": 0}
    )

    assert reply.status == 400
    assert reply.body["error"] == "invalid_uid"


async def test_migrate_to_unpublished_registry_pod(proxy: Proxy) -> None:
    reply = await proxy.call(
        "POST", "/v1/links/default/alice/registry/migrate", {"pod": 4}
    )

    assert reply.status == 404
    assert reply.body["error"] == "unknown_pod"
