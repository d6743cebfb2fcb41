"""Active health probes, and the health loop that every service runs.

A round sends ``GET <health_check_path>`` to every pod of the service at
once, each on a new connection, and records each result in the service's
`HealthTable`. A status in ``expected_statuses`` passes. A refused or reset
connection, no response within ``health_timeout_s``, or another status
fails, and `probe` raises `ProbeError` with the reason. Rounds start every
``health_interval_s``, moved by up to 10 % either way at random, so that
the probes of many proxies spread out.

The loop also keeps the table's pools up to date, which
``max_ejection_percent`` counts in: the pods of the service, per namespace
for templated and registry services. It ends passive ejections on time as
well, so it runs for every service, with or without probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable

import httptools

from proxy.errors import StatefulRouteError
from proxy.pods import Pod
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.statuses import StatusRanges
from proxy.upstream_connection import (
    MAX_INTERIM_RESPONSES,
    MAX_RESPONSE_HEAD_BYTES,
    InvalidResponseError,
    split_head,
)

logger = logging.getLogger("stateful_route.health")

# Rounds start every interval times a factor drawn from this range.
JITTER = (0.9, 1.1)
# Maximum wait between two turns of the loop, so that pools follow the pod
# sets and ejections end within this time even without probes.
TICK_S = 1.0
USER_AGENT = "stateful-route-health"
# Maximum bytes read from the socket at a time for a probe response.
_READ_SIZE = 16 * 1024


class ProbeError(StatefulRouteError):
    """A failed probe.

    `kind` is "connect" (refused or unreachable), "timeout", "status" or
    "error" (the connection broke, for example by a reset).
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


async def probe(
    pod: Pod,
    path: str,
    timeout_s: float,
    expected: StatusRanges,
) -> None:
    """Send one probe to `pod` and raise `ProbeError` unless it passes.

    The probe reads the response head with llhttp under the limits of the
    proxy's forwarding path, because requests routed to the pod would get a
    502 where they fail. So a head larger than `MAX_RESPONSE_HEAD_BYTES`,
    more than `MAX_INTERIM_RESPONSES` interim responses, or a head that
    llhttp rejects fails the probe. The body is not read.
    """
    try:
        async with asyncio.timeout(timeout_s):
            status = await _read_status(pod, path)
    except TimeoutError:
        raise ProbeError("timeout", f"no response within {timeout_s:g} s") from None
    if status not in expected:
        raise ProbeError("status", f"status {status}, expected {expected}")


async def _read_status(pod: Pod, path: str) -> int:
    """Send the probe request and return the status of the final response."""
    address = pod.address
    try:
        reader, writer = await asyncio.open_connection(address.host, address.port)
    except OSError as exc:
        raise ProbeError("connect", f"cannot connect: {exc}") from None
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {address}\r\n"
            f"User-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n".encode()
        )
        head = _ProbeHead()
        while head.status is None:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise ProbeError(
                    "error", "the pod closed the connection before the response head"
                )
            head.feed(data)
        return head.status
    except OSError as exc:
        detail = str(exc) or type(exc).__name__
        raise ProbeError("error", f"request failed: {detail}") from None
    finally:
        writer.transport.abort()


class _ProbeHead:
    """The parser callbacks of a probe, which keep the final status only.

    `received` holds the bytes of the response heads in progress, so that
    their size is known before llhttp has a whole head.
    """

    def __init__(self) -> None:
        self.status: int | None = None
        self.received = bytearray()
        self._interim = 0
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        """Parse `data`, and raise `ProbeError` when the response fails a limit."""
        self.received += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProbeError):
                raise cause from None
            raise ProbeError("error", f"invalid response: {exc}") from None
        except httptools.HttpParserUpgrade:
            # A 101 with Upgrade, which `on_headers_complete` has seen.
            pass
        except httptools.HttpParserError as exc:
            raise ProbeError("error", f"invalid response: {exc}") from None
        if self.status is None and len(self.received) > MAX_RESPONSE_HEAD_BYTES:
            raise _head_too_large()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        # llhttp skips CR and LF bytes before a status line.
        received = bytes(self.received).lstrip(b"\r\n")
        try:
            status_line, _, head_end = split_head(received)
        except InvalidResponseError as exc:
            raise ProbeError("error", str(exc)) from None
        if head_end > MAX_RESPONSE_HEAD_BYTES:
            raise _head_too_large()
        # The proxy's forwarding path rejects these two, which llhttp takes.
        if status < 100:
            raise ProbeError("error", f"status {status} below 100")
        if 0 in status_line:
            raise ProbeError("error", "NUL in the status line")
        if status < 200 and status != 101:
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise ProbeError(
                    "error", f"more than {MAX_INTERIM_RESPONSES} interim responses"
                )
            self.received = bytearray(received[head_end:])
            return
        self.status = status


