"""The pod state records in use, re-read from the store in the background.

Each (namespace, service) that traffic uses gets an entry on its first
request; `run` then re-reads its records every ``state_refresh_s`` of the
service and rebuilds its `PodSet`, so a drain or a shutdown published by a
pod takes effect within seconds. While the store is unreachable an entry
keeps its last snapshot: pods are judged on what was last read, instead of
every record turning stale at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.errors import StoreError
from proxy.podset import PodSet, build_pod_set, parse_records
from proxy.podstate import PodState, now_ms
from proxy.services import Service
from proxy.store.base import LinkStore

logger = logging.getLogger("stateful_route.state")

# An entry unused for this long is dropped, so namespaces that clients send
# once do not cost a read every refresh forever.
IDLE_EXPIRY_S = 300.0
MAX_ENTRIES = 4096


@dataclass(slots=True)
class _Entry:
    pod_set: PodSet
    records: dict[int, PodState]
    next_refresh_ms: int
    last_used_ms: int
    used: bool = False
    problems: tuple[str, ...] = ()


class PodStates:
    """Current `PodSet` of every (namespace, service) in use.

    :param store: where the records are read.
    :param services: the configured services by name.
    :param clock: returns Unix time in milliseconds.
    """

    def __init__(
        self,
        store: LinkStore,
        services: Mapping[str, Service],
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._services = services
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._refresh_lock = asyncio.Lock()

    def get(self, namespace: str, service: str) -> PodSet | None:
        """Return the current pod set, or None before its first read."""
        entry = self._entries.get((namespace, service))
        if entry is None:
            return None
        entry.used = True
        return entry.pod_set

    def peek(self, namespace: str, service: str) -> PodSet | None:
        """Return the current pod set like `get`, without counting it as used.

        For background work, which must not keep an idle entry alive.
        """
        entry = self._entries.get((namespace, service))
        return None if entry is None else entry.pod_set

    async def load(self, namespace: str, service: str) -> PodSet:
        """Return the pod set, reading the records now on first use.

        Raises `StoreUnavailableError` when the records cannot be read.
        """
        pod_set = self.get(namespace, service)
        if pod_set is not None:
            return pod_set
        entry = await self._read(namespace, self._services[service])
        for problem in entry.problems:
            logger.warning(
                "invalid pod state in service=%s namespace=%s: %s",
                service,
                namespace,
                problem,
            )
        if len(self._entries) >= MAX_ENTRIES:
            self._evict_one()
        self._entries.setdefault((namespace, service), entry)
        return self._entries[(namespace, service)].pod_set

    async def refresh(self, namespace: str, service: str) -> PodSet:
        """Re-read the records of one pair now, for example after a change."""
        entry = await self._read(namespace, self._services[service])
        self._entries[(namespace, service)] = entry
        return entry.pod_set

    async def refresh_due(self) -> None:
        """Re-read every entry whose refresh time has come; drop idle ones."""
        async with self._refresh_lock:
            now = self._clock()
            for key, entry in list(self._entries.items()):
                if key[1] not in self._services:
                    # A request that was loading it when a reload removed
                    # the service put it back.
                    del self._entries[key]
                    continue
                if entry.used:
                    entry.used = False
                    entry.last_used_ms = now
                elif now - entry.last_used_ms > IDLE_EXPIRY_S * 1000:
                    del self._entries[key]
                    continue
                if entry.next_refresh_ms <= now:
                    await self._refresh_entry(key, entry)

    async def run(self, stopping: asyncio.Event, tick_s: float = 0.25) -> None:
        """Refresh due entries until `stopping` is set; errors are logged."""
        while not stopping.is_set():
            try:
                await self.refresh_due()
            except Exception:
                logger.exception("pod state refresh failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), tick_s)

    async def _refresh_entry(self, key: tuple[str, str], entry: _Entry) -> None:
        namespace, name = key
        service = self._services.get(name)
        if service is None:
            return  # removed by a reload while earlier entries were read
        try:
            fresh = await self._read(namespace, service)
        except StoreError:
            # The store logs the outage; keep judging on the last records.
            entry.next_refresh_ms = self._clock() + self._period_ms(service)
            return
        if self._services.get(name) is not service:
            return  # a reload removed or replaced the service during the read
        fresh.last_used_ms = entry.last_used_ms
        self._log_changes(entry, fresh)
        self._entries[key] = fresh

    def forget(self, service: str) -> None:
        """Drop every entry of `service`, which a reload removed."""
        for key in [key for key in self._entries if key[1] == service]:
            del self._entries[key]

    def rebuild(self, service: str) -> None:
        """Rebuild the pod sets of `service` from the records read last.

        For a reload that changed the service's pods or settings. Nothing is
        read from the store, so it works during an outage too. Entries of
        namespaces that the service no longer serves are dropped.
        """
        current = self._services[service]
        settings = current.settings
        now = self._clock()
        for key, entry in list(self._entries.items()):
            namespace, name = key
            if name != service:
                continue
            if not settings.serves(namespace):
                del self._entries[key]
                continue
            entry.pod_set = build_pod_set(
                settings, namespace, current.pods(namespace), entry.records, now
            )

    async def _read(self, namespace: str, service: Service) -> _Entry:
        raw = await self._store.read_pod_states(namespace, service.name)
        records, problems = parse_records(raw)
        now = self._clock()
        pod_set = build_pod_set(
            service.settings, namespace, service.pods(namespace), records, now
        )
        return _Entry(
            pod_set=pod_set,
            records=records,
            next_refresh_ms=now + self._period_ms(service),
            last_used_ms=now,
            problems=tuple(problems),
        )

    @staticmethod
    def _period_ms(service: Service) -> int:
        return int(service.settings.state_refresh_s * 1000)

    def _log_changes(self, old: _Entry, new: _Entry) -> None:
        """Log pods whose status changed and records that became invalid."""
        pod_set = new.pod_set
        for index, status in pod_set.statuses.items():
            before = old.pod_set.get(index)
            if before is None or before.reason != status.reason:
                log = logger.info if status.routable else logger.warning
                log(
                    "pod=%d service=%s namespace=%s is now %s (was %s)",
                    index,
                    pod_set.service,
                    pod_set.namespace,
                    status.reason,
                    "absent" if before is None else before.reason,
                )
        for index in old.pod_set.statuses.keys() - pod_set.statuses.keys():
            logger.warning(
                "pod=%d service=%s namespace=%s left the pod set",
                index,
                pod_set.service,
                pod_set.namespace,
            )
        for problem in set(new.problems) - set(old.problems):
            logger.warning(
                "invalid pod state in service=%s namespace=%s: %s",
                pod_set.service,
                pod_set.namespace,
                problem,
            )

    def _evict_one(self) -> None:
        oldest = min(self._entries, key=lambda key: self._entries[key].last_used_ms)
        del self._entries[oldest]

    def namespaces_of(self, service: str) -> list[str]:
        """Return the namespaces in use for `service`."""
        return [namespace for namespace, name in self._entries if name == service]

    def __len__(self) -> int:
        return len(self._entries)
