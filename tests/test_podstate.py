"""Pod state records and pod sets, without I/O.

The vectors of the second half are raw state hashes as another router
sharing the Redis (the Java one included) would leave them: JSON text per
pod index, as `RedisStore.read_pod_states` returns it.
"""

from __future__ import annotations

import json

import pytest

from proxy.config import ServiceSettings
from proxy.pods import Address, Pod
from proxy.podset import PodSet, build_pod_set, parse_records
from proxy.podstate import PodState, Routing, Workload

NOW_MS = 1_764_800_000_000
STALE_AFTER_S = 60.0
NAMESPACE = "eu"
SERVICE = "game"


def raw_record(**fields: object) -> str:
    """Return a record as JSON text, the way a publisher writes it."""
    return json.dumps(fields)


def pods(count: int) -> tuple[Pod, ...]:
    return tuple(
        Pod(index, Address("10.0.0.1", 8000 + index)) for index in range(count)
    )


def settings(**overrides: object) -> ServiceSettings:
    values: dict[str, object] = {
        "name": SERVICE,
        "pods": tuple(str(pod.address) for pod in pods(5)),
        "state_stale_after_s": STALE_AFTER_S,
    }
    values.update(overrides)
    return ServiceSettings(**values)  # type: ignore[arg-type]


def pod_set_from(raw: dict[str, str], **overrides: object) -> PodSet:
    records, problems = parse_records(raw)
    assert problems == []
    return build_pod_set(settings(**overrides), NAMESPACE, pods(5), records, NOW_MS)


# Records.


@pytest.mark.parametrize(
    "state",
    [
        PodState(120, Routing.READY, NOW_MS),
        PodState(0, Routing.DENY_NEW_CALL, NOW_MS, "10.1.2.3:8080", "admin"),
        PodState(-40, Routing.SHUTDOWN, 0, "[::1]:9000"),
    ],
    ids=["minimal", "all-fields", "negative-load-ipv6"],
)
def test_record_round_trips(state: PodState) -> None:
    assert PodState.decode(state.encode()) == state


def test_record_encodes_documented_fields() -> None:
    state = PodState(-7, Routing.DENY_NEW_CALL, NOW_MS, "pod-0.game:8080", "admin")

    encoded = json.loads(state.encode())

    assert encoded == {
        "load": -7,
        "routing": "DENY_NEW_CALL",
        "updated_ms": NOW_MS,
        "address": "pod-0.game:8080",
        "drained_by": "admin",
    }


def test_record_omits_absent_optional_fields() -> None:
    encoded = json.loads(PodState(1, Routing.READY, NOW_MS).encode())

    assert "address" not in encoded
    assert "drained_by" not in encoded


def test_negative_load_decodes_as_integer() -> None:
    state = PodState.decode(raw_record(load=-500, routing="READY", updated_ms=NOW_MS))

    assert state.load == -500


# orjson reads a number below the signed 64-bit range as a float.
@pytest.mark.parametrize(
    ("load", "message"),
    [(2**63, "outside the signed 64-bit range"), (-(2**63) - 1, "not an integer")],
)
def test_load_beyond_64_bits_rejected(load: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PodState.decode(raw_record(load=load, routing="READY", updated_ms=NOW_MS))


def test_decode_accepts_bytes() -> None:
    text = raw_record(load=3, routing="READY", updated_ms=NOW_MS).encode()

    assert PodState.decode(text) == PodState(3, Routing.READY, NOW_MS)


def test_unknown_record_fields_ignored() -> None:
    text = raw_record(
        load=5, routing="READY", updated_ms=NOW_MS, cpu=0.4, version="2.1", extra={}
    )

    assert PodState.decode(text) == PodState(5, Routing.READY, NOW_MS)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"READY"', "not a JSON object"),
        (raw_record(routing="READY", updated_ms=NOW_MS), "load"),
        (raw_record(load="12", routing="READY", updated_ms=NOW_MS), "load"),
        (raw_record(load=1.5, routing="READY", updated_ms=NOW_MS), "load"),
        (raw_record(load=True, routing="READY", updated_ms=NOW_MS), "load"),
        (raw_record(load=1, updated_ms=NOW_MS), "routing"),
        (raw_record(load=1, routing="ready", updated_ms=NOW_MS), "routing"),
        (raw_record(load=1, routing="DRAINING", updated_ms=NOW_MS), "routing"),
        (raw_record(load=1, routing=2, updated_ms=NOW_MS), "routing"),
        (raw_record(load=1, routing="READY"), "updated_ms"),
        (raw_record(load=1, routing="READY", updated_ms="now"), "updated_ms"),
        (raw_record(load=1, routing="READY", updated_ms=1.7e12), "updated_ms"),
        (raw_record(load=1, routing="READY", updated_ms=False), "updated_ms"),
        (raw_record(load=1, routing="READY", updated_ms=NOW_MS, address=80), "address"),
        (
            raw_record(load=1, routing="READY", updated_ms=NOW_MS, drained_by=1),
            "drained_by",
        ),
    ],
)
def test_invalid_record_names_field(text: str, named: str) -> None:
    with pytest.raises(ValueError) as raised:
        PodState.decode(text)

    assert named in str(raised.value)


