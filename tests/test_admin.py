"""The admin API, against a `ProxyServer` running in this process.

Each test starts a proxy on loopback with the memory store and again with a
real redis-server, in front of in-process pods that reply with their index,
and talks to its admin port over real sockets with aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio
from conftest import LOOPBACK, RedisServer, free_port
from multidict import CIMultiDictProxy

from proxy.admin import build_admin_app
from proxy.config import parse_config
from proxy.demo import start_demo_pods
from proxy.podstate import PodState, Routing, now_ms
from proxy.server import ProxyServer
from proxy.store.keys import state_key

NS = "default"
POD_COUNT = 3
TOKEN = "test-admin-token"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)

Document = dict[str, Any]


# In-process pods and proxies.


@pytest.fixture
async def pod_addresses() -> AsyncIterator[list[str]]:
    """Start three demo pods on free loopback ports; each replies with its index."""
    runners, addresses = await start_demo_pods(POD_COUNT, LOOPBACK)
    try:
        yield addresses
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture(params=["memory", "redis"])
def store_section(request: pytest.FixtureRequest) -> Document:
    """The ``[store]`` section of each backend; Redis starts with FLUSHDB."""
    if request.param == "memory":
        return {"backend": "memory"}
    request.getfixturevalue("redis_client")
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"backend": "redis", "redis_url": server.url}


def make_document(pods: list[str], store: Document) -> Document:
    """Return a configuration with static services game (3 pods), chat (1 pod)
    and the registry service lobby."""
    return {
        "proxy": {"host": LOOPBACK, "port": 0},
        "admin": {"host": LOOPBACK, "port": 0},
        "store": dict(store),
        "services": {
            "game": {"pods": pods},
            "chat": {"pods": pods[:1]},
            "lobby": {"discovery": "registry"},
        },
    }


def pod_section(service: str = "game", index: int = 1, advertise: str = "") -> Document:
    """Return a ``[pod]`` section whose application port has no listener."""
    return {
        "namespace": NS,
        "service": service,
        "index": index,
        "app_address": f"{LOOPBACK}:{free_port()}",
        "host": LOOPBACK,
        "port": 0,
        "advertise_address": advertise,
    }


@dataclass
class Reply:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]


class Proxy:
    """A started `ProxyServer` with a client session for its two ports."""

    def __init__(self, server: ProxyServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.token = ""

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: str | None = None,
        token: str | None = None,
    ) -> Reply:
        """Send one admin request; `token` None sends this proxy's token."""
        headers = {}
        token = self.token if token is None else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = orjson.dumps(json) if json is not None else data
        url = f"http://{self.server.admin_address}{path}"
        async with self.session.request(
            method, url, data=body, headers=headers
        ) as response:
            text = await response.read()
            parsed = orjson.loads(text) if text else None
            return Reply(response.status, parsed, response.headers)

    async def route(self, uid: str, service: str = "game") -> int:
        """Send one request through the proxy port; return the pod that served it."""
        url = f"http://{self.server.proxy_address}/play"
        headers = {"X-Uid": uid, "X-Service": service}
        async with self.session.get(url, headers=headers) as response:
            assert response.status == 200, await response.text()
            pod: int = (await response.json())["pod"]
            return pod

    async def record(self, index: int, service: str = "game") -> dict[str, Any]:
        """Return the stored state record of one pod, parsed from its JSON."""
        raw = await self.server.store.read_pod_states(NS, service)
        record: dict[str, Any] = orjson.loads(raw[str(index)])
        return record

    async def publish(
        self,
        index: int,
        routing: Routing = Routing.READY,
        *,
        service: str = "game",
        load: int = 0,
        address: str | None = None,
        age_s: float = 0,
    ) -> None:
        """Write a pod's record as its sidecar would."""
        state = PodState(load, routing, now_ms() - int(age_s * 1000), address)
        await self.server.store.publish_pod_state(NS, service, index, state.encode())


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    """Start proxies from configuration documents; all are stopped after the test."""
    started: list[Proxy] = []

    async def start(document: Document, token: str = "") -> Proxy:
        if token:
            document["admin"]["token"] = token
        server = ProxyServer(parse_config(document, environ={}))
        session = aiohttp.ClientSession(timeout=CLIENT_TIMEOUT)
        proxy = Proxy(server, session)
        proxy.token = token
        started.append(proxy)
        await server.start()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.session.close()
            await proxy.server.stop()


