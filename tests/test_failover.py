"""The failover handler and user migration, against the memory store and Redis.

Each test links users through a real `Router`, makes a pod unusable by
failing its probes in the service's `HealthTable`, and lets the handler
move the users. Moves are paced by a fake clock, so no test sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from proxy.cache import LinkCache
from proxy.config import ServiceSettings
from proxy.failover import (
    EventType,
    FailoverHandler,
    FailoverHistory,
    HistoryEvent,
    MigrationRejected,
    Pacer,
)
from proxy.health import HealthState
from proxy.pods import Pod
from proxy.podstate import PodState, Routing, now_ms
from proxy.routing import FAILOVER_REASON, MIGRATED_REASON, Router
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.store.base import PERSISTENT, LinkStore
from proxy.store.memory import MemoryStore

NS = "default"
LINK_TTL_S = 300.0
USERS = 30
WAIT_S = 5.0


class FakeTime:
    """A clock and a sleep for `Pacer`: sleeping advances the clock at once.

    `on_sleep` runs at each sleep, so a test can act between two moves.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[], Awaitable[None]] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            await self.on_sleep()


@dataclass
class Setup:
    """A service of three pods with linked users and a failover handler."""

    store: LinkStore
    service: Service
    states: PodStates
    router: Router
    handler: FailoverHandler
    time: FakeTime
    linked: dict[str, int]

    def pod(self, index: int) -> Pod:
        pods = self.service.pods(NS)
        assert pods is not None
        return pods[index]

    def users_of(self, index: int) -> list[str]:
        return sorted(uid for uid, pod in self.linked.items() if pod == index)

    def fail(self, index: int) -> None:
        for _ in range(self.service.settings.unhealthy_threshold):
            self.service.health.record_probe(self.pod(index), "cannot connect")

    def recover(self, index: int) -> None:
        for _ in range(self.service.settings.healthy_threshold):
            self.service.health.record_probe(self.pod(index), None)

    async def links(self, uids: list[str]) -> dict[str, int | None]:
        return {uid: await self.store.get(NS, uid, "game") for uid in uids}

    async def route(self, uid: str) -> tuple[int, int | None, str]:
        pod_set = await self.states.load(NS, "game")
        route = await self.router.route(NS, self.service, pod_set, uid)
        return route.pod.index, route.previous, route.reason


async def make_setup(store: LinkStore, rate_per_s: float = 50.0) -> Setup:
    addresses = tuple(f"127.0.0.1:{9000 + index}" for index in range(3))
    settings = ServiceSettings(
        name="game",
        pods=addresses,
        max_moves_per_s=rate_per_s,
        slow_start_s=0.0,
    )
    service = Service(settings)
    states = PodStates(store, {"game": service})
    router = Router(store, LinkCache(0, 1000), LINK_TTL_S)
    fake = FakeTime()
    pacer = Pacer(rate_per_s, clock=fake.clock, sleep=fake.sleep)
    handler = FailoverHandler(service, store, states, router, pacer, page_size=4)
    pod_set = await states.load(NS, "game")
    linked = {}
    for number in range(USERS):
        uid = f"user-{number}"
        linked[uid] = (await router.route(NS, service, pod_set, uid)).pod.index
    await router.wait_background()
    return Setup(store, service, states, router, handler, fake, linked)


@pytest.fixture
async def setup(store: LinkStore) -> AsyncIterator[Setup]:
    prepared = await make_setup(store)
    stopping = asyncio.Event()
    task = asyncio.create_task(prepared.handler.run(stopping))
    await prepared.handler.ready.wait()
    try:
        yield prepared
    finally:
        stopping.set()
        await asyncio.wait_for(task, WAIT_S)


