"""The Redis link store, shared with the Java routers.

Keys follow `proxy.store.keys`. Every operation that reads and then writes
runs as one Lua script, so it is atomic, and each script touches only the
keys of one (namespace, uid), which share a hash tag and so one Redis
Cluster slot. A pod index is stored as a decimal string.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import (
    StoreBusyError,
    StoreDataError,
    StoreError,
    StoreUnavailableError,
)
from proxy.store.base import NOTICE_TTL_S, PERSISTENT, check_pod, check_ttl
from proxy.store.keys import (
    link_key,
    move_notice_key,
    pod_links_key,
    state_key,
    uid_hash_key,
    workload_key,
)
from proxy.store.redis_pool import (
    POOL_EXHAUSTED,
    IdleTrimming,
    TrimmingBlockingPool,
    TrimmingSentinelPool,
    supports_trimming,
)
from proxy.store.redis_scripts import (
    GET_AND_REFRESH_LUA,
    GET_IF_PERSISTENT_LUA,
    READ_LINK_LUA,
    READ_LINK_NOTICED_LUA,
    REMOVE_IF_POD_LUA,
    REMOVE_IF_TEMPORARY_LUA,
    REMOVE_LUA,
    REPLACE_IF_POD_LUA,
    REPLACE_POD_STATE_LUA,
    SET_IF_ABSENT_LUA,
    SET_LUA,
    TRY_SET_LUA,
)

logger = logging.getLogger("stateful_route.store")

_T = TypeVar("_T")
_Script = Callable[..., Awaitable[Any]]
# Receives the seconds of one round trip and its error, None on success.
StoreObserver = Callable[[float, StoreError | None], None]

# Errors that mean Redis was not reached or did not reply in time, or that
# the cluster cannot serve the slot now. The builtin TimeoutError is also
# asyncio.TimeoutError. RedisClusterException, raised for example when no
# node serves a slot, is no RedisError.
_UNAVAILABLE_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
    RedisClusterException,
)
# URL schemes of a Redis Cluster, with TLS for the second.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# URL schemes of a primary that Redis Sentinel monitors, with TLS for the
# second.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
# Query parameters of a Sentinel URL: credentials of the Sentinel processes,
# which may differ from those of the primary.
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password")
# Accepted primary names: letters, digits and ._-, so that a name needs no
# escaping, neither in the URL nor in a `sentinel monitor` line.
_PRIMARY_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")

# A pod index as this store and the Java routers write it. Python's
# str.isdigit() would also accept non-ASCII digits, so match explicitly. The
# length bound keeps int() from rejecting an absurdly long value itself.
_POD_RE = re.compile(r"[0-9]{1,18}")

_RETRY_BACKOFF_BASE_S = 0.01
_RETRY_BACKOFF_CAP_S = 0.1
# During an outage, one call per this many seconds checks whether Redis is
# back; the others fail at once.
_OUTAGE_PROBE_S = 0.5
# Maximum seconds between two trims of idle pool connections.
_TRIM_PERIOD_MAX_S = 1.0


def mask_password(url: str) -> str:
    """Return `url` with its password, in the user info or the query, as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user_info, _, host = netloc.rpartition("@")
        username = user_info.partition(":")[0]
        netloc = f"{username}:***@{host}"
    query = re.sub(r"(^|&)((?:sentinel_)?password)=[^&]*", r"\1\2=***", parts.query)
    # Built by hand because urlunsplit() turns unix:///path into unix:/path.
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        masked += f"?{query}"
    if parts.fragment:
        masked += f"#{parts.fragment}"
    return masked


