"""The per-process cache of links, in front of the link store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection

_Key = tuple[str, str, str]

# Maximum seconds between two removals of expired entries by `run_expiry`.
_EXPIRY_PERIOD_MAX_S = 5.0
# A dict keeps its table after deletes, so the entries are copied into a
# new dict once they shrank to a quarter of their peak, if that peak was
# at least this many entries.
_SHRINK_MIN_PEAK = 1024


class LinkCache:
    """Maps (namespace, service, uid) to a pod index for `ttl_s` seconds.

    Entries live shorter than temporary links, so a cached pod never outlives
    its link in the store by more than the difference. When the cache contains
    `max_size` entries, the oldest entry is dropped first. An expired entry
    is dropped when it is read, or by `remove_expired`.

    :param ttl_s: lifetime of an entry in seconds; 0 disables the cache.
    :param max_size: maximum number of entries; 0 disables the cache.
    :param clock: returns the current time in seconds.
    """

    def __init__(
        self,
        ttl_s: float,
        max_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._clock = clock
        # Insertion order is expiry order, because `put` inserts again and
        # every entry lives `ttl_s`.
        self._entries: dict[_Key, tuple[int, float]] = {}
        # Maximum entry count since the dict was last copied.
        self._peak = 0
        self.hits = 0
        self.misses = 0
        # Set while the entries cannot be trusted, for example while the
        # connection that receives invalidations from Redis is down. Every
        # lookup then misses and nothing is cached until `resume()`.
        self.suspended = False
        # The entries of the last suspend(), kept only to place users during
        # a store outage (see `stale_pod`).
        self._stale: dict[_Key, tuple[int, float]] = {}
        # Called with the key after each `put`, so an invalidation that
        # arrived while the store read was in flight can be checked.
        self.on_put: Callable[[_Key], None] | None = None

    @property
    def enabled(self) -> bool:
        return self._ttl_s > 0 and self._max_size > 0

    def suspend(self) -> None:
        """Drop every entry and bypass the cache until `resume()`."""
        if not self.suspended:
            self._stale = self._entries
            self._entries = {}
        self.suspended = True

    def resume(self) -> None:
        """Use the cache again after `suspend()`."""
        self.suspended = False
        self._stale = {}

    def stale_pod(self, key: _Key) -> int | None:
        """Return the pod `key` had when the cache was suspended, if not expired.

        Only for routing while the store is unavailable: the entry may have
        missed changes, but while Redis is down no router can change a link.
        """
        entry = self._stale.get(key)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def peek(self, key: _Key) -> int | None:
        """Return the cached pod of `key` without counting a hit or a miss."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def get(self, key: _Key) -> int | None:
        """Return the cached pod index, or None when absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        pod, expires_at = entry
        if expires_at <= self._clock():
            del self._entries[key]
            self.misses += 1
            return None
        self.hits += 1
        return pod

    def put(self, key: _Key, pod: int) -> None:
        """Cache `pod` for `key`, replacing an older entry."""
        if not self.enabled or self.suspended:
            return
        self._entries.pop(key, None)
        if len(self._entries) >= self._max_size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (pod, self._clock() + self._ttl_s)
        self._peak = max(self._peak, len(self._entries))
        if self.on_put is not None:
            self.on_put(key)

    def remove_expired(self) -> int:
        """Drop the expired entries, and shrink the dict after a burst.

        Returns how many entries it dropped. It scans from the oldest entry
        and stops at the first one that has not expired.
        """
        now = self._clock()
        expired: list[_Key] = []
        for key, (_, expires_at) in self._entries.items():
            if expires_at > now:
                break
            expired.append(key)
        for key in expired:
            del self._entries[key]
        if self._peak >= _SHRINK_MIN_PEAK and len(self._entries) * 4 <= self._peak:
            # dict() sizes the new table for the remaining entries.
            self._entries = dict(self._entries)
            self._peak = len(self._entries)
        return len(expired)

    async def run_expiry(self, stopping: asyncio.Event) -> None:
        """Run `remove_expired` periodically until `stopping` is set.

        Without it, the entries of users who do not come back would stay
        until `max_size` newer entries push them out.
        """
        if not self.enabled:
            return
        period_s = min(_EXPIRY_PERIOD_MAX_S, self._ttl_s / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), period_s)
                return
            self.remove_expired()

    def drop(self, key: _Key) -> None:
        """Forget the entry of `key`, if any."""
        self._entries.pop(key, None)

    def drop_pod(self, namespaces: Collection[str], service: str, pod: int) -> int:
        """Forget every entry of `service` in `namespaces` that names `pod`.

        Scans the whole cache, so call it on rare events such as a pod
        failure. Returns how many entries it dropped.
        """
        stale = [
            key
            for key, (cached, _) in self._entries.items()
            if cached == pod and key[1] == service and key[0] in namespaces
        ]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
