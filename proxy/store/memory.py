"""The embedded link store: links in this process's memory.

It is the default backend, for one proxy process or a demo. Links do not
survive a restart and are not shared with other proxies. Every operation runs
without an await, so on one event loop each is atomic like a Lua script.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.store.base import NOTICE_TTL_S, PERSISTENT, check_pod, check_ttl

_Key = tuple[str, str, str]


@dataclass(slots=True)
class _Link:
    pod: int
    expires_at: float | None  # clock time; None for a persistent link


class MemoryStore:
    """Link store kept in a dict, with TTLs on a monotonic clock.

    :param clock: returns the current time in seconds; tests pass a fake one.
    """

    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._links: dict[_Key, _Link] = {}
        self._persistent: dict[tuple[str, str], dict[str, int]] = {}
        # (expires_at, key) of temporary links, popped once they are due. An
        # entry whose link was changed since is skipped when popped.
        self._expiries: list[tuple[float, _Key]] = []
        self._pod_states: dict[tuple[str, str], dict[str, str]] = {}
        # Move notices: (previous pod, reason, expiry in clock seconds).
        self._notices: dict[_Key, tuple[int, str, float]] = {}
        self._workloads: dict[tuple[str, str], str] = {}
        # (namespace, service, pod) -> uid -> expiry in Unix ms, inf if persistent
        self._pod_index: dict[tuple[str, str, int], dict[str, float]] = {}

    def _live(self, key: _Key) -> _Link | None:
        link = self._links.get(key)
        if link is None:
            return None
        if link.expires_at is not None and link.expires_at <= self._clock():
            del self._links[key]
            return None
        return link

    def _purge_expired(self) -> None:
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            link = self._links.get(key)
            if link is not None and link.expires_at == expires_at:
                del self._links[key]

    def _write(self, key: _Key, pod: int, ttl_s: float) -> None:
        namespace, uid, service = key
        if ttl_s == PERSISTENT:
            self._links[key] = _Link(pod, None)
            self._persistent.setdefault((namespace, uid), {})[service] = pod
            return
        expires_at = self._clock() + ttl_s
        self._links[key] = _Link(pod, expires_at)
        heapq.heappush(self._expiries, (expires_at, key))
        self._forget_persistent(key)

    def _forget_persistent(self, key: _Key) -> None:
        namespace, uid, service = key
        services = self._persistent.get((namespace, uid))
        if services is None:
            return
        services.pop(service, None)
        if not services:
            del self._persistent[(namespace, uid)]

    def _delete(self, key: _Key, delay_s: float) -> None:
        if delay_s > 0:
            link = self._links[key]
            link.expires_at = self._clock() + delay_s
            heapq.heappush(self._expiries, (link.expires_at, key))
        else:
            del self._links[key]
        self._forget_persistent(key)

    async def get(self, namespace: str, uid: str, service: str) -> int | None:
        link = self._live((namespace, uid, service))
        return None if link is None else link.pod

    async def get_and_refresh(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> int | None:
        check_ttl(ttl_s)
        self._purge_expired()
        key = (namespace, uid, service)
        link = self._live(key)
        if link is None:
            return None
        if link.expires_at is not None and ttl_s != PERSISTENT:
            link.expires_at = self._clock() + ttl_s
            heapq.heappush(self._expiries, (link.expires_at, key))
        return link.pod

    async def read_link(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> tuple[int, bool] | None:
        pod = await self.get_and_refresh(namespace, uid, service, ttl_s)
        if pod is None:
            return None
        link = self._links[(namespace, uid, service)]
        return pod, link.expires_at is None

    async def set(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> int | None:
        check_pod(pod)
        check_ttl(ttl_s)
        self._purge_expired()
        key = (namespace, uid, service)
        previous = self._live(key)
        self._write(key, pod, ttl_s)
        return None if previous is None else previous.pod

    async def try_set(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> tuple[bool, int | None]:
        check_pod(pod)
        check_ttl(ttl_s)
        self._purge_expired()
        key = (namespace, uid, service)
        current = self._live(key)
        if current is not None and current.expires_at is None and current.pod != pod:
            return False, current.pod
        self._write(key, pod, ttl_s)
        return True, pod

    async def set_if_absent(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> int:
        check_pod(pod)
        check_ttl(ttl_s)
        self._purge_expired()
        key = (namespace, uid, service)
        current = self._live(key)
        if current is not None:
            return current.pod
        self._write(key, pod, ttl_s)
        return pod

    async def remove(
        self, namespace: str, uid: str, service: str, delay_s: float = 0
    ) -> bool:
        key = (namespace, uid, service)
        if self._live(key) is None:
            self._forget_persistent(key)
            return False
        self._delete(key, delay_s)
        return True

    async def remove_if_pod(
        self, namespace: str, uid: str, service: str, pod: int, delay_s: float = 0
    ) -> bool:
        key = (namespace, uid, service)
        link = self._live(key)
        if link is None or link.pod != pod:
            return False
        self._delete(key, delay_s)
        return True

    async def replace_if_pod(
        self,
        namespace: str,
        uid: str,
        service: str,
        old_pod: int,
        new_pod: int,
        ttl_s: float,
        notice: str = "",
    ) -> tuple[bool, int | None]:
        check_pod(new_pod)
        check_ttl(ttl_s)
        self._purge_expired()
        key = (namespace, uid, service)
        link = self._live(key)
        if link is None:
            return False, None
        if link.pod != old_pod:
            return False, link.pod
        self._write(key, new_pod, ttl_s)
        if notice:
            lifetime_s = NOTICE_TTL_S if ttl_s == PERSISTENT else ttl_s
            self._notices[key] = (old_pod, notice, self._clock() + lifetime_s)
        return True, new_pod

    async def read_link_noticed(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> tuple[int, bool, tuple[int, str] | None] | None:
        read = await self.read_link(namespace, uid, service, ttl_s)
        if read is None:
            return None
        entry = self._notices.pop((namespace, uid, service), None)
        notice = None
        if entry is not None and entry[2] > self._clock():
            notice = (entry[0], entry[1])
        return read[0], read[1], notice

    async def remove_if_temporary(
        self, namespace: str, uid: str, service: str, pod: int
    ) -> bool:
        key = (namespace, uid, service)
        link = self._live(key)
        if link is None or link.pod != pod or link.expires_at is None:
            return False
        del self._links[key]
        return True

    async def get_if_persistent(
        self, namespace: str, uid: str, service: str
    ) -> int | None:
        link = self._live((namespace, uid, service))
        if link is None or link.expires_at is not None:
            return None
        return link.pod

    async def linked_services(self, namespace: str, uid: str) -> dict[str, int]:
        return dict(self._persistent.get((namespace, uid), {}))

    async def batch_get(
        self, namespace: str, service: str, uids: Sequence[str]
    ) -> dict[int, list[str]]:
        by_pod: dict[int, list[str]] = {}
        for uid in uids:
            link = self._live((namespace, uid, service))
            if link is not None:
                by_pod.setdefault(link.pod, []).append(uid)
        return by_pod

    async def link_ttl(self, namespace: str, uid: str, service: str) -> float | None:
        link = self._live((namespace, uid, service))
        if link is None:
            return None
        if link.expires_at is None:
            return PERSISTENT
        return link.expires_at - self._clock()

    async def publish_pod_state(
        self, namespace: str, service: str, pod: int, record: str
    ) -> None:
        check_pod(pod)
        self._pod_states.setdefault((namespace, service), {})[str(pod)] = record

    async def replace_pod_state(
        self,
        namespace: str,
        service: str,
        pod: int,
        expected: str | None,
        record: str,
    ) -> bool:
        check_pod(pod)
        records = self._pod_states.setdefault((namespace, service), {})
        if records.get(str(pod)) != expected:
            return False
        records[str(pod)] = record
        return True

    async def read_pod_states(self, namespace: str, service: str) -> dict[str, str]:
        return dict(self._pod_states.get((namespace, service), {}))

    async def remove_pod_state(self, namespace: str, service: str, pod: int) -> bool:
        records = self._pod_states.get((namespace, service), {})
        return records.pop(str(pod), None) is not None

    async def publish_workload(self, namespace: str, service: str, value: str) -> None:
        self._workloads[(namespace, service)] = value

    async def read_workload(self, namespace: str, service: str) -> str | None:
        return self._workloads.get((namespace, service))

    async def index_link(
        self,
        namespace: str,
        service: str,
        pod: int,
        uid: str,
        expires_ms: int | None,
        previous_pod: int | None = None,
    ) -> None:
        if previous_pod is not None and previous_pod != pod:
            await self.unindex_link(namespace, service, previous_pod, uid)
        score = math.inf if expires_ms is None else float(expires_ms)
        self._pod_index.setdefault((namespace, service, pod), {})[uid] = score

    async def unindex_link(
        self, namespace: str, service: str, pod: int, uid: str
    ) -> None:
        entries = self._pod_index.get((namespace, service, pod))
        if entries is not None:
            entries.pop(uid, None)
            if not entries:
                del self._pod_index[(namespace, service, pod)]

    async def indexed_uids(
        self, namespace: str, service: str, pod: int, now_ms: int, limit: int
    ) -> list[str]:
        entries = self._prune_index(namespace, service, pod, now_ms)
        ordered = sorted(entries.items(), key=lambda item: (item[1], item[0]))
        return [uid for uid, _ in ordered[:limit]]

    async def count_indexed(
        self, namespace: str, service: str, pod: int, now_ms: int
    ) -> tuple[int, int]:
        entries = self._prune_index(namespace, service, pod, now_ms)
        persistent = sum(1 for score in entries.values() if score == math.inf)
        return len(entries) - persistent, persistent

    def _prune_index(
        self, namespace: str, service: str, pod: int, now_ms: int
    ) -> dict[str, float]:
        entries = self._pod_index.get((namespace, service, pod), {})
        for uid in [uid for uid, score in entries.items() if score <= now_ms]:
            del entries[uid]
        return entries

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._links.clear()
        self._persistent.clear()
        self._expiries.clear()
        self._pod_states.clear()
        self._workloads.clear()
        self._pod_index.clear()
        self._notices.clear()

    def __len__(self) -> int:
        """Return the number of links, expired ones not yet purged included."""
        return len(self._links)
