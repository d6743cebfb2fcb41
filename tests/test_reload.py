"""Live reload: SIGHUP and ``POST /v1/reload`` on a running proxy process.

The end-to-end tests start ``stateful-route run`` as a subprocess in front
of ``tests/pod_app.py`` processes, rewrite its configuration file, and
reload it through the admin API or with SIGHUP. The first tests compare
configurations without a process.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import RedisServer, free_port
from test_e2e import (
    Document,
    PodProcess,
    ProxyProcess,
    Reply,
    pod_headers,
    proxy_document,
    request_json,
    routing_headers,
    start_pods,
    start_proxy,
    stop_pods,
    stop_process,
    write_config,
)

from proxy.config import load_config, parse_config
from proxy.reload import ReloadRejected, plan_reload, restart_problems
from proxy.server import ProxyServer

POD_COUNT = 3
USERS = 30
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
# Bound of every wait below.
WAIT_S = 10.0
POLL_S = 0.02
SLOW_MS = 2000


# Comparing configurations.


def service_document(**game: Any) -> dict[str, Any]:
    return {"services": {"game": {"pods": ["10.0.0.1:80", "10.0.0.2:80"], **game}}}


def test_plan_lists_pod_and_setting_changes() -> None:
    old = parse_config(service_document(), environ={})
    new = parse_config(
        service_document(
            pods=["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
            strategy="least_connections",
        ),
        environ={},
    )

    plan = plan_reload(old, new)

    [change] = plan.changed
    assert change.pods_added == ("2@10.0.0.3:80",)
    assert change.pods_removed == ()
    assert change.settings == ("strategy", "pods")
    assert plan.describe() == (
        "game: pods added 2@10.0.0.3:80, settings changed strategy,pods"
    )


def test_plan_of_same_config_is_empty() -> None:
    old = parse_config(service_document(), environ={})
    new = parse_config(service_document(), environ={})

    plan = plan_reload(old, new)

    assert plan.empty
    assert plan.describe() == "no changes"
    assert restart_problems(old, new) == []


def test_restart_problems_name_settings_not_secrets() -> None:
    old = parse_config(
        {**service_document(), "admin": {"token": "old-secret"}}, environ={}
    )
    new = parse_config(
        {
            **service_document(),
            "admin": {"token": "new-secret"},
            "proxy": {"port": 8081},
        },
        environ={},
    )

    problems = restart_problems(old, new)

    assert problems == [
        "proxy.port: changed from 8080 to 8081, which needs a restart",
        "admin.token: changed, which needs a restart",
    ]


# Processes and helpers.


@pytest.fixture
def own_pods(tmp_path: Path) -> Iterator[list[PodProcess]]:
    """Pod processes of one test, which it may stop."""
    started = start_pods(POD_COUNT, tmp_path)
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


@pytest.fixture(params=["memory", "redis"])
def store_section(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> dict[str, Any]:
    """The [store] section of each backend in turn; Redis starts empty."""
    if request.param == "memory":
        return {"backend": "memory"}
    request.getfixturevalue("redis_client")  # for its FLUSHDB
    return proxy_document([], redis_server.url)["store"]


class Proxy:
    """A proxy process with the document it runs, which a test rewrites."""

    def __init__(self, process: ProxyProcess, document: Document, path: Path) -> None:
        self.process = process
        self.document = document
        self.path = path

    def rewrite(self) -> None:
        write_config(self.path.parent, self.document, self.path.name)

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.process.log().splitlines() if text in line]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[ProxyProcess] = []

    async def start(document: Document) -> Proxy:
        process = await start_proxy(tmp_path, document, len(started))
        started.append(process)
        return Proxy(process, document, tmp_path / f"proxy-{len(started) - 1}.toml")

    try:
        yield start
    finally:
        for process in started:
            stop_process(process.process)


def document_on(
    pods: list[PodProcess], store: dict[str, Any] | None = None
) -> Document:
    """A configuration with service ``game`` on `pods`, round robin."""
    document = proxy_document(pods, "redis://127.0.0.1:1/0")
    document["store"] = dict(store or {"backend": "memory"})
    document["services"] = {
        "game": {"pods": [pod.address for pod in pods], "read_timeout_s": 10.0},
    }
    return document


async def call(
    client: aiohttp.ClientSession,
    proxy: Proxy,
    uid: str,
    path: str = "/",
    service: str = "game",
) -> Reply:
    return await request_json(
        client, f"{proxy.process.url}{path}", routing_headers(uid, service)
    )


async def admin(
    client: aiohttp.ClientSession,
    proxy: Proxy,
    path: str,
    method: str = "GET",
    token: str = "",
) -> Reply:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await request_json(
        client, f"{proxy.process.admin_url}{path}", headers, method
    )


async def wait_for_in_flight(client: aiohttp.ClientSession, proxy: Proxy) -> None:
    deadline = time.monotonic() + WAIT_S
    while (await admin(client, proxy, "/v1/status")).body["in_flight"] < 1:
        assert time.monotonic() < deadline, "no request in flight"
        await asyncio.sleep(POLL_S)


async def sighup_and_wait(proxy: Proxy, text: str) -> list[str]:
    """Send SIGHUP, and return the log lines with `text` once there is a new one."""
    before = len(proxy.log_lines(text))
    proxy.process.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT_S
    while len(proxy.log_lines(text)) == before:
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        await asyncio.sleep(POLL_S)
    return proxy.log_lines(text)


# Pods added and removed.


async def test_added_pod_takes_new_users(
    launch: Any,
    own_pods: list[PodProcess],
    store_section: dict[str, Any],
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch(document_on(own_pods[:2], store_section))
    old_users = {}
    for n in range(4):
        old_users[f"old-{n}"] = (await call(client, proxy, f"old-{n}")).body["pod"]
    slow = asyncio.create_task(call(client, proxy, "slowpoke", f"/slow?ms={SLOW_MS}"))
    await wait_for_in_flight(client, proxy)

    proxy.document["services"]["game"]["pods"].append(own_pods[2].address)
    proxy.rewrite()
    reloaded = await admin(client, proxy, "/v1/reload", "POST")
    in_flight_during_reload = not slow.done()
    new_pods = Counter(
        [(await call(client, proxy, f"new-{n}")).body["pod"] for n in range(USERS)]
    )
    slow_reply = await slow

    assert reloaded.status == 200
    [change] = reloaded.body["services_changed"]
    assert change["pods_added"] == [f"2@{own_pods[2].address}"]
    assert change["pods_removed"] == []
    assert in_flight_during_reload
    assert slow_reply.status == 200
    assert slow_reply.body["path"] == f"/slow?ms={SLOW_MS}"
    assert new_pods[2] == USERS // POD_COUNT
    for uid, pod in old_users.items():
        assert (await call(client, proxy, uid)).body["pod"] == pod
    [line] = proxy.log_lines("reloaded")
    assert f"game: pods added 2@{own_pods[2].address}" in line


async def test_removed_pod_users_move_once(
    launch: Any,
    own_pods: list[PodProcess],
    store_section: dict[str, Any],
    client: aiohttp.ClientSession,
) -> None:
    proxy = await launch(document_on(own_pods, store_section))
    placed = {uid: (await call(client, proxy, uid)).body["pod"] for uid in _uids()}
    on_removed = [uid for uid, pod in placed.items() if pod == 2]
    slow = asyncio.create_task(
        call(client, proxy, on_removed[0], f"/slow?ms={SLOW_MS}")
    )
    await wait_for_in_flight(client, proxy)

    proxy.document["services"]["game"]["pods"].pop()
    proxy.rewrite()
    [line] = await sighup_and_wait(proxy, "reloaded")
    in_flight_during_reload = not slow.done()
    slow_reply = await slow
    first = {uid: (await call(client, proxy, uid)).body for uid in on_removed}
    second = {uid: (await call(client, proxy, uid)).body for uid in on_removed}
    new_users = [(await call(client, proxy, f"new-{n}")).body for n in range(USERS)]

    assert f"game: pods removed 2@{own_pods[2].address}" in line
    assert in_flight_during_reload
    assert slow_reply.status == 200
    assert slow_reply.body["pod"] == 2
    for uid in on_removed:
        assert first[uid]["pod"] in (0, 1)
        assert pod_headers(first[uid]).get("X-Route-Previous-Pod") == "2"
        assert pod_headers(first[uid]).get("X-Route-Reason") == "missing"
        assert second[uid]["pod"] == first[uid]["pod"]
        assert "X-Route-Previous-Pod" not in pod_headers(second[uid])
    for uid, pod in placed.items():
        if pod != 2:
            assert (await call(client, proxy, uid)).body["pod"] == pod
    assert {body["pod"] for body in new_users} == {0, 1}


def _uids() -> list[str]:
    """Enough users for round robin to put several on each of three pods."""
    return [f"user-{n}" for n in range(USERS)]


# Services added and removed.


async def test_services_added_and_removed(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    document = document_on(own_pods)
    document["services"]["open"] = {
        "pods": [pod.address for pod in own_pods],
        "allow_without_uid": True,
    }
    proxy = await launch(document)
    assert (await call(client, proxy, "a", service="open")).status == 200

    del proxy.document["services"]["open"]
    proxy.document["services"]["chat"] = {"pods": [own_pods[0].address]}
    proxy.rewrite()
    reloaded = await admin(client, proxy, "/v1/reload", "POST")
    removed = await call(client, proxy, "a", service="open")
    added = await call(client, proxy, "a", service="chat")
    services = await admin(client, proxy, "/v1/services")
    metrics = await _metrics_text(client, proxy)

    assert reloaded.status == 200
    assert reloaded.body["services_added"] == ["chat"]
    assert reloaded.body["services_removed"] == ["open"]
    assert removed.status == 404
    assert removed.body["error"] == "unknown_service"
    assert added.status == 200
    assert added.body["pod"] == 0
    assert [s["name"] for s in services.body["services"]] == ["game", "chat"]
    assert 'service="open"' not in metrics
    assert 'service="chat"' in metrics


async def _metrics_text(client: aiohttp.ClientSession, proxy: Proxy) -> str:
    async with client.get(f"{proxy.process.admin_url}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_concurrent_reloads_apply_once(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    proxy = await launch(document_on(own_pods))

    proxy.document["services"]["chat"] = {"pods": [own_pods[0].address]}
    proxy.rewrite()
    replies = await asyncio.gather(
        *(admin(client, proxy, "/v1/reload", "POST") for _ in range(4))
    )

    assert [reply.status for reply in replies] == [200] * 4
    added = [reply.body["services_added"] for reply in replies]
    assert sorted(added) == [[], [], [], ["chat"]]
    assert (await call(client, proxy, "a", service="chat")).status == 200


async def test_quick_sighups_apply_change_once(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    proxy = await launch(document_on(own_pods))

    proxy.document["services"]["chat"] = {"pods": [own_pods[0].address]}
    proxy.rewrite()
    # The kernel keeps one SIGHUP pending, so these may arrive as fewer.
    for _ in range(5):
        proxy.process.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT_S
    while not proxy.log_lines("on SIGHUP"):
        assert time.monotonic() < deadline, "no reload on SIGHUP logged"
        await asyncio.sleep(POLL_S)
    after = await admin(client, proxy, "/v1/reload", "POST")
    lines = proxy.log_lines("on SIGHUP")

    assert after.status == 200
    assert after.body["services_added"] == []
    assert 1 <= len(lines) <= 5
    applied = [line for line in lines if "services added: chat" in line]
    assert len(applied) == 1
    for line in lines:
        assert line in applied or line.endswith('no changes"')


# Rejected reloads.


def break_document(document: Document) -> None:
    """Put a bad value, an unknown key and a duplicate port in `document`."""
    game = document["services"]["game"]
    game["strategy"] = "fastest"
    game["colour"] = "blue"
    document["admin"]["port"] = document["proxy"]["port"]


def expected_problems(document: Document) -> list[str]:
    return [
        "services.game.strategy = 'fastest': expected one of 'round_robin', "
        "'least_connections', 'weighted_round_robin', 'least_response_time', "
        "'lowest_load', 'consistent_hash'",
        "services.game.colour: unknown key",
        f"admin.port = {document['proxy']['port']}: the same port as proxy.port",
    ]


async def test_invalid_reload_rejected_by_admin(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    proxy = await launch(document_on(own_pods))
    before = (await call(client, proxy, "steady")).body["pod"]

    break_document(proxy.document)
    proxy.rewrite()
    rejected = await admin(client, proxy, "/v1/reload", "POST")
    after = await call(client, proxy, "steady")
    services = await admin(client, proxy, "/v1/services")

    assert rejected.status == 400
    assert rejected.body["error"] == "invalid_config"
    assert rejected.body["source"] == str(proxy.path)
    assert sorted(rejected.body["problems"]) == sorted(
        expected_problems(proxy.document)
    )
    assert after.status == 200
    assert after.body["pod"] == before
    assert services.body["services"][0]["strategy"] == "round_robin"
    assert len(proxy.log_lines("level=ERROR")) == 1


async def test_invalid_reload_rejected_by_sighup(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    proxy = await launch(document_on(own_pods))
    before = (await call(client, proxy, "steady")).body["pod"]

    break_document(proxy.document)
    proxy.rewrite()
    [line] = await sighup_and_wait(proxy, "level=ERROR")
    after = await call(client, proxy, "steady")

    assert "reload from SIGHUP rejected" in line
    for problem in expected_problems(proxy.document):
        assert problem in line
    assert after.status == 200
    assert after.body["pod"] == before
    assert proxy.process.process.poll() is None


async def test_every_rejected_sighup_reload_logged(
    launch: Any, own_pods: list[PodProcess]
) -> None:
    proxy = await launch(document_on(own_pods))
    # More rejections than the repeat filter lets through in one window.
    strategies = [f"fastest-{n}" for n in range(8)]

    lines = []
    for strategy in strategies:
        proxy.document["services"]["game"]["strategy"] = strategy
        proxy.rewrite()
        lines = await sighup_and_wait(proxy, "level=ERROR")

    assert len(lines) == len(strategies)
    for line, strategy in zip(lines, strategies, strict=True):
        assert f"services.game.strategy = {strategy!r}" in line
    assert "similar messages" not in proxy.process.log()


async def test_restart_setting_rejected_by_name(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    proxy = await launch(document_on(own_pods))
    old_port = proxy.document["proxy"]["port"]

    proxy.document["proxy"]["port"] = free_port()
    proxy.document["store"]["local_cache_size"] = 10
    proxy.document["services"]["game"]["strategy"] = "least_connections"
    proxy.rewrite()
    rejected = await admin(client, proxy, "/v1/reload", "POST")
    services = await admin(client, proxy, "/v1/services")

    assert rejected.status == 409
    assert rejected.body["error"] == "restart_required"
    assert rejected.body["problems"] == [
        f"proxy.port: changed from {old_port} to {proxy.document['proxy']['port']}, "
        "which needs a restart",
        "store.local_cache_size: changed from 100000 to 10, which needs a restart",
    ]
    assert services.body["services"][0]["strategy"] == "round_robin"
    assert (await call(client, proxy, "still-here")).status == 200


async def test_reload_requires_admin_token(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    document = document_on(own_pods)
    document["admin"]["token"] = "reload-token"
    proxy = await launch(document)

    without = await admin(client, proxy, "/v1/reload", "POST")
    wrong = await admin(client, proxy, "/v1/reload", "POST", token="guess")
    right = await admin(client, proxy, "/v1/reload", "POST", token="reload-token")

    assert without.status == 401
    assert without.body["error"] == "unauthorized"
    assert wrong.status == 401
    assert right.status == 200
    assert right.body["status"] == "reloaded"
    assert right.body["services_changed"] == []


# Health across a strategy change.


async def test_strategy_change_keeps_health_state(
    launch: Any, own_pods: list[PodProcess], client: aiohttp.ClientSession
) -> None:
    document = document_on(own_pods)
    document["services"]["game"].update(
        health_check_path="/probe",
        health_interval_s=0.1,
        health_timeout_s=0.5,
        unhealthy_threshold=2,
    )
    proxy = await launch(document)
    stop_process(own_pods[2].process)
    await _wait_for_state(client, proxy, 2, "unhealthy")

    # A reset table would need two more failed probes, which the long
    # interval does not leave time for.
    proxy.document["services"]["game"].update(
        strategy="least_connections", health_interval_s=60.0
    )
    proxy.rewrite()
    reloaded = await admin(client, proxy, "/v1/reload", "POST")
    health = await admin(client, proxy, "/v1/services/game/health")
    services = await admin(client, proxy, "/v1/services")
    placed = {(await call(client, proxy, f"n-{n}")).body["pod"] for n in range(9)}

    assert reloaded.status == 200
    [change] = reloaded.body["services_changed"]
    assert change["settings"] == ["strategy", "health_interval_s"]
    assert services.body["services"][0]["strategy"] == "least_connections"
    states = {pod["index"]: pod["state"] for pod in health.body["pods"]}
    assert states == {0: "healthy", 1: "healthy", 2: "unhealthy"}
    down = {pod["index"]: pod["transitions"]["down"] for pod in health.body["pods"]}
    assert down[2] == 1
    assert placed <= {0, 1}


async def _wait_for_state(
    client: aiohttp.ClientSession, proxy: Proxy, index: int, state: str
) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        health = await admin(client, proxy, "/v1/services/game/health")
        states = {pod["index"]: pod["state"] for pod in health.body["pods"]}
        if states.get(index) == state:
            return
        assert time.monotonic() < deadline, f"pod {index} never became {state}"
        await asyncio.sleep(POLL_S)


# Reload while stopping, in one process.


async def test_reload_rejected_while_stopping(
    own_pods: list[PodProcess], tmp_path: Path
) -> None:
    document = document_on(own_pods)
    document["proxy"]["port"] = 0
    document["admin"]["enabled"] = False
    path = write_config(tmp_path, document, "inline.toml")
    server = ProxyServer(load_config(path, {}), environ={})
    await server.start()
    try:
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0)

        with pytest.raises(ReloadRejected) as rejected:
            await server.reloader.reload()
    finally:
        await stopping

    assert rejected.value.code == "stopping"
    assert rejected.value.problems == ["the proxy is stopping, so it takes no reload"]


async def test_reloader_removes_pod_in_process(
    own_pods: list[PodProcess], tmp_path: Path
) -> None:
    document = document_on(own_pods)
    document["proxy"]["port"] = 0
    document["admin"]["enabled"] = False
    path = write_config(tmp_path, document, "inline.toml")
    server = ProxyServer(load_config(path, {}), environ={})
    await server.start()
    try:
        document["services"]["game"]["pods"].pop()
        write_config(tmp_path, document, "inline.toml")
        plan = await server.reloader.reload()
        pods = server.services["game"].pods("default")
    finally:
        await server.stop()

    assert plan.changed[0].pods_removed == (f"2@{own_pods[2].address}",)
    assert pods is not None
    assert [pod.index for pod in pods] == [0, 1]
    assert server.config.source == str(path)