def parse_cluster_url(url: str) -> tuple[list[ClusterNode], dict[str, Any]]:
    """Parse a ``redis+cluster://`` or ``rediss+cluster://`` URL.

    The form is ``redis+cluster://[user:password@]host:port[,host:port...]/``.
    Returns the startup nodes and the options of every node connection
    (``username``, ``password`` and ``ssl``). Raises ValueError on an invalid
    URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(
            f"invalid Redis Cluster URL {mask_password(url)!r}: expected the "
            "scheme redis+cluster:// or rediss+cluster://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"invalid Redis Cluster URL {mask_password(url)!r}: expected no "
            "database, query or fragment, because a cluster has only database 0"
        )
    user_info, _, hosts = parts.netloc.rpartition("@")
    options: dict[str, Any] = {"ssl": parts.scheme == "rediss+cluster"}
    options.update(_user_options(user_info))
    addresses = _parse_addresses(url, "Redis Cluster", hosts)
    return [ClusterNode(host, port) for host, port in addresses], options


def _parse_addresses(url: str, kind: str, hosts: str) -> list[tuple[str, int]]:
    """Parse the comma-separated host:port list of a Cluster or Sentinel URL."""
    addresses: list[tuple[str, int]] = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        valid_port = port.isascii() and port.isdigit() and 0 < int(port) < 65536
        if not host or not valid_port:
            raise ValueError(
                f"invalid {kind} URL {mask_password(url)!r}: expected "
                f"host:port, got {address!r}"
            )
        addresses.append((host, int(port)))
    return addresses


def _user_options(user_info: str) -> dict[str, Any]:
    """Return the username and password of the user info of a URL."""
    if not user_info:
        return {}
    username, _, password = user_info.partition(":")
    return {
        "username": unquote(username) or None,
        "password": unquote(password) or None,
    }


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """The parts of a ``redis+sentinel://`` URL.

    `options` apply to the connections to the primary (``username``,
    ``password``, ``db`` and ``ssl``), `sentinel_options` to those to the
    Sentinel processes (``ssl`` and the credentials of the query).
    """

    sentinels: list[tuple[str, int]]
    primary: str
    options: dict[str, Any]
    sentinel_options: dict[str, Any]


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a ``redis+sentinel://`` or ``rediss+sentinel://`` URL.

    The form is ``redis+sentinel://[user:password@]host:port[,host:port...]
    /primary[/db][?sentinel_username=...&sentinel_password=...]``: the
    addresses of the Sentinel processes, the name under which they monitor
    the primary, and its database, 0 by default. The user info
    authenticates to the primary and its replicas, the query to the
    Sentinels. Raises ValueError on an invalid URL.
    """
    kind = "Redis Sentinel"
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(
            f"invalid {kind} URL {mask_password(url)!r}: expected the scheme "
            "redis+sentinel:// or rediss+sentinel://"
        )
    if parts.fragment:
        raise ValueError(
            f"invalid {kind} URL {mask_password(url)!r}: expected no fragment"
        )
    user_info, _, hosts = parts.netloc.rpartition("@")
    sentinels = _parse_addresses(url, kind, hosts)

    segments = parts.path.removeprefix("/").removesuffix("/").split("/")
    primary = unquote(segments[0])
    if _PRIMARY_NAME_RE.fullmatch(primary) is None:
        raise ValueError(
            f"invalid {kind} URL {mask_password(url)!r}: expected the primary "
            f"name after the addresses, as in host:port/mymaster, got {primary!r}"
        )
    database = segments[1] if len(segments) > 1 else "0"
    if len(segments) > 2 or not database.isascii() or not database.isdigit():
        raise ValueError(
            f"invalid {kind} URL {mask_password(url)!r}: expected "
            f"/primary or /primary/db with a decimal db, got {parts.path!r}"
        )

    tls = parts.scheme == "rediss+sentinel"
    options: dict[str, Any] = {"db": int(database), "ssl": tls}
    options.update(_user_options(user_info))
    sentinel_options: dict[str, Any] = {"ssl": tls}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _SENTINEL_QUERY:
            allowed = " and ".join(_SENTINEL_QUERY)
            raise ValueError(
                f"invalid {kind} URL {mask_password(url)!r}: unknown query "
                f"parameter {name!r}, expected only {allowed}"
            )
        sentinel_options[name.removeprefix("sentinel_")] = value or None
    return SentinelTarget(sentinels, primary, options, sentinel_options)


def _milliseconds(seconds: float) -> int:
    """Convert a positive duration to whole milliseconds, rounded up, min 1."""
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {seconds!r}: expected a finite number")
    # Rounding first keeps float noise such as 2.007 * 1000 = 2007.0000000000002
    # from adding a millisecond.
    return max(1, math.ceil(round(seconds * 1000, 6)))


def _ttl_arg(ttl_s: float) -> str:
    return "-1" if ttl_s == PERSISTENT else str(_milliseconds(ttl_s))


def _delay_arg(delay_s: float) -> str:
    return str(_milliseconds(delay_s)) if delay_s > 0 else "0"