async def wait_for_event(handler: FailoverHandler, kind: EventType) -> HistoryEvent:
    """Poll the history until an event of `kind` appears, and return it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for event in handler.history.events():
            if event.type is kind:
                return event
        await asyncio.sleep(0.005)
    pytest.fail(f"no {kind} event within {WAIT_S} s: {handler.history.events()}")


async def fail_and_wait(setup: Setup, index: int) -> None:
    setup.fail(index)
    await wait_for_event(setup.handler, EventType.POD_FAILURE)
    await asyncio.wait_for(setup.handler.wait_runs(), WAIT_S)


# Failover runs.


async def test_failed_pod_users_all_move(setup: Setup) -> None:
    leaving = setup.users_of(1)

    await fail_and_wait(setup, 1)

    links = await setup.links(leaving)
    assert len(leaving) == 10
    assert [uid for uid, pod in links.items() if pod not in (0, 2)] == []


async def test_other_pods_users_never_move(setup: Setup) -> None:
    staying = setup.users_of(0) + setup.users_of(2)

    await fail_and_wait(setup, 1)

    assert await setup.links(staying) == {uid: setup.linked[uid] for uid in staying}


async def test_moved_users_leave_failed_index(setup: Setup) -> None:
    await fail_and_wait(setup, 1)

    remaining = await setup.store.indexed_uids(NS, "game", 1, now_ms(), 100)
    on_zero = await setup.store.indexed_uids(NS, "game", 0, now_ms(), 100)
    on_two = await setup.store.indexed_uids(NS, "game", 2, now_ms(), 100)
    assert remaining == []
    assert len(on_zero) + len(on_two) == USERS


async def test_history_records_failure_then_moves(setup: Setup) -> None:
    leaving = setup.users_of(1)

    await fail_and_wait(setup, 1)

    migrated, failure = setup.handler.history.events()
    assert failure.type is EventType.POD_FAILURE
    assert failure.pod == 1
    assert failure.users == 10
    assert sorted(failure.sample) == leaving
    assert failure.reason.startswith("failed 3 probes in a row")
    assert migrated.type is EventType.USER_MIGRATED
    assert migrated.namespace == NS
    assert migrated.users == 10
    assert migrated.reason == FAILOVER_REASON
    assert sorted(migrated.sample) == leaving


async def test_moves_are_paced_per_service(setup: Setup) -> None:
    await fail_and_wait(setup, 1)

    # The first move waits for no one; the 9 others wait 1/50 s each.
    assert setup.time.sleeps == pytest.approx([0.02] * 9)


async def test_next_request_learns_of_move(setup: Setup) -> None:
    [uid, *_] = setup.users_of(1)
    await fail_and_wait(setup, 1)

    first = await setup.route(uid)
    second = await setup.route(uid)

    assert first[1:] == (1, FAILOVER_REASON)
    assert first[0] in (0, 2)
    assert second == (first[0], None, "")


async def test_recovery_stops_run_early(setup: Setup) -> None:
    leaving = setup.users_of(1)

    async def recover_after_three_moves() -> None:
        if len(setup.time.sleeps) == 3:
            setup.recover(1)

    setup.time.on_sleep = recover_after_three_moves
    await fail_and_wait(setup, 1)

    links = await setup.links(leaving)
    migrated = await wait_for_event(setup.handler, EventType.USER_MIGRATED)
    assert sum(1 for pod in links.values() if pod == 1) == 7
    assert migrated.users == 3
    assert migrated.reason == "failover, stopped: pod recovered"


async def test_recovery_is_recorded(setup: Setup) -> None:
    await fail_and_wait(setup, 1)

    setup.recover(1)
    recovery = await wait_for_event(setup.handler, EventType.POD_RECOVERY)

    assert recovery.pod == 1
    assert recovery.reason == "passed 2 probes in a row"


async def test_recovered_pod_keeps_no_one_back(setup: Setup) -> None:
    leaving = setup.users_of(1)
    await fail_and_wait(setup, 1)
    moved = await setup.links(leaving)

    setup.recover(1)
    await wait_for_event(setup.handler, EventType.POD_RECOVERY)
    routed = {uid: (await setup.route(uid))[0] for uid in leaving}

    assert routed == moved


async def test_request_move_counted_once(setup: Setup) -> None:
    leaving = setup.users_of(1)
    last = leaving[-1]
    request_moves: list[tuple[int, int | None, str]] = []

    async def route_last_user_first() -> None:
        if not request_moves:
            request_moves.append(await setup.route(last))

    setup.time.on_sleep = route_last_user_first
    await fail_and_wait(setup, 1)

    migrated = await wait_for_event(setup.handler, EventType.USER_MIGRATED)
    assert request_moves[0][1:] == (1, FAILOVER_REASON)
    assert setup.router.users_moved == 10
    assert migrated.users == 10
    assert (await setup.store.get(NS, last, "game")) == request_moves[0][0]


async def test_no_usable_pod_stops_run(setup: Setup) -> None:
    for index in range(3):
        setup.fail(index)
    await wait_for_event(setup.handler, EventType.POD_FAILURE)
    await asyncio.wait_for(setup.handler.wait_runs(), WAIT_S)

    kinds = [event.type for event in setup.handler.history.events()]
    assert kinds == [EventType.POD_FAILURE] * 3
    assert await setup.links(list(setup.linked)) == setup.linked


def test_history_keeps_newest_first() -> None:
    history = FailoverHistory(2)

    for pod in range(3):
        history.add(HistoryEvent(pod, EventType.POD_FAILURE, pod, "", "", 0))

    assert [event.pod for event in history.events()] == [2, 1]


async def test_pacer_spaces_calls() -> None:
    fake = FakeTime()
    pacer = Pacer(4.0, clock=fake.clock, sleep=fake.sleep)

    for _ in range(5):
        await pacer.wait()

    assert fake.sleeps == [0.25] * 4


# Migrating one user.


async def test_migration_moves_link(store: LinkStore) -> None:
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)

    migration = await setup.handler.migrate_user(NS, uid, 2)

    assert (migration.pod, migration.previous, migration.moved) == (2, 1, True)
    assert await store.get(NS, uid, "game") == 2
    indexed = await store.indexed_uids(NS, "game", 2, now_ms(), 100)
    assert sorted(indexed) == sorted([*setup.users_of(2), uid])


async def test_migration_marks_next_request(store: LinkStore) -> None:
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)

    await setup.handler.migrate_user(NS, uid, 0)
    routed = await setup.route(uid)

    assert routed == (0, 1, MIGRATED_REASON)


async def test_migration_keeps_persistent_link(store: LinkStore) -> None:
    setup = await make_setup(store)
    await store.set(NS, "owner", "game", 0, PERSISTENT)

    migration = await setup.handler.migrate_user(NS, "owner", 1)

    assert migration.persistent
    assert await store.link_ttl(NS, "owner", "game") == PERSISTENT
    assert await store.linked_services(NS, "owner") == {"game": 1}


async def test_migration_keeps_temporary_link_temporary(store: LinkStore) -> None:
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)

    await setup.handler.migrate_user(NS, uid, 0)

    ttl = await store.link_ttl(NS, uid, "game")
    assert ttl is not None
    assert 0 < ttl <= LINK_TTL_S


async def test_migration_to_same_pod_is_noop(store: LinkStore) -> None:
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)

    migration = await setup.handler.migrate_user(NS, uid, 1)

    assert not migration.moved
    assert setup.handler.history.events() == []


async def test_migration_records_history(store: LinkStore) -> None:
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)

    await setup.handler.migrate_user(NS, uid, 2)

    [event] = setup.handler.history.events()
    assert event.type is EventType.USER_MIGRATED
    assert (event.pod, event.target, event.users) == (1, 2, 1)
    assert event.sample == (uid,)


async def rejection(setup: Setup, uid: str, target: int) -> MigrationRejected:
    with pytest.raises(MigrationRejected) as caught:
        await setup.handler.migrate_user(NS, uid, target)
    return caught.value


async def test_migration_rejects_draining_pod(store: LinkStore) -> None:
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)
    draining = PodState(0, Routing.DENY_NEW_CALL, now_ms())
    await store.publish_pod_state(NS, "game", 2, draining.encode())
    await setup.states.refresh(NS, "game")

    error = await rejection(setup, uid, 2)

    assert error.code == "pod_not_routable"
    assert await store.get(NS, uid, "game") == 1


async def test_migration_rejects_unhealthy_pod(store: LinkStore) -> None:
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)
    setup.fail(2)

    error = await rejection(setup, uid, 2)

    assert error.code == "pod_unhealthy"
    assert setup.service.health.state(setup.pod(2)) is HealthState.UNHEALTHY


async def test_migration_rejects_unknown_pod(store: LinkStore) -> None:
    setup = await make_setup(store)

    error = await rejection(setup, "user-0", 7)

    assert error.code == "unknown_pod"


async def test_migration_needs_existing_link(store: LinkStore) -> None:
    setup = await make_setup(store)

    error = await rejection(setup, "nobody", 0)

    assert error.code == "no_link"


class StaleReadStore(MemoryStore):
    """A memory store whose `read_link` returns the link as it was first read."""

    def __init__(self) -> None:
        super().__init__()
        self.stale: dict[str, tuple[int, bool]] = {}

    async def read_link(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> tuple[int, bool] | None:
        if uid in self.stale:
            return self.stale[uid]
        return await super().read_link(namespace, uid, service, ttl_s)


async def test_concurrent_change_rejects_migration() -> None:
    store = StaleReadStore()
    setup = await make_setup(store)
    [uid, *_] = setup.users_of(1)
    store.stale[uid] = (1, False)
    await store.set(NS, uid, "game", 0, LINK_TTL_S)

    error = await rejection(setup, uid, 2)

    assert error.code == "link_changed"
    assert error.pod == 0
    assert await store.get(NS, uid, "game") == 0


async def test_failure_drops_cached_links_to_pod(setup: Setup) -> None:
    setup.router.cache = LinkCache(240, 1000)
    moved_elsewhere = setup.users_of(1)[0]
    key = (NS, "game", moved_elsewhere)
    setup.router.cache.put(key, 1)
    # Another proxy moves the user first, so this proxy's own move fails.
    await setup.store.replace_if_pod(NS, moved_elsewhere, "game", 1, 0, LINK_TTL_S)

    await fail_and_wait(setup, 1)

    assert setup.router.cache.get(key) is None


async def test_background_moves_are_counted(setup: Setup) -> None:
    before = setup.router.users_moved

    await fail_and_wait(setup, 1)

    assert setup.router.users_moved - before == 10
