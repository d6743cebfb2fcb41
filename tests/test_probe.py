"""Active probes and the health loop, against in-process pods on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from conftest import LOOPBACK, free_port
from scripted_pod import ScriptedPod

from proxy.config import ServiceSettings
from proxy.health import HealthState
from proxy.pods import Address, Pod
from proxy.podstate import PodState, Routing, now_ms
from proxy.probe import HealthMonitor, ProbeError, probe
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.statuses import StatusRanges
from proxy.store.memory import MemoryStore

EXPECTED = StatusRanges(["200-399"])
TIMEOUT_S = 0.3
# Bound of every wait for the health loop.
WAIT_S = 5.0


class FakePod:
    """An in-process pod whose probe endpoint fails on demand.

    `mode` is "ok", "status" (503), "slow" (sleeps past the probe timeout)
    or "reset" (closes the connection without a response).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.probes = 0
        self.probed = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.probes += 1
        self.probed.set()
        if self.mode == "status":
            return web.Response(status=503)
        if self.mode == "slow":
            await asyncio.sleep(TIMEOUT_S * 3)
        if self.mode == "reset":
            # Only this request: a client that sent it again would pass.
            self.mode = "ok"
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOOPBACK, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    @property
    def pod(self) -> Pod:
        return Pod(0, Address(LOOPBACK, self.port))


@pytest.fixture
async def fake_pod() -> AsyncIterator[FakePod]:
    pod = FakePod()
    await pod.start()
    try:
        yield pod
    finally:
        assert pod.runner is not None
        await pod.runner.cleanup()


async def probe_error(pod: Pod) -> ProbeError:
    with pytest.raises(ProbeError) as caught:
        await probe(pod, "/healthz", TIMEOUT_S, EXPECTED)
    return caught.value


# One probe.


async def test_expected_status_passes(fake_pod: FakePod) -> None:
    await probe(fake_pod.pod, "/healthz", TIMEOUT_S, EXPECTED)

    assert fake_pod.probes == 1


async def test_unexpected_status_fails(fake_pod: FakePod) -> None:
    fake_pod.mode = "status"

    error = await probe_error(fake_pod.pod)

    assert error.kind == "status"
    assert str(error) == "status 503, expected 200-399"


async def test_refused_connection_fails() -> None:
    pod = Pod(0, Address(LOOPBACK, free_port()))

    error = await probe_error(pod)

    assert error.kind == "connect"


async def test_slow_pod_times_out(fake_pod: FakePod) -> None:
    fake_pod.mode = "slow"
    started = time.monotonic()

    error = await probe_error(fake_pod.pod)

    assert error.kind == "timeout"
    assert time.monotonic() - started < TIMEOUT_S * 2


async def test_reset_connection_fails(fake_pod: FakePod) -> None:
    fake_pod.mode = "reset"

    error = await probe_error(fake_pod.pod)

    assert error.kind == "error"
    assert fake_pod.probes == 1


async def test_probe_keeps_query_string() -> None:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response()

    app = web.Application()
    app.router.add_get("/ready", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    try:
        pod = Pod(0, Address(LOOPBACK, runner.addresses[0][1]))
        await probe(pod, "/ready?deep=1", TIMEOUT_S, EXPECTED)
    finally:
        await runner.cleanup()

    assert seen == ["/ready?deep=1"]


@pytest.fixture
async def scripted_pod() -> AsyncIterator[ScriptedPod]:
    pod = ScriptedPod()
    await pod.start()
    try:
        yield pod
    finally:
        await pod.stop()


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("huge-head", "response head larger than 65536 bytes"),
        ("huge-head-whole", "response head larger than 65536 bytes"),
        ("head-65537", "response head larger than 65536 bytes"),
        ("head-65537-nospace", "response head larger than 65536 bytes"),
        ("interim-101", "more than 100 interim responses"),
        ("status-099", "status 99 below 100"),
        ("nul-reason", "NUL in the status line"),
        ("duplicate-length", "invalid response: Duplicate Content-Length"),
        ("close", "the pod closed the connection before the response head"),
    ],
)
async def test_rejected_response_fails_probe(
    scripted_pod: ScriptedPod, script: str, reason: str
) -> None:
    # The proxy returns 502 to a request whose pod sends such a response.
    pod = Pod(0, Address(LOOPBACK, scripted_pod.port))

    with pytest.raises(ProbeError) as caught:
        await probe(pod, f"/{script}", TIMEOUT_S * 10, EXPECTED)

    assert caught.value.kind == "error"
    assert str(caught.value) == reason