def _parse_pod(key: str, value: object) -> int | None:
    """Return the pod index stored at `key`, or None for a missing value."""
    if value is None:
        return None
    if not isinstance(value, str) or _POD_RE.fullmatch(value) is None:
        raise StoreDataError(key, value)
    return int(value)


def _require_pod(key: str, value: object) -> int:
    pod = _parse_pod(key, value)
    if pod is None:
        raise StoreDataError(key, value)
    return pod


class RedisStore:
    """Link store in Redis, in the key layout that the Java routers share.

    :param url: ``redis://``, ``rediss://`` or ``unix://`` URL, as redis-py
        parses it; its query string may set further connection options. A
        ``redis+cluster://`` or ``rediss+cluster://`` URL selects Redis
        Cluster, as `parse_cluster_url` describes, and a
        ``redis+sentinel://`` or ``rediss+sentinel://`` URL a primary that
        Redis Sentinel monitors, as `parse_sentinel_url` describes.
    :param timeout_s: seconds to wait for a reply, and for a free pooled
        connection.
    :param connect_timeout_s: seconds to wait for a TCP connection.
    :param retries: retries after the first attempt of a command that failed
        on a connection error or timeout, with exponential backoff of at
        most 0.1 s.
    :param max_connections: size of the connection pool; on Redis Cluster,
        of the pool of each node and the maximum calls in flight at once.
    :param idle_timeout_s: seconds after which `run_idle_trim` closes an
        idle pool connection, or 0 to keep them open. Redis Cluster
        connections are not trimmed.
    :param min_idle_connections: idle connections that the trim keeps.
    :param clock: returns the monotonic seconds that idle times are
        measured in.

    Sentinel connections use `timeout_s` and `connect_timeout_s` too, but
    no retries.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 1.0,
        retries: int = 2,
        max_connections: int = 32,
        idle_timeout_s: float = 30.0,
        min_idle_connections: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"invalid timeout_s {timeout_s!r}: expected > 0")
        if not connect_timeout_s > 0:
            raise ValueError(
                f"invalid connect_timeout_s {connect_timeout_s!r}: expected > 0"
            )
        if retries < 0:
            raise ValueError(f"invalid retries {retries!r}: expected >= 0")
        if max_connections < 1:
            raise ValueError(
                f"invalid max_connections {max_connections!r}: expected >= 1"
            )
        if not idle_timeout_s >= 0 or not math.isfinite(idle_timeout_s):
            raise ValueError(
                f"invalid idle_timeout_s {idle_timeout_s!r}: expected a finite "
                "number >= 0"
            )
        if min_idle_connections < 0:
            raise ValueError(
                f"invalid min_idle_connections {min_idle_connections!r}: expected >= 0"
            )
        self._url = mask_password(url)
        self._idle_timeout_s = idle_timeout_s
        self._min_idle_connections = min_idle_connections
        # The URL with its password, for the connection of invalidations.
        self._connect_url = url
        self._sentinel_target: SentinelTarget | None = None
        self._max_connections = max_connections
        self._timeout_s = timeout_s

        # NOTE: a write retried after a timeout may already have run once,
        # so set() can then return the pod it wrote itself as the previous
        # pod, and remove() can return False for a link it removed.
        retry = Retry(
            ExponentialBackoff(cap=_RETRY_BACKOFF_CAP_S, base=_RETRY_BACKOFF_BASE_S),
            retries,
        )
        self._client: redis.asyncio.Redis | redis.asyncio.RedisCluster
        self._sentinel: Sentinel | None = None
        # Permits of the calls that may run at once on Redis Cluster.
        self._cluster_permits: asyncio.Semaphore | None = None
        scheme = urlsplit(url).scheme
        self.cluster = scheme in CLUSTER_SCHEMES
        if scheme in SENTINEL_SCHEMES:
            self._sentinel_target = parse_sentinel_url(url)
            self._client = self._sentinel_client(
                self._sentinel_target, retry, connect_timeout_s
            )
        elif self.cluster:
            nodes, options = parse_cluster_url(url)
            # redis-py's cluster client has no blocking pool: a command that
            # finds all max_connections connections of its node in use fails
            # with MaxConnectionsError. With at most max_connections calls
            # running at once, no node runs out, and the other calls wait
            # for a permit in arrival order.
            self._cluster_permits = asyncio.Semaphore(max_connections)
            self._client = redis.asyncio.RedisCluster(
                startup_nodes=nodes,
                max_connections=max_connections,
                socket_timeout=timeout_s,
                socket_connect_timeout=connect_timeout_s,
                retry=retry,
                decode_responses=True,
                **options,
            )
        else:
            # A blocking pool makes a burst of more than max_connections
            # requests wait for a connection, where the default pool would
            # fail them at once with "Too many connections".
            pool = TrimmingBlockingPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_connect_timeout=connect_timeout_s,
                retry=retry,
                decode_responses=True,
            )
            self._client = redis.asyncio.Redis.from_pool(pool)

        trimmed_pool = self._trimmed_pool
        if trimmed_pool is not None:
            trimmed_pool.clock = clock

        # AsyncScript runs EVALSHA and loads the script on NOSCRIPT.
        register = self._client.register_script
        self._get_and_refresh_script: _Script = register(GET_AND_REFRESH_LUA)
        self._set_script: _Script = register(SET_LUA)
        self._remove_if_temporary_script: _Script = register(REMOVE_IF_TEMPORARY_LUA)
        self._read_link_script: _Script = register(READ_LINK_LUA)
        self._read_link_noticed_script: _Script = register(READ_LINK_NOTICED_LUA)
        self._try_set_script: _Script = register(TRY_SET_LUA)
        self._set_if_absent_script: _Script = register(SET_IF_ABSENT_LUA)
        self._replace_if_pod_script: _Script = register(REPLACE_IF_POD_LUA)
        self._remove_script: _Script = register(REMOVE_LUA)
        self._remove_if_pod_script: _Script = register(REMOVE_IF_POD_LUA)
        self._get_if_persistent_script: _Script = register(GET_IF_PERSISTENT_LUA)
        self._replace_pod_state_script: _Script = register(REPLACE_POD_STATE_LUA)

        # Guards the first cluster initialization; None once it succeeded.
        self._cluster_start_lock: asyncio.Lock | None = (
            asyncio.Lock() if self.cluster else None
        )

        # Monotonic time of the first failure of the current outage, or None
        # while Redis is reachable.
        self._unavailable_since: float | None = None
        self._failed_calls = 0
        self._last_probe = 0.0
        self._outage_reason = ""
        # Called after every round trip, including the calls that fail at
        # once during an outage.
        self.observer: StoreObserver | None = None

    def _sentinel_client(
        self, target: SentinelTarget, retry: Retry, connect_timeout_s: float
    ) -> redis.asyncio.Redis:
        """Build a client of the primary that the Sentinels of `target` name.

        Every new connection queries the Sentinels for the primary's address,
        and a connection to a demoted primary, which replies READONLY, is
        closed, so the retries after a failover reach the promoted replica.
        """
        # A Sentinel that is down costs one connect timeout, with no retry,
        # before the next one is asked. Sentinel.__init__ has no annotations
        # in redis-py 8.1 and has them in 8.2.
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            target.sentinels,
            sentinel_kwargs={
                "socket_timeout": self._timeout_s,
                "socket_connect_timeout": connect_timeout_s,
                "retry": Retry(NoBackoff(), 0),
                "decode_responses": True,
                **target.sentinel_options,
            },
        )
        client: redis.asyncio.Redis = self._sentinel.master_for(
            target.primary,
            connection_pool_class=TrimmingSentinelPool,
            max_connections=self._max_connections,
            timeout=self._timeout_s,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=retry,
            decode_responses=True,
            **target.options,
        )
        return client

    def invalidation_pool(
        self, connect_timeout_s: float
    ) -> redis.asyncio.ConnectionPool:
        """Return a pool of RESP2 connections to the primary, for invalidations.

        Through Sentinel, each new connection queries the Sentinels for the
        primary, so a reconnect after a failover reaches the promoted replica.
        Not for Redis Cluster, whose nodes track keys each on their own.
        """
        # RESP2 delivers invalidations as messages of a channel, where
        # redis-py's RESP3 parsers would handle the pushes themselves.
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            "socket_timeout": connect_timeout_s,
            "protocol": 2,
        }
        target = self._sentinel_target
        if target is not None:
            assert self._sentinel is not None
            return SentinelConnectionPool(  # type: ignore[no-untyped-call]
                target.primary, self._sentinel, **target.options, **options
            )
        return redis.asyncio.ConnectionPool.from_url(self._connect_url, **options)

    def describe(self) -> str:
        """Return the Redis URL with its password masked, for logs."""
        return self._url

    @property
    def _trimmed_pool(self) -> IdleTrimming | None:
        """Return the pool that `trim_idle_connections` trims, None on Cluster."""
        if not isinstance(self._client, redis.asyncio.Redis):
            return None
        pool = self._client.connection_pool
        return pool if isinstance(pool, IdleTrimming) else None

    def pool_connections(self) -> tuple[int, int]:
        """Return the pool's idle and in-use connection counts, (0, 0) on Cluster."""
        pool = self._trimmed_pool
        if pool is None:
            return 0, 0
        return pool.connection_counts()

    async def trim_idle_connections(self) -> int:
        """Close pool connections idle longer than the idle timeout.

        Keeps the `min_idle_connections` most recently used ones. Returns
        how many it closed: none on Redis Cluster or with an idle timeout
        of 0.
        """
        pool = self._trimmed_pool
        if pool is None or self._idle_timeout_s == 0:
            return 0
        return await pool.trim_idle(self._idle_timeout_s, self._min_idle_connections)

    async def run_idle_trim(self, stopping: asyncio.Event) -> None:
        """Run `trim_idle_connections` periodically until `stopping` is set.

        A connection is closed between `idle_timeout_s` and
        `idle_timeout_s` + 1 s after its last use.
        """
        pool = self._trimmed_pool
        if pool is None or self._idle_timeout_s == 0:
            return
        if not supports_trimming(pool):
            logger.warning(
                "redis-py %s has no idle connection list that this proxy can "
                "trim, so idle Redis connections stay open; use redis-py "
                "5.0.1 to 8.x",
                getattr(redis, "__version__", "(unknown version)"),
            )
            return
        period_s = min(_TRIM_PERIOD_MAX_S, self._idle_timeout_s / 2)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), period_s)
                return
            try:
                closed = await self.trim_idle_connections()
            except Exception:
                logger.exception(
                    "trimming idle Redis connections failed, so idle "
                    "connections stay open until the proxy restarts"
                )
                return
            if closed:
                idle, in_use = self.pool_connections()
                logger.debug(
                    "closed %d Redis connections idle for more than %gs, "
                    "%d idle and %d in use remain",
                    closed,
                    self._idle_timeout_s,
                    idle,
                    in_use,
                )

    @property
    def unavailable(self) -> bool:
        """Whether Redis is in an outage, which lasts until a call succeeds."""
        return self._unavailable_since is not None

    async def _call(self, awaitable: Awaitable[_T]) -> _T:
        """Await one Redis round trip, timing it for `observer` when that is set."""
        observer = self.observer
        if observer is None:
            return await self._round_trip(awaitable)
        started = time.perf_counter()
        try:
            result = await self._round_trip(awaitable)
        except StoreError as error:
            observer(time.perf_counter() - started, error)
            raise
        observer(time.perf_counter() - started, None)
        return result

    async def _round_trip(self, awaitable: Awaitable[_T]) -> _T:
        """Await one Redis round trip and map its errors to store errors.

        During an outage, only one call per `_OUTAGE_PROBE_S` goes to Redis;
        the others fail at once instead of each waiting for the timeouts.
        """
        if self._unavailable_since is not None:
            now = time.monotonic()
            if now - self._last_probe < _OUTAGE_PROBE_S:
                if inspect.iscoroutine(awaitable):
                    awaitable.close()
                self._failed_calls += 1
                raise StoreUnavailableError(self.backend, self._outage_reason)
            self._last_probe = now
        try:
            if self._cluster_start_lock is not None:
                try:
                    await self._start_cluster(self._cluster_start_lock)
                except BaseException:
                    if inspect.iscoroutine(awaitable):
                        awaitable.close()
                    raise
            if self._cluster_permits is None:
                result = await awaitable
            else:
                result = await self._await_with_permit(self._cluster_permits, awaitable)
        except MaxConnectionsError as exhausted:
            raise StoreBusyError(
                self.backend,
                f"all {self._max_connections} connections to a cluster node are "
                "in use; raise store.redis_max_connections",
            ) from exhausted
        except RedisConnectionError as connection_error:
            if str(connection_error) == POOL_EXHAUSTED:
                raise StoreBusyError(
                    self.backend,
                    f"no free connection of {self._max_connections} within "
                    f"{self._timeout_s:g}s; raise store.redis_max_connections",
                ) from connection_error
            reason = self._note_failure(connection_error)
            raise StoreUnavailableError(self.backend, reason) from connection_error
        except _UNAVAILABLE_ERRORS as unavailable:
            reason = self._note_failure(unavailable)
            raise StoreUnavailableError(self.backend, reason) from unavailable
        except RedisError as failed:
            # An error reply such as WRONGTYPE: Redis is reachable, but the
            # command failed, so it does not end an outage either.
            raise StoreError(f"redis command failed: {failed}") from failed
        self._note_reachable()
        return result

    async def _await_with_permit(
        self, permits: asyncio.Semaphore, awaitable: Awaitable[_T]
    ) -> _T:
        """Await `awaitable` while holding one of `permits`.

        Raises StoreBusyError when no permit frees up within the timeout.
        """
        try:
            async with asyncio.timeout(self._timeout_s):
                await permits.acquire()
        except BaseException as error:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            if isinstance(error, TimeoutError):
                raise StoreBusyError(
                    self.backend,
                    f"{self._max_connections} calls, the maximum, were in flight "
                    f"for {self._timeout_s:g}s; raise store.redis_max_connections",
                ) from None
            raise
        try:
            return await awaitable
        finally:
            permits.release()

    async def _start_cluster(self, lock: asyncio.Lock) -> None:
        """Read the cluster's slot map once, before the first command.

        With redis-py 8.1, concurrent first commands of a RedisCluster that
        has not read the slot map yet can fail with AttributeError
        ('NoneType' object has no attribute 'writelines') when a socket
        timeout is set. One initialization before any command avoids that.
        """
        async with lock:
            if self._cluster_start_lock is None:
                return
            assert isinstance(self._client, redis.asyncio.RedisCluster)
            await self._client.initialize()
            self._cluster_start_lock = None

    def _note_failure(self, error: BaseException) -> str:
        reason = f"{type(error).__name__}: {error}" if str(error) else repr(error)
        self._failed_calls += 1
        self._outage_reason = reason
        if self._unavailable_since is None:
            self._unavailable_since = time.monotonic()
            self._last_probe = self._unavailable_since
            logger.warning("Redis store at %s is unavailable: %s", self._url, reason)
        return reason

    def _note_reachable(self) -> None:
        if self._unavailable_since is None:
            return
        duration_s = time.monotonic() - self._unavailable_since
        logger.info(
            "Redis store at %s is reachable again after %.1f s and %d failed calls",
            self._url,
            duration_s,
            self._failed_calls,
        )
        self._unavailable_since = None
        self._failed_calls = 0

    async def get(self, namespace: str, uid: str, service: str) -> int | None:
        key = link_key(namespace, uid, service)
        value = await self._call(self._client.get(key))
        return _parse_pod(key, value)

    async def get_and_refresh(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> int | None:
        check_ttl(ttl_s)
        if ttl_s == PERSISTENT:
            # A temporary link keeps its TTL, as in MemoryStore.
            return await self.get(namespace, uid, service)
        key = link_key(namespace, uid, service)
        value = await self._call(
            self._get_and_refresh_script(keys=[key], args=[_ttl_arg(ttl_s)])
        )
        return _parse_pod(key, value)

    async def read_link(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> tuple[int, bool] | None:
        check_ttl(ttl_s)
        if ttl_s == PERSISTENT:
            pod = await self.get(namespace, uid, service)
            if pod is None:
                return None
            return pod, await self.link_ttl(namespace, uid, service) == PERSISTENT
        key = link_key(namespace, uid, service)
        result = await self._call(
            self._read_link_script(keys=[key], args=[_ttl_arg(ttl_s)])
        )
        if result is None:
            return None
        return _require_pod(key, result[0]), bool(int(result[1]))

    async def read_link_noticed(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> tuple[int, bool, tuple[int, str] | None] | None:
        check_ttl(ttl_s)
        if ttl_s == PERSISTENT:
            read = await self.read_link(namespace, uid, service, ttl_s)
            return None if read is None else (read[0], read[1], None)
        key = link_key(namespace, uid, service)
        keys = [key, move_notice_key(namespace, uid, service)]
        result = await self._call(
            self._read_link_noticed_script(keys=keys, args=[_ttl_arg(ttl_s)])
        )
        if result is None:
            return None
        notice = None
        if len(result) > 2 and isinstance(result[2], str):
            previous, _, reason = result[2].partition(":")
            if _POD_RE.fullmatch(previous) is not None:
                notice = (int(previous), reason)
        return _require_pod(key, result[0]), bool(int(result[1])), notice

    async def set(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> int | None:
        """Overwrite the link and return the previous pod.

        Raises StoreDataError when the previous value was no pod index. The
        new link is written even then.
        """
        check_pod(pod)
        check_ttl(ttl_s)
        keys = self._link_keys(namespace, uid, service)
        previous = await self._call(
            self._set_script(keys=keys, args=[pod, _ttl_arg(ttl_s), service])
        )
        return _parse_pod(keys[0], previous)

    async def try_set(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> tuple[bool, int | None]:
        check_pod(pod)
        check_ttl(ttl_s)
        keys = self._link_keys(namespace, uid, service)
        result = await self._call(
            self._try_set_script(keys=keys, args=[pod, _ttl_arg(ttl_s), service])
        )
        accepted, current = result
        return accepted == 1, _require_pod(keys[0], current)

    async def set_if_absent(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> int:
        check_pod(pod)
        check_ttl(ttl_s)
        keys = self._link_keys(namespace, uid, service)
        current = await self._call(
            self._set_if_absent_script(keys=keys, args=[pod, _ttl_arg(ttl_s), service])
        )
        return _require_pod(keys[0], current)

    async def remove(
        self, namespace: str, uid: str, service: str, delay_s: float = 0
    ) -> bool:
        keys = self._link_keys(namespace, uid, service)
        existed = await self._call(
            self._remove_script(keys=keys, args=[_delay_arg(delay_s), service])
        )
        return bool(existed == 1)

    async def remove_if_pod(
        self, namespace: str, uid: str, service: str, pod: int, delay_s: float = 0
    ) -> bool:
        keys = self._link_keys(namespace, uid, service)
        result = await self._call(
            self._remove_if_pod_script(
                keys=keys, args=[pod, _delay_arg(delay_s), service]
            )
        )
        if isinstance(result, str):
            raise StoreDataError(keys[0], result)
        return bool(result == 1)

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
        keys = [
            *self._link_keys(namespace, uid, service),
            move_notice_key(namespace, uid, service),
        ]
        lifetime_s = NOTICE_TTL_S if ttl_s == PERSISTENT else ttl_s
        args = [
            old_pod,
            new_pod,
            _ttl_arg(ttl_s),
            service,
            notice,
            _milliseconds(lifetime_s),
        ]
        result = await self._call(self._replace_if_pod_script(keys=keys, args=args))
        if len(result) < 2:
            return False, None
        return bool(result[0]), _require_pod(keys[0], result[1])

    async def remove_if_temporary(
        self, namespace: str, uid: str, service: str, pod: int
    ) -> bool:
        key = link_key(namespace, uid, service)
        removed = await self._call(
            self._remove_if_temporary_script(keys=[key], args=[pod])
        )
        return bool(removed)

    async def get_if_persistent(
        self, namespace: str, uid: str, service: str
    ) -> int | None:
        key = link_key(namespace, uid, service)
        value = await self._call(self._get_if_persistent_script(keys=[key]))
        return _parse_pod(key, value)

    async def linked_services(self, namespace: str, uid: str) -> dict[str, int]:
        key = uid_hash_key(namespace, uid)
        fields = await self._call(self._client.hgetall(key))
        services: dict[str, int] = {}
        for service, value in fields.items():
            # With decode_responses both are str, so this only narrows the type.
            if not isinstance(service, str) or not isinstance(value, str):
                raise StoreDataError(key, {service: value})
            if _POD_RE.fullmatch(value) is None:
                raise StoreDataError(key, {service: value})
            services[service] = int(value)
        return services

    async def batch_get(
        self, namespace: str, service: str, uids: Sequence[str]
    ) -> dict[int, list[str]]:
        if not uids:
            return {}
        keys = [link_key(namespace, uid, service) for uid in uids]

        # A pipeline of GETs, not MGET, because on Redis Cluster the keys of
        # different UIDs live in different slots.
        async with self._client.pipeline(transaction=False) as pipeline:
            for key in keys:
                pipeline.get(key)
            values: list[Any] = await self._call(pipeline.execute())

        by_pod: dict[int, list[str]] = {}
        for uid, key, value in zip(uids, keys, values, strict=True):
            pod = _parse_pod(key, value)
            if pod is not None:
                by_pod.setdefault(pod, []).append(uid)
        return by_pod

    async def link_ttl(self, namespace: str, uid: str, service: str) -> float | None:
        milliseconds = await self._call(
            self._client.pttl(link_key(namespace, uid, service))
        )
        if milliseconds == -2:
            return None
        if milliseconds == -1:
            return PERSISTENT
        return milliseconds / 1000

    async def publish_pod_state(
        self, namespace: str, service: str, pod: int, record: str
    ) -> None:
        check_pod(pod)
        key = state_key(namespace, service)
        await self._call(self._client.hset(key, str(pod), record))

    async def replace_pod_state(
        self,
        namespace: str,
        service: str,
        pod: int,
        expected: str | None,
        record: str,
    ) -> bool:
        check_pod(pod)
        keys = [state_key(namespace, service)]
        absent = "1" if expected is None else "0"
        args = [pod, record, absent, expected or ""]
        written = await self._call(self._replace_pod_state_script(keys=keys, args=args))
        return bool(written)

    async def read_pod_states(self, namespace: str, service: str) -> dict[str, str]:
        key = state_key(namespace, service)
        fields = await self._call(self._client.hgetall(key))
        return {str(field): str(value) for field, value in fields.items()}

    async def remove_pod_state(self, namespace: str, service: str, pod: int) -> bool:
        key = state_key(namespace, service)
        return bool(await self._call(self._client.hdel(key, str(pod))))

    async def publish_workload(self, namespace: str, service: str, value: str) -> None:
        key = workload_key(namespace, service)
        await self._call(self._client.set(key, value))

    async def read_workload(self, namespace: str, service: str) -> str | None:
        value = await self._call(self._client.get(workload_key(namespace, service)))
        return None if value is None else str(value)

    async def index_link(
        self,
        namespace: str,
        service: str,
        pod: int,
        uid: str,
        expires_ms: int | None,
        previous_pod: int | None = None,
    ) -> None:
        score: float = math.inf if expires_ms is None else expires_ms
        # A non-transactional pipeline: one round trip on a single node, and
        # on Cluster each command goes to the node of its own key.
        async with self._client.pipeline(transaction=False) as pipeline:
            if previous_pod is not None and previous_pod != pod:
                pipeline.zrem(pod_links_key(namespace, service, previous_pod), uid)
            pipeline.zadd(pod_links_key(namespace, service, pod), {uid: score})
            await self._call(pipeline.execute())

    async def unindex_link(
        self, namespace: str, service: str, pod: int, uid: str
    ) -> None:
        await self._call(self._client.zrem(pod_links_key(namespace, service, pod), uid))

    async def indexed_uids(
        self, namespace: str, service: str, pod: int, now_ms: int, limit: int
    ) -> list[str]:
        key = pod_links_key(namespace, service, pod)
        async with self._client.pipeline(transaction=False) as pipeline:
            pipeline.zremrangebyscore(key, "-inf", now_ms)
            pipeline.zrange(key, 0, limit - 1)
            _, uids = await self._call(pipeline.execute())
        return [str(uid) for uid in uids]

    async def count_indexed(
        self, namespace: str, service: str, pod: int, now_ms: int
    ) -> tuple[int, int]:
        key = pod_links_key(namespace, service, pod)
        async with self._client.pipeline(transaction=False) as pipeline:
            pipeline.zremrangebyscore(key, "-inf", now_ms)
            pipeline.zcount(key, f"({now_ms}", "(+inf")
            pipeline.zcount(key, "+inf", "+inf")
            _, temporary, persistent = await self._call(pipeline.execute())
        return int(temporary), int(persistent)

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    @staticmethod
    def _link_keys(namespace: str, uid: str, service: str) -> list[str]:
        return [link_key(namespace, uid, service), uid_hash_key(namespace, uid)]
