"""Behaviour that every link store shares, run on the memory and Redis stores."""

from __future__ import annotations

import asyncio
import math

import pytest

from proxy.store import PERSISTENT, LinkStore

NS = "ns"
UID = "u1"
SERVICE = "game"
# Long enough that a temporary link never expires during a test.
TTL_S = 30.0
# Short TTL for expiry checks, with sleeps chosen well clear of it.
SHORT_TTL_S = 0.25


async def test_get_returns_none_without_link(store: LinkStore) -> None:
    assert await store.get(NS, UID, SERVICE) is None


async def test_get_returns_linked_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 3, TTL_S)

    assert await store.get(NS, UID, SERVICE) == 3


async def test_links_separate_per_namespace_uid_service(
    store: LinkStore,
) -> None:
    await store.set("ns-a", UID, SERVICE, 1, TTL_S)
    await store.set("ns-b", UID, SERVICE, 2, TTL_S)
    await store.set("ns-a", "u2", SERVICE, 3, TTL_S)
    await store.set("ns-a", UID, "chat", 4, TTL_S)

    assert await store.get("ns-a", UID, SERVICE) == 1
    assert await store.get("ns-b", UID, SERVICE) == 2
    assert await store.get("ns-a", "u2", SERVICE) == 3
    assert await store.get("ns-a", UID, "chat") == 4


# get_and_refresh


async def test_get_and_refresh_returns_none_without_link(store: LinkStore) -> None:
    assert await store.get_and_refresh(NS, UID, SERVICE, TTL_S) is None


async def test_get_and_refresh_restarts_temporary_ttl(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 2, SHORT_TTL_S)
    await asyncio.sleep(0.15)

    assert await store.get_and_refresh(NS, UID, SERVICE, SHORT_TTL_S) == 2
    remaining = await store.link_ttl(NS, UID, SERVICE)
    assert remaining is not None
    assert remaining > 0.15

    # 0.3 s after the set, past the first TTL but inside the restarted one.
    await asyncio.sleep(0.15)
    assert await store.get(NS, UID, SERVICE) == 2


async def test_get_and_refresh_leaves_persistent_link_persistent(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 2, PERSISTENT)

    assert await store.get_and_refresh(NS, UID, SERVICE, SHORT_TTL_S) == 2
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT
    assert await store.linked_services(NS, UID) == {SERVICE: 2}


# set


async def test_set_returns_none_for_new_link(store: LinkStore) -> None:
    assert await store.set(NS, UID, SERVICE, 1, TTL_S) is None


async def test_set_returns_previous_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    assert await store.set(NS, UID, SERVICE, 2, TTL_S) == 1
    assert await store.get(NS, UID, SERVICE) == 2


async def test_set_persistent_records_link_in_uid_hash(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 3, PERSISTENT)

    assert await store.linked_services(NS, UID) == {SERVICE: 3}
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT


async def test_set_temporary_leaves_uid_hash(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 3, TTL_S)

    assert await store.linked_services(NS, UID) == {}


async def test_set_temporary_over_persistent_link(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 3, PERSISTENT)

    assert await store.set(NS, UID, SERVICE, 4, TTL_S) == 3
    assert await store.linked_services(NS, UID) == {}
    assert await store.get_if_persistent(NS, UID, SERVICE) is None
    remaining = await store.link_ttl(NS, UID, SERVICE)
    assert remaining is not None
    assert 0 < remaining <= TTL_S


async def test_set_persistent_over_temporary_clears_ttl(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 3, SHORT_TTL_S)

    assert await store.set(NS, UID, SERVICE, 4, PERSISTENT) == 3
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT
    assert await store.linked_services(NS, UID) == {SERVICE: 4}

    await asyncio.sleep(SHORT_TTL_S + 0.1)
    assert await store.get(NS, UID, SERVICE) == 4


