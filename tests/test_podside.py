from __future__ import annotations

import orjson
import pytest

from proxy.config import PodSettings
from proxy.podside import PodAgent
from proxy.podstate import DRAINED_BY_ADMIN, MAX_LOAD, PodState, Routing
from proxy.store.memory import MemoryStore

NS = "default"
SERVICE = "game"
NOW_MS = 1_764_800_000_000


def make_agent(store: MemoryStore, index: int = 1, **settings: object) -> PodAgent:
    pod = PodSettings(
        namespace=NS,
        service=SERVICE,
        index=index,
        app_address="127.0.0.1:1",
        advertise_address="10.0.0.1:8000",
        **settings,  # type: ignore[arg-type]
    )
    return PodAgent(pod, store, clock=lambda: NOW_MS)


async def stored(store: MemoryStore, index: int = 1) -> dict[str, object]:
    raw = await store.read_pod_states(NS, SERVICE)
    record: dict[str, object] = orjson.loads(raw[str(index)])
    return record


def admin_drain_record() -> str:
    return PodState(0, Routing.DENY_NEW_CALL, NOW_MS, None, DRAINED_BY_ADMIN).encode()


class DrainDuringPublish(MemoryStore):
    """A memory store where an operator drains pod 1 during the first publish."""

    def __init__(self) -> None:
        super().__init__()
        self.interfered = False

    async def replace_pod_state(
        self, namespace: str, service: str, pod: int, expected: str | None, record: str
    ) -> bool:
        if not self.interfered:
            self.interfered = True
            await self.publish_pod_state(namespace, service, pod, admin_drain_record())
        return await super().replace_pod_state(
            namespace, service, pod, expected, record
        )


async def test_publish_writes_documented_record() -> None:
    store = MemoryStore()
    agent = make_agent(store)
    agent.report(load=-7)

    await agent.publish()

    assert await stored(store) == {
        "load": -7,
        "routing": "READY",
        "updated_ms": NOW_MS,
        "address": "10.0.0.1:8000",
    }


async def test_computed_load_weighs_in_flight_and_latency() -> None:
    agent = make_agent(MemoryStore(), cpu_factor=0.7)
    agent.in_flight.enter()
    agent.in_flight.enter()
    agent.latency_ms = 100.0

    assert agent.load == round(0.7 * 2 + 0.3 * 100.0)


async def test_reported_load_wins_over_computed() -> None:
    agent = make_agent(MemoryStore())
    agent.latency_ms = 500.0

    agent.report(load=3)

    assert agent.load == 3


async def test_admin_drain_written_mid_publish_survives() -> None:
    store = DrainDuringPublish()
    agent = make_agent(store)

    await agent.publish()

    record = await stored(store)
    assert record["routing"] == "DENY_NEW_CALL"
    assert record["drained_by"] == DRAINED_BY_ADMIN


async def test_admin_drain_over_app_drain_is_kept() -> None:
    store = MemoryStore()
    agent = make_agent(store)
    agent.report(routing=Routing.DENY_NEW_CALL)
    await store.publish_pod_state(NS, SERVICE, 1, admin_drain_record())

    await agent.publish()
    agent.report(routing=Routing.READY)
    await agent.publish()

    record = await stored(store)
    assert record["routing"] == "DENY_NEW_CALL"
    assert record["drained_by"] == DRAINED_BY_ADMIN


async def test_admin_undrain_restores_app_routing() -> None:
    store = MemoryStore()
    agent = make_agent(store)
    agent.report(routing=Routing.DENY_NEW_CALL)
    await store.publish_pod_state(NS, SERVICE, 1, admin_drain_record())
    await agent.publish()

    await store.remove_pod_state(NS, SERVICE, 1)
    await agent.publish()

    record = await stored(store)
    assert record["routing"] == "DENY_NEW_CALL"
    assert "drained_by" not in record


async def test_shutdown_cannot_be_reported() -> None:
    agent = make_agent(MemoryStore())

    with pytest.raises(ValueError):
        agent.report(routing=Routing.SHUTDOWN)


async def test_stop_publishes_deny_then_shutdown() -> None:
    store = MemoryStore()
    agent = make_agent(store, drain_s=0.0)
    seen: list[object] = []
    original = store.replace_pod_state

    async def recording(*args: object) -> bool:
        written = await original(*args)  # type: ignore[arg-type]
        seen.append(orjson.loads(str(args[-1]))["routing"])
        return written

    store.replace_pod_state = recording  # type: ignore[method-assign]

    await agent.drain_and_shut_down()

    assert seen == ["DENY_NEW_CALL", "SHUTDOWN"]
    assert (await stored(store))["routing"] == "SHUTDOWN"


async def test_pod_zero_publishes_workload() -> None:
    store = MemoryStore()
    agent = make_agent(store, index=0)
    agent.report(load=40)

    await agent.publish()

    workload = await store.read_workload(NS, SERVICE)
    assert workload is not None
    assert orjson.loads(workload) == {
        "pods": 1,
        "ready": 1,
        "load": 40,
        "updated_ms": NOW_MS,
    }


async def test_workload_load_sum_clamped() -> None:
    store = MemoryStore()
    other = PodState(MAX_LOAD, Routing.READY, NOW_MS, "10.0.0.2:8000").encode()
    await store.publish_pod_state(NS, SERVICE, 1, other)
    agent = make_agent(store, index=0)
    agent.report(load=MAX_LOAD)

    await agent.publish()

    workload = await store.read_workload(NS, SERVICE)
    assert workload is not None
    assert orjson.loads(workload)["load"] == MAX_LOAD


async def test_other_pods_write_no_workload() -> None:
    store = MemoryStore()

    await make_agent(store, index=2).publish()

    assert await store.read_workload(NS, SERVICE) is None
