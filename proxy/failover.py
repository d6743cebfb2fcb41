"""Failover: move the users of a pod that became unusable, and keep a history.

A `FailoverHandler` subscribes to the health transitions of one service.
When a pod becomes unusable, the handler records a POD_FAILURE event, then
pages through the per-pod index of linked UIDs in every namespace where this
proxy has a pod set with that pod. It moves each user with `replace_if_pod`,
which relinks only while the link still names the failed pod. The router
moves a user who sends a request first with the same compare-and-set, so
each user moves exactly once. The new pod is chosen by the service's
strategy among the usable routable pods. Moves of one service are paced to
``max_moves_per_s``, and a run stops early when the pod becomes usable
again. Links to other pods are never changed, and nobody is moved back when
the pod recovers. Moved links are temporary, like the links the router
moves on a request, so the new pod writes a persistent link again when it
takes ownership.

NOTE: the index only lists UIDs of namespaces this proxy has served since it
started. Users of other namespaces, and users whose request reaches another
proxy before its handler moved them, are moved by their next request.

The history keeps the last ``history_size`` events of the service:
POD_FAILURE and POD_RECOVERY when a pod becomes unusable or usable, and
USER_MIGRATED when a failover run ends (the users moved off one pod in one
namespace, by the handler or by their own requests meanwhile) or an operator
migrated a user with `FailoverHandler.migrate_user`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from proxy.errors import NoPodError, StatefulRouteError, StoreError
from proxy.health import Transition, next_transition
from proxy.pods import Pod
from proxy.podstate import now_ms
from proxy.routing import FAILOVER_REASON, MIGRATED_REASON, Router
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.store.base import PERSISTENT, LinkStore

logger = logging.getLogger("stateful_route.failover")

# UIDs kept in one history event.
SAMPLE_SIZE = 10
# UIDs read from the index per page.
PAGE_SIZE = 100


class EventType(StrEnum):
    """The kinds of failover history events."""

    POD_FAILURE = "POD_FAILURE"
    POD_RECOVERY = "POD_RECOVERY"
    USER_MIGRATED = "USER_MIGRATED"


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One failover event of a service.

    `pod` is the pod that failed, recovered or lost users, `target` the pod
    an operator moved a user to, `users` how many users were affected (None
    when the store could not count them) and `sample` some of their UIDs.
    """

    time_ms: int
    type: EventType
    pod: int
    address: str
    reason: str
    users: int | None
    sample: tuple[str, ...] = ()
    namespace: str | None = None
    target: int | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "time_ms": self.time_ms,
            "type": self.type.value,
            "pod": self.pod,
            "address": self.address,
            "namespace": self.namespace,
            "target": self.target,
            "reason": self.reason,
            "users": self.users,
            "sample": list(self.sample),
        }


