"""The proxy process: assemble the parts, serve, and stop in phases.

Stopping runs in three phases: stop accepting connections and close idle
keep-alive ones, let in-flight requests finish for up to
``proxy.shutdown_timeout_s``, then cancel the rest and close the pod pools
and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import build_kind, stale_compiled_modules
from proxy.admin import build_admin_app
from proxy.cache import LinkCache
from proxy.config import Config, StoreSettings
from proxy.failover import FailoverHandler
from proxy.forward import Forwarder
from proxy.health import TransitionCounts, log_transitions
from proxy.inbound import InboundServer, Limits
from proxy.inflight import InFlight
from proxy.listener import BatchAcceptSite
from proxy.logs import ACCESS_LOGGER, AccessLogger
from proxy.metrics import Metrics
from proxy.podside import PodAgent
from proxy.probe import HealthMonitor
from proxy.rebalance import Rebalancer
from proxy.reload import Reloader
from proxy.routing import Router
from proxy.services import Service, build_services
from proxy.statetable import PodStates
from proxy.store.base import LinkStore
from proxy.store.memory import MemoryStore
from proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from proxy.invalidation import Invalidator

logger = logging.getLogger("stateful_route.server")


# Time background loops get to end by themselves once the proxy stops.
_BACKGROUND_STOP_S = 2.0
# Time the runner gives handlers after stop() stopped waiting for them.
_CANCEL_GRACE_S = 0.05
# Listen backlog of the proxy port. aiohttp's default of 128 overflows when
# hundreds of clients connect at once, and the kernel then drops their SYNs,
# which the clients resend only after 1 s, 3 s and more. Linux caps it at
# net.core.somaxconn, whose default is 4096 since Linux 5.4.
_LISTEN_BACKLOG = 4096


def create_store(settings: StoreSettings) -> LinkStore:
    """Return the link store that `settings` select, not yet connected."""
    if settings.backend == "redis":
        from proxy.store.redis import RedisStore

        return RedisStore(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            connect_timeout_s=settings.redis_connect_timeout_s,
            retries=settings.redis_retries,
            max_connections=settings.redis_max_connections,
            idle_timeout_s=settings.redis_idle_timeout_s,
            min_idle_connections=settings.redis_min_idle_connections,
        )
    return MemoryStore()


def describe_store(store: LinkStore) -> str:
    """Return the backend name and, for Redis, its URL without the password."""
    describe = getattr(store, "describe", None)
    if callable(describe):
        return f"{store.backend} {describe()}"
    return store.backend


class ProxyServer:
    """One proxy: the forwarding port, the admin port, the store and the pools.

    :param config: the validated configuration.
    :param store: a store to use instead of the one `config` selects.
    :param environ: the environment that reloads read overrides from; a
        copy of ``os.environ`` as it is now when not given.
    :param worker: index of this process among ``proxy.workers``; worker i
        serves the admin API on ``admin.port + i`` (or a free port for 0).
    """

    def __init__(
        self,
        config: Config,
        store: LinkStore | None = None,
        environ: Mapping[str, str] | None = None,
        worker: int = 0,
    ) -> None:
        self.config = config
        self.worker = worker
        self.store = store if store is not None else create_store(config.store)
        self.services: dict[str, Service] = build_services(config.services)
        self.cache = LinkCache(
            config.store.local_cache_ttl_s, config.store.local_cache_size
        )
        self.router = Router(self.store, self.cache, config.store.temporary_link_ttl_s)
        self.states = PodStates(self.store, self.services)
        self.rebalancer = Rebalancer(self.store, self.states, self.services, self.cache)
        self.failover = {
            name: FailoverHandler(service, self.store, self.states, self.router)
            for name, service in self.services.items()
        }
        self.health_counts = {name: TransitionCounts() for name in self.services}
        self.health_monitors: dict[str, HealthMonitor] = {}
        self._stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        # The loops of each service stop on its own event, set when a reload
        # removes the service or the proxy stops.
        self._service_stopping: dict[str, asyncio.Event] = {}
        self._service_tasks: dict[str, list[asyncio.Task[None]]] = {}
        self.reloader = Reloader(self, os.environ if environ is None else environ)
        self.started_at = time.time()
        self._upstream: UpstreamPool | None = None
        self._forwarder: Forwarder | None = None
        self._runners: list[web.ServerRunner] = []
        self.pod_agent: PodAgent | None = None
        self.inbound_address = ""
        # Set once a stop began; /readyz then reports not ready.
        self.stopping = False
        self._admin_runner: web.AppRunner | None = None
        self.proxy_address = ""
        self.admin_address = ""
        self.metrics = Metrics(self)
        self.invalidator: Invalidator | None = None
        # Invalidations connect to store.redis_url, so only for that store.
        self._store_from_config = store is None

    @property
    def in_flight(self) -> int:
        """Return the requests in flight on the proxy and inbound ports."""
        return sum(counter.count for counter in self._in_flight_counters())

    @property
    def retry_counters(self) -> dict[str, dict[str, int]]:
        """Return the retry counters of every service; empty without a proxy port."""
        if self._forwarder is None:
            return {}
        return self._forwarder.retry_counters()

    def _in_flight_counters(self) -> list[InFlight]:
        counters = []
        if self._forwarder is not None:
            counters.append(self._forwarder.in_flight)
        if self.pod_agent is not None:
            counters.append(self.pod_agent.in_flight)
        return counters

    async def start(self) -> None:
        """Connect the store and open the ports.

        Raises `StoreUnavailableError` when the store does not respond, and
        OSError when a port cannot be bound.
        """
        await self.store.ping()
        await self._start_invalidation()
        self._start_idle_trim()
        self._background_task(self.cache.run_expiry(self._stopping), "cache-expiry")
        proxy = self.config.proxy
        self._upstream = UpstreamPool(
            proxy.upstream_connections_per_pod, proxy.upstream_idle_timeout_s
        )

        if self.services:
            self._forwarder = Forwarder(
                self.config,
                self.services,
                self.router,
                self.states,
                self._upstream,
                self.metrics,
            )
            self._background_task(self.states.run(self._stopping), "pod-states")
            self._background_task(self.rebalancer.run(self._stopping), "rebalance")
            self._start_health()
            runner = await self._listen(self._forwarder.handle, proxy.host, proxy.port)
            self.proxy_address = _bound_address(runner)

        pod = self.config.pod
        if pod is not None:
            self.pod_agent = PodAgent(pod, self.store)
            self.pod_agent.start_relay(
                self._upstream, Limits.from_settings(self.config.proxy)
            )
            runner = await self._listen(self.pod_agent.handle, pod.host, pod.port)
            self.inbound_address = _bound_address(runner)
            # The first record goes out before start() returns, so routers
            # can see the pod as soon as the sidecar runs.
            await self.pod_agent.publish()
            self._background_task(self.pod_agent.run(self._stopping), "pod-publish")

        admin = self.config.admin
        if admin.enabled:
            self._admin_runner = web.AppRunner(
                build_admin_app(self), access_log=None, handle_signals=False
            )
            await self._admin_runner.setup()
            admin_port = admin.port + self.worker if admin.port else 0
            admin_site = web.TCPSite(self._admin_runner, admin.host, admin_port)
            await admin_site.start()
            self.admin_address = _bound_address(self._admin_runner)

    async def _start_invalidation(self) -> None:
        """Keep the link cache coherent through Redis, where Redis can do it."""
        settings = self.config.store
        if not self._store_from_config or settings.backend != "redis":
            return
        if not self.cache.enabled:
            return
        if getattr(self.store, "cluster", False):
            logger.warning(
                "Redis Cluster: no invalidations, so a link changed elsewhere "
                "is seen after at most store.local_cache_ttl_s = %gs",
                settings.local_cache_ttl_s,
            )
            return
        from proxy.invalidation import Invalidator
        from proxy.store.redis import RedisStore

        assert isinstance(self.store, RedisStore)
        pool = self.store.invalidation_pool(settings.redis_connect_timeout_s)
        self.invalidator = Invalidator(pool, self.store, self.cache)
        self._background_task(self.invalidator.run(self._stopping), "invalidation")
        # Until the first attempt ends the cache is suspended; waiting here
        # lets the first requests already use it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.invalidator.first_round.wait(),
                settings.redis_connect_timeout_s + 1.0,
            )

    def _start_idle_trim(self) -> None:
        """Close the Redis connections that a burst of store calls left idle."""
        run_idle_trim = getattr(self.store, "run_idle_trim", None)
        if callable(run_idle_trim):
            self._background_task(run_idle_trim(self._stopping), "redis-idle-trim")

    @property
    def _access_log(self) -> dict[str, Any]:
        """Return the access log arguments of aiohttp's server."""
        if not self.config.log.access_log:
            return {"access_log": None}
        proxy = self.config.proxy
        return {
            "access_log_class": AccessLogger,
            "access_log": logging.getLogger(ACCESS_LOGGER),
            "access_log_format": f"{proxy.uid_header}|{proxy.routed_pod_header}",
        }

    async def _listen(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        host: str,
        port: int,
    ) -> web.ServerRunner:
        server = InboundServer(
            handler,
            Limits.from_settings(self.config.proxy),
            handler_cancellation=True,
            # BatchAcceptSite sets them on each accepted socket.
            socket_options_set=True,
            **self._access_log,
        )
        # stop() waits for in-flight requests itself, so the runner's own wait
        # only has to cancel what is left. aiohttp reads 0 as no time limit.
        runner = web.ServerRunner(
            server, shutdown_timeout=_CANCEL_GRACE_S, handle_signals=False
        )
        await runner.setup()
        self._runners.append(runner)
        # With several workers each process binds the same port, and the
        # kernel spreads new connections over them.
        reuse_port = self.config.proxy.workers > 1
        site = BatchAcceptSite(
            runner, host, port, backlog=_LISTEN_BACKLOG, reuse_port=reuse_port
        )
        await site.start()
        return runner

    def _start_health(self) -> None:
        """Start the health loop, failover handler and observers of each service."""
        for name in self.services:
            self.start_service_loops(name)

    def start_service_loops(self, name: str) -> None:
        """Start the health loop, failover handler and observers of one service."""
        service = self.services[name]
        stopping = asyncio.Event()
        if self._stopping.is_set():
            stopping.set()
        self._service_stopping[name] = stopping
        monitor = HealthMonitor(service, self.states)
        self.health_monitors[name] = monitor
        counts = self.health_counts[name]
        log_queue = service.health.subscribe()
        counts_queue = service.health.subscribe()
        tasks = [
            self._background_task(monitor.run(stopping), f"health-{name}"),
            self._background_task(
                self.failover[name].run(stopping), f"failover-{name}"
            ),
            self._background_task(
                log_transitions(log_queue, stopping), f"health-log-{name}"
            ),
            self._background_task(
                counts.run(counts_queue, stopping), f"health-counts-{name}"
            ),
        ]
        self._service_tasks[name] = tasks

    async def stop_service_loops(self, name: str) -> None:
        """Stop the loops of a service that a reload removed."""
        self._service_stopping.pop(name).set()
        tasks = self._service_tasks.pop(name)
        await _finish_tasks(tasks, _BACKGROUND_STOP_S)
        for task in tasks:
            if task in self._background:
                self._background.remove(task)

    @property
    def forwarder(self) -> Forwarder | None:
        """The handler of the proxy port; None without services or before start."""
        return self._forwarder

    def _background_task(
        self, work: Coroutine[Any, Any, None], name: str
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_log_failed_task)
        self._background.append(task)
        return task

    def log_started(self) -> None:
        """Log the one start-up line: addresses, store, services and pod role."""
        parts = []
        if self.proxy_address:
            services = ", ".join(s.describe() for s in self.services.values())
            parts.append(f"listening on {self.proxy_address}, services: {services}")
        if self.pod_agent is not None:
            pod = self.pod_agent.settings
            parts.append(
                f"pod {pod.index} of {pod.service} in {pod.namespace}: inbound "
                f"{self.inbound_address} to app {pod.app_address}, publishing "
                f"every {pod.publish_period_s:g}s"
            )
        parts.append(f"admin {self.admin_address or 'disabled'}")
        parts.append(f"store {describe_store(self.store)}")
        parts.append(f"forwarding path {build_kind()}")
        if self.config.proxy.workers > 1:
            parts.append(f"worker {self.worker} of {self.config.proxy.workers}")
        logger.info("stateful-route %s", "; ".join(parts))
        stale = stale_compiled_modules()
        if stale:
            logger.warning(
                "compiled modules older than their source files, so edits of "
                "these sources have no effect: %s; compile again with "
                "STATEFUL_ROUTE_MYPYC=1 pip install -e ., or delete the .so "
                "files to run the sources",
                ", ".join(stale),
            )

    async def drain_pod(self) -> None:
        """Run the pod's drain before stopping, when the sidecar has a pod role."""
        if self.pod_agent is not None:
            await self.pod_agent.drain_and_shut_down()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests, then close everything."""
        self.stopping = True
        timeout = self.config.proxy.shutdown_timeout_s
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()
            if runner.server is not None:
                runner.server.pre_shutdown()
        if self.in_flight:
            logger.info(
                "stopping: waiting up to %gs for %d in-flight requests",
                timeout,
                self.in_flight,
            )
            deadline = time.monotonic() + timeout
            for counter in self._in_flight_counters():
                await counter.wait_idle(max(0.0, deadline - time.monotonic()))
            if self.in_flight:
                logger.warning(
                    "stopping: cancelling %d requests still in flight after %gs",
                    self.in_flight,
                    timeout,
                )
        for runner in self._runners:
            await runner.cleanup()

        self._stopping.set()
        for service_stopping in self._service_stopping.values():
            service_stopping.set()
        await _finish_tasks(self._background, _BACKGROUND_STOP_S)
        await self.router.wait_background()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._upstream is not None:
            await self._upstream.close()
        await self.store.close()
        logger.info("stateful-route stopped")


async def _finish_tasks(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait up to `timeout_s` for tasks that saw the stop event, then cancel them."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        logger.info("stopping: cancelling background task %s", task.get_name())
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _bound_address(runner: web.BaseRunner) -> str:
    """Return host:port of a started site, with the real port when it was 0."""
    addresses: Sequence[object] = runner.addresses
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            host, port = address[0], address[1]
            if ":" in str(host):
                return f"[{host}]:{port}"
            return f"{host}:{port}"
    return ""


async def serve(
    config: Config,
    stop_signals: Sequence[int] = (),
    reload_signals: Sequence[int] = (),
    worker: int = 0,
) -> None:
    """Run a proxy until one of `stop_signals` arrives, then stop it.

    Each of `reload_signals` reloads the configuration file.
    """
    server = ProxyServer(config, worker=worker)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(number: int) -> None:
        name = signal.Signals(number).name
        if stopping.is_set():
            # The handlers stay installed until the proxy stopped, so a
            # second signal cannot kill it halfway through draining.
            logger.info("received %s again, already stopping", name)
            return
        logger.info("received %s, stopping", name)
        stopping.set()

    reloads: set[asyncio.Task[None]] = set()

    def on_reload_signal(number: int) -> None:
        # Reloads wait for each other in the reloader, which also rejects
        # one that arrives while the proxy stops.
        task = asyncio.create_task(
            server.reloader.reload_logged(signal.Signals(number).name)
        )
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for number in stop_signals:
        loop.add_signal_handler(number, on_signal, number)
    for number in reload_signals:
        loop.add_signal_handler(number, on_reload_signal, number)
    server.log_started()
    # Objects made at start (modules, configuration, pools) move to the
    # permanent generation, so the collector's full passes under traffic
    # no longer scan them. benchmarks/run measured the p99 of its small
    # load at 10.3 to 12.6 ms without this and 7.3 to 7.4 ms with it.
    gc.collect()
    gc.freeze()
    try:
        await stopping.wait()
        server.stopping = True
        await server.drain_pod()
    finally:
        try:
            await server.stop()
        finally:
            for number in (*stop_signals, *reload_signals):
                loop.remove_signal_handler(number)
            await asyncio.gather(*reloads, return_exceptions=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)


def _log_failed_task(task: asyncio.Task[None]) -> None:
    """Log a background task that ended with an error, which nothing awaits."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        logger.error(
            "background task %s stopped on an error: %r; what it does stops "
            "until the proxy restarts",
            task.get_name(),
            error,
            exc_info=error,
        )