@pytest.fixture
async def proxy(
    start_proxy: ProxyFactory, pod_addresses: list[str], store_section: Document
) -> Proxy:
    """A proxy with the three services and no token."""
    return await start_proxy(make_document(pod_addresses, store_section))


@pytest.fixture
async def pod_proxy(
    start_proxy: ProxyFactory, pod_addresses: list[str], store_section: Document
) -> Proxy:
    """A proxy that is also the sidecar of pod 1 of game."""
    document = make_document(pod_addresses, store_section)
    document["pod"] = pod_section(advertise=pod_addresses[1])
    return await start_proxy(document)


# Configuration and authentication.


def test_token_env_override_sets_token() -> None:
    document = {"services": {"game": {"pods": ["127.0.0.1:9001"]}}}
    environ = {"STATEFUL_ROUTE_ADMIN_TOKEN": "from-env-secret"}

    config = parse_config(document, environ=environ)

    assert config.admin.token == "from-env-secret"
    assert "from-env-secret" not in repr(config)


@pytest.fixture
async def guarded(
    start_proxy: ProxyFactory, pod_addresses: list[str], store_section: Document
) -> Proxy:
    """A proxy whose admin API requires TOKEN."""
    return await start_proxy(make_document(pod_addresses, store_section), TOKEN)


async def test_missing_token_returns_401(guarded: Proxy) -> None:
    reply = await guarded.call("GET", "/v1/status", token="")

    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert reply.body["error"] == "unauthorized"


