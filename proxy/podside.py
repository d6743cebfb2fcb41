"""The sidecar's role beside one stateful pod: inbound relay and state publisher.

With a ``[pod]`` section the sidecar forwards the pod's inbound traffic to
the local application, measuring it, and publishes the pod's state record
every ``publish_period_s``:

- the load is the value the application last reported through the admin
  API; when it reported none, the sidecar computes one the way the Java
  framework weighs its load, from what it measures:
  ``round(cpu_factor * in_flight + (1 - cpu_factor) * latency_ms)``, where
  `in_flight` is the number of inbound requests being served at publication
  and `latency_ms` the moving average of their response times;
- the routing state is READY, or DENY_NEW_CALL once the application or an
  operator asked for a drain;
- pod 0 also publishes the service's workload state.

On SIGTERM the agent publishes DENY_NEW_CALL, keeps serving for ``drain_s``
so linked users finish, then publishes SHUTDOWN so routers move them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from proxy.config import PodSettings
from proxy.errors import StoreError
from proxy.inbound import Limits, parse_networks
from proxy.inflight import InFlight
from proxy.pods import Pod, parse_address
from proxy.podset import parse_records
from proxy.podstate import (
    DRAINED_BY_ADMIN,
    MAX_LOAD,
    MIN_LOAD,
    PodState,
    Routing,
    Workload,
    now_ms,
)
from proxy.relay import Relay, answer_expect
from proxy.store.base import LinkStore
from proxy.upstream import UpstreamPool

logger = logging.getLogger("stateful_route.pod")

# Weight of the newest response time in the moving average of latency.
_LATENCY_ALPHA = 0.1
# Compare-and-set rounds of one publication before it writes unconditionally.
_PUBLISH_ATTEMPTS = 3


class PodAgent:
    """Publishes the local pod's state and relays its inbound traffic.

    :param settings: the ``[pod]`` section.
    :param store: where the record is published.
    :param clock: returns Unix time in milliseconds.
    """

    def __init__(
        self,
        settings: PodSettings,
        store: LinkStore,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.settings = settings
        self._store = store
        self._clock = clock
        self.app = Pod(settings.index, parse_address(settings.app_address))
        self.reported_load: int | None = None
        # The routing state the application reported, an operator's drain on
        # top of it, and the final states of a stop, which win over both.
        self.app_routing = Routing.READY
        self.drained_by_admin = False
        self._stop_routing: Routing | None = None
        self.in_flight = InFlight()
        self.latency_ms = 0.0
        self.requests = 0
        self.last_published: PodState | None = None
        # One publication at a time, so the periodic one cannot land after
        # the final SHUTDOWN of a stop.
        self._publish_lock = asyncio.Lock()
        self._relay: Relay | None = None
        self._limits: Limits | None = None
        self._trusted = parse_networks(settings.trusted_proxies)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )

    @property
    def load(self) -> int:
        """Return the load to publish: reported, or computed from measurements."""
        if self.reported_load is not None:
            return self.reported_load
        factor = self.settings.cpu_factor
        return round(factor * self.in_flight.count + (1 - factor) * self.latency_ms)

    def report(self, load: int | None = None, routing: Routing | None = None) -> None:
        """Take the load or routing state the application reports.

        SHUTDOWN is not accepted here: it is published on stop only.
        """
        if load is not None:
            self.reported_load = load
        if routing is not None:
            if routing is Routing.SHUTDOWN:
                raise ValueError("SHUTDOWN is published by the sidecar when it stops")
            if self._stop_routing is not None:
                raise ValueError("the pod is stopping; its routing state is final")
            self.app_routing = routing

    @property
    def routing(self) -> Routing:
        """Return the routing state to publish."""
        if self._stop_routing is not None:
            return self._stop_routing
        if self.drained_by_admin:
            return Routing.DENY_NEW_CALL
        return self.app_routing

    @property
    def drained_by(self) -> str | None:
        if self.drained_by_admin and self._stop_routing is None:
            return DRAINED_BY_ADMIN
        return None

    def record(self) -> PodState:
        """Return the record that the next publication writes."""
        address = self.settings.advertise_address or None
        return PodState(
            self.load, self.routing, self._clock(), address, self.drained_by
        )

    async def publish(self) -> PodState:
        """Write the record now; pod 0 also writes the workload state."""
        async with self._publish_lock:
            return await self._publish()

    async def _publish(self) -> PodState:
        settings = self.settings
        for _ in range(_PUBLISH_ATTEMPTS):
            stored = await self._read_own_record()
            self._follow_admin_drain(stored)
            state = self.record()
            # A compare-and-set, so an admin drain written after our read is
            # never overwritten: we read again and adopt it instead.
            if await self._store.replace_pod_state(
                settings.namespace,
                settings.service,
                settings.index,
                stored,
                state.encode(),
            ):
                break
        else:
            await self._store.publish_pod_state(
                settings.namespace, settings.service, settings.index, state.encode()
            )
        if settings.index == 0:
            await self._publish_workload()
        if self.last_published is None or self.last_published.routing != state.routing:
            logger.info(
                "published pod=%d service=%s namespace=%s routing=%s load=%d",
                settings.index,
                settings.service,
                settings.namespace,
                state.routing.value,
                state.load,
            )
        self.last_published = state
        return state

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish every ``publish_period_s`` until `stopping` is set."""
        period = self.settings.publish_period_s
        while not stopping.is_set():
            try:
                await self.publish()
            except StoreError as exc:
                logger.warning("cannot publish the pod state: %s", exc)
            except Exception:
                # A bug must not end the publishing, or the record goes
                # stale and every router stops sending to this pod.
                logger.exception("publishing the pod state failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), period)

    async def drain_and_shut_down(self) -> None:
        """Publish DENY_NEW_CALL, serve for ``drain_s``, then publish SHUTDOWN."""
        settings = self.settings
        self._stop_routing = Routing.DENY_NEW_CALL
        await self._publish_logged()
        logger.info(
            "draining pod=%d for %gs before SHUTDOWN", settings.index, settings.drain_s
        )
        await asyncio.sleep(settings.drain_s)
        self._stop_routing = Routing.SHUTDOWN
        await self._publish_logged()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Relay one inbound request to the local application, measuring it."""
        assert self._relay is not None, "start_relay() first"
        ids = {"pod": self.settings.index, "app": str(self.app.address)}
        started = time.monotonic()
        rejected = answer_expect(request)
        if rejected is not None:
            return rejected
        self.in_flight.enter()
        try:
            return await self._relay.relay(
                request,
                self.app,
                self._timeout,
                ids,
                trusted=self._trusted,
                limits=self._limits,
            )
        finally:
            self.in_flight.leave()
            self.requests += 1
            elapsed_ms = (time.monotonic() - started) * 1000
            self.latency_ms += _LATENCY_ALPHA * (elapsed_ms - self.latency_ms)

    def start_relay(self, pool: UpstreamPool, limits: Limits) -> None:
        """Use `pool` for the inbound relay; the agent does not close it.

        `limits` are those of the inbound listener, for the request bodies.
        """
        self._relay = Relay(pool, routed_pod_header="")
        self._limits = limits

    def describe(self) -> dict[str, object]:
        """Return the agent's state for the admin API."""
        settings = self.settings
        last = self.last_published
        return {
            "namespace": settings.namespace,
            "service": settings.service,
            "index": settings.index,
            "app_address": str(self.app.address),
            "advertise_address": settings.advertise_address or None,
            "routing": self.routing.value,
            "app_routing": self.app_routing.value,
            "drained_by": self.drained_by,
            "load": self.load,
            "reported_load": self.reported_load,
            "in_flight": self.in_flight.count,
            "latency_ms": round(self.latency_ms, 3),
            "requests": self.requests,
            "publish_period_s": settings.publish_period_s,
            "drain_s": settings.drain_s,
            "last_published": None
            if last is None
            else {
                "load": last.load,
                "routing": last.routing.value,
                "updated_ms": last.updated_ms,
            },
        }

    async def _publish_logged(self) -> None:
        try:
            await self.publish()
        except StoreError as exc:
            logger.warning("cannot publish routing=%s: %s", self.routing.value, exc)
        except Exception:
            # The drain goes on, so SHUTDOWN is still published at its end.
            logger.exception("publishing routing=%s failed", self.routing.value)

    async def _read_own_record(self) -> str | None:
        settings = self.settings
        raw = await self._store.read_pod_states(settings.namespace, settings.service)
        return raw.get(str(settings.index))

    def _follow_admin_drain(self, stored: str | None) -> None:
        """Adopt or drop a drain an operator wrote through a router's admin API.

        The record then carries ``drained_by = "admin"``; an undrain through
        the admin API writes READY without it, or deletes the record.
        """
        if self._stop_routing is not None:
            return
        drained_by_admin = False
        if stored is not None:
            try:
                state = PodState.decode(stored)
            except ValueError:
                state = None
            drained_by_admin = (
                state is not None
                and state.drained_by == DRAINED_BY_ADMIN
                and state.routing is Routing.DENY_NEW_CALL
            )
        self.drained_by_admin = drained_by_admin

    async def _publish_workload(self) -> None:
        settings = self.settings
        raw = await self._store.read_pod_states(settings.namespace, settings.service)
        records, _ = parse_records(raw)
        now = self._clock()
        # Java's staleness window is two publish periods (60 s for 30 s).
        fresh = [
            state
            for state in records.values()
            if state.is_fresh(now, 2 * settings.publish_period_s)
            and state.routing is not Routing.SHUTDOWN
        ]
        workload = Workload(
            pods=len(fresh),
            ready=sum(1 for state in fresh if state.routing is Routing.READY),
            load=min(max(sum(state.load for state in fresh), MIN_LOAD), MAX_LOAD),
            updated_ms=now,
        )
        await self._store.publish_workload(
            settings.namespace, settings.service, workload.encode()
        )
