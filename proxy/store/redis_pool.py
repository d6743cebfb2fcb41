"""Redis connection pools that serve waiting requests in order and trim idle ones.

redis-py's asyncio `BlockingConnectionPool` (read in 8.2.0) makes each
waiting request and each returned connection take the lock of one
``asyncio.Condition``. While requests keep arriving, a returned connection
queues for that lock behind them, and the waiter it wakes can find it
taken by a newer request and queue again at the end. Some requests then
wait for the whole pool timeout and fail. `FairWaiting` makes requests
wait for a free connection in arrival order, so a pool much smaller than
a burst serves it.

redis-py's asyncio pools keep every connection they ever opened, so a burst
of a few hundred concurrent store calls leaves a few hundred idle
connections behind, at about 18 KiB of resident memory each (measured with
``benchmarks/idle_connections.py``). The pools here record when each
connection was released, and `IdleTrimming.trim_idle` closes those idle for
longer than a timeout, down to a floor of idle connections.

redis-py has no public call that removes a single idle connection, so the
trim uses two attributes of ``redis.asyncio.ConnectionPool``:

- ``_available_connections``, the list of idle connections. ``release``
  appends to it and ``get_available_connection`` pops from its end, so it is
  ordered from the longest idle to the most recently released. It is there
  in redis-py 5.0.1, 5.1.0, 5.3.0, 6.0.0, 7.0.0 and 8.2.0. The blocking pool
  of 5.0.0 kept idle connections in a queue instead, which is why the
  project requires 5.0.1 or later, and `supports_trimming` turns the trim
  off for a pool without the list.
- ``_lock``, the ``asyncio.Lock`` under which redis-py 5.3.0 and later
  change and iterate that list (5.0.1 and 5.1.0 have none). The trim
  acquires it when it exists, so it never removes a connection while
  redis-py iterates the list.

A connection is taken out of that list and disconnected only after it left
the list, without an ``await`` in between. A connection in use is not in
the list, so the trim never closes one, and no caller can receive a
connection that the trim closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Sized
from typing import Any

from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

logger = logging.getLogger("stateful_route.store")

# Message of the ConnectionError that redis-py's BlockingConnectionPool
# raises when no connection frees up in time (redis-py 5 to 8).
POOL_EXHAUSTED = "No connection available."


def supports_trimming(pool: object) -> bool:
    """Return whether `pool` has the redis-py internals that the trim uses."""
    available = getattr(pool, "_available_connections", None)
    lock = getattr(pool, "_lock", None)
    return isinstance(available, list) and (
        lock is None or isinstance(lock, asyncio.Lock)
    )


class IdleTrimming:
    """Mixin of a redis-py asyncio pool that records release times and trims.

    Put it before the redis-py pool class in the bases, so that its
    `release` runs first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Monotonic seconds of each idle connection's release. Tests replace
        # the clock.
        self.clock: Callable[[], float] = time.monotonic
        self._released_at: weakref.WeakKeyDictionary[Any, float] = (
            weakref.WeakKeyDictionary()
        )
        super().__init__(*args, **kwargs)

    def connection_counts(self) -> tuple[int, int]:
        """Return the idle and in-use connection counts, or (0, 0) if unknown.

        Reads ``_in_use_connections`` too, a set (or WeakSet) of redis-py's
        pool in the same versions as ``_available_connections``.
        """
        if not supports_trimming(self):
            return 0, 0
        idle: list[Any] = self._available_connections  # type: ignore[attr-defined]
        in_use: Sized = getattr(self, "_in_use_connections", ())
        return len(idle), len(in_use)

    async def release(self, connection: Any) -> None:
        """Record the release time of `connection`, then return it to the pool."""
        self._released_at[connection] = self.clock()
        await super().release(connection)  # type: ignore[misc]

    async def trim_idle(self, idle_timeout_s: float, min_idle: int) -> int:
        """Close the connections idle for more than `idle_timeout_s` seconds.

        Keeps at least `min_idle` idle connections, the most recently
        released ones. Returns how many connections it closed.
        """
        if not supports_trimming(self):
            return 0
        lock: asyncio.Lock | None = getattr(self, "_lock", None)
        if lock is None:
            closing = self._take_expired(idle_timeout_s, min_idle)
        else:
            async with lock:
                closing = self._take_expired(idle_timeout_s, min_idle)
        if not closing:
            return 0

        results = await asyncio.gather(
            *(connection.disconnect() for connection in closing),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, Exception):
                # The connection is out of the pool already, so no caller
                # can receive it.
                logger.debug("closing an idle Redis connection failed: %s", result)
        return len(closing)

    def _take_expired(self, idle_timeout_s: float, min_idle: int) -> list[Any]:
        """Remove the expired connections from the idle list and return them.

        Runs without an ``await``, so no other task runs while the list
        changes.
        """
        available: list[Any] = self._available_connections  # type: ignore[attr-defined]
        excess = len(available) - min_idle
        if excess <= 0:
            return []
        released = self._released_at
        now = self.clock()
        expired = 0
        # The list runs from the longest idle to the most recently released,
        # so the expired connections are a prefix of it.
        for connection in available[:excess]:
            since = released.get(connection)
            if since is None:
                # A connection released by a path that bypassed `release`
                # starts its idle time now.
                released[connection] = now
                break
            if now - since <= idle_timeout_s:
                break
            expired += 1
        # NOTE: redis-py 8's connection-count metrics, which record nothing
        # unless a collector is configured, keep counting these as idle.
        closing = available[:expired]
        del available[:expired]
        for connection in closing:
            released.pop(connection, None)
        return closing


