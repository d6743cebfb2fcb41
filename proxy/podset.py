"""The pods of one (namespace, service) with their state, as routing uses them.

A pod is *available* when its record is fresh and its routing state is not
SHUTDOWN: users linked to it stay. A pod is *routable* when it is available
and READY: new users may be linked to it. A DENY_NEW_CALL pod is available
but not routable, which is how a pod drains.

A configured pod without any record counts as READY with load 0, unless the
service sets ``require_pod_state``, so a service without publishers works.
A record that cannot be parsed counts as no record. Without
``require_pod_state``, a drain written through the admin API does not go
stale, so draining a pod that has no publisher lasts until undrain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import ServiceSettings
from proxy.pods import Pod, parse_address
from proxy.podstate import DRAINED_BY_ADMIN, PodState, Routing


@dataclass(frozen=True, slots=True)
class PodStatus:
    """One pod with its record and what the record allows.

    `reason` is why the pod is not routable, or "ready".
    """

    pod: Pod
    state: PodState | None
    fresh: bool
    available: bool
    routable: bool
    reason: str

    @property
    def load(self) -> int:
        return 0 if self.state is None else self.state.load


class PodSet:
    """A snapshot of the pods of one service in one namespace.

    Built from the configuration and the state records every time the
    records are read, so a request only looks values up.
    """

    __slots__ = ("built_ms", "namespace", "routable", "service", "statuses")

    def __init__(
        self,
        namespace: str,
        service: str,
        statuses: Mapping[int, PodStatus],
        built_ms: int,
    ) -> None:
        self.namespace = namespace
        self.service = service
        self.statuses = dict(sorted(statuses.items()))
        self.routable = tuple(
            status.pod for status in self.statuses.values() if status.routable
        )
        self.built_ms = built_ms

    def get(self, index: int) -> PodStatus | None:
        return self.statuses.get(index)

    def is_available(self, index: int) -> bool:
        status = self.statuses.get(index)
        return status is not None and status.available

    def load(self, index: int) -> int:
        status = self.statuses.get(index)
        return 0 if status is None else status.load

    def __len__(self) -> int:
        return len(self.statuses)


def parse_records(records: Mapping[str, str]) -> tuple[dict[int, PodState], list[str]]:
    """Parse a raw state hash; return the valid records and one problem per bad one."""
    parsed: dict[int, PodState] = {}
    problems: list[str] = []
    for field, text in records.items():
        # Only canonical decimals, so "007" cannot stand in for pod 7.
        if not field.isdecimal() or not field.isascii() or str(int(field)) != field:
            problems.append(f"field {field!r} is not a pod index")
            continue
        try:
            parsed[int(field)] = PodState.decode(text)
        except ValueError as exc:
            problems.append(f"record of pod {field}: {exc}")
    return parsed, problems


def build_pod_set(
    settings: ServiceSettings,
    namespace: str,
    configured: tuple[Pod, ...] | None,
    records: Mapping[int, PodState],
    at_ms: int,
) -> PodSet:
    """Combine configured pods (or, for registry discovery, records) into a set."""
    statuses: dict[int, PodStatus] = {}
    if settings.uses_registry:
        for index, state in records.items():
            if state.address is None or not state.is_fresh(
                at_ms, settings.state_stale_after_s
            ):
                continue
            pod = Pod(index, parse_address(state.address))
            statuses[index] = _status(pod, state, settings, at_ms)
    else:
        for pod in configured or ():
            statuses[pod.index] = _status(pod, records.get(pod.index), settings, at_ms)
    return PodSet(namespace, settings.name, statuses, at_ms)


def _status(
    pod: Pod, state: PodState | None, settings: ServiceSettings, at_ms: int
) -> PodStatus:
    if state is None:
        if settings.require_pod_state:
            return PodStatus(pod, None, False, False, False, "no record")
        return PodStatus(pod, None, False, True, True, "ready")
    fresh = state.is_fresh(at_ms, settings.state_stale_after_s)
    if not fresh and state.drained_by == DRAINED_BY_ADMIN:
        # Without require_pod_state, records are not how a pod proves it is
        # alive, so an operator's drain lasts until undrain even when no
        # sidecar republishes it.
        fresh = not settings.require_pod_state
    if not fresh:
        return PodStatus(pod, state, False, False, False, "stale")
    if state.routing is Routing.SHUTDOWN:
        return PodStatus(pod, state, True, False, False, "shutdown")
    if state.routing is Routing.DENY_NEW_CALL:
        return PodStatus(pod, state, True, True, False, "draining")
    return PodStatus(pod, state, True, True, True, "ready")
