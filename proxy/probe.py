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

import aiohttp
from yarl import URL

from proxy.errors import StatefulRouteError
from proxy.pods import Pod
from proxy.services import Service
from proxy.statetable import PodStates
from proxy.statuses import StatusRanges
from proxy.upstream_connection import MAX_RESPONSE_HEAD_BYTES

logger = logging.getLogger("stateful_route.health")

# Rounds start every interval times a factor drawn from this range.
JITTER = (0.9, 1.1)
# Maximum wait between two turns of the loop, so that pools follow the pod
# sets and ejections end within this time even without probes.
TICK_S = 1.0
USER_AGENT = "stateful-route-health"
# The maximum number of header lines in a head within the proxy's limit. The
# shortest line, such as "a:" and its CRLF, takes 4 bytes.
MAX_PROBE_HEADERS = MAX_RESPONSE_HEAD_BYTES // 4


class ProbeError(StatefulRouteError):
    """A failed probe.

    `kind` is "connect" (refused or unreachable), "timeout", "status" or
    "error" (the connection broke, for example by a reset).
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


async def probe(
    session: aiohttp.ClientSession,
    pod: Pod,
    path: str,
    timeout_s: float,
    expected: StatusRanges,
) -> None:
    """Send one probe to `pod` and raise `ProbeError` unless it passes.

    The body of the response is not read. A response head larger than the
    proxy forwards (`MAX_RESPONSE_HEAD_BYTES`) fails, because requests
    routed to the pod would get a 502.
    """
    route, _, query = path.partition("?")
    url = URL.build(
        scheme="http",
        host=pod.address.host,
        port=pod.address.port,
        path=route,
        query_string=query,
        encoded=True,
    )
    try:
        async with (
            asyncio.timeout(timeout_s),
            session.get(
                url, allow_redirects=False, headers={"User-Agent": USER_AGENT}
            ) as response,
        ):
            status = response.status
            head_size = _head_size(response)
    except TimeoutError:
        raise ProbeError("timeout", f"no response within {timeout_s:g} s") from None
    except aiohttp.ClientConnectorError as exc:
        raise ProbeError("connect", f"cannot connect: {exc.os_error}") from None
    except (aiohttp.ClientError, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise ProbeError("error", f"request failed: {detail}") from None
    if head_size > MAX_RESPONSE_HEAD_BYTES:
        raise ProbeError(
            "error",
            f"response head of about {head_size} bytes is larger than "
            f"{MAX_RESPONSE_HEAD_BYTES} bytes",
        )
    if status not in expected:
        raise ProbeError("status", f"status {status}, expected {expected}")


def _head_size(response: aiohttp.ClientResponse) -> int:
    """Return the size of a response head as sent, from its parsed lines.

    NOTE: the parser drops the spaces around each header value. They are
    counted as one space, so a head with more of them is counted short by
    those bytes.
    """
    reason = response.reason or ""
    size = len(f"HTTP/1.1 {response.status} {reason}\r\n")
    for name, value in response.raw_headers:
        size += len(name) + len(value) + 4
    return size + 2


def new_probe_session() -> aiohttp.ClientSession:
    """Return a client session for probes, with a new connection per probe.

    A fresh connection tests that the pod still accepts connections, and a
    keep-alive connection that the pod closed cannot fail a probe.
    """
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        # The proxy limits only the whole head, so a long line or many
        # lines pass here as they pass there, and `probe` checks the size.
        max_line_size=MAX_RESPONSE_HEAD_BYTES,
        max_field_size=MAX_RESPONSE_HEAD_BYTES,
        max_headers=MAX_PROBE_HEADERS,
    )
    # NOTE: aiohttp (3.14.5 here) sends a GET again, once, when the server
    # closes the connection before the response, which would turn a reset
    # into a pass. No public option turns this off; aiohttp's own test
    # client sets the same private attribute.
    session._retry_connection = False
    return session


class HealthMonitor:
    """The health loop of one service: pools, ejection ends and active probes.

    :param service: the service whose `HealthTable` the loop feeds.
    :param states: the pod sets in use, for registry discovery.
    :param session: the session that probes use, or None when the service
        has no ``health_check_path``.
    :param rng: draws the jitter; tests pass a seeded one.
    """

    def __init__(
        self,
        service: Service,
        states: PodStates,
        session: aiohttp.ClientSession | None,
        rng: random.Random | None = None,
    ) -> None:
        self._service = service
        self._states = states
        self.session = session
        """The probe session; a reload that turns probes on sets it."""
        self._rng = rng or random.Random()
        self._expected_entries = service.settings.expected_statuses
        self._expected = StatusRanges(self._expected_entries)
        self.ready = asyncio.Event()
        """Set after the first round."""

    @property
    def probing(self) -> bool:
        return bool(self._service.settings.health_check_path) and (
            self.session is not None
        )

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
        assert self.session is not None
        settings = self._service.settings
        try:
            await probe(
                self.session,
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
