"""Keeping the local link cache coherent with Redis, for the Redis store.

One connection per proxy process turns on the invalidation messages of
Redis client-side caching, in broadcasting mode::

    CLIENT TRACKING on REDIRECT <own id> BCAST PREFIX sf:{
    SUBSCRIBE __redis__:invalidate

Redis (6.0 or later) then publishes the name of every key under ``sf:{``
that any client modifies, expires or evicts. So the proxy also receives the
changes of other proxies, of Java routers and of redis-cli users, and
Redis needs no configuration for it. A message with no keys means FLUSHDB or
FLUSHALL, and empties the cache.

An invalidated link does not simply leave the cache, because this proxy's
own cache misses restart the TTL of temporary links with PEXPIRE, which is
a modification too, and dropping the entry each time would make every
request a miss. Instead the invalidated keys that have an entry are read
again with one pipelined GET per batch, and an entry whose pod differs
from the link, or whose link is gone, is dropped. An invalidation that
arrives while the key's store read is still in flight is remembered for
``_RECENT_S`` to twice that, and the entry that read then caches is
checked the same way. Invalidated keys are remembered by their hash in two
sets, the current one and the previous one, and the previous one is
dropped every ``_RECENT_S``, so a burst of new users leaves nothing behind
once it is over. A hash collision only costs one more read.

Failure modes:

- While the invalidation connection is down, or before it first connects,
  the cache is suspended: every request reads the store. The loss and the
  recovery are logged once each. Redis stops tracking when the connection
  closes, so after a reconnect the cache starts empty.
- A connection that stops replying without closing is found by a PING
  after ``_PING_PERIOD_S`` of silence and given up ``_SILENCE_LIMIT_S``
  after the last reply.
- Redis Cluster tracks keys per node, so this module is not started there
  and the cache keeps entries for ``store.local_cache_ttl_s`` as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from proxy.cache import LinkCache
from proxy.errors import StoreError
from proxy.store.base import LinkStore

logger = logging.getLogger("stateful_route.invalidation")

CHANNEL = "__redis__:invalidate"
KEY_PREFIX = "sf:{"

# Seconds without a message before a PING checks the connection.
_PING_PERIOD_S = 0.5
# Seconds without any reply, PONG included, before the connection counts as lost.
_SILENCE_LIMIT_S = 2.0
# Backoff between connection attempts, doubled after each failure.
_RECONNECT_MIN_S = 0.1
_RECONNECT_MAX_S = 5.0
# How long an invalidation of a key without an entry makes the next `put` of
# that key check the link again. It covers a store read in flight when the
# link changed, which lasts at most one store timeout with its retries.
_RECENT_S = 5.0
# Maximum keys in one set. A full set starts the next one early.
_MAX_RECENT = 50_000

_Key = tuple[str, str, str]


def parse_link_key(key: str) -> _Key | None:
    """Return (namespace, service, uid) of a link key, None for any other key.

    A link key is ``sf:{<ns>:lk:<uid>}<svc>`` (see `proxy.store.keys`).
    Service names contain no ``:``, so move notices (``...<svc>:moved``) and
    the hash of persistent links (no service) are no link keys.
    """
    if not key.startswith(KEY_PREFIX):
        return None
    tag, closing, service = key[len(KEY_PREFIX) :].partition("}")
    if not closing or not service or ":" in service:
        return None
    namespace, _, rest = tag.partition(":")
    kind, _, uid = rest.partition(":")
    if not namespace or kind != "lk" or not uid:
        return None
    return namespace, service, uid


class Invalidator:
    """Receives invalidations from Redis and applies them to a link cache.

    :param pool: RESP2 connections to the store's primary, as
        `RedisStore.invalidation_pool` returns them; closed by `run`.
    :param store: the link store, used to read invalidated links again.
    :param cache: the cache to keep coherent; suspended until subscribed.
    :param clock: returns monotonic seconds.
    :param recent_s: seconds for which an invalidation of a key makes a
        `put` of that key check the link, from `recent_s` up to twice that.
    """

    def __init__(
        self,
        pool: redis.asyncio.ConnectionPool,
        store: LinkStore,
        cache: LinkCache,
        *,
        clock: Callable[[], float] = time.monotonic,
        recent_s: float = _RECENT_S,
    ) -> None:
        self._pool = pool
        self._store = store
        self._cache = cache
        self._clock = clock
        self._recent_s = recent_s
        # Hashes of the keys invalidated since `_recent_since`, and of those
        # invalidated during the `recent_s` before it.
        self._recent: set[int] = set()
        self._older: set[int] = set()
        self._recent_since = clock()
        self._pending: set[_Key] = set()
        self._check_task: asyncio.Task[None] | None = None
        self.connected = False
        # Level of the last "lost" log line, None after a recovery.
        self._lost_level: int | None = None
        # Set after the first connection attempt, successful or not.
        self.first_round = asyncio.Event()
        self.invalidated_keys = 0
        self.dropped_entries = 0
        self.flushes = 0
        cache.suspend()
        cache.on_put = self._after_put

    async def run(self, stopping: asyncio.Event) -> None:
        """Subscribe, apply invalidations and reconnect until `stopping` is set."""
        backoff_s = _RECONNECT_MIN_S
        while not stopping.is_set():
            connection: Any = self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                # The cache starts empty after a reconnect, so it waits until
                # the store serves requests again. Until then, during an
                # outage, the entries that suspend() set aside still place
                # the users they hold.
                await self._store.ping()
                await self._subscribe(connection)
                backoff_s = _RECONNECT_MIN_S
                self._note_connected()
                self.first_round.set()
                await self._listen(connection, stopping)
            except (RedisError, OSError, StoreError) as exc:
                await self._note_lost(exc)
                self.first_round.set()
            finally:
                await connection.disconnect()
            if stopping.is_set():
                break
            try:
                await asyncio.wait_for(stopping.wait(), backoff_s)
            except TimeoutError:
                backoff_s = min(backoff_s * 2, _RECONNECT_MAX_S)
            self._expire_recent(self._clock())
        await self._close()

    async def _close(self) -> None:
        if self._check_task is not None:
            self._check_task.cancel()
            await asyncio.gather(self._check_task, return_exceptions=True)
        self._cache.on_put = None
        await self._pool.aclose()

    async def _subscribe(self, connection: Any) -> None:
        await connection.connect()
        await connection.send_command("CLIENT", "ID")
        client_id = await connection.read_response(push_request=True)
        await connection.send_command(
            "CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST", "PREFIX",
            KEY_PREFIX,
        )  # fmt: skip
        await connection.read_response(push_request=True)
        await connection.send_command("SUBSCRIBE", CHANNEL)
        await connection.read_response(push_request=True)

    async def _listen(self, connection: Any, stopping: asyncio.Event) -> None:
        last_reply = self._clock()
        while not stopping.is_set():
            message = await connection.read_response(
                timeout=_PING_PERIOD_S, push_request=True
            )
            # This loop wakes at least every _PING_PERIOD_S, so it also
            # drops the expired invalidations after a burst.
            self._expire_recent(self._clock())
            if message is None:
                silence_s = self._clock() - last_reply
                if silence_s > _SILENCE_LIMIT_S:
                    raise RedisError(f"no reply to PING within {silence_s:.1f} s")
                await connection.send_command("PING")
                continue
            last_reply = self._clock()
            if isinstance(message, list) and len(message) == 3:
                kind, channel, keys = message
                if kind == b"message" and channel == CHANNEL.encode():
                    self._apply(keys)

    def _note_connected(self) -> None:
        # Entries cached before the loss missed invalidations, so suspend()
        # set them aside and resume() drops them: the cache starts empty.
        self._cache.resume()
        self.connected = True
        if self._lost_level is not None:
            logger.info(
                "invalidation connection to Redis restored, the local link "
                "cache is on again"
            )
            self._lost_level = None

    async def _note_lost(self, exc: BaseException) -> None:
        """Turn the cache off and log the loss once per level.

        The loss is a WARNING while the store itself responds, for example
        when an ACL forbids CLIENT TRACKING. During a Redis outage it is
        INFO, because the store already logs the outage as a WARNING.
        """
        self._cache.suspend()
        self.connected = False
        if self._lost_level == logging.WARNING:
            return
        try:
            await self._store.ping()
        except StoreError:
            level = logging.INFO
        else:
            level = logging.WARNING
        if self._lost_level is not None and level <= self._lost_level:
            return
        logger.log(
            level,
            "invalidation connection to Redis lost or not established (%s). "
            "The local link cache is off and every request reads the store "
            "until it reconnects",
            str(exc).rstrip("."),
        )
        self._lost_level = level

    def _apply(self, keys: object) -> None:
        """Apply one invalidation message: a list of key names, or None."""
        if keys is None:
            self.flushes += 1
            self._cache.clear()
            return
        if not isinstance(keys, list):
            return
        now = self._clock()
        for raw in keys:
            if not isinstance(raw, bytes):
                continue
            key = parse_link_key(raw.decode("utf-8", "replace"))
            if key is None:
                continue
            self.invalidated_keys += 1
            self._remember(key, now)
            if self._cache.peek(key) is not None:
                self._pending.add(key)
        self._schedule_check()

    @property
    def remembered_keys(self) -> int:
        """Count of the remembered invalidations, whose keys a `put` checks."""
        return len(self._recent) + len(self._older)

    def _remember(self, key: _Key, now: float) -> None:
        self._expire_recent(now)
        if len(self._recent) >= _MAX_RECENT:
            self._older = self._recent
            self._recent = set()
            self._recent_since = now
        self._recent.add(hash(key))

    def _expire_recent(self, now: float) -> None:
        """Drop the invalidations older than `recent_s` to twice that.

        Every `recent_s` the current set becomes the previous one, and the
        previous one is dropped with its table, which a set keeps after
        deletes.
        """
        age_s = now - self._recent_since
        if age_s < self._recent_s:
            return
        if not self._recent and not self._older:
            self._recent_since = now
            return
        # After two periods without a rotation, both sets are expired.
        self._older = self._recent if age_s < 2 * self._recent_s else set()
        self._recent = set()
        self._recent_since = now

    def _after_put(self, key: _Key) -> None:
        if not self._recent and not self._older:
            return
        key_hash = hash(key)
        if key_hash not in self._recent and key_hash not in self._older:
            return
        self._pending.add(key)
        self._schedule_check()

    def _schedule_check(self) -> None:
        if not self._pending:
            return
        if self._check_task is None or self._check_task.done():
            self._check_task = asyncio.create_task(
                self._check_pending(), name="invalidation-check"
            )

    async def _check_pending(self) -> None:
        """Read the pending links again and drop entries that no longer match."""
        while self._pending:
            batch, self._pending = self._pending, set()
            groups: dict[tuple[str, str], list[str]] = {}
            for namespace, service, uid in batch:
                groups.setdefault((namespace, service), []).append(uid)
            for (namespace, service), uids in groups.items():
                await self._check_group(namespace, service, uids)

    async def _check_group(self, namespace: str, service: str, uids: list[str]) -> None:
        try:
            by_pod = await self._store.batch_get(namespace, service, uids)
        except StoreError as exc:
            # Without the current link the entry cannot be trusted.
            logger.debug("re-reading %d invalidated links failed: %s", len(uids), exc)
            by_pod = None
        linked: dict[str, int] = {}
        for pod, pod_uids in (by_pod or {}).items():
            for uid in pod_uids:
                linked[uid] = pod
        for uid in uids:
            key = (namespace, service, uid)
            cached = self._cache.peek(key)
            if cached is None:
                continue
            if by_pod is None or linked.get(uid) != cached:
                self._cache.drop(key)
                self.dropped_entries += 1
