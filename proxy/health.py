"""The health of the pods of a service, kept apart from strategies and pod sets.

Every `Service` owns one `HealthTable`, keyed by `Pod` like its `PodStats`,
so rebuilding a strategy or a pod set never resets health. Two checks feed
it:

- **Active probes** (`proxy.probe`): a pod becomes UNHEALTHY after
  ``unhealthy_threshold`` failed probes in a row, and healthy again after
  ``healthy_threshold`` passed probes in a row.
- **Passive outlier detection**: ``consecutive_failures`` failed requests
  in a row, reported by the forwarder with `HealthTable.record`, make a pod
  EJECTED for ``base_ejection_s`` times the number of its ejections, at most
  ``max_ejection_s``. Every ``max_ejection_s`` without an ejection lowers
  that number by one. A pod is not ejected when that would put more than
  ``max_ejection_percent`` of its pool out at once, the pod itself counted.

A pod is usable while it is HEALTHY, that is neither UNHEALTHY nor EJECTED.
Pods start HEALTHY. Every change between usable and unusable is a
`Transition`, put on the queue of each subscriber without waiting, so the
request path never blocks on an observer. A pod that becomes usable again
is in slow start for ``slow_start_s``: `slow_start_share` grows from 0 to 1
over that time, and routing offers the pod to new users with that
probability.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from proxy.logs import REPEAT_EXEMPT
from proxy.pods import Pod

if TYPE_CHECKING:
    from proxy.config import ServiceSettings

logger = logging.getLogger("stateful_route.health")

# Maximum entries of one table. Registry pods that change address get new
# entries, so beyond this a usable entry is dropped, the oldest first.
MAX_ENTRIES = 4096
# Transitions a subscriber may fall behind by. Beyond it the oldest waiting
# transition is dropped and counted in `HealthTable.dropped_transitions`.
QUEUE_SIZE = 1024


class HealthState(StrEnum):
    """The health state of one pod, which decides whether routing uses it."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"


@dataclass(frozen=True, slots=True)
class Transition:
    """A pod of `service` that became usable or unusable, and the reason."""

    service: str
    pod: Pod
    old: HealthState
    new: HealthState
    reason: str

    @property
    def usable(self) -> bool:
        return self.new is HealthState.HEALTHY


class PodHealth:
    """The health of one pod, changed only through its `HealthTable`."""

    __slots__ = (
        "ejected_until",
        "ejections",
        "failed_probes",
        "last_failure",
        "last_probe_error",
        "passive_failures",
        "probe_failures",
        "probe_healthy",
        "probe_successes",
        "probes",
        "refused_ejections",
        "returned_at",
        "state",
    )

    def __init__(self) -> None:
        self.state = HealthState.HEALTHY
        self.probe_healthy = True
        self.probe_successes = 0
        self.probe_failures = 0
        self.probes = 0
        self.failed_probes = 0
        self.last_probe_error = ""
        self.passive_failures = 0
        self.last_failure = ""
        # Clock time the current ejection ends, None while not ejected.
        self.ejected_until: float | None = None
        self.ejections = 0
        self.refused_ejections = 0
        # Clock time the last ejection ended, None before the first one.
        self.returned_at: float | None = None


