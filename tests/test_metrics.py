"""The ``/metrics`` endpoint, against a `ProxyServer` running in this process.

Each test starts a proxy on loopback with the memory store and again with a
real redis-server, in front of in-process pods that reply with their index,
sends traffic through its proxy port and reads the admin port's metrics.
"""

from __future__ import annotations

import bisect
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import LOOPBACK, RedisServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.demo import start_demo_pods
from proxy.metrics import REQUEST_BUCKETS_S, RequestCollector, bucket_index
from proxy.server import ProxyServer

POD_COUNT = 2
TOKEN = "metrics-test-token"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Starts a proxy with the admin API in a fresh interpreter, then exits 1
# when prometheus_client was imported before any scrape.
START_WITHOUT_SCRAPE = """
import asyncio, sys
from proxy.config import parse_config
from proxy.server import ProxyServer

async def main():
    document = {
        "proxy": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "services": {"game": {"pods": ["127.0.0.1:1"]}},
    }
    proxy = ProxyServer(parse_config(document, environ={}))
    await proxy.start()
    proxy.metrics.observe_request("game", 0, 200, 0.001)
    await proxy.stop()

asyncio.run(main())
sys.exit(1 if "prometheus_client" in sys.modules else 0)
"""


@pytest.fixture
async def pod_addresses() -> AsyncIterator[list[str]]:
    """Start two demo pods on free loopback ports; each replies with its index."""
    runners, addresses = await start_demo_pods(POD_COUNT, LOOPBACK)
    try:
        yield addresses
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture(params=["memory", "redis"])
def store_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``[store]`` section of each backend; Redis starts with FLUSHDB."""
    if request.param == "memory":
        return {"backend": "memory"}
    request.getfixturevalue("redis_client")
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"backend": "redis", "redis_url": server.url}


@pytest.fixture
async def server(
    pod_addresses: list[str], store_section: dict[str, Any]
) -> AsyncIterator[ProxyServer]:
    document = {
        "proxy": {"host": LOOPBACK, "port": 0},
        "admin": {"host": LOOPBACK, "port": 0, "token": TOKEN},
        "store": store_section,
        "services": {"game": {"pods": pod_addresses}},
    }
    proxy = ProxyServer(parse_config(document, environ={}))
    try:
        await proxy.start()
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client:
        yield client


async def send(
    session: aiohttp.ClientSession, server: ProxyServer, headers: dict[str, str]
) -> int:
    """Send one request through the proxy port and return its status."""
    url = f"http://{server.proxy_address}/play"
    async with session.get(url, headers=headers) as response:
        await response.read()
        return response.status


async def scrape(session: aiohttp.ClientSession, server: ProxyServer) -> Samples:
    """Return every sample of ``/metrics`` by name and label set."""
    url = f"http://{server.admin_address}/metrics"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return parse_samples(await response.text())


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_traffic_moves_request_metrics(
    server: ProxyServer, session: aiohttp.ClientSession
) -> None:
    statuses = [
        await send(session, server, {"X-Uid": "alice", "X-Service": "game"})
        for _ in range(3)
    ]
    rejected = await send(session, server, {"X-Service": "game"})

    samples = await scrape(session, server)
    served = sum(
        value(
            samples,
            "stateful_route_requests_total",
            service="game",
            pod=str(pod),
            status_class="2xx",
        )
        for pod in range(POD_COUNT)
    )
    assert statuses == [200, 200, 200]
    assert rejected == 400
    assert served == 3
    assert (
        value(
            samples,
            "stateful_route_requests_total",
            service="game",
            pod="",
            status_class="4xx",
        )
        == 1
    )
    assert (
        value(samples, "stateful_route_request_duration_seconds_count", service="game")
        == 4
    )
    assert value(samples, "stateful_route_links_created_total") == 1
    assert value(samples, "stateful_route_local_cache_hits_total") >= 1
    assert value(samples, "stateful_route_requests_in_flight") == 0


async def test_health_gauge_per_pod(
    server: ProxyServer, session: aiohttp.ClientSession
) -> None:
    samples = await scrape(session, server)

    for pod in range(POD_COUNT):
        assert (
            value(samples, "stateful_route_pod_usable", service="game", pod=str(pod))
            == 1
        )
    assert value(samples, "stateful_route_store_degraded") == 0


async def test_unknown_service_label_empty(
    server: ProxyServer, session: aiohttp.ClientSession
) -> None:
    status = await send(session, server, {"X-Uid": "bob", "X-Service": "no-such"})

    samples = await scrape(session, server)
    assert status == 404
    assert (
        value(
            samples,
            "stateful_route_requests_total",
            service="",
            pod="",
            status_class="4xx",
        )
        == 1
    )
    assert not any("no-such" in str(labels) for _, labels in samples)


async def test_store_histogram_by_backend(
    server: ProxyServer, session: aiohttp.ClientSession
) -> None:
    await send(session, server, {"X-Uid": "carol", "X-Service": "game"})

    samples = await scrape(session, server)
    calls = value(samples, "stateful_route_store_operation_duration_seconds_count")
    if server.store.backend == "redis":
        assert calls > 0
    else:
        assert calls == 0


async def test_metrics_require_admin_token(
    server: ProxyServer, session: aiohttp.ClientSession
) -> None:
    url = f"http://{server.admin_address}/metrics"

    async with session.get(url) as response:
        status = response.status

    assert status == 401


async def test_upstream_refused_counted_by_kind(
    pod_addresses: list[str], session: aiohttp.ClientSession
) -> None:
    # Port 1 on loopback has no listener, so every connect is refused.
    document = {
        "proxy": {"host": LOOPBACK, "port": 0},
        "admin": {"host": LOOPBACK, "port": 0},
        "store": {"backend": "memory"},
        "services": {"game": {"pods": [f"{LOOPBACK}:1"], "retry_attempts": 0}},
    }
    proxy = ProxyServer(parse_config(document, environ={}))
    try:
        await proxy.start()
        status = await send(session, proxy, {"X-Uid": "dave", "X-Service": "game"})
        url = f"http://{proxy.admin_address}/metrics"
        async with session.get(url) as response:
            text = await response.text()
    finally:
        await proxy.stop()

    samples = parse_samples(text)
    assert status == 502
    assert (
        value(
            samples,
            "stateful_route_upstream_errors_total",
            service="game",
            kind="connect",
        )
        == 1
    )
    assert (
        value(
            samples,
            "stateful_route_requests_total",
            service="game",
            pod="0",
            status_class="5xx",
        )
        == 1
    )


def test_start_leaves_prometheus_client_unloaded() -> None:
    result = subprocess.run(
        [sys.executable, "-c", START_WITHOUT_SCRAPE],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


def collected(collector: RequestCollector) -> Samples:
    samples: Samples = {}
    for family in collector.collect():
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_request_collector_buckets_by_le() -> None:
    collector = RequestCollector()
    collector.observe("game", 0, 2, 0.005)
    collector.observe("game", 0, 2, 0.0051)
    collector.observe("game", None, 4, 60.0)

    samples = collected(collector)
    bucket = "stateful_route_request_duration_seconds_bucket"
    assert samples[(bucket, frozenset({("service", "game"), ("le", "0.0025")}))] == 0
    assert samples[(bucket, frozenset({("service", "game"), ("le", "0.005")}))] == 1
    assert samples[(bucket, frozenset({("service", "game"), ("le", "0.01")}))] == 2
    assert samples[(bucket, frozenset({("service", "game"), ("le", "30.0")}))] == 2
    assert samples[(bucket, frozenset({("service", "game"), ("le", "+Inf")}))] == 3
    count = "stateful_route_request_duration_seconds_count"
    assert samples[(count, frozenset({("service", "game")}))] == 3
    total = "stateful_route_request_duration_seconds_sum"
    assert samples[(total, frozenset({("service", "game")}))] == pytest.approx(60.0101)
    requests = "stateful_route_requests_total"
    ok = frozenset({("service", "game"), ("pod", "0"), ("status_class", "2xx")})
    assert samples[(requests, ok)] == 2
    rejected = frozenset({("service", "game"), ("pod", ""), ("status_class", "4xx")})
    assert samples[(requests, rejected)] == 1


def test_request_collector_forgets_series() -> None:
    collector = RequestCollector()
    collector.observe("game", 0, 2, 0.001)
    collector.observe("game", 1, 2, 0.001)
    collector.observe("chat", 0, 2, 0.001)

    collector.forget_pods("game", [0])
    names = {(name, dict(labels).get("pod")) for name, labels in collected(collector)}
    assert ("stateful_route_requests_total", "1") not in names
    assert ("stateful_route_requests_total", "0") in names

    collector.forget_service("game")
    services = {dict(labels).get("service") for _, labels in collected(collector)}
    assert services == {"chat"}


def test_bucket_index_matches_bisect_left() -> None:
    bounds = REQUEST_BUCKETS_S
    values = [0.0, -1.0, 0.0005, 40.0, float("inf"), float("nan")]
    for bound in bounds:
        values += [bound, bound * 0.999, bound * 1.001]
    for value in values:
        assert bucket_index(bounds, value) == bisect.bisect_left(bounds, value), value
    assert bucket_index((), 1.0) == 0
