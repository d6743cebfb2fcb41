from __future__ import annotations

import asyncio
import sys

from proxy.cache import LinkCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_returns_entry_until_ttl() -> None:
    clock = FakeClock()
    cache = LinkCache(ttl_s=10, max_size=100, clock=clock)
    cache.put(("ns", "svc", "alice"), 0)

    clock.now += 9.9
    assert cache.get(("ns", "svc", "alice")) == 0
    clock.now += 0.2
    assert cache.get(("ns", "svc", "alice")) is None


def test_cache_keeps_pod_zero() -> None:
    cache = LinkCache(ttl_s=10, max_size=100)
    cache.put(("ns", "svc", "alice"), 0)

    assert cache.get(("ns", "svc", "alice")) == 0
    assert cache.hits == 1


def test_cache_drops_oldest_entry_when_full() -> None:
    cache = LinkCache(ttl_s=10, max_size=2)
    cache.put(("ns", "svc", "a"), 1)
    cache.put(("ns", "svc", "b"), 2)
    cache.put(("ns", "svc", "c"), 3)

    assert len(cache) == 2
    assert cache.get(("ns", "svc", "a")) is None
    assert cache.get(("ns", "svc", "c")) == 3


def test_remove_expired_keeps_live_entries() -> None:
    clock = FakeClock()
    cache = LinkCache(ttl_s=10, max_size=100, clock=clock)
    cache.put(("ns", "svc", "old"), 1)
    clock.now += 5
    cache.put(("ns", "svc", "new"), 2)
    clock.now += 5.5

    removed = cache.remove_expired()

    assert removed == 1
    assert len(cache) == 1
    assert cache.peek(("ns", "svc", "old")) is None
    assert cache.get(("ns", "svc", "new")) == 2


def test_entry_put_again_expires_later() -> None:
    clock = FakeClock()
    cache = LinkCache(ttl_s=10, max_size=100, clock=clock)
    cache.put(("ns", "svc", "a"), 1)
    cache.put(("ns", "svc", "b"), 2)
    clock.now += 5
    cache.put(("ns", "svc", "a"), 1)
    clock.now += 5.5

    removed = cache.remove_expired()

    assert removed == 1
    assert cache.peek(("ns", "svc", "a")) == 1
    assert cache.peek(("ns", "svc", "b")) is None


def test_remove_expired_releases_table_after_burst() -> None:
    clock = FakeClock()
    cache = LinkCache(ttl_s=10, max_size=100_000, clock=clock)
    for index in range(10_000):
        cache.put(("ns", "svc", f"user-{index}"), 1)
    size_after_burst = sys.getsizeof(cache._entries)
    clock.now += 11
    cache.put(("ns", "svc", "returning"), 2)

    removed = cache.remove_expired()

    assert removed == 10_000
    assert len(cache) == 1
    # A dict keeps its table after deletes unless it is copied.
    assert sys.getsizeof(cache._entries) < size_after_burst / 100


async def test_run_expiry_removes_entries_unread() -> None:
    cache = LinkCache(ttl_s=0.2, max_size=100)
    cache.put(("ns", "svc", "gone"), 1)
    stopping = asyncio.Event()
    expiry = asyncio.create_task(cache.run_expiry(stopping))
    # Up to 5 s for the loop: a bounded wait, not a timing.
    for _ in range(250):
        if len(cache) == 0:
            break
        await asyncio.sleep(0.02)
    stopping.set()
    await expiry

    assert len(cache) == 0


def test_cache_with_zero_ttl_stores_nothing() -> None:
    cache = LinkCache(ttl_s=0, max_size=100)
    cache.put(("ns", "svc", "alice"), 1)

    assert len(cache) == 0
    assert cache.get(("ns", "svc", "alice")) is None


def test_cache_drop_forgets_entry() -> None:
    cache = LinkCache(ttl_s=10, max_size=100)
    cache.put(("ns", "svc", "alice"), 1)
    cache.drop(("ns", "svc", "alice"))

    assert cache.get(("ns", "svc", "alice")) is None
    assert cache.misses == 1


def test_drop_pod_forgets_its_entries_only() -> None:
    cache = LinkCache(ttl_s=10, max_size=100)
    cache.put(("ns", "game", "a"), 2)
    cache.put(("ns", "game", "b"), 1)
    cache.put(("other", "game", "c"), 2)
    cache.put(("ns", "chat", "d"), 2)

    dropped = cache.drop_pod({"ns"}, "game", 2)

    assert dropped == 1
    assert cache.get(("ns", "game", "a")) is None
    assert cache.get(("ns", "game", "b")) == 1
    assert cache.get(("other", "game", "c")) == 2
    assert cache.get(("ns", "chat", "d")) == 2