@pytest.mark.parametrize(
    "header",
    [f"Bearer {TOKEN}x", "Bearer", f"Basic {TOKEN}", TOKEN, "Bearer t\u00e9st"],
)
async def test_wrong_token_returns_401(guarded: Proxy, header: str) -> None:
    url = f"http://{guarded.server.admin_address}/v1/services"
    headers = {"Authorization": header}

    async with guarded.session.get(url, headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_valid_token_returns_200(guarded: Proxy) -> None:
    reply = await guarded.call("GET", "/v1/services/game/pods")

    assert reply.status == 200


async def test_lowercase_bearer_scheme_accepted(guarded: Proxy) -> None:
    url = f"http://{guarded.server.admin_address}/v1/status"
    headers = {"Authorization": f"bearer {TOKEN}"}

    async with guarded.session.get(url, headers=headers) as response:
        assert response.status == 200


async def test_health_endpoints_need_no_token(guarded: Proxy) -> None:
    healthz = await guarded.call("GET", "/healthz", token="")
    readyz = await guarded.call("GET", "/readyz", token="")

    assert healthz.status == 200
    assert readyz.status == 200


async def test_unknown_path_needs_token(guarded: Proxy) -> None:
    reply = await guarded.call("GET", "/v1/nothing", token="")

    assert reply.status == 401


async def test_changes_need_token(guarded: Proxy) -> None:
    drain = await guarded.call("POST", "/v1/services/game/pods/0/drain", token="")
    link = await guarded.call(
        "PUT", "/v1/links/default/alice/game", json={"pod": 0}, token=""
    )

    assert drain.status == 401
    assert link.status == 401
    assert await guarded.server.store.get(NS, "alice", "game") is None


async def test_token_never_logged(
    start_proxy: ProxyFactory,
    pod_addresses: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    document = make_document(pod_addresses, {"backend": "memory"})
    guarded = await start_proxy(document, TOKEN)

    await guarded.call("GET", "/v1/status", token=TOKEN + "x")
    await guarded.call("POST", "/v1/services/game/pods/0/drain")
    guarded.server.log_started()

    assert "rejected 1 admin requests" in caplog.text
    assert TOKEN not in caplog.text


async def test_open_admin_off_loopback_warns(
    pod_addresses: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    document = make_document(pod_addresses, {"backend": "memory"})
    document["admin"]["host"] = "0.0.0.0"
    # The app is only built, never bound.
    server = ProxyServer(parse_config(document, environ={}))

    build_admin_app(server)

    assert "without admin.token" in caplog.text


# aiohttp's own errors.


async def test_unknown_path_returns_json_404(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/nothing")

    assert reply.status == 404
    assert reply.body["error"] == "not_found"


async def test_wrong_method_returns_json_405(proxy: Proxy) -> None:
    reply = await proxy.call("POST", "/v1/pod/state")

    assert reply.status == 405
    assert reply.body["error"] == "method_not_allowed"
    assert set(reply.headers["Allow"].split(",")) >= {"GET", "PUT"}


# Listing pods.


async def test_pods_lists_every_configured_pod(
    proxy: Proxy, pod_addresses: list[str]
) -> None:
    reply = await proxy.call("GET", "/v1/services/game/pods")

    assert reply.status == 200
    pods = reply.body["pods"]
    assert [pod["index"] for pod in pods] == [0, 1, 2]
    assert [pod["address"] for pod in pods] == pod_addresses
    assert [pod["record"] for pod in pods] == [None, None, None]
    assert [pod["reason"] for pod in pods] == ["ready", "ready", "ready"]
    assert all(pod["routable"] for pod in pods)


async def test_pods_shows_measured_metrics(proxy: Proxy) -> None:
    pod = await proxy.route("metrics-user")

    reply = await proxy.call("GET", "/v1/services/game/pods")

    metrics = reply.body["pods"][pod]["metrics"]
    assert metrics["index"] == pod
    assert metrics["samples"] == 1
    assert metrics["in_flight"] == 0
    assert metrics["latency_ms"] > 0
    assert metrics["calculated_load"] > 0


async def test_pods_shows_published_record(proxy: Proxy) -> None:
    await proxy.publish(2, Routing.READY, load=-5, age_s=3)

    reply = await proxy.call("GET", "/v1/services/game/pods")

    pod = reply.body["pods"][2]
    assert pod["record"]["load"] == -5
    assert pod["record"]["routing"] == "READY"
    assert 3 <= pod["age_s"] < 13
    assert pod["fresh"] is True
    assert pod["available"] is True


async def test_pods_shows_stale_pod_unavailable(proxy: Proxy) -> None:
    await proxy.publish(0, Routing.READY, age_s=120)

    reply = await proxy.call("GET", "/v1/services/game/pods")

    pod = reply.body["pods"][0]
    assert pod["fresh"] is False
    assert pod["available"] is False
    assert pod["reason"] == "stale"


async def test_pods_reports_invalid_record(proxy: Proxy) -> None:
    await proxy.server.store.publish_pod_state(NS, "game", 1, "not json")

    reply = await proxy.call("GET", "/v1/services/game/pods")

    assert reply.body["pods"][1]["record"] is None
    assert len(reply.body["problems"]) == 1


async def test_pods_registry_lists_stale_record(proxy: Proxy) -> None:
    await proxy.publish(0, service="lobby", address="127.0.0.1:7000")
    await proxy.publish(4, service="lobby", address="127.0.0.1:7004", age_s=600)

    reply = await proxy.call("GET", "/v1/services/lobby/pods")

    pods = {pod["index"]: pod for pod in reply.body["pods"]}
    assert pods[0]["reason"] == "ready"
    assert pods[0]["address"] == "127.0.0.1:7000"
    assert pods[4]["reason"] == "stale"
    assert pods[4]["available"] is False


async def test_pods_unknown_service_returns_404(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/services/nothing/pods")

    assert reply.status == 404
    assert reply.body["error"] == "unknown_service"
    assert "'nothing'" in reply.body["message"]


async def test_pods_invalid_namespace_returns_400(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/services/game/pods?namespace=Bad_NS")

    assert reply.status == 400
    assert reply.body["error"] == "invalid_namespace"
    assert "'Bad_NS'" in reply.body["message"]


async def test_pods_unknown_parameter_returns_400(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/services/game/pods?namspace=other")

    assert reply.status == 400
    assert reply.body["error"] == "invalid_parameter"
    assert "'namspace'" in reply.body["message"]


async def test_pods_repeated_parameter_returns_400(proxy: Proxy) -> None:
    path = "/v1/services/game/pods?namespace=a&namespace=b"

    reply = await proxy.call("GET", path)

    assert reply.status == 400
    assert reply.body["error"] == "invalid_parameter"


# Drain and undrain.


async def test_drain_marks_pod_draining(proxy: Proxy) -> None:
    reply = await proxy.call("POST", "/v1/services/game/pods/1/drain")

    assert reply.status == 200
    assert reply.body["record"]["routing"] == "DENY_NEW_CALL"
    assert reply.body["record"]["drained_by"] == "admin"
    listed = (await proxy.call("GET", "/v1/services/game/pods")).body["pods"]
    assert listed[1]["reason"] == "draining"
    assert listed[1]["routable"] is False
    assert listed[1]["available"] is True
    stored = await proxy.record(1)
    assert stored["routing"] == "DENY_NEW_CALL"
    assert stored["drained_by"] == "admin"


async def test_undrain_deletes_admin_drain_record(proxy: Proxy) -> None:
    await proxy.call("POST", "/v1/services/game/pods/1/drain")

    reply = await proxy.call("POST", "/v1/services/game/pods/1/undrain")

    assert reply.status == 200
    assert reply.body["routing"] == "READY"
    assert reply.body["record"] is None
    listed = (await proxy.call("GET", "/v1/services/game/pods")).body["pods"]
    assert listed[1]["reason"] == "ready"
    assert listed[1]["routable"] is True
    assert await proxy.server.store.read_pod_states(NS, "game") == {}


async def test_undrain_of_published_pod_writes_ready(proxy: Proxy) -> None:
    await proxy.publish(1, Routing.DENY_NEW_CALL, load=5)

    reply = await proxy.call("POST", "/v1/services/game/pods/1/undrain")

    assert reply.status == 200
    assert reply.body["record"]["routing"] == "READY"
    assert reply.body["record"]["drained_by"] is None
    stored = await proxy.record(1)
    assert stored["routing"] == "READY"
    assert stored["load"] == 5
    assert "drained_by" not in stored


async def test_drain_keeps_load_and_address(proxy: Proxy) -> None:
    await proxy.publish(2, load=77, address="127.0.0.1:7777")
    before_ms = now_ms()

    await proxy.call("POST", "/v1/services/game/pods/2/drain")

    stored = await proxy.record(2)
    assert stored["load"] == 77
    assert stored["address"] == "127.0.0.1:7777"
    assert stored["updated_ms"] >= before_ms


async def test_drain_without_record_writes_load_zero(proxy: Proxy) -> None:
    await proxy.call("POST", "/v1/services/game/pods/0/drain")

    stored = await proxy.record(0)
    assert stored["load"] == 0
    assert "address" not in stored


async def test_drain_uses_namespace_parameter(proxy: Proxy) -> None:
    path = "/v1/services/game/pods/0/drain?namespace=other"

    reply = await proxy.call("POST", path)

    assert reply.body["namespace"] == "other"
    store = proxy.server.store
    assert "0" in await store.read_pod_states("other", "game")
    assert await store.read_pod_states(NS, "game") == {}


async def test_drain_keeps_linked_users_only(proxy: Proxy) -> None:
    first = await proxy.route("alice")

    await proxy.call("POST", f"/v1/services/game/pods/{first}/drain")

    assert await proxy.route("alice") == first
    newcomers = [await proxy.route(f"new-{number}") for number in range(6)]
    assert first not in newcomers


async def test_drain_index_out_of_range_returns_400(proxy: Proxy) -> None:
    game = await proxy.call("POST", "/v1/services/game/pods/3/drain")
    chat = await proxy.call("POST", "/v1/services/chat/pods/1/drain")

    assert game.status == 400
    assert game.body["error"] == "invalid_pod"
    assert "3 pods" in game.body["message"]
    assert chat.status == 400


@pytest.mark.parametrize("index", ["one", "-1", "1.0", "+1", "99999999999"])
async def test_drain_invalid_index_returns_400(proxy: Proxy, index: str) -> None:
    reply = await proxy.call("POST", f"/v1/services/game/pods/{index}/drain")

    assert reply.status == 400
    assert reply.body["error"] == "invalid_pod"


async def test_drain_unknown_service_returns_404(proxy: Proxy) -> None:
    reply = await proxy.call("POST", "/v1/services/nothing/pods/0/drain")

    assert reply.status == 404
    assert reply.body["error"] == "unknown_service"


async def test_drain_shut_down_pod_returns_409(proxy: Proxy) -> None:
    await proxy.publish(1, Routing.SHUTDOWN)

    reply = await proxy.call("POST", "/v1/services/game/pods/1/undrain")

    assert reply.status == 409
    assert reply.body["error"] == "pod_shut_down"
    assert (await proxy.record(1))["routing"] == "SHUTDOWN"


async def test_drain_registry_pod_without_record_returns_404(proxy: Proxy) -> None:
    reply = await proxy.call("POST", "/v1/services/lobby/pods/5/drain")

    assert reply.status == 404
    assert reply.body["error"] == "unknown_pod"
    assert await proxy.server.store.read_pod_states(NS, "lobby") == {}


async def test_drain_registry_stale_pod_returns_404(proxy: Proxy) -> None:
    await proxy.publish(5, service="lobby", address="127.0.0.1:7005", age_s=600)

    reply = await proxy.call("POST", "/v1/services/lobby/pods/5/drain")

    assert reply.status == 404
    assert reply.body["error"] == "unknown_pod"
    assert (await proxy.record(5, "lobby"))["routing"] == "READY"


async def test_drain_registry_pod_keeps_address(proxy: Proxy) -> None:
    await proxy.publish(5, service="lobby", load=3, address="127.0.0.1:7005")

    reply = await proxy.call("POST", "/v1/services/lobby/pods/5/drain")

    assert reply.status == 200
    assert reply.body["record"]["address"] == "127.0.0.1:7005"
    assert reply.body["record"]["load"] == 3


@pytest.mark.parametrize("store_section", ["redis"], indirect=True)
async def test_drain_writes_redis_state_hash(
    proxy: Proxy, redis_client: redis.asyncio.Redis
) -> None:
    await proxy.call("POST", "/v1/services/game/pods/2/drain")

    raw = await redis_client.hget(state_key(NS, "game"), "2")

    assert raw is not None
    assert orjson.loads(raw)["drained_by"] == "admin"


# The pod role.


async def test_pod_state_without_pod_role_returns_404(proxy: Proxy) -> None:
    read = await proxy.call("GET", "/v1/pod/state")
    write = await proxy.call("PUT", "/v1/pod/state", json={"load": 1})

    assert read.status == 404
    assert read.body["error"] == "no_pod_role"
    assert write.status == 404


async def test_pod_state_describes_agent(pod_proxy: Proxy) -> None:
    reply = await pod_proxy.call("GET", "/v1/pod/state")

    assert reply.status == 200
    assert reply.body["service"] == "game"
    assert reply.body["index"] == 1
    assert reply.body["routing"] == "READY"


async def test_pod_state_put_publishes_record(pod_proxy: Proxy) -> None:
    body = {"load": 42, "routing": "DENY_NEW_CALL"}

    reply = await pod_proxy.call("PUT", "/v1/pod/state", json=body)

    assert reply.status == 200
    assert reply.body["load"] == 42
    assert reply.body["routing"] == "DENY_NEW_CALL"
    stored = await pod_proxy.record(1)
    assert stored["load"] == 42
    assert stored["routing"] == "DENY_NEW_CALL"


async def test_pod_state_put_load_only(pod_proxy: Proxy) -> None:
    reply = await pod_proxy.call("PUT", "/v1/pod/state", json={"load": -3})

    assert reply.status == 200
    assert reply.body["routing"] == "READY"
    assert (await pod_proxy.record(1))["load"] == -3


async def test_pod_state_rejects_shutdown(pod_proxy: Proxy) -> None:
    reply = await pod_proxy.call("PUT", "/v1/pod/state", json={"routing": "SHUTDOWN"})

    assert reply.status == 400
    assert reply.body["error"] == "invalid_field"
    assert "SHUTDOWN" in reply.body["message"]
    assert (await pod_proxy.record(1))["routing"] == "READY"


@pytest.mark.parametrize(
    "body",
    [
        {"load": True},
        {"load": 1.5},
        {"load": "3"},
        {"load": None},
        {"load": 2**63},
        {"load": 2**64 - 1},
        {"routing": "ready"},
        {"routing": 1},
        {"load": 1, "weight": 2},
        {},
    ],
    ids=lambda body: orjson.dumps(body).decode(),
)
async def test_pod_state_rejects_invalid_body(
    pod_proxy: Proxy, body: dict[str, Any]
) -> None:
    reply = await pod_proxy.call("PUT", "/v1/pod/state", json=body)

    assert reply.status == 400
    assert reply.body["error"] == "invalid_field"


@pytest.mark.parametrize("data", ["{", "[1]", "", "42"])
async def test_pod_state_rejects_invalid_json(pod_proxy: Proxy, data: str) -> None:
    reply = await pod_proxy.call("PUT", "/v1/pod/state", data=data)

    assert reply.status == 400
    assert reply.body["error"] == "invalid_json"


async def test_pod_state_names_wrong_field(pod_proxy: Proxy) -> None:
    reply = await pod_proxy.call("PUT", "/v1/pod/state", json={"load": True})

    assert reply.body["field"] == "load"
    assert reply.body["message"] == "load must be an integer, got true"


async def test_admin_drain_outlasts_reported_ready(pod_proxy: Proxy) -> None:
    await pod_proxy.call("POST", "/v1/services/game/pods/1/drain")

    reply = await pod_proxy.call("PUT", "/v1/pod/state", json={"routing": "READY"})

    assert reply.body["routing"] == "DENY_NEW_CALL"
    assert reply.body["drained_by"] == "admin"


async def test_undrain_keeps_application_drain(pod_proxy: Proxy) -> None:
    await pod_proxy.call("PUT", "/v1/pod/state", json={"routing": "DENY_NEW_CALL"})
    await pod_proxy.call("POST", "/v1/services/game/pods/1/undrain")

    await pod_proxy.call("PUT", "/v1/pod/state", json={"load": 5})

    assert (await pod_proxy.record(1))["routing"] == "DENY_NEW_CALL"


# Links.


async def test_link_set_persistent_records_uid_hash(proxy: Proxy) -> None:
    reply = await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 2})

    assert reply.status == 200
    assert reply.body == {"mode": "set", "pod": 2, "previous": None}
    link = (await proxy.call("GET", "/v1/links/default/alice/game")).body
    assert link["pod"] == 2
    assert link["persistent"] is True
    assert link["ttl_s"] is None
    links = (await proxy.call("GET", "/v1/links/default/alice")).body
    assert links["persistent"] == {"game": 2}


async def test_link_set_temporary_has_ttl(proxy: Proxy) -> None:
    body = {"pod": 0, "ttl_s": 30}

    reply = await proxy.call("PUT", "/v1/links/default/alice/game", json=body)

    assert reply.status == 200
    link = (await proxy.call("GET", "/v1/links/default/alice/game")).body
    assert link["persistent"] is False
    assert 0 < link["ttl_s"] <= 30
    links = (await proxy.call("GET", "/v1/links/default/alice")).body
    assert links["persistent"] == {}
    assert links["links"]["game"]["pod"] == 0


async def test_link_set_returns_previous_pod(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 0})

    reply = await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 1})

    assert reply.body["previous"] == 0
    assert await proxy.server.store.get(NS, "alice", "game") == 1


async def test_try_set_refused_returns_409(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 0})
    body = {"pod": 1, "mode": "try_set"}

    reply = await proxy.call("PUT", "/v1/links/default/alice/game", json=body)

    assert reply.status == 409
    assert reply.body["error"] == "link_conflict"
    assert reply.body["pod"] == 0
    assert await proxy.server.store.get(NS, "alice", "game") == 0


async def test_try_set_replaces_temporary_link(proxy: Proxy) -> None:
    body = {"pod": 0, "ttl_s": 60}
    await proxy.call("PUT", "/v1/links/default/alice/game", json=body)
    body = {"pod": 1, "mode": "try_set"}

    reply = await proxy.call("PUT", "/v1/links/default/alice/game", json=body)

    assert reply.status == 200
    assert reply.body == {"mode": "try_set", "accepted": True, "pod": 1}


async def test_set_if_absent_keeps_existing_link(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 0})
    body = {"pod": 2, "mode": "set_if_absent"}

    reply = await proxy.call("PUT", "/v1/links/default/alice/game", json=body)

    assert reply.status == 200
    assert reply.body == {"mode": "set_if_absent", "pod": 0}


