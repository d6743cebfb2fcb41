"""The per-process cache of links, in front of the link store."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

_Key = tuple[str, str, str]


class LinkCache:
    """Maps (namespace, service, uid) to a pod index for `ttl_s` seconds.

    Entries live shorter than temporary links, so a cached pod never outlives
    its link in the store by more than the difference. When the cache contains
    `max_size` entries, the oldest entry is dropped first.

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
        self._entries: dict[_Key, tuple[int, float]] = {}
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
        if self.on_put is not None:
            self.on_put(key)

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
