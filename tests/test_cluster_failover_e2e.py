"""End-to-end: a Redis Cluster primary killed while requests flow.

The proxy runs as a subprocess on a cluster of three primaries with one
replica each, in front of real pod processes. A background task sends
steady traffic of regular and new users, the test kills one primary with
SIGKILL, and the cluster promotes its replica. Routing must carry on: the
regular users keep their pods, no user is split over two pods, and the
links survive in the cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio
from conftest import LOOPBACK, RedisCluster, redis_cli_output
from redis.crc import key_slot
from test_e2e import (
    CLIENT_TIMEOUT,
    ProxyProcess,
    proxy_document,
    start_pods,
    start_proxy,
    stop_pods,
    stop_process,
)
from traffic import Outcome, Traffic, request_outcome

from proxy.store.keys import link_key

NS = "default"
SERVICE = "game"
REGULAR_USERS = 60
REPLICATION_TIMEOUT_S = 10.0
# Bound on the wait for the replica to take over and the proxy to write
# links in its slots again, well above the 1 s node timeout of the fixture.
FAILOVER_TIMEOUT_S = 40.0
TRAFFIC_TIMEOUT_S = 60.0
CANDIDATE_UIDS = 2000


def node_slots(cluster: RedisCluster, port: int) -> set[int]:
    """Return the slots that the node on `port` serves, from CLUSTER NODES."""
    output = redis_cli_output(port, "cluster", "nodes")
    for line in output.splitlines():
        fields = line.split()
        if "myself" not in fields[2].split(","):
            continue
        slots: set[int] = set()
        for entry in fields[8:]:
            if entry.startswith("["):
                continue  # a slot being migrated, never the case here
            first, _, last = entry.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        return slots
    pytest.fail(f"CLUSTER NODES of port {port} lists no myself line: {output!r}")


async def wait_for_replicas(cluster: RedisCluster) -> None:
    """Wait until every replica has as many keys as its primary.

    No request is in flight meanwhile, so equal counts mean the replicas
    have every link written so far.
    """
    deadline = time.monotonic() + REPLICATION_TIMEOUT_S
    for primary, replicas in cluster.replicas_of().items():
        assert len(replicas) == 1, f"replicas of {primary}: {replicas}"
        async with (
            redis.asyncio.Redis(host=LOOPBACK, port=primary) as source,
            redis.asyncio.Redis(host=LOOPBACK, port=replicas[0]) as copy,
        ):
            while await copy.dbsize() != await source.dbsize():
                assert time.monotonic() < deadline, (
                    f"replica {replicas[0]} did not catch up with primary {primary}"
                )
                await asyncio.sleep(0.05)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


@pytest.fixture
async def cluster_proxy(
    replicated_cluster: RedisCluster, tmp_path: Path
) -> AsyncIterator[ProxyProcess]:
    """A proxy on `replicated_cluster` in front of three pod processes."""
    pods = start_pods(3, tmp_path)
    proxy: ProxyProcess | None = None
    try:
        proxy = await start_proxy(
            tmp_path, proxy_document(pods, replicated_cluster.url), 0
        )
        yield proxy
    finally:
        if proxy is not None:
            stop_process(proxy.process)
        stop_pods(pods)


async def test_cluster_primary_killed_during_traffic(
    replicated_cluster: RedisCluster,
    cluster_proxy: ProxyProcess,
    client: aiohttp.ClientSession,
) -> None:
    url = f"{cluster_proxy.url}/"
    regular = [f"regular-{number}" for number in range(REGULAR_USERS)]
    first = await asyncio.gather(
        *(request_outcome(client, url, uid) for uid in regular)
    )
    assert [outcome.status for outcome in first] == [200] * REGULAR_USERS
    linked = {outcome.uid: outcome.pod for outcome in first}
    await wait_for_replicas(replicated_cluster)

    # The victim is the primary of the first regular user's link.
    victim_port = next(
        port
        for port in replicated_cluster.replicas_of()
        if key_slot(link_key(NS, regular[0], SERVICE).encode())
        in node_slots(replicated_cluster, port)
    )
    victim_slots = node_slots(replicated_cluster, victim_port)
    on_victim = [
        uid
        for uid in regular
        if key_slot(link_key(NS, uid, SERVICE).encode()) in victim_slots
    ]
    probes = [
        uid
        for uid in (f"probe-{number}" for number in range(CANDIDATE_UIDS))
        if key_slot(link_key(NS, uid, SERVICE).encode()) in victim_slots
    ]

    traffic = Traffic(client, url, regular)
    traffic.start()
    try:
        await traffic.wait_rounds(3, TRAFFIC_TIMEOUT_S)
        killed_at = time.monotonic()
        replicated_cluster.node(victim_port).kill()

        # Recovered once a new user in the victim's slots gets a link.
        recovered: Outcome | None = None
        for uid in probes:
            outcome = await request_outcome(client, url, uid)
            if outcome.status == 200 and outcome.reason != "degraded":
                recovered = outcome
                break
            assert time.monotonic() - killed_at < FAILOVER_TIMEOUT_S, (
                f"no link written in the killed primary's slots within "
                f"{FAILOVER_TIMEOUT_S} s"
            )
            await asyncio.sleep(0.1)
        recovered_s = time.monotonic() - killed_at
        await traffic.wait_rounds(3, TRAFFIC_TIMEOUT_S)
    finally:
        await traffic.stop()

    # The time is printed for the operations page, never asserted.
    print(
        f"cluster failover: links written in the killed primary's slots again "
        f"after {recovered_s:.1f} s, {traffic.rounds} rounds, "
        f"statuses {traffic.statuses()}"
    )
    assert recovered is not None, "ran out of probe users before the failover"
    assert on_victim, "no regular user had a link on the killed primary"

    # Cached users keep their pod throughout, and every request gets 200.
    by_uid = traffic.by_uid()
    for uid in regular:
        pods = {outcome.pod for outcome in by_uid[uid]}
        statuses = {outcome.status for outcome in by_uid[uid]}
        assert statuses == {200}, f"{uid}: {statuses}"
        assert pods == {linked[uid]}, f"{uid}: {pods}, linked to {linked[uid]}"
    assert set(traffic.statuses()) == {200}, traffic.statuses()

    # No user ends on two pods.
    for uid, outcomes in by_uid.items():
        pods = {outcome.pod for outcome in outcomes}
        assert len(pods) == 1, f"{uid} was served by pods {pods}"

    # The links survive, those of the killed primary on its promoted replica.
    # Users placed while the store was unavailable are linked to the pod
    # they used on their next request.
    degraded = sorted(
        {outcome.uid for outcome in traffic.outcomes if outcome.reason == "degraded"}
    )
    again = await asyncio.gather(
        *(request_outcome(client, url, uid) for uid in degraded)
    )
    placed = {uid: by_uid[uid][0].pod for uid in degraded}
    assert {outcome.uid: outcome.pod for outcome in again} == placed
    survivor = next(
        port for port in replicated_cluster.replicas_of() if port != victim_port
    )
    async with redis.asyncio.RedisCluster(
        host=LOOPBACK, port=survivor, decode_responses=True
    ) as inspector:
        for uid in regular:
            stored = await inspector.get(link_key(NS, uid, SERVICE))
            assert stored == str(linked[uid]), f"link of {uid}: {stored!r}"
        for uid in degraded:
            stored = await inspector.get(link_key(NS, uid, SERVICE))
            assert stored == str(placed[uid]), f"link of {uid}: {stored!r}"
    log = cluster_proxy.log()
    print(
        f"cluster failover: {len(degraded)} users placed without the store, "
        f"{log.count('is unavailable')} outage starts logged, "
        f"{log.count('reachable again')} ends"
    )