async def test_set_if_absent_creates_missing_link(proxy: Proxy) -> None:
    body = {"pod": 2, "mode": "set_if_absent", "ttl_s": 60}

    reply = await proxy.call("PUT", "/v1/links/default/alice/game", json=body)

    assert reply.body["pod"] == 2
    assert await proxy.server.store.get(NS, "alice", "game") == 2


async def test_link_absent_returns_404(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/links/default/alice/game")

    assert reply.status == 404
    assert reply.body["error"] == "no_link"
    assert "'alice'" in reply.body["message"]


async def test_links_of_uid_cover_every_service(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 1})
    await proxy.call("PUT", "/v1/links/default/alice/chat", json={"pod": 0, "ttl_s": 9})

    reply = await proxy.call("GET", "/v1/links/default/alice")

    assert reply.status == 200
    assert set(reply.body["links"]) == {"game", "chat"}
    assert reply.body["persistent"] == {"game": 1}


async def test_links_of_unlinked_uid_are_empty(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/links/default/nobody")

    assert reply.status == 200
    assert reply.body["links"] == {}
    assert reply.body["persistent"] == {}


async def test_delete_removes_link(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 1})

    first = await proxy.call("DELETE", "/v1/links/default/alice/game")
    second = await proxy.call("DELETE", "/v1/links/default/alice/game")

    assert first.body == {"removed": True}
    assert second.body == {"removed": False}
    assert await proxy.server.store.get(NS, "alice", "game") is None
    assert await proxy.server.store.linked_services(NS, "alice") == {}