class HealthTable:
    """The health of the pods of one service.

    :param settings: the service's settings with the thresholds.
    :param clock: returns monotonic seconds.
    :param max_entries: entries kept before usable ones are dropped.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.service = settings.name
        self.configure(settings)
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[Pod, PodHealth] = {}
        self._ejected: dict[Pod, float] = {}
        self._next_ejection_end = math.inf
        self._unusable = 0
        self._version = 0
        # Pod -> clock time it became usable again, while in slow start.
        self._warming: dict[Pod, float] = {}
        self._pools: dict[Pod, frozenset[Pod]] = {}
        self._subscribers: list[asyncio.Queue[Transition]] = []
        self.dropped_transitions = 0
        # Panic mode, set by the router, which routes on pods that health
        # finds unusable when none is usable. Kept here for the admin API.
        self.panic_namespaces: set[str] = set()
        self.panic_entries = 0
        self.panic_routes = 0

    def configure(self, settings: ServiceSettings) -> None:
        """Take the thresholds of `settings`, keeping the state of every pod.

        New thresholds apply from the next probe or request on, and an
        ejection in progress keeps its end time.
        """
        self._healthy_threshold = settings.healthy_threshold
        self._unhealthy_threshold = settings.unhealthy_threshold
        self._consecutive_failures = settings.consecutive_failures
        self._base_ejection_s = settings.base_ejection_s
        self._max_ejection_s = settings.max_ejection_s
        self._max_ejection_percent = settings.max_ejection_percent
        self._slow_start_s = settings.slow_start_s

    def now(self) -> float:
        """Return the current time of the table's clock, in seconds."""
        return self._clock()

    @property
    def version(self) -> int:
        """A number that changes whenever a pod becomes usable or unusable.

        Ends the ejections that are due first, so a view of the usable pods
        cached by version is rebuilt when an ejection ends.
        """
        if self._ejected and self._next_ejection_end <= self._clock():
            self.end_due_ejections()
        return self._version

    @property
    def in_slow_start(self) -> bool:
        """Whether any pod may still be in slow start."""
        return bool(self._warming)

    def get(self, pod: Pod) -> PodHealth | None:
        return self._entries.get(pod)

    def state(self, pod: Pod) -> HealthState:
        self.usable(pod)
        entry = self._entries.get(pod)
        return HealthState.HEALTHY if entry is None else entry.state

    def usable(self, pod: Pod) -> bool:
        """Return whether `pod` is HEALTHY, ending its ejection when it is due."""
        entry = self._entries.get(pod)
        if entry is None or entry.state is HealthState.HEALTHY:
            return True
        if entry.ejected_until is not None and entry.ejected_until <= self._clock():
            self.end_due_ejections()
            # The call above changed the state, which mypy cannot see.
            return _is_healthy(entry)
        return False

    def usable_pods(self, pods: tuple[Pod, ...]) -> tuple[Pod, ...]:
        """Return the usable pods of `pods`, `pods` itself when all are."""
        if not self._unusable:
            return pods
        kept = tuple(pod for pod in pods if self.usable(pod))
        return pods if len(kept) == len(pods) else kept

    def slow_start_share(self, pod: Pod) -> float:
        """Return the share of new users `pod` may take now, from 0 to 1.

        It grows linearly over ``slow_start_s`` after the pod became usable
        again, and is 1 outside slow start.
        """
        since = self._warming.get(pod)
        if since is None:
            return 1.0
        elapsed = self._clock() - since
        if elapsed >= self._slow_start_s:
            del self._warming[pod]
            return 1.0
        return max(0.0, elapsed / self._slow_start_s)

    def record_probe(self, pod: Pod, error: str | None) -> None:
        """Count one active probe of `pod`: passed when `error` is None."""
        entry = self._entry(pod)
        entry.probes += 1
        if error is None:
            entry.probe_failures = 0
            entry.probe_successes += 1
            if (
                not entry.probe_healthy
                and entry.probe_successes >= self._healthy_threshold
            ):
                entry.probe_healthy = True
                self._update(
                    pod, entry, f"passed {entry.probe_successes} probes in a row"
                )
            return

        entry.failed_probes += 1
        entry.last_probe_error = error
        entry.probe_successes = 0
        entry.probe_failures += 1
        if entry.probe_healthy and entry.probe_failures >= self._unhealthy_threshold:
            entry.probe_healthy = False
            self._update(
                pod,
                entry,
                f"failed {entry.probe_failures} probes in a row, last error: {error}",
            )

    def record(self, pod: Pod, ok: bool, kind: str) -> None:
        """Count the outcome of one proxied request, for passive detection.

        `kind` describes a failure for the log and the admin API, such as
        "status 503" or "connect error". A success of a pod without recent
        failures costs one dictionary lookup, so every request may call it.
        """
        if self._consecutive_failures == 0:
            return
        entry = self._entries.get(pod)
        if ok:
            if entry is not None and entry.passive_failures:
                entry.passive_failures = 0
            return
        if entry is None:
            entry = self._entry(pod)
        entry.passive_failures += 1
        entry.last_failure = kind
        if (
            entry.passive_failures >= self._consecutive_failures
            and entry.ejected_until is None
            and entry.probe_healthy
        ):
            self._eject(pod, entry, kind)

    def end_due_ejections(self) -> None:
        """End every ejection whose time has come."""
        now = self._clock()
        if self._next_ejection_end > now:
            return
        for pod, until in list(self._ejected.items()):
            if until > now:
                continue
            entry = self._entries[pod]
            del self._ejected[pod]
            entry.ejected_until = None
            entry.returned_at = now
            entry.passive_failures = 0
            self._update(pod, entry, "the ejection time is over")
        self._next_ejection_end = min(self._ejected.values(), default=math.inf)

    def next_ejection_end(self) -> float:
        """Return the clock time the next ejection ends, inf when none is due."""
        return self._next_ejection_end

    def set_pools(self, pools: Iterable[Collection[Pod]]) -> None:
        """Set the groups of pods that ``max_ejection_percent`` applies to.

        A pod outside every pool counts as a pool of all pods in the table.
        """
        pool_of: dict[Pod, frozenset[Pod]] = {}
        for pool in pools:
            members = frozenset(pool)
            for pod in members:
                pool_of[pod] = members
        self._pools = pool_of

    def retain(self, pods: Collection[Pod]) -> None:
        """Drop the entries of pods that are not in `pods`, which left the service."""
        for pod in [pod for pod in self._entries if pod not in pods]:
            self._remove(pod)

    def subscribe(self, size: int = QUEUE_SIZE) -> asyncio.Queue[Transition]:
        """Return a new queue that receives every transition from now on."""
        queue: asyncio.Queue[Transition] = asyncio.Queue(size)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Transition]) -> None:
        self._subscribers.remove(queue)

    def _eject(self, pod: Pod, entry: PodHealth, kind: str) -> None:
        self.end_due_ejections()
        pool: Collection[Pod] | None = self._pools.get(pod)
        if pool is None:
            pool = self._entries.keys() | {pod}
        ejected = sum(1 for other in pool if other in self._ejected)
        if (ejected + 1) * 100 > self._max_ejection_percent * len(pool):
            entry.refused_ejections += 1
            logger.debug(
                "not ejecting pod=%d service=%s: %d of %d pods are ejected, at "
                "most %d%% may be",
                pod.index,
                self.service,
                ejected,
                len(pool),
                self._max_ejection_percent,
            )
            return

        now = self._clock()
        if entry.returned_at is not None:
            quiet_periods = int((now - entry.returned_at) // self._max_ejection_s)
            entry.ejections = max(0, entry.ejections - quiet_periods)
        entry.ejections += 1
        duration_s = min(self._base_ejection_s * entry.ejections, self._max_ejection_s)
        entry.ejected_until = now + duration_s
        self._ejected[pod] = entry.ejected_until
        self._next_ejection_end = min(self._next_ejection_end, entry.ejected_until)
        self._update(
            pod,
            entry,
            f"{entry.passive_failures} failed requests in a row, last: {kind}, "
            f"ejected for {duration_s:g} s",
        )

    def _update(self, pod: Pod, entry: PodHealth, reason: str) -> None:
        """Derive the pod's state, and publish the change when usability flips."""
        if not entry.probe_healthy:
            new = HealthState.UNHEALTHY
        elif entry.ejected_until is not None:
            new = HealthState.EJECTED
        else:
            new = HealthState.HEALTHY
        old = entry.state
        if new is old:
            return
        entry.state = new
        if (old is HealthState.HEALTHY) == (new is HealthState.HEALTHY):
            return  # from UNHEALTHY to EJECTED or back: still unusable

        self._version += 1
        if new is HealthState.HEALTHY:
            self._unusable -= 1
            if self._slow_start_s > 0:
                self._warming[pod] = self._clock()
        else:
            self._unusable += 1
            self._warming.pop(pod, None)
        self._publish(Transition(self.service, pod, old, new, reason))

    def _publish(self, transition: Transition) -> None:
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.dropped_transitions += 1
            queue.put_nowait(transition)

    def _entry(self, pod: Pod) -> PodHealth:
        entry = self._entries.get(pod)
        if entry is not None:
            return entry
        if len(self._entries) >= self._max_entries:
            for other, health in self._entries.items():
                if health.state is HealthState.HEALTHY:
                    self._remove(other)
                    break
        entry = self._entries[pod] = PodHealth()
        return entry

    def _remove(self, pod: Pod) -> None:
        entry = self._entries.pop(pod)
        if entry.state is not HealthState.HEALTHY:
            self._unusable -= 1
            self._version += 1
        if self._ejected.pop(pod, None) is not None:
            self._next_ejection_end = min(self._ejected.values(), default=math.inf)
        self._warming.pop(pod, None)

    def __len__(self) -> int:
        return len(self._entries)


def _is_healthy(entry: PodHealth) -> bool:
    return entry.state is HealthState.HEALTHY


async def next_transition(
    queue: asyncio.Queue[Transition], stopping: asyncio.Event
) -> Transition | None:
    """Return the next transition of `queue`, or None once `stopping` is set.

    Waits for a transition when none is queued. Queued ones come first.
    """
    if not queue.empty():
        return queue.get_nowait()
    if stopping.is_set():
        return None
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((getter, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None


def log_transition(transition: Transition) -> None:
    """Log one transition: WARNING when the pod became unusable, INFO when usable.

    The lines are exempt from the repeat filter, which would otherwise hide
    which pods went down when many go down at once. The health thresholds
    bound how often one pod can change state.
    """
    pod = transition.pod
    log = logger.info if transition.usable else logger.warning
    log(
        "pod=%d service=%s at %s is now %s (was %s): %s",
        pod.index,
        transition.service,
        pod.address,
        transition.new,
        transition.old,
        transition.reason,
        extra=REPEAT_EXEMPT,
    )


async def log_transitions(
    queue: asyncio.Queue[Transition], stopping: asyncio.Event
) -> None:
    """Log every transition of `queue` until `stopping` is set."""
    while (transition := await next_transition(queue, stopping)) is not None:
        log_transition(transition)


class TransitionCounts:
    """Counts of transitions per pod, a subscriber that the admin API reads."""

    def __init__(self) -> None:
        self.down: Counter[Pod] = Counter()
        self.up: Counter[Pod] = Counter()

    def count(self, transition: Transition) -> None:
        counter = self.up if transition.usable else self.down
        counter[transition.pod] += 1

    def retain(self, pods: Collection[Pod]) -> None:
        """Drop the counts of pods that are not in `pods`, which left the service."""
        for counter in (self.down, self.up):
            for pod in [pod for pod in counter if pod not in pods]:
                del counter[pod]

    async def run(
        self, queue: asyncio.Queue[Transition], stopping: asyncio.Event
    ) -> None:
        """Count every transition of `queue` until `stopping` is set."""
        while (transition := await next_transition(queue, stopping)) is not None:
            self.count(transition)