class FailoverHistory:
    """The last `size` events of one service."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._events: deque[HistoryEvent] = deque(maxlen=size)

    def add(self, event: HistoryEvent) -> None:
        self._events.append(event)

    def resize(self, size: int) -> None:
        """Keep the last `size` events from now on, dropping older ones now."""
        if size != self.size:
            self.size = size
            self._events = deque(self._events, maxlen=size)

    def events(self) -> list[HistoryEvent]:
        """Return the events, newest first."""
        return list(reversed(self._events))

    def __len__(self) -> int:
        return len(self._events)


class MigrationRejected(StatefulRouteError):
    """A migration that `FailoverHandler.migrate_user` did not make.

    `code` is "unknown_pod", "pod_not_routable", "pod_unhealthy", "no_link"
    or "link_changed". `pod` is the pod involved, when there is one.
    """

    def __init__(self, code: str, message: str, pod: int | None = None) -> None:
        self.code = code
        self.message = message
        self.pod = pod
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Migration:
    """The outcome of `FailoverHandler.migrate_user`."""

    pod: int
    previous: int
    moved: bool
    persistent: bool


class _Outcome(Enum):
    MOVED = "moved"
    GONE = "gone"  # the link names another pod or expired, so the entry went
    NO_TARGET = "no usable pod to move users to"
    NO_POD_SET = "the namespace is no longer in use"


@dataclass(slots=True)
class _Run:
    """The users moved off one pod in one namespace by one failover run."""

    pod: Pod
    namespace: str
    moved: int = 0
    sample: list[str] = field(default_factory=list)

    def note(self, uid: str) -> None:
        self.moved += 1
        if len(self.sample) < SAMPLE_SIZE:
            self.sample.append(uid)


class Pacer:
    """Spaces calls of `wait` at least 1 / `rate_per_s` seconds apart.

    :param rate_per_s: calls per second at most.
    :param clock: returns monotonic seconds.
    :param sleep: waits, and tests pass a fake one.
    """

    def __init__(
        self,
        rate_per_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._gap_s = 1.0 / rate_per_s
        self._clock = clock
        self._sleep = sleep
        self._next_at = -float("inf")

    async def wait(self) -> None:
        """Return once the previous call is at least the gap in the past."""
        now = self._clock()
        slot = max(self._next_at, now)
        self._next_at = slot + self._gap_s
        if slot > now:
            await self._sleep(slot - now)


class FailoverHandler:
    """Moves the users of the pods of one service that become unusable.

    :param service: the service whose health transitions it handles.
    :param store: the link store with the per-pod index.
    :param states: the pod sets in use.
    :param router: chooses new pods and learns of each move.
    :param pacer: paces the moves, at ``max_moves_per_s`` when not given.
    :param page_size: UIDs read from the index at once.
    """

    def __init__(
        self,
        service: Service,
        store: LinkStore,
        states: PodStates,
        router: Router,
        pacer: Pacer | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._service = service
        self._store = store
        self._states = states
        self._router = router
        settings = service.settings
        self._moves_per_s = settings.max_moves_per_s
        self._pacer = pacer or Pacer(settings.max_moves_per_s)
        self._page_size = page_size
        self.history = FailoverHistory(settings.history_size)
        self._queue = service.health.subscribe()
        self._runs: dict[Pod, asyncio.Task[None]] = {}
        # Failures that arrived while a run of the same pod was still ending.
        self._again: dict[Pod, str] = {}
        self._closing = False
        self._open: dict[tuple[str, int], _Run] = {}
        router.move_observers.append(self._on_route_move)
        self.ready = asyncio.Event()
        """Set once the handler waits for transitions."""

    def reconfigure(self) -> None:
        """Take the service's new pace and history size, as after a reload.

        Runs in progress continue at the new pace, and the history keeps
        its newest events.
        """
        settings = self._service.settings
        if settings.max_moves_per_s != self._moves_per_s:
            self._moves_per_s = settings.max_moves_per_s
            self._pacer = Pacer(settings.max_moves_per_s)
        self.history.resize(settings.history_size)

    def detach(self) -> None:
        """Stop observing the router and the health table, for a removed service.

        Call it once. `run` still has to end, through its stop event.
        """
        if self._on_route_move in self._router.move_observers:
            self._router.move_observers.remove(self._on_route_move)
        self._service.health.unsubscribe(self._queue)

    async def run(self, stopping: asyncio.Event) -> None:
        """Handle transitions until `stopping` is set, then cancel open runs."""
        self.ready.set()
        try:
            while (
                transition := await next_transition(self._queue, stopping)
            ) is not None:
                self.handle(transition)
        finally:
            self._closing = True
            tasks = list(self._runs.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def handle(self, transition: Transition) -> None:
        """Start a failover run for a pod that became unusable, or record a recovery."""
        pod = transition.pod
        if transition.usable:
            self.history.add(
                HistoryEvent(
                    now_ms(),
                    EventType.POD_RECOVERY,
                    pod.index,
                    str(pod.address),
                    transition.reason,
                    0,
                )
            )
            return
        if pod in self._runs:
            # The pod recovered and failed again while its run was ending.
            self._again[pod] = transition.reason
            return
        self._start(pod, transition.reason)

    def _start(self, pod: Pod, reason: str) -> None:
        task = asyncio.create_task(
            self.fail_over(pod, reason),
            name=f"failover-{self._service.name}-{pod.index}",
        )
        self._runs[pod] = task
        task.add_done_callback(lambda _: self._run_ended(pod))

    def _run_ended(self, pod: Pod) -> None:
        self._runs.pop(pod, None)
        reason = self._again.pop(pod, None)
        if reason is None or self._closing:
            return
        if not self._service.health.usable(pod):
            self._start(pod, reason)

    async def wait_runs(self) -> None:
        """Wait until every failover run has ended."""
        while self._runs:
            await asyncio.gather(*self._runs.values(), return_exceptions=True)
            # A run leaves _runs in its done callback, which the loop calls
            # soon after the run ends. From Python 3.12 on, gather over runs
            # that all ended can return without yielding to the loop, so
            # this loop would spin without ever letting that callback run.
            await asyncio.sleep(0)

    async def fail_over(self, pod: Pod, reason: str) -> None:
        """Record the failure of `pod` and move its users, namespace by namespace."""
        name = self._service.name
        namespaces = self._namespaces_of(pod)
        # Users that another proxy moves must not come back to this pod from
        # this proxy's cache once the pod is usable again, so every cached
        # link to it goes now and the next request reads the store.
        self._router.cache.drop_pod(set(namespaces), name, pod.index)
        users, sample = await self._count_users(pod, namespaces)
        self.history.add(
            HistoryEvent(
                now_ms(),
                EventType.POD_FAILURE,
                pod.index,
                str(pod.address),
                reason,
                users,
                tuple(sample),
            )
        )
        for namespace in namespaces:
            if self._service.health.usable(pod):
                break
            try:
                await self._migrate(pod, namespace)
            except Exception:
                logger.exception(
                    "failover of pod=%d service=%s namespace=%s failed",
                    pod.index,
                    name,
                    namespace,
                )

    def _namespaces_of(self, pod: Pod) -> list[str]:
        """Return the namespaces in use whose pod set contains `pod`."""
        name = self._service.name
        namespaces = []
        for namespace in self._states.namespaces_of(name):
            pod_set = self._states.peek(namespace, name)
            if pod_set is None:
                continue
            status = pod_set.get(pod.index)
            if status is not None and status.pod == pod:
                namespaces.append(namespace)
        return namespaces

    async def _count_users(
        self, pod: Pod, namespaces: list[str]
    ) -> tuple[int | None, list[str]]:
        name = self._service.name
        users = 0
        sample: list[str] = []
        try:
            for namespace in namespaces:
                at_ms = now_ms()
                temporary, persistent = await self._store.count_indexed(
                    namespace, name, pod.index, at_ms
                )
                users += temporary + persistent
                if len(sample) < SAMPLE_SIZE:
                    sample += await self._store.indexed_uids(
                        namespace, name, pod.index, at_ms, SAMPLE_SIZE - len(sample)
                    )
        except StoreError as exc:
            logger.warning(
                "cannot count the users of failed pod=%d service=%s: %s",
                pod.index,
                name,
                exc,
            )
            return None, sample
        return users, sample

    async def _migrate(self, pod: Pod, namespace: str) -> None:
        """Move the users of `pod` in `namespace` until none is left or it recovers."""
        name = self._service.name
        run = _Run(pod, namespace)
        self._open[(namespace, pod.index)] = run
        stopped = ""
        try:
            stopped = await self._move_all(pod, namespace, run)
        except StoreError as exc:
            stopped = f"store error: {exc}"
            logger.warning(
                "failover of pod=%d service=%s namespace=%s stopped after %d moves: %s",
                pod.index,
                name,
                namespace,
                run.moved,
                exc,
            )
        finally:
            del self._open[(namespace, pod.index)]
        self._end_run(run, stopped)

    async def _move_all(self, pod: Pod, namespace: str, run: _Run) -> str:
        """Move the indexed users of `pod`; return why it stopped early, or ""."""
        name = self._service.name
        health = self._service.health
        # The index may list a UID again while a request renews the entry of a
        # link it read before the move, so each UID is handled once.
        seen: set[str] = set()
        while True:
            page = await self._store.indexed_uids(
                namespace, name, pod.index, now_ms(), len(seen) + self._page_size
            )
            fresh = [uid for uid in page if uid not in seen]
            if not fresh:
                return ""
            for uid in fresh:
                seen.add(uid)
                await self._pacer.wait()
                if health.usable(pod):
                    return "pod recovered"
                outcome = await self._move(pod, namespace, uid)
                if outcome is _Outcome.MOVED:
                    run.note(uid)
                elif outcome is not _Outcome.GONE:
                    return str(outcome.value)

    async def _move(self, pod: Pod, namespace: str, uid: str) -> _Outcome:
        name = self._service.name
        pod_set = self._states.peek(namespace, name)
        if pod_set is None:
            return _Outcome.NO_POD_SET
        try:
            target = self._router.choose_target(
                namespace, self._service, pod_set, uid, pod.index
            )
        except NoPodError:
            target = None
        if target is None:
            return _Outcome.NO_TARGET

        key = (namespace, name, uid)
        ttl_s = self._router.link_ttl_s
        replaced, _ = await self._store.replace_if_pod(
            namespace, uid, name, pod.index, target.index, ttl_s, FAILOVER_REASON
        )
        if not replaced:
            await self._store.unindex_link(namespace, name, pod.index, uid)
            return _Outcome.GONE

        # Dropped, not updated: the next request reads the link and takes the
        # move notice, once, whichever proxy it goes through.
        self._router.cache.drop(key)
        self._router.users_moved += 1
        expires_ms = now_ms() + int(ttl_s * 1000)
        await self._store.index_link(
            namespace, name, target.index, uid, expires_ms, previous_pod=pod.index
        )
        logger.debug(
            "failover moved uid=%s service=%s namespace=%s from pod=%d to pod=%d",
            uid,
            name,
            namespace,
            pod.index,
            target.index,
        )
        return _Outcome.MOVED

    def _on_route_move(
        self,
        namespace: str,
        service: str,
        uid: str,
        previous: int,
        reason: str,
        pod: int,
    ) -> None:
        """Count a user that a request moved off a pod while its run is open."""
        if service != self._service.name or reason != FAILOVER_REASON:
            return
        run = self._open.get((namespace, previous))
        if run is not None:
            run.note(uid)

    def _end_run(self, run: _Run, stopped: str) -> None:
        name = self._service.name
        reason = FAILOVER_REASON if not stopped else f"failover, stopped: {stopped}"
        logger.info(
            "failover of pod=%d service=%s namespace=%s moved %d users%s",
            run.pod.index,
            name,
            run.namespace,
            run.moved,
            f", stopped: {stopped}" if stopped else "",
        )
        if run.moved == 0:
            return
        self.history.add(
            HistoryEvent(
                now_ms(),
                EventType.USER_MIGRATED,
                run.pod.index,
                str(run.pod.address),
                reason,
                run.moved,
                tuple(run.sample),
                namespace=run.namespace,
            )
        )

    async def migrate_user(self, namespace: str, uid: str, target: int) -> Migration:
        """Move the link of `uid` to pod `target`, which must be routable and usable.

        The move is a compare-and-set on the pod read first, so a concurrent
        change of the link makes it fail with "link_changed" instead of being
        overwritten. A persistent link stays persistent, because the operator
        moves the user's ownership to the new pod, and a temporary link gets
        the temporary TTL. Raises `MigrationRejected` when the move is not
        made, and `StoreError` when the store fails.
        """
        name = self._service.name
        pod_set = await self._states.load(namespace, name)
        status = pod_set.get(target)
        if status is None:
            raise MigrationRejected(
                "unknown_pod",
                f"pod {target} is not in the pod set of service {name!r} in "
                f"namespace {namespace!r}",
                target,
            )
        if not status.routable:
            raise MigrationRejected(
                "pod_not_routable",
                f"pod {target} is {status.reason}: a migrated user needs a "
                "routable (READY) pod",
                target,
            )
        health = self._service.health
        if not health.usable(status.pod):
            raise MigrationRejected(
                "pod_unhealthy",
                f"pod {target} is {health.state(status.pod)} by the health checks "
                "of this proxy; migrate to a pod that passes them",
                target,
            )

        read = await self._store.read_link(
            namespace, uid, name, self._router.link_ttl_s
        )
        if read is None:
            raise MigrationRejected(
                "no_link",
                f"UID {uid!r} has no link to service {name!r} in namespace "
                f"{namespace!r}",
            )
        current, persistent = read
        if current == target:
            return Migration(target, current, moved=False, persistent=persistent)
        previous = pod_set.get(current)
        address = "" if previous is None else str(previous.pod.address)
        return await self._relink(
            namespace, uid, current, address, status.pod, persistent
        )

    async def _relink(
        self,
        namespace: str,
        uid: str,
        current: int,
        current_address: str,
        target: Pod,
        persistent: bool,
    ) -> Migration:
        name = self._service.name
        key = (namespace, name, uid)
        ttl_s = PERSISTENT if persistent else self._router.link_ttl_s
        replaced, linked = await self._store.replace_if_pod(
            namespace, uid, name, current, target.index, ttl_s, MIGRATED_REASON
        )
        if not replaced:
            raise MigrationRejected(
                "link_changed",
                f"the link of UID {uid!r} changed during the migration, to "
                f"{'no pod' if linked is None else f'pod {linked}'}; read it and "
                "retry",
                linked,
            )

        self._router.cache.drop(key)
        self._router.users_moved += 1
        expires_ms = None if persistent else now_ms() + int(ttl_s * 1000)
        await self._store.index_link(
            namespace, name, target.index, uid, expires_ms, previous_pod=current
        )
        self.history.add(
            HistoryEvent(
                now_ms(),
                EventType.USER_MIGRATED,
                current,
                current_address,
                "admin migration",
                1,
                (uid,),
                namespace=namespace,
                target=target.index,
            )
        )
        logger.info(
            "admin migrated uid=%s service=%s namespace=%s from pod=%d to pod=%d",
            uid,
            name,
            namespace,
            current,
            target.index,
        )
        return Migration(target.index, current, moved=True, persistent=persistent)