async def test_delete_with_delay_expires_later(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 1})

    reply = await proxy.call("DELETE", "/v1/links/default/alice/game?delay_s=0.3")

    assert reply.body == {"removed": True}
    link = (await proxy.call("GET", "/v1/links/default/alice/game")).body
    assert link["pod"] == 1
    assert 0 < link["ttl_s"] <= 0.3
    assert await proxy.server.store.linked_services(NS, "alice") == {}
    await asyncio.sleep(0.5)
    expired = await proxy.call("GET", "/v1/links/default/alice/game")
    assert expired.status == 404


async def test_delete_with_pod_mismatch_keeps_link(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 0})

    reply = await proxy.call("DELETE", "/v1/links/default/alice/game?pod=1")

    assert reply.body == {"removed": False}
    assert await proxy.server.store.get(NS, "alice", "game") == 0


async def test_delete_with_matching_pod_removes(proxy: Proxy) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 0})

    reply = await proxy.call("DELETE", "/v1/links/default/alice/game?pod=0")

    assert reply.body == {"removed": True}
    assert await proxy.server.store.get(NS, "alice", "game") is None


@pytest.mark.parametrize("delay", ["-1", "nan", "inf", "soon", "1e12"])
async def test_delete_invalid_delay_returns_400(proxy: Proxy, delay: str) -> None:
    await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 0})

    path = f"/v1/links/default/alice/game?delay_s={delay}"
    reply = await proxy.call("DELETE", path)

    assert reply.status == 400
    assert reply.body["error"] == "invalid_parameter"
    assert await proxy.server.store.get(NS, "alice", "game") == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_link_uid_with_brace_returns_400(proxy: Proxy, method: str) -> None:
    body = {"pod": 0} if method == "PUT" else None

    reply = await proxy.call(method, "/v1/links/default/a{b/game", json=body)

    assert reply.status == 400
    assert reply.body["error"] == "invalid_uid"
    assert "'a{b'" in reply.body["message"]