async def test_temporary_link_expires(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 5, SHORT_TTL_S)
    assert await store.get(NS, UID, SERVICE) == 5

    await asyncio.sleep(SHORT_TTL_S + 0.1)

    assert await store.get(NS, UID, SERVICE) is None
    assert await store.link_ttl(NS, UID, SERVICE) is None
    assert await store.batch_get(NS, SERVICE, [UID]) == {}


async def test_set_keeps_other_services_in_uid_hash(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)
    await store.set(NS, UID, "chat", 2, PERSISTENT)

    await store.set(NS, UID, SERVICE, 3, TTL_S)

    assert await store.linked_services(NS, UID) == {"chat": 2}


# try_set


async def test_try_set_accepts_new_link(store: LinkStore) -> None:
    assert await store.try_set(NS, UID, SERVICE, 2, TTL_S) == (True, 2)
    assert await store.get(NS, UID, SERVICE) == 2


async def test_try_set_rejects_other_pod_over_persistent_link(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.try_set(NS, UID, SERVICE, 2, PERSISTENT) == (False, 1)
    assert await store.try_set(NS, UID, SERVICE, 2, TTL_S) == (False, 1)
    assert await store.get(NS, UID, SERVICE) == 1
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT
    assert await store.linked_services(NS, UID) == {SERVICE: 1}


async def test_try_set_accepts_other_pod_over_temporary_link(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    assert await store.try_set(NS, UID, SERVICE, 2, TTL_S) == (True, 2)
    assert await store.get(NS, UID, SERVICE) == 2


async def test_try_set_accepts_same_pod_over_persistent_link(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.try_set(NS, UID, SERVICE, 1, PERSISTENT) == (True, 1)
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT


async def test_try_set_same_pod_temporary_makes_link_temporary(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.try_set(NS, UID, SERVICE, 1, TTL_S) == (True, 1)
    assert await store.linked_services(NS, UID) == {}
    assert await store.get_if_persistent(NS, UID, SERVICE) is None


async def test_try_set_persistent_records_link_in_uid_hash(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    assert await store.try_set(NS, UID, SERVICE, 2, PERSISTENT) == (True, 2)
    assert await store.linked_services(NS, UID) == {SERVICE: 2}
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT


async def test_try_set_temporary_link_expires(store: LinkStore) -> None:
    assert await store.try_set(NS, UID, SERVICE, 2, SHORT_TTL_S) == (True, 2)

    await asyncio.sleep(SHORT_TTL_S + 0.1)

    assert await store.get(NS, UID, SERVICE) is None


# set_if_absent


async def test_set_if_absent_links_pod_without_link(store: LinkStore) -> None:
    assert await store.set_if_absent(NS, UID, SERVICE, 2, TTL_S) == 2
    assert await store.get(NS, UID, SERVICE) == 2
    assert await store.linked_services(NS, UID) == {}


async def test_set_if_absent_returns_existing_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    assert await store.set_if_absent(NS, UID, SERVICE, 2, TTL_S) == 1
    assert await store.get(NS, UID, SERVICE) == 1


async def test_set_if_absent_keeps_persistent_link(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.set_if_absent(NS, UID, SERVICE, 2, TTL_S) == 1
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT
    assert await store.linked_services(NS, UID) == {SERVICE: 1}


async def test_set_if_absent_persistent_fills_uid_hash(
    store: LinkStore,
) -> None:
    assert await store.set_if_absent(NS, UID, SERVICE, 2, PERSISTENT) == 2
    assert await store.linked_services(NS, UID) == {SERVICE: 2}


async def test_set_if_absent_links_again_after_expiry(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, SHORT_TTL_S)
    await asyncio.sleep(SHORT_TTL_S + 0.1)

    assert await store.set_if_absent(NS, UID, SERVICE, 2, TTL_S) == 2


async def test_concurrent_set_if_absent_agrees_on_one_pod(store: LinkStore) -> None:
    results = await asyncio.gather(
        *(store.set_if_absent(NS, UID, SERVICE, pod, TTL_S) for pod in range(20))
    )

    winner = results[0]
    assert set(results) == {winner}
    assert await store.get(NS, UID, SERVICE) == winner


# remove


async def test_remove_returns_false_without_link(store: LinkStore) -> None:
    assert await store.remove(NS, UID, SERVICE) is False


async def test_remove_deletes_link_now(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    assert await store.remove(NS, UID, SERVICE) is True
    assert await store.get(NS, UID, SERVICE) is None
    assert await store.link_ttl(NS, UID, SERVICE) is None


async def test_remove_persistent_link_clears_uid_hash(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.remove(NS, UID, SERVICE) is True
    assert await store.get(NS, UID, SERVICE) is None
    assert await store.linked_services(NS, UID) == {}


async def test_remove_keeps_other_services_in_uid_hash(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)
    await store.set(NS, UID, "chat", 2, PERSISTENT)

    assert await store.remove(NS, UID, SERVICE) is True
    assert await store.linked_services(NS, UID) == {"chat": 2}
    assert await store.get(NS, UID, "chat") == 2


async def test_remove_with_delay_keeps_link_until_delay(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.remove(NS, UID, SERVICE, delay_s=SHORT_TTL_S) is True
    assert await store.get(NS, UID, SERVICE) == 1
    assert await store.linked_services(NS, UID) == {}
    assert await store.get_if_persistent(NS, UID, SERVICE) is None
    remaining = await store.link_ttl(NS, UID, SERVICE)
    assert remaining is not None
    assert 0 < remaining <= SHORT_TTL_S

    await asyncio.sleep(SHORT_TTL_S + 0.1)
    assert await store.get(NS, UID, SERVICE) is None


async def test_remove_with_delay_returns_false_without_link(
    store: LinkStore,
) -> None:
    assert await store.remove(NS, UID, SERVICE, delay_s=SHORT_TTL_S) is False
    assert await store.get(NS, UID, SERVICE) is None


# remove_if_pod


async def test_remove_if_pod_removes_named_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.remove_if_pod(NS, UID, SERVICE, 1) is True
    assert await store.get(NS, UID, SERVICE) is None
    assert await store.linked_services(NS, UID) == {}


async def test_remove_if_pod_keeps_other_pod_link(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.remove_if_pod(NS, UID, SERVICE, 2) is False
    assert await store.get(NS, UID, SERVICE) == 1
    assert await store.linked_services(NS, UID) == {SERVICE: 1}


async def test_remove_if_pod_returns_false_without_link(store: LinkStore) -> None:
    assert await store.remove_if_pod(NS, UID, SERVICE, 1) is False


async def test_delayed_remove_if_pod_keeps_link_briefly(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.remove_if_pod(NS, UID, SERVICE, 1, SHORT_TTL_S) is True
    assert await store.get(NS, UID, SERVICE) == 1
    assert await store.linked_services(NS, UID) == {}

    await asyncio.sleep(SHORT_TTL_S + 0.1)
    assert await store.get(NS, UID, SERVICE) is None


async def test_delayed_remove_if_pod_skips_other_pod(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.remove_if_pod(NS, UID, SERVICE, 2, SHORT_TTL_S) is False
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT


# get_if_persistent


async def test_get_if_persistent_returns_persistent_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 2, PERSISTENT)

    assert await store.get_if_persistent(NS, UID, SERVICE) == 2


async def test_get_if_persistent_ignores_temporary_link(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 2, TTL_S)

    assert await store.get_if_persistent(NS, UID, SERVICE) is None


async def test_get_if_persistent_returns_none_without_link(
    store: LinkStore,
) -> None:
    assert await store.get_if_persistent(NS, UID, SERVICE) is None


# linked_services


async def test_linked_services_is_empty_without_links(store: LinkStore) -> None:
    assert await store.linked_services(NS, UID) == {}


async def test_linked_services_lists_only_persistent_links(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)
    await store.set(NS, UID, "chat", 2, PERSISTENT)
    await store.set(NS, UID, "mail", 3, TTL_S)
    await store.set(NS, "u2", "shop", 4, PERSISTENT)
    await store.set("other", UID, "shop", 5, PERSISTENT)

    assert await store.linked_services(NS, UID) == {SERVICE: 1, "chat": 2}


# batch_get


async def test_batch_get_groups_uids_by_pod(store: LinkStore) -> None:
    await store.set(NS, "u1", SERVICE, 1, TTL_S)
    await store.set(NS, "u2", SERVICE, 2, PERSISTENT)
    await store.set(NS, "u3", SERVICE, 1, PERSISTENT)
    await store.set(NS, "u4", "chat", 1, TTL_S)

    result = await store.batch_get(NS, SERVICE, ["u1", "u2", "u3", "u4", "u5"])

    assert result == {1: ["u1", "u3"], 2: ["u2"]}


async def test_batch_get_of_no_uids_is_empty(store: LinkStore) -> None:
    assert await store.batch_get(NS, SERVICE, []) == {}


async def test_batch_get_leaves_out_uids_without_link(store: LinkStore) -> None:
    assert await store.batch_get(NS, SERVICE, ["u1", "u2"]) == {}


async def test_batch_get_reads_many_uids(store: LinkStore) -> None:
    uids = [f"user-{index}" for index in range(200)]
    for index, uid in enumerate(uids):
        await store.set(NS, uid, SERVICE, index % 3, TTL_S)

    result = await store.batch_get(NS, SERVICE, uids)

    assert result == {pod: uids[pod::3] for pod in range(3)}


# link_ttl


async def test_link_ttl_returns_none_without_link(store: LinkStore) -> None:
    assert await store.link_ttl(NS, UID, SERVICE) is None


async def test_link_ttl_returns_persistent_for_persistent_link(
    store: LinkStore,
) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT


async def test_link_ttl_returns_remaining_seconds(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, 10.0)

    remaining = await store.link_ttl(NS, UID, SERVICE)

    assert remaining is not None
    assert 9.0 < remaining <= 10.0


# Pod 0 is a real pod.


async def test_pod_zero_is_returned_by_get(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, TTL_S)

    assert await store.get(NS, UID, SERVICE) == 0
    assert await store.get_and_refresh(NS, UID, SERVICE, TTL_S) == 0


async def test_pod_zero_is_returned_as_previous_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, TTL_S)

    assert await store.set(NS, UID, SERVICE, 1, TTL_S) == 0


async def test_pod_zero_wins_set_if_absent(store: LinkStore) -> None:
    assert await store.set_if_absent(NS, UID, SERVICE, 0, TTL_S) == 0
    assert await store.set_if_absent(NS, UID, SERVICE, 1, TTL_S) == 0


async def test_pod_zero_persistent_link_rejects_try_set(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, PERSISTENT)

    assert await store.try_set(NS, UID, SERVICE, 1, TTL_S) == (False, 0)
    assert await store.try_set(NS, UID, SERVICE, 0, PERSISTENT) == (True, 0)


async def test_pod_zero_is_persistent_and_linked(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, PERSISTENT)

    assert await store.get_if_persistent(NS, UID, SERVICE) == 0
    assert await store.linked_services(NS, UID) == {SERVICE: 0}


async def test_pod_zero_is_grouped_by_batch_get(store: LinkStore) -> None:
    await store.set(NS, "u1", SERVICE, 0, TTL_S)
    await store.set(NS, "u2", SERVICE, 1, TTL_S)

    assert await store.batch_get(NS, SERVICE, ["u1", "u2"]) == {0: ["u1"], 1: ["u2"]}


async def test_pod_zero_is_removed_by_remove_if_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, TTL_S)

    assert await store.remove_if_pod(NS, UID, SERVICE, 1) is False
    assert await store.remove_if_pod(NS, UID, SERVICE, 0) is True
    assert await store.get(NS, UID, SERVICE) is None


# Invalid arguments


INVALID_TTLS = [0, 0.0, -0.5, -2, math.nan]


@pytest.mark.parametrize("ttl_s", INVALID_TTLS)
async def test_set_rejects_invalid_ttl(store: LinkStore, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="invalid link TTL"):
        await store.set(NS, UID, SERVICE, 1, ttl_s)
    assert await store.get(NS, UID, SERVICE) is None


@pytest.mark.parametrize("ttl_s", INVALID_TTLS)
async def test_try_set_rejects_invalid_ttl(store: LinkStore, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="invalid link TTL"):
        await store.try_set(NS, UID, SERVICE, 1, ttl_s)
    assert await store.get(NS, UID, SERVICE) is None


@pytest.mark.parametrize("ttl_s", INVALID_TTLS)
async def test_set_if_absent_rejects_invalid_ttl(
    store: LinkStore, ttl_s: float
) -> None:
    with pytest.raises(ValueError, match="invalid link TTL"):
        await store.set_if_absent(NS, UID, SERVICE, 1, ttl_s)
    assert await store.get(NS, UID, SERVICE) is None


@pytest.mark.parametrize("ttl_s", INVALID_TTLS)
async def test_get_and_refresh_rejects_invalid_ttl(
    store: LinkStore, ttl_s: float
) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    with pytest.raises(ValueError, match="invalid link TTL"):
        await store.get_and_refresh(NS, UID, SERVICE, ttl_s)


async def test_set_rejects_negative_pod(store: LinkStore) -> None:
    with pytest.raises(ValueError, match="invalid pod index"):
        await store.set(NS, UID, SERVICE, -1, TTL_S)
    assert await store.get(NS, UID, SERVICE) is None


async def test_try_set_rejects_negative_pod(store: LinkStore) -> None:
    with pytest.raises(ValueError, match="invalid pod index"):
        await store.try_set(NS, UID, SERVICE, -1, TTL_S)
    assert await store.get(NS, UID, SERVICE) is None


async def test_set_if_absent_rejects_negative_pod(store: LinkStore) -> None:
    with pytest.raises(ValueError, match="invalid pod index"):
        await store.set_if_absent(NS, UID, SERVICE, -1, TTL_S)
    assert await store.get(NS, UID, SERVICE) is None


async def test_ping_succeeds_on_reachable_store(store: LinkStore) -> None:
    assert await store.ping() is None


async def test_replace_if_pod_moves_link_off_old_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, TTL_S)

    result = await store.replace_if_pod(NS, UID, SERVICE, 0, 2, TTL_S)

    assert result == (True, 2)
    assert await store.get(NS, UID, SERVICE) == 2


async def test_replace_if_pod_keeps_link_of_other_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    result = await store.replace_if_pod(NS, UID, SERVICE, 0, 2, TTL_S)

    assert result == (False, 1)
    assert await store.get(NS, UID, SERVICE) == 1


async def test_replace_if_pod_without_link_writes_nothing(store: LinkStore) -> None:
    result = await store.replace_if_pod(NS, UID, SERVICE, 0, 2, TTL_S)

    assert result == (False, None)
    assert await store.get(NS, UID, SERVICE) is None


async def test_replace_if_pod_turns_persistent_temporary(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    await store.replace_if_pod(NS, UID, SERVICE, 1, 2, TTL_S)

    ttl = await store.link_ttl(NS, UID, SERVICE)
    assert ttl is not None
    assert 0 < ttl <= TTL_S
    assert await store.linked_services(NS, UID) == {}


async def test_concurrent_replace_if_pod_has_one_winner(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, TTL_S)

    results = await asyncio.gather(
        *(store.replace_if_pod(NS, UID, SERVICE, 0, pod, TTL_S) for pod in range(1, 21))
    )

    winners = [pod for replaced, pod in results if replaced]
    assert len(winners) == 1
    assert await store.get(NS, UID, SERVICE) == winners[0]


async def test_pod_states_round_trip(store: LinkStore) -> None:
    await store.publish_pod_state(NS, SERVICE, 0, '{"load":1}')
    await store.publish_pod_state(NS, SERVICE, 2, '{"load":2}')
    await store.publish_pod_state(NS, "chat", 0, '{"load":3}')

    records = await store.read_pod_states(NS, SERVICE)

    assert records == {"0": '{"load":1}', "2": '{"load":2}'}


async def test_pod_state_publish_overwrites(store: LinkStore) -> None:
    await store.publish_pod_state(NS, SERVICE, 1, '{"load":1}')
    await store.publish_pod_state(NS, SERVICE, 1, '{"load":5}')

    assert await store.read_pod_states(NS, SERVICE) == {"1": '{"load":5}'}


async def test_remove_pod_state_deletes_one_record(store: LinkStore) -> None:
    await store.publish_pod_state(NS, SERVICE, 0, "a")
    await store.publish_pod_state(NS, SERVICE, 1, "b")

    assert await store.remove_pod_state(NS, SERVICE, 0) is True
    assert await store.remove_pod_state(NS, SERVICE, 0) is False
    assert await store.read_pod_states(NS, SERVICE) == {"1": "b"}


async def test_workload_round_trip(store: LinkStore) -> None:
    assert await store.read_workload(NS, SERVICE) is None

    await store.publish_workload(NS, SERVICE, '{"pods":3}')

    assert await store.read_workload(NS, SERVICE) == '{"pods":3}'


NOW_MS = 1_764_800_000_000


async def test_index_lists_live_uids_of_pod(store: LinkStore) -> None:
    await store.index_link(NS, SERVICE, 1, "a", NOW_MS + 5_000)
    await store.index_link(NS, SERVICE, 1, "b", None)
    await store.index_link(NS, SERVICE, 2, "c", NOW_MS + 5_000)

    uids = await store.indexed_uids(NS, SERVICE, 1, NOW_MS, 10)

    assert uids == ["a", "b"]


async def test_index_drops_expired_entries(store: LinkStore) -> None:
    await store.index_link(NS, SERVICE, 0, "old", NOW_MS - 1)
    await store.index_link(NS, SERVICE, 0, "new", NOW_MS + 1_000)

    assert await store.indexed_uids(NS, SERVICE, 0, NOW_MS, 10) == ["new"]
    assert await store.count_indexed(NS, SERVICE, 0, NOW_MS) == (1, 0)


async def test_index_moves_uid_off_previous_pod(store: LinkStore) -> None:
    await store.index_link(NS, SERVICE, 0, "a", NOW_MS + 1_000)

    await store.index_link(NS, SERVICE, 2, "a", NOW_MS + 1_000, previous_pod=0)

    assert await store.indexed_uids(NS, SERVICE, 0, NOW_MS, 10) == []
    assert await store.indexed_uids(NS, SERVICE, 2, NOW_MS, 10) == ["a"]


async def test_index_counts_temporary_and_persistent(store: LinkStore) -> None:
    for uid in ("a", "b", "c"):
        await store.index_link(NS, SERVICE, 1, uid, NOW_MS + 1_000)
    await store.index_link(NS, SERVICE, 1, "p", None)

    assert await store.count_indexed(NS, SERVICE, 1, NOW_MS) == (3, 1)


async def test_unindex_removes_one_uid(store: LinkStore) -> None:
    await store.index_link(NS, SERVICE, 1, "a", NOW_MS + 1_000)
    await store.index_link(NS, SERVICE, 1, "b", NOW_MS + 1_000)

    await store.unindex_link(NS, SERVICE, 1, "a")

    assert await store.indexed_uids(NS, SERVICE, 1, NOW_MS, 10) == ["b"]


async def test_indexed_uids_respects_limit(store: LinkStore) -> None:
    for number in range(5):
        await store.index_link(NS, SERVICE, 3, f"u{number}", NOW_MS + 1_000 + number)

    assert await store.indexed_uids(NS, SERVICE, 3, NOW_MS, 2) == ["u0", "u1"]


async def test_replace_pod_state_writes_over_expected(store: LinkStore) -> None:
    await store.publish_pod_state(NS, SERVICE, 1, "old")

    assert await store.replace_pod_state(NS, SERVICE, 1, "old", "new") is True
    assert await store.read_pod_states(NS, SERVICE) == {"1": "new"}


async def test_replace_pod_state_rejects_changed_record(store: LinkStore) -> None:
    await store.publish_pod_state(NS, SERVICE, 1, "theirs")

    assert await store.replace_pod_state(NS, SERVICE, 1, "old", "new") is False
    assert await store.read_pod_states(NS, SERVICE) == {"1": "theirs"}


async def test_replace_pod_state_expecting_none(store: LinkStore) -> None:
    assert await store.replace_pod_state(NS, SERVICE, 0, None, "first") is True
    assert await store.replace_pod_state(NS, SERVICE, 0, None, "second") is False
    assert await store.read_pod_states(NS, SERVICE) == {"0": "first"}


async def test_read_link_marks_temporary_link(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, SHORT_TTL_S)

    result = await store.read_link(NS, UID, SERVICE, TTL_S)

    assert result == (0, False)
    ttl = await store.link_ttl(NS, UID, SERVICE)
    assert ttl is not None
    assert ttl > SHORT_TTL_S


async def test_read_link_marks_persistent_link(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 2, PERSISTENT)

    result = await store.read_link(NS, UID, SERVICE, TTL_S)

    assert result == (2, True)
    assert await store.link_ttl(NS, UID, SERVICE) == PERSISTENT


async def test_read_link_without_link_returns_none(store: LinkStore) -> None:
    assert await store.read_link(NS, UID, SERVICE, TTL_S) is None


async def test_remove_if_temporary_removes_temporary_link(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)

    assert await store.remove_if_temporary(NS, UID, SERVICE, 1) is True
    assert await store.get(NS, UID, SERVICE) is None


async def test_remove_if_temporary_keeps_persistent_link(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, PERSISTENT)

    assert await store.remove_if_temporary(NS, UID, SERVICE, 1) is False
    assert await store.get(NS, UID, SERVICE) == 1
    assert await store.linked_services(NS, UID) == {SERVICE: 1}


async def test_remove_if_temporary_keeps_other_pod(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 2, TTL_S)

    assert await store.remove_if_temporary(NS, UID, SERVICE, 1) is False
    assert await store.get(NS, UID, SERVICE) == 2


async def test_move_notice_is_read_once(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, TTL_S)
    await store.replace_if_pod(NS, UID, SERVICE, 0, 2, TTL_S, "failover")

    first = await store.read_link_noticed(NS, UID, SERVICE, TTL_S)
    second = await store.read_link_noticed(NS, UID, SERVICE, TTL_S)

    assert first == (2, False, (0, "failover"))
    assert second == (2, False, None)


async def test_failed_replace_leaves_no_notice(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 1, TTL_S)
    await store.replace_if_pod(NS, UID, SERVICE, 0, 2, TTL_S, "failover")

    assert await store.read_link_noticed(NS, UID, SERVICE, TTL_S) == (1, False, None)


async def test_move_notice_of_persistent_link(store: LinkStore) -> None:
    await store.set(NS, UID, SERVICE, 0, PERSISTENT)
    await store.replace_if_pod(NS, UID, SERVICE, 0, 3, PERSISTENT, "migrated")

    read = await store.read_link_noticed(NS, UID, SERVICE, TTL_S)

    assert read == (3, True, (0, "migrated"))