@pytest.mark.parametrize("address", ["no-port", "host:0", "host:99999", "[::1:80"])
def test_invalid_address_rejected(address: str) -> None:
    text = raw_record(load=1, routing="READY", updated_ms=NOW_MS, address=address)

    with pytest.raises(ValueError):
        PodState.decode(text)


@pytest.mark.parametrize(
    ("age_ms", "fresh"),
    [
        (0, True),
        (59_999, True),
        (60_000, True),
        (60_001, False),
        (3_600_000, False),
    ],
)
def test_freshness_ends_after_window(age_ms: int, fresh: bool) -> None:
    state = PodState(0, Routing.READY, NOW_MS - age_ms)

    assert state.is_fresh(NOW_MS, STALE_AFTER_S) is fresh


def test_workload_round_trips() -> None:
    workload = Workload(pods=3, ready=2, load=-10, updated_ms=NOW_MS)

    assert Workload.decode(workload.encode()) == workload


@pytest.mark.parametrize("missing", ["pods", "ready", "load", "updated_ms"])
def test_invalid_workload_names_field(missing: str) -> None:
    fields = {"pods": 3, "ready": 2, "load": 0, "updated_ms": NOW_MS}
    fields[missing] = "x"

    with pytest.raises(ValueError) as raised:
        Workload.decode(json.dumps(fields))

    assert missing in str(raised.value)


# Pod sets from raw state hashes.

STALE_MS = NOW_MS - 61_000
JAVA_HASH = {
    "0": raw_record(load=-250, routing="READY", updated_ms=NOW_MS),
    "1": raw_record(load=40, routing="DENY_NEW_CALL", updated_ms=NOW_MS),
    "2": raw_record(load=10, routing="READY", updated_ms=STALE_MS),
    "4": raw_record(load=0, routing="SHUTDOWN", updated_ms=NOW_MS),
}


@pytest.mark.parametrize(
    ("require_pod_state", "index", "expected"),
    [
        (False, 0, (True, True, True, "ready")),
        (False, 1, (True, True, False, "draining")),
        (False, 2, (False, False, False, "stale")),
        (False, 3, (False, True, True, "ready")),
        (False, 4, (True, False, False, "shutdown")),
        (True, 0, (True, True, True, "ready")),
        (True, 1, (True, True, False, "draining")),
        (True, 2, (False, False, False, "stale")),
        (True, 3, (False, False, False, "no record")),
        (True, 4, (True, False, False, "shutdown")),
    ],
    ids=[
        "pod0-negative-load",
        "deny-new-call",
        "stale",
        "missing-record",
        "shutdown",
        "required-pod0-negative-load",
        "required-deny-new-call",
        "required-stale",
        "required-missing-record",
        "required-shutdown",
    ],
)
def test_java_record_status(
    require_pod_state: bool, index: int, expected: tuple[bool, bool, bool, str]
) -> None:
    pod_set = pod_set_from(JAVA_HASH, require_pod_state=require_pod_state)

    status = pod_set.get(index)

    assert status is not None
    fresh, available, routable, reason = expected
    assert status.fresh is fresh
    assert status.available is available
    assert status.routable is routable
    assert status.reason == reason