@pytest.mark.parametrize(
    "script",
    [
        "large-head",
        "long-header-line",
        "many-headers",
        "head-65536",
        "head-65536-nospace",
        "interim-100",
    ],
)
async def test_relayed_response_passes_probe(
    scripted_pod: ScriptedPod, script: str
) -> None:
    # The proxy relays these responses, so the probe must pass them too.
    pod = Pod(0, Address(LOOPBACK, scripted_pod.port))

    await probe(pod, f"/{script}", TIMEOUT_S * 10, EXPECTED)

    [event] = scripted_pod.events
    assert event.method == "GET"
    assert event.target == f"/{script}"
    assert ("User-Agent", "stateful-route-health") in event.headers
    assert ("Host", f"{LOOPBACK}:{scripted_pod.port}") in event.headers


# The health loop.


def probed_service(pod: FakePod, **settings: object) -> Service:
    values: dict[str, object] = {
        "pods": (str(pod.pod.address),),
        "health_check_path": "/healthz",
        "health_interval_s": 0.05,
        "health_timeout_s": TIMEOUT_S,
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
    }
    values.update(settings)
    return Service(ServiceSettings(name="game", **values))  # type: ignore[arg-type]


async def wait_for_state(service: Service, pod: Pod, state: HealthState) -> float:
    """Poll the pod's health state; return the seconds it took, or fail."""
    started = time.monotonic()
    while service.health.state(pod) is not state:
        if time.monotonic() - started > WAIT_S:
            pytest.fail(f"pod not {state} within {WAIT_S} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_monitor_flips_pod_both_ways(fake_pod: FakePod) -> None:
    service = probed_service(fake_pod)
    monitor = HealthMonitor(service, PodStates(MemoryStore(), {}))
    stopping = asyncio.Event()
    task = asyncio.create_task(monitor.run(stopping))
    try:
        await asyncio.wait_for(monitor.ready.wait(), WAIT_S)
        fake_pod.mode = "status"
        await wait_for_state(service, fake_pod.pod, HealthState.UNHEALTHY)
        fake_pod.mode = "ok"
        await wait_for_state(service, fake_pod.pod, HealthState.HEALTHY)
    finally:
        stopping.set()
        await asyncio.wait_for(task, WAIT_S)

    entry = service.health.get(fake_pod.pod)
    assert entry is not None
    assert entry.last_probe_error == "status 503, expected 200-399"


async def test_monitor_stops_during_slow_round(fake_pod: FakePod) -> None:
    fake_pod.mode = "slow"
    service = probed_service(fake_pod, health_timeout_s=30.0)
    monitor = HealthMonitor(service, PodStates(MemoryStore(), {}))
    stopping = asyncio.Event()
    task = asyncio.create_task(monitor.run(stopping))
    await asyncio.wait_for(fake_pod.probed.wait(), WAIT_S)

    started = time.monotonic()
    stopping.set()
    await asyncio.wait_for(task, WAIT_S)

    assert time.monotonic() - started < 1.0


async def test_monitor_without_path_never_probes(fake_pod: FakePod) -> None:
    service = probed_service(fake_pod, health_check_path="")
    monitor = HealthMonitor(service, PodStates(MemoryStore(), {}))
    stopping = asyncio.Event()
    task = asyncio.create_task(monitor.run(stopping))
    await asyncio.wait_for(monitor.ready.wait(), WAIT_S)
    await asyncio.sleep(0.2)
    stopping.set()
    await asyncio.wait_for(task, WAIT_S)

    assert fake_pod.probes == 0


def test_template_pools_split_by_namespace() -> None:
    settings = ServiceSettings(
        name="game",
        address_template="{service}-{index}.{namespace}:80",
        replicas=2,
        namespaces=("eu", "us"),
    )
    service = Service(settings)
    monitor = HealthMonitor(service, PodStates(MemoryStore(), {}))

    pools = monitor.pools()

    assert [[str(pod.address) for pod in pool] for pool in pools] == [
        ["game-0.eu:80", "game-1.eu:80"],
        ["game-0.us:80", "game-1.us:80"],
    ]


async def test_registry_pools_follow_pod_sets() -> None:
    store = MemoryStore()
    service = Service(ServiceSettings(name="lobby", discovery="registry"))
    states = PodStates(store, {"lobby": service})
    record = PodState(0, Routing.READY, now_ms(), "127.0.0.1:9100")
    await store.publish_pod_state("eu", "lobby", 3, record.encode())
    await states.load("eu", "lobby")
    monitor = HealthMonitor(service, states)

    pools = monitor.pools()

    assert pools == [(Pod(3, Address("127.0.0.1", 9100)),)]