async def test_links_uid_with_brace_returns_400(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/links/default/a}b")

    assert reply.status == 400
    assert reply.body["error"] == "invalid_uid"


async def test_link_uid_with_slash_accepted(proxy: Proxy) -> None:
    path = "/v1/links/default/team%2Falice/game"

    reply = await proxy.call("PUT", path, json={"pod": 1})

    assert reply.status == 200
    assert await proxy.server.store.get(NS, "team/alice", "game") == 1


async def test_link_invalid_namespace_returns_400(proxy: Proxy) -> None:
    reply = await proxy.call("PUT", "/v1/links/Bad_NS/alice/game", json={"pod": 0})

    assert reply.status == 400
    assert reply.body["error"] == "invalid_namespace"


async def test_link_invalid_service_returns_400(proxy: Proxy) -> None:
    reply = await proxy.call("GET", "/v1/links/default/alice/Ga{me")

    assert reply.status == 400
    assert reply.body["error"] == "invalid_service"


async def test_link_unknown_service_returns_404(proxy: Proxy) -> None:
    reply = await proxy.call("PUT", "/v1/links/default/alice/nothing", json={"pod": 0})

    assert reply.status == 404
    assert reply.body["error"] == "unknown_service"
    assert await proxy.server.store.get(NS, "alice", "nothing") is None


