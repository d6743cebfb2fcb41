"""Pod state records: what each pod publishes about itself.

A record is a JSON object stored in the hash ``sf:{<ns>:state:<svc>}`` under
the pod index::

    {"load": 120, "routing": "READY", "updated_ms": 1764800000000,
     "address": "10.1.2.3:8080"}

- ``load``: integer, smaller is less loaded, may be negative.
- ``routing``: ``READY``, ``DENY_NEW_CALL`` (draining: linked users stay, no
  new users) or ``SHUTDOWN`` (gone: linked users move).
- ``updated_ms``: Unix time of the publication in milliseconds.
- ``address``: optional ``host:port`` where the pod serves traffic.
- ``drained_by``: optional; ``"admin"`` when an operator drained the pod
  through the admin API, so a publishing sidecar keeps the drain.

Unknown fields are ignored, so a newer publisher can add fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import orjson

from proxy.pods import parse_address

DRAINED_BY_ADMIN = "admin"
"""`drained_by` value of a drain written through the admin API."""
# The range of a load: a signed 64-bit integer, the range of a Java long.
# The service-wide sum is clamped to it.
MIN_LOAD = -(2**63)
MAX_LOAD = 2**63 - 1


class Routing(StrEnum):
    """The routing state a pod publishes."""

    READY = "READY"
    DENY_NEW_CALL = "DENY_NEW_CALL"
    SHUTDOWN = "SHUTDOWN"


def now_ms() -> int:
    """Return the current Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class PodState:
    """One pod's published record."""

    load: int
    routing: Routing
    updated_ms: int
    address: str | None = None
    drained_by: str | None = None

    def encode(self) -> str:
        """Return the record as the JSON text stored in Redis."""
        record: dict[str, object] = {
            "load": self.load,
            "routing": self.routing.value,
            "updated_ms": self.updated_ms,
        }
        if self.address is not None:
            record["address"] = self.address
        if self.drained_by is not None:
            record["drained_by"] = self.drained_by
        return orjson.dumps(record).decode()

    @classmethod
    def decode(cls, text: str | bytes) -> PodState:
        """Parse a stored record; raise ValueError naming what is wrong."""
        try:
            record = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")

        load = record.get("load")
        if not isinstance(load, int) or isinstance(load, bool):
            raise ValueError(f"load {load!r} is not an integer")
        if not MIN_LOAD <= load <= MAX_LOAD:
            raise ValueError(f"load {load} is outside the signed 64-bit range")
        routing = record.get("routing")
        if not isinstance(routing, str) or routing not in Routing.__members__:
            raise ValueError(
                f"routing {routing!r} is not READY, DENY_NEW_CALL or SHUTDOWN"
            )
        updated_ms = record.get("updated_ms")
        if not isinstance(updated_ms, int) or isinstance(updated_ms, bool):
            raise ValueError(f"updated_ms {updated_ms!r} is not an integer")

        address = record.get("address")
        if address is not None:
            if not isinstance(address, str):
                raise ValueError(f"address {address!r} is not a string")
            parse_address(address)
        drained_by = record.get("drained_by")
        if drained_by is not None and not isinstance(drained_by, str):
            raise ValueError(f"drained_by {drained_by!r} is not a string")
        return cls(load, Routing(routing), updated_ms, address, drained_by)

    def is_fresh(self, at_ms: int, stale_after_s: float) -> bool:
        """Return whether the record was updated within the staleness window.

        A record from further in the future than the window, written by a
        pod whose clock is ahead, is not fresh either, or it would stay
        fresh long after the pod stopped publishing.
        """
        return abs(at_ms - self.updated_ms) <= stale_after_s * 1000


@dataclass(frozen=True, slots=True)
class Workload:
    """The service-wide workload state that pod 0 publishes.

    Stored as JSON in ``sf:{<ns>:workload:<svc>}``: the number of pods with a
    fresh record, how many of them are READY, the sum of their loads, and the
    publication time in milliseconds.
    """

    pods: int
    ready: int
    load: int
    updated_ms: int

    def encode(self) -> str:
        return orjson.dumps(
            {
                "pods": self.pods,
                "ready": self.ready,
                "load": self.load,
                "updated_ms": self.updated_ms,
            }
        ).decode()

    @classmethod
    def decode(cls, text: str | bytes) -> Workload:
        """Parse a stored workload state; raise ValueError when it is invalid."""
        try:
            record = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        values = []
        for name in ("pods", "ready", "load", "updated_ms"):
            value = record.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} {value!r} is not an integer")
            values.append(value)
        return cls(*values)
