"""Link stores: the embedded memory store and the Redis store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.base import PERSISTENT, LinkStore
from proxy.store.memory import MemoryStore

if TYPE_CHECKING:
    from proxy.store.redis import RedisStore

__all__ = ["PERSISTENT", "LinkStore", "MemoryStore", "RedisStore"]


def __getattr__(name: str) -> object:
    # Imported on first use, so that a proxy with the memory store does not
    # load redis-py, which takes about 7 MiB of resident memory.
    if name == "RedisStore":
        from proxy.store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
