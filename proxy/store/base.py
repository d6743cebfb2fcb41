"""The link store interface that the memory and Redis stores implement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

PERSISTENT = -1.0
"""TTL value of a persistent link: no expiry, recorded in the UID hash."""

NOTICE_TTL_S = 300.0
"""Lifetime of the move notice of a user whose new link is persistent."""


def check_ttl(ttl_s: float) -> None:
    """Raise ValueError unless `ttl_s` is PERSISTENT or a positive number."""
    if ttl_s != PERSISTENT and not ttl_s > 0:
        raise ValueError(f"invalid link TTL {ttl_s!r}: expected -1 or > 0 seconds")


def check_pod(pod: int) -> None:
    """Raise ValueError unless `pod` is a pod index (0 is a real pod)."""
    if pod < 0:
        raise ValueError(f"invalid pod index {pod!r}: expected >= 0")


class LinkStore(Protocol):
    """Atomic operations on links UID -> pod, and the pods' state records.

    Every operation is atomic: a Lua script in Redis, a step without an await
    in memory. A TTL is in seconds; `PERSISTENT` (-1) means no TTL. A pod is
    a pod index; None means no link. Operations raise
    `StoreUnavailableError` when the store cannot be reached.
    """

    backend: str

    async def get(self, namespace: str, uid: str, service: str) -> int | None:
        """Return the linked pod, or None when there is no link."""
        ...

    async def get_and_refresh(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> int | None:
        """Return the linked pod and restart the TTL of a temporary link.

        A persistent link is returned as it is. Routers use this so that a
        user who keeps sending requests keeps the temporary link.
        """
        ...

    async def read_link(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> tuple[int, bool] | None:
        """Do what `get_and_refresh` does and also tell whether it is persistent.

        Returns (pod, persistent), or None when there is no link.
        """
        ...

    async def set(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> int | None:
        """Overwrite the link and return the previous pod.

        With `PERSISTENT` the link gets no TTL and is recorded in the UID
        hash; otherwise it expires after `ttl_s` and leaves the UID hash.
        """
        ...

    async def try_set(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> tuple[bool, int | None]:
        """Set the link unless a persistent link names a different pod.

        Returns (accepted, pod linked now).
        """
        ...

    async def set_if_absent(
        self, namespace: str, uid: str, service: str, pod: int, ttl_s: float
    ) -> int:
        """Link `pod` only when no link exists; return the pod linked now."""
        ...

    async def remove(
        self, namespace: str, uid: str, service: str, delay_s: float = 0
    ) -> bool:
        """Remove the link now, or let it expire after `delay_s` seconds.

        The link leaves the UID hash at once; the hash is deleted when it
        becomes empty. Returns whether a link existed.
        """
        ...

    async def remove_if_pod(
        self, namespace: str, uid: str, service: str, pod: int, delay_s: float = 0
    ) -> bool:
        """Remove the link only when it names `pod`; return whether it did."""
        ...

    async def replace_if_pod(
        self,
        namespace: str,
        uid: str,
        service: str,
        old_pod: int,
        new_pod: int,
        ttl_s: float,
        notice: str = "",
    ) -> tuple[bool, int | None]:
        """Relink to `new_pod` only when the link still names `old_pod`.

        A compare-and-set: of concurrent callers that saw the same old pod,
        exactly one succeeds. With a `notice` (a reason such as "failover"),
        a successful move also leaves a move notice that the next
        `read_link_noticed` of the link returns once. Returns (replaced, pod
        linked now or None).
        """
        ...

    async def read_link_noticed(
        self, namespace: str, uid: str, service: str, ttl_s: float
    ) -> tuple[int, bool, tuple[int, str] | None] | None:
        """Do what `read_link` does, and take the link's move notice, if any.

        Returns (pod, persistent, (previous pod, reason) or None), or None
        when there is no link. The notice is deleted as it is read.
        """
        ...

    async def remove_if_temporary(
        self, namespace: str, uid: str, service: str, pod: int
    ) -> bool:
        """Remove the link only when it names `pod` and has a TTL.

        Rebalancing uses it, so a persistent link is never touched. Returns
        whether it removed the link.
        """
        ...

    async def get_if_persistent(
        self, namespace: str, uid: str, service: str
    ) -> int | None:
        """Return the linked pod only when the link has no TTL."""
        ...

    async def linked_services(self, namespace: str, uid: str) -> dict[str, int]:
        """Return every persistent link of a UID as service -> pod."""
        ...

    async def batch_get(
        self, namespace: str, service: str, uids: Sequence[str]
    ) -> dict[int, list[str]]:
        """Return the links of many UIDs in one round trip as pod -> UIDs.

        UIDs without a link are left out.
        """
        ...

    async def link_ttl(self, namespace: str, uid: str, service: str) -> float | None:
        """Return the seconds a link has left, PERSISTENT, or None when absent."""
        ...

    async def publish_pod_state(
        self, namespace: str, service: str, pod: int, record: str
    ) -> None:
        """Store one pod's state record (JSON text) in the service's state hash."""
        ...

    async def replace_pod_state(
        self,
        namespace: str,
        service: str,
        pod: int,
        expected: str | None,
        record: str,
    ) -> bool:
        """Store `record` only when the stored one is still `expected`.

        None expects no record. Returns whether it wrote, so a publisher can
        re-read and decide again when someone else wrote in between.
        """
        ...

    async def read_pod_states(self, namespace: str, service: str) -> dict[str, str]:
        """Return the state hash of a service as field -> record, unparsed.

        Fields are pod indexes in decimal when written by a conforming pod.
        """
        ...

    async def remove_pod_state(self, namespace: str, service: str, pod: int) -> bool:
        """Delete one pod's state record; return whether it existed."""
        ...

    async def publish_workload(self, namespace: str, service: str, value: str) -> None:
        """Store the service-wide workload state."""
        ...

    async def read_workload(self, namespace: str, service: str) -> str | None:
        """Return the service-wide workload state, or None when absent."""
        ...

    async def index_link(
        self,
        namespace: str,
        service: str,
        pod: int,
        uid: str,
        expires_ms: int | None,
        previous_pod: int | None = None,
    ) -> None:
        """Record `uid` in the index of `pod`, and drop it from `previous_pod`'s.

        `expires_ms` is the Unix time in ms when the link expires, None for a
        persistent link. The index is a hint: it may name UIDs whose link
        moved or expired, so every user of it re-checks the link.
        """
        ...

    async def unindex_link(
        self, namespace: str, service: str, pod: int, uid: str
    ) -> None:
        """Drop `uid` from the index of `pod`."""
        ...

    async def indexed_uids(
        self, namespace: str, service: str, pod: int, now_ms: int, limit: int
    ) -> list[str]:
        """Return up to `limit` UIDs indexed on `pod` whose link has not expired.

        Entries that expired before `now_ms` are deleted first. Persistent
        links come last.
        """
        ...

    async def count_indexed(
        self, namespace: str, service: str, pod: int, now_ms: int
    ) -> tuple[int, int]:
        """Return (temporary, persistent) counts of live entries of `pod`."""
        ...

    async def ping(self) -> None:
        """Raise `StoreUnavailableError` unless the store responds."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...