async def test_link_pod_out_of_range_returns_400(proxy: Proxy) -> None:
    game = await proxy.call("PUT", "/v1/links/default/alice/game", json={"pod": 3})
    chat = await proxy.call("PUT", "/v1/links/default/alice/chat", json={"pod": 1})
    delete = await proxy.call("DELETE", "/v1/links/default/alice/game?pod=3")

    assert game.status == 400
    assert game.body["error"] == "invalid_pod"
    assert chat.status == 400
    assert delete.status == 400


async def test_link_registry_service_takes_any_pod(proxy: Proxy) -> None:
    reply = await proxy.call("PUT", "/v1/links/default/alice/lobby", json={"pod": 40})

    assert reply.status == 200
    assert await proxy.server.store.get(NS, "alice", "lobby") == 40


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ("{", None),
        ("[]", None),
        ("", None),
        ('{"pod": 1, "extra": 1}', "extra"),
        ('{"pod": "1"}', "pod"),
        ('{"pod": true}', "pod"),
        ('{"pod": -1}', None),
        ("{}", "pod"),
        ('{"pod": 1, "ttl_s": 0}', "ttl_s"),
        ('{"pod": 1, "ttl_s": -2}', "ttl_s"),
        ('{"pod": 1, "ttl_s": "60"}', "ttl_s"),
        ('{"pod": 1, "ttl_s": 1e300}', "ttl_s"),
        ('{"pod": 1, "mode": "bogus"}', "mode"),
        ('{"pod": 1, "mode": null}', "mode"),
    ],
)
async def test_link_invalid_body_returns_400(
    proxy: Proxy, data: str, field: str | None
) -> None:
    reply = await proxy.call("PUT", "/v1/links/default/alice/game", data=data)

    assert reply.status == 400
    assert reply.body.get("field") == field
    assert await proxy.server.store.get(NS, "alice", "game") is None