def _head_too_large() -> ProbeError:
    return ProbeError(
        "error", f"response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes"
    )


class HealthMonitor:
    """The health loop of one service: pools, ejection ends and active probes.

    :param service: the service whose `HealthTable` the loop feeds.
    :param states: the pod sets in use, for registry discovery.
    :param rng: draws the jitter; tests pass a seeded one.
    """

    def __init__(
        self,
        service: Service,
        states: PodStates,
        rng: random.Random | None = None,
    ) -> None:
        self._service = service
        self._states = states
        self._rng = rng or random.Random()
        self._expected_entries = service.settings.expected_statuses
        self._expected = StatusRanges(self._expected_entries)
        self.ready = asyncio.Event()
        """Set after the first round."""

    @property
    def probing(self) -> bool:
        return bool(self._service.settings.health_check_path)

    def _expected_statuses(self) -> StatusRanges:
        """Return the service's expected statuses, parsed again after a reload."""
        entries = self._service.settings.expected_statuses
        if entries != self._expected_entries:
            self._expected = StatusRanges(entries)
            self._expected_entries = entries
        return self._expected

    async def run(self, stopping: asyncio.Event) -> None:
        """Run rounds until `stopping` is set. Errors are logged and survived."""
        loop = asyncio.get_running_loop()
        next_probe_at = loop.time()
        while not stopping.is_set():
            try:
                pods = self.update_pools()
                if self.probing and loop.time() >= next_probe_at:
                    next_probe_at = loop.time() + self._interval_s()
                    await _until_stopped(self.probe_round(pods), stopping)
                self._service.health.end_due_ejections()
            except Exception:
                logger.exception(
                    "health round of service=%s failed", self._service.name
                )
            self.ready.set()

            wait_s = TICK_S
            if self.probing:
                wait_s = min(wait_s, max(0.0, next_probe_at - loop.time()))
            ejection_end = self._service.health.next_ejection_end()
            wait_s = min(wait_s, max(0.0, ejection_end - self._service.health.now()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait_s)

    def update_pools(self) -> list[Pod]:
        """Give the table the current pools, and return every pod of the service."""
        pools = self.pools()
        health = self._service.health
        health.set_pools(pools)
        pods = list(dict.fromkeys(pod for pool in pools for pod in pool))
        health.retain(pods)
        return pods

    def pools(self) -> list[tuple[Pod, ...]]:
        """Return the pods of the service, grouped by the pod sets they form.

        Static pods serve every namespace and form one pool. A templated
        service has one pool per namespace it lists. A registry service has
        one per namespace in use, with the pods its records name.
        """
        service = self._service
        settings = service.settings
        if settings.pods:
            return [service.pods("") or ()]
        if not settings.uses_registry:
            return [service.pods(namespace) or () for namespace in settings.namespaces]
        pools = []
        for namespace in self._states.namespaces_of(service.name):
            pod_set = self._states.peek(namespace, service.name)
            if pod_set is not None:
                pools.append(tuple(status.pod for status in pod_set.statuses.values()))
        return pools

    async def probe_round(self, pods: list[Pod]) -> None:
        """Probe every pod at once and record the results."""
        await asyncio.gather(*(self._probe_one(pod) for pod in pods))

    async def _probe_one(self, pod: Pod) -> None:
        settings = self._service.settings
        try:
            await probe(
                pod,
                settings.health_check_path,
                settings.health_timeout_s,
                self._expected_statuses(),
            )
        except ProbeError as exc:
            logger.debug(
                "probe of pod=%d service=%s failed: %s", pod.index, settings.name, exc
            )
            self._service.health.record_probe(pod, str(exc))
            return
        self._service.health.record_probe(pod, None)

    def _interval_s(self) -> float:
        return self._service.settings.health_interval_s * self._rng.uniform(*JITTER)


async def _until_stopped(work: Awaitable[None], stopping: asyncio.Event) -> None:
    """Await `work`, cancelling it when `stopping` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        stopper.cancel()
        raise
    stopper.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return
    task.result()
