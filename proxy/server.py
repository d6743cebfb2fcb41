"""The proxy process: assemble the parts, serve, and stop in phases.

Stopping runs in three phases: stop accepting connections and close idle
keep-alive ones, let in-flight requests finish for up to
``proxy.shutdown_timeout_s``, then cancel the rest and close the pod pools
and the store.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from proxy.admin import build_admin_app
from proxy.cache import LinkCache
from proxy.config import Config, StoreSettings
from proxy.forward import Forwarder
from proxy.routing import Router
from proxy.services import Service, build_services
from proxy.statetable import PodStates
from proxy.store.base import LinkStore
from proxy.store.memory import MemoryStore

logger = logging.getLogger("stateful_route.server")


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
    """

    def __init__(self, config: Config, store: LinkStore | None = None) -> None:
        self.config = config
        self.store = store if store is not None else create_store(config.store)
        self.services: dict[str, Service] = build_services(config.services)
        self.cache = LinkCache(
            config.store.local_cache_ttl_s, config.store.local_cache_size
        )
        self.router = Router(self.store, self.cache, config.store.temporary_link_ttl_s)
        self.states = PodStates(self.store, self.services)
        self._stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self.started_at = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._forwarder: Forwarder | None = None
        self._runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.proxy_address = ""
        self.admin_address = ""

    @property
    def in_flight(self) -> int:
        return 0 if self._forwarder is None else self._forwarder.in_flight

    async def start(self) -> None:
        """Connect the store and open the ports.

        Raises `StoreUnavailableError` when the store does not answer, and
        OSError when a port cannot be bound.
        """
        await self.store.ping()
        proxy = self.config.proxy
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=proxy.upstream_connections_per_pod,
            keepalive_timeout=proxy.upstream_idle_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._forwarder = Forwarder(
            self.config, self.services, self.router, self.states, self._session
        )
        self._background.append(
            asyncio.create_task(self.states.run(self._stopping), name="pod-states")
        )

        server = web.Server(
            self._forwarder.handle, handler_cancellation=True, access_log=None
        )
        self._runner = web.ServerRunner(
            server, shutdown_timeout=0.0, handle_signals=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, proxy.host, proxy.port)
        await site.start()
        self.proxy_address = _bound_address(site, self._runner)

        admin = self.config.admin
        if admin.enabled:
            self._admin_runner = web.AppRunner(
                build_admin_app(self), access_log=None, handle_signals=False
            )
            await self._admin_runner.setup()
            admin_site = web.TCPSite(self._admin_runner, admin.host, admin.port)
            await admin_site.start()
            self.admin_address = _bound_address(admin_site, self._admin_runner)

    def log_started(self) -> None:
        """Log the one start-up line: addresses, store and services."""
        services = ", ".join(service.describe() for service in self.services.values())
        admin = self.admin_address or "disabled"
        logger.info(
            "stateful-route listening on %s (admin %s), store %s, services: %s",
            self.proxy_address,
            admin,
            describe_store(self.store),
            services,
        )

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests, then close everything."""
        timeout = self.config.proxy.shutdown_timeout_s
        runner = self._runner
        if runner is not None:
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
            assert self._forwarder is not None
            if not await self._forwarder.wait_idle(timeout):
                logger.warning(
                    "stopping: cancelling %d requests still in flight after %gs",
                    self.in_flight,
                    timeout,
                )
            await runner.cleanup()
        self._stopping.set()
        for task in self._background:
            await task
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._session is not None:
            await self._session.close()
        await self.store.close()
        logger.info("stateful-route stopped")


def _bound_address(site: web.TCPSite, runner: web.BaseRunner) -> str:
    """Return host:port of a started site, with the real port when it was 0."""
    addresses: Sequence[object] = runner.addresses
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            host, port = address[0], address[1]
            if ":" in str(host):
                return f"[{host}]:{port}"
            return f"{host}:{port}"
    return site.name


async def serve(config: Config, stop_signals: Sequence[int] = ()) -> None:
    """Run a proxy until one of `stop_signals` arrives, then stop it."""
    server = ProxyServer(config)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(number: int) -> None:
        logger.info("received %s, stopping", signal.Signals(number).name)
        stopping.set()

    for number in stop_signals:
        loop.add_signal_handler(number, on_signal, number)
    server.log_started()
    try:
        await stopping.wait()
    finally:
        for number in stop_signals:
            loop.remove_signal_handler(number)
        await server.stop()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