async def test_link_change_seen_by_next_route(proxy: Proxy) -> None:
    first = await proxy.route("alice")
    other = (first + 1) % POD_COUNT

    path = "/v1/links/default/alice/game"
    await proxy.call("PUT", path, json={"pod": other, "ttl_s": 60})

    assert await proxy.route("alice") == other


async def test_link_delete_drops_cached_pod(proxy: Proxy) -> None:
    first = await proxy.route("alice")
    other = (first + 1) % POD_COUNT

    await proxy.call("DELETE", "/v1/links/default/alice/game")
    # Written behind the admin API, so only a dropped cache entry shows it.
    await proxy.server.store.set(NS, "alice", "game", other, 60)

    assert await proxy.route("alice") == other


async def test_pod_role_service_accepts_links(
    start_proxy: ProxyFactory, pod_addresses: list[str], store_section: Document
) -> None:
    document = make_document(pod_addresses, store_section)
    document["pod"] = pod_section(service="match", index=7)
    proxy = await start_proxy(document)

    reply = await proxy.call("PUT", "/v1/links/default/alice/match", json={"pod": 7})

    assert reply.status == 200
    links = (await proxy.call("GET", "/v1/links/default/alice")).body["links"]
    assert links["match"]["pod"] == 7
    other = await proxy.call("PUT", "/v1/links/other/alice/match", json={"pod": 7})
    assert other.status == 404


async def test_store_outage_returns_503(
    start_proxy: ProxyFactory,
    pod_addresses: list[str],
    private_redis_server: RedisServer,
) -> None:
    store = {
        "backend": "redis",
        "redis_url": private_redis_server.url,
        "redis_timeout_s": 0.5,
        "redis_connect_timeout_s": 0.5,
        "redis_retries": 0,
    }
    proxy = await start_proxy(make_document(pod_addresses, store))
    private_redis_server.stop()

    links = await proxy.call("GET", "/v1/links/default/alice")
    drain = await proxy.call("POST", "/v1/services/game/pods/0/drain")

    assert links.status == 503
    assert links.body["error"] == "store_unavailable"
    assert drain.status == 503


async def test_undrain_without_record_writes_nothing(proxy: Proxy) -> None:
    reply = await proxy.call("POST", "/v1/services/game/pods/2/undrain")

    assert reply.status == 200
    assert reply.body["routing"] == "READY"
    assert reply.body["record"] is None
    assert await proxy.server.store.read_pod_states(NS, "game") == {}
