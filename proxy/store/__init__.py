"""Link stores: the embedded memory store and the Redis store."""

from __future__ import annotations

from proxy.store.base import PERSISTENT, LinkStore
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore

__all__ = ["PERSISTENT", "LinkStore", "MemoryStore", "RedisStore"]
