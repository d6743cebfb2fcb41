"""End-to-end: the redis-server process killed and restarted while requests flow.

The proxy runs as a subprocess in front of real pod processes, with its
links in a redis-server that writes every command to its append-only file,
so the restarted server has the links written before the crash. A
background task sends steady traffic of cached users and new users while
the test kills Redis with SIGKILL and later starts it again on the same
port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio
from conftest import RedisServer, RedisServerFactory
from prometheus_client.parser import text_string_to_metric_families
from test_e2e import (
    CLIENT_TIMEOUT,
    PodProcess,
    ProxyProcess,
    proxy_document,
    start_pods,
    start_proxy,
    stop_pods,
    stop_process,
)
from traffic import Traffic, request_outcome

from proxy.hashing import rank
from proxy.pods import Pod, parse_address
from proxy.store import RedisStore
from proxy.store.keys import link_key

NS = "default"
SERVICE = "game"
REGULAR_USERS = 40
TTL_S = 60.0
# Bound on the waits for the proxy to notice the outage and its end.
STATE_TIMEOUT_S = 15.0
TRAFFIC_TIMEOUT_S = 60.0
# How long Redis stays down: several of the store's 0.5 s probe intervals.
OUTAGE_S = 2.0
DEGRADED = "stateful_route_store_degraded"
UNAVAILABLE_ERRORS = 'stateful_route_store_errors_total{kind="unavailable"}'
PLACEMENTS = "stateful_route_degraded_placements_total"


async def scrape(
    client: aiohttp.ClientSession, proxy: ProxyProcess
) -> dict[str, float]:
    """Return the samples of the proxy's /metrics, keyed as in the text format."""
    async with client.get(f"{proxy.admin_url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            samples[key] = sample.value
    return samples


async def wait_for_gauge(
    client: aiohttp.ClientSession, proxy: ProxyProcess, value: float
) -> dict[str, float]:
    """Wait until the degraded gauge shows `value`, and return that scrape."""
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while True:
        samples = await scrape(client, proxy)
        if samples.get(DEGRADED) == value:
            return samples
        assert time.monotonic() < deadline, (
            f"{DEGRADED} did not become {value} within {STATE_TIMEOUT_S} s"
        )
        await asyncio.sleep(0.05)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


@pytest.fixture
def durable_redis(redis_server_factory: RedisServerFactory) -> RedisServer:
    """A redis-server that syncs its append-only file after every write."""
    return redis_server_factory("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def own_pods(tmp_path: Path) -> Iterator[list[PodProcess]]:
    started = start_pods(3, tmp_path)
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture
async def proxy(
    own_pods: list[PodProcess], durable_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[ProxyProcess]:
    document = proxy_document(own_pods, durable_redis.url)
    document["store"]["redis_timeout_s"] = 0.3
    document["store"]["redis_connect_timeout_s"] = 0.3
    # A load factor this high never overrides the hash with at most 16
    # requests in flight, so a degraded placement is always the top-ranked pod.
    document["services"][SERVICE]["load_factor"] = 100.0
    started = await start_proxy(tmp_path, document, 0)
    try:
        yield started
    finally:
        stop_process(started.process)


async def test_redis_killed_and_restarted_during_traffic(
    proxy: ProxyProcess,
    own_pods: list[PodProcess],
    durable_redis: RedisServer,
    client: aiohttp.ClientSession,
) -> None:
    url = f"{proxy.url}/"
    pod_list = [Pod(pod.index, parse_address(pod.address)) for pod in own_pods]
    regular = [f"regular-{number}" for number in range(REGULAR_USERS)]
    first = await asyncio.gather(
        *(request_outcome(client, url, uid) for uid in regular)
    )
    assert [outcome.status for outcome in first] == [200] * REGULAR_USERS
    linked = {outcome.uid: outcome.pod for outcome in first}
    before = await scrape(client, proxy)

    traffic = Traffic(client, url, regular)
    traffic.start()
    try:
        await traffic.wait_rounds(3, TRAFFIC_TIMEOUT_S)
        durable_redis.kill()
        killed_at = time.monotonic()
        during = await wait_for_gauge(client, proxy, 1)

        # A user placed during the outage, whose link another router writes
        # before this proxy routes the user again.
        contested = await request_outcome(client, url, "contested")
        while time.monotonic() - killed_at < OUTAGE_S:
            await traffic.wait_rounds(1, TRAFFIC_TIMEOUT_S)

        durable_redis.start()
        other_pod = (contested.pod or 0) + 1
        other_pod %= len(own_pods)
        seeder = RedisStore(durable_redis.url)
        try:
            await seeder.set(NS, "contested", SERVICE, other_pod, TTL_S)
        finally:
            await seeder.close()
        after = await wait_for_gauge(client, proxy, 0)
        recovered_round = traffic.rounds
        await traffic.wait_rounds(3, TRAFFIC_TIMEOUT_S)
    finally:
        await traffic.stop()

    statuses = traffic.statuses()
    degraded = {o.uid: o for o in traffic.outcomes if o.reason == "degraded"}
    ends = [line for line in proxy.log().splitlines() if "reachable again" in line]
    print(
        f"degraded mode: statuses {statuses} over {traffic.rounds} rounds, "
        f"{len(degraded)} users placed without the store; {ends}"
    )
    errors = sum(count for status, count in statuses.items() if status >= 500)
    assert errors == 0, statuses
    assert 0 not in statuses, "some requests got no reply"

    # Cached users keep their pod throughout.
    by_uid = traffic.by_uid()
    for uid in regular:
        assert {o.status for o in by_uid[uid]} == {200}, uid
        assert {o.pod for o in by_uid[uid]} == {linked[uid]}, uid

    # New users of the outage rounds are placed by the consistent hash.
    assert degraded, "no request was placed without the store"
    not_new = sorted(uid for uid in degraded if not uid.startswith("new-"))
    assert not_new == []
    for uid, outcome in degraded.items():
        assert outcome.pod == rank(uid, pod_list)[0].index, uid
    late = [uid for uid, o in degraded.items() if o.round > recovered_round]
    assert not late, f"placed without the store after it recovered: {late}"
    assert contested.status == 200
    assert contested.reason == "degraded"
    assert contested.pod == rank("contested", pod_list)[0].index

    # Once Redis is back, placements become links with set-if-absent on the
    # next request, and a link that another router wrote meanwhile wins.
    again = await asyncio.gather(
        *(request_outcome(client, url, uid) for uid in degraded)
    )
    assert {o.uid: o.pod for o in again} == {u: o.pod for u, o in degraded.items()}
    assert all(o.reason is None for o in again)
    followed = await request_outcome(client, url, "contested")
    assert followed.status == 200
    assert followed.pod == other_pod
    assert followed.reason is None
    async with redis.asyncio.from_url(durable_redis.url, decode_responses=True) as db:
        for uid, outcome in degraded.items():
            assert await db.get(link_key(NS, uid, SERVICE)) == str(outcome.pod), uid
        for uid in regular:
            assert await db.get(link_key(NS, uid, SERVICE)) == str(linked[uid]), uid
        assert await db.get(link_key(NS, "contested", SERVICE)) == str(other_pod)

    # One WARNING when the outage starts, one INFO when it ends.
    warnings = [line for line in proxy.log().splitlines() if "level=WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "unavailable" in warnings[0]
    assert len(ends) == 1, ends
    assert "level=INFO" in ends[0]

    # The gauge goes 0, 1, 0 and the counters move.
    assert before[DEGRADED] == 0
    assert during[DEGRADED] == 1
    assert after[DEGRADED] == 0
    assert after[UNAVAILABLE_ERRORS] > before.get(UNAVAILABLE_ERRORS, 0)
    assert after[PLACEMENTS] > before[PLACEMENTS]