class FairWaiting:
    """Mixin of a redis-py blocking pool that hands out connections in order.

    A request takes a permit of an `asyncio.Semaphore` of
    ``max_connections`` permits before redis-py's `get_connection`, and
    gives it back when it releases the connection. asyncio's semaphore
    wakes its waiters in arrival order and lets no new request pass them,
    so redis-py's own wait only runs while a connection is given back.
    Waiting for a permit takes at most the pool's ``timeout``, after which
    it raises redis-py's ConnectionError with `POOL_EXHAUSTED`.

    Put it before the redis-py pool class in the bases.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        max_connections: int = self.max_connections  # type: ignore[attr-defined]
        self._permits = asyncio.Semaphore(max_connections)
        # The connections handed out with a permit, so that a second release
        # of one connection cannot add a permit.
        self._permit_holders: set[Any] = set()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """Wait in order for a permit, then return a connection of the pool."""
        timeout_s: float | None = self.timeout  # type: ignore[attr-defined]
        try:
            async with asyncio.timeout(timeout_s):
                await self._permits.acquire()
        except TimeoutError:
            raise RedisConnectionError(POOL_EXHAUSTED) from None
        try:
            connection = await super().get_connection(  # type: ignore[misc]
                *args, **kwargs
            )
        except BaseException:
            self._permits.release()
            raise
        self._permit_holders.add(connection)
        return connection

    async def release(self, connection: Any) -> None:
        """Return `connection` to the pool and its permit to the next request."""
        try:
            await super().release(connection)  # type: ignore[misc]
        finally:
            if connection in self._permit_holders:
                self._permit_holders.remove(connection)
                self._permits.release()


class TrimmingBlockingPool(IdleTrimming, FairWaiting, BlockingConnectionPool):
    """redis-py's `BlockingConnectionPool` with `FairWaiting` and trimming."""


class TrimmingSentinelPool(
    IdleTrimming, FairWaiting, SentinelConnectionPool, BlockingConnectionPool
):
    """A blocking pool of connections to the primary that Sentinel reports.

    Like `BlockingConnectionPool`, it makes a request wait up to its
    ``timeout`` for a free connection, in arrival order (`FairWaiting`).
    Like `SentinelConnectionPool`, it queries the Sentinels for the
    primary's address on every new connection, so connections made after a
    failover reach the promoted replica. `IdleTrimming.trim_idle` closes
    idle connections.
    """