def test_routable_set_counts_missing_record() -> None:
    pod_set = pod_set_from(JAVA_HASH, require_pod_state=False)

    assert [pod.index for pod in pod_set.routable] == [0, 3]


def test_routable_set_requires_record() -> None:
    pod_set = pod_set_from(JAVA_HASH, require_pod_state=True)

    assert [pod.index for pod in pod_set.routable] == [0]


def test_pod_zero_is_a_real_pod() -> None:
    pod_set = pod_set_from(JAVA_HASH)

    assert pod_set.is_available(0)
    assert pod_set.load(0) == -250


def test_draining_pod_stays_available() -> None:
    pod_set = pod_set_from(JAVA_HASH)

    assert pod_set.is_available(1)
    assert 1 not in [pod.index for pod in pod_set.routable]


def test_unknown_index_not_available() -> None:
    pod_set = pod_set_from(JAVA_HASH)

    assert pod_set.get(7) is None
    assert not pod_set.is_available(7)
    assert pod_set.load(7) == 0


def test_record_of_unconfigured_pod_ignored() -> None:
    raw = {"9": raw_record(load=0, routing="READY", updated_ms=NOW_MS)}

    pod_set = pod_set_from(raw)

    assert pod_set.get(9) is None
    assert len(pod_set) == 5


def test_invalid_records_reported_and_skipped() -> None:
    raw = {
        "0": raw_record(load=1, routing="READY", updated_ms=NOW_MS),
        "1": raw_record(load="heavy", routing="READY", updated_ms=NOW_MS),
        "pod-2": raw_record(load=1, routing="READY", updated_ms=NOW_MS),
        "3": "{broken",
    }

    records, problems = parse_records(raw)

    assert sorted(records) == [0]
    assert len(problems) == 3
    assert any("pod 1" in problem and "load" in problem for problem in problems)
    assert any("'pod-2'" in problem for problem in problems)
    assert any("pod 3" in problem and "not JSON" in problem for problem in problems)


def test_invalid_record_counts_as_missing() -> None:
    records, _ = parse_records({"1": raw_record(load="heavy", routing="READY")})

    pod_set = build_pod_set(
        settings(require_pod_state=True), NAMESPACE, pods(3), records, NOW_MS
    )

    status = pod_set.get(1)
    assert status is not None
    assert status.reason == "no record"
    assert not status.available


def test_registry_set_takes_fresh_addressed_records() -> None:
    raw = {
        "0": raw_record(load=0, routing="READY", updated_ms=NOW_MS, address="a:1"),
        "1": raw_record(load=0, routing="READY", updated_ms=STALE_MS, address="b:1"),
        "2": raw_record(load=0, routing="READY", updated_ms=NOW_MS),
        "3": raw_record(
            load=0, routing="DENY_NEW_CALL", updated_ms=NOW_MS, address="d:1"
        ),
        "5": raw_record(load=0, routing="SHUTDOWN", updated_ms=NOW_MS, address="f:1"),
    }
    records, _ = parse_records(raw)
    registry = settings(pods=(), discovery="registry")

    pod_set = build_pod_set(registry, NAMESPACE, None, records, NOW_MS)

    assert sorted(pod_set.statuses) == [0, 3, 5]
    assert [pod.index for pod in pod_set.routable] == [0]
    assert [str(pod.address) for pod in pod_set.routable] == ["a:1"]
    assert pod_set.is_available(3)
    assert not pod_set.is_available(5)


def test_record_far_in_future_is_not_fresh() -> None:
    state = PodState(0, Routing.READY, 1_000_000 + 61_000)

    assert state.is_fresh(1_000_000, 60) is False
    assert state.is_fresh(1_000_000 + 2_000, 60) is True


def test_padded_pod_index_is_rejected() -> None:
    records, problems = parse_records(
        {"007": PodState(0, Routing.READY, 1).encode(), "7": "x"}
    )

    assert records == {}
    assert problems[0] == "field '007' is not a pod index"
