"""The over-limit cache on its own: expiry, the limit an entry was over, and the size bound in bytes."""

from __future__ import annotations

import pytest

from ratelimit_svc.over_limit_cache import ENTRY_OVERHEAD_BYTES, OverLimitCache, entry_bytes


def room_for(*keys: str) -> int:
    return sum(entry_bytes(k) for k in keys)


def test_cache_holds_a_key_until_its_expiry() -> None:
    cache = OverLimitCache(10_000)
    cache.add("k_60", 5, expires_at=160.0, now=100.0)
    assert cache.is_over("k_60", 5, now=159.9)
    assert not cache.is_over("k_60", 5, now=160.0)
    assert len(cache) == 0 and cache.used_bytes == 0  # the expired entry is dropped on the way


def test_cache_answers_for_an_equal_or_lower_limit() -> None:
    cache = OverLimitCache(10_000)
    cache.add("k", 10, expires_at=60.0, now=0.0)
    assert cache.is_over("k", 10, now=1.0)
    assert cache.is_over("k", 3, now=1.0)  # a counter over 10 is over 3 as well


def test_cache_drops_an_entry_when_the_limit_rose() -> None:
    cache = OverLimitCache(10_000)
    cache.add("k", 10, expires_at=60.0, now=0.0)
    assert not cache.is_over("k", 11, now=1.0)
    assert not cache.is_over("k", 10, now=1.0)  # gone: Redis decides again and re-adds it if still over


def test_cache_does_not_know_other_keys() -> None:
    cache = OverLimitCache(10_000)
    cache.add("a_60", 1, expires_at=60.0, now=0.0)
    assert not cache.is_over("a_120", 1, now=1.0)
    assert not cache.is_over("b_60", 1, now=1.0)


def test_adding_an_already_expired_entry_stores_nothing() -> None:
    cache = OverLimitCache(10_000)
    cache.add("k", 1, expires_at=5.0, now=5.0)
    assert len(cache) == 0


def test_adding_a_key_again_replaces_it_without_counting_it_twice() -> None:
    cache = OverLimitCache(10_000)
    cache.add("k", 1, expires_at=60.0, now=0.0)
    cache.add("k", 7, expires_at=90.0, now=1.0)
    assert len(cache) == 1 and cache.used_bytes == entry_bytes("k")
    assert cache.is_over("k", 7, now=80.0)


def test_entry_estimate_is_the_overhead_plus_the_key_string() -> None:
    assert entry_bytes("x" * 60) - entry_bytes("") == 60
    assert entry_bytes("") > ENTRY_OVERHEAD_BYTES


def test_full_cache_evicts_the_least_recently_used_key() -> None:
    cache = OverLimitCache(room_for("a", "b"))
    cache.add("a", 1, expires_at=100.0, now=0.0)
    cache.add("b", 1, expires_at=100.0, now=0.0)
    assert cache.is_over("a", 1, now=0.1)  # a is now more recent than b
    cache.add("c", 1, expires_at=100.0, now=0.2)
    assert cache.is_over("a", 1, now=0.3) and cache.is_over("c", 1, now=0.3)
    assert not cache.is_over("b", 1, now=0.3)
    assert cache.evictions == 1
    assert cache.used_bytes <= cache.size_bytes


def test_full_cache_drops_expired_keys_before_live_ones() -> None:
    cache = OverLimitCache(room_for("live", "old"))
    cache.add("live", 1, expires_at=100.0, now=0.0)  # least recently used, but live
    cache.add("old", 1, expires_at=5.0, now=0.0)
    cache.add("new", 1, expires_at=100.0, now=10.0)
    assert cache.is_over("live", 1, now=11.0) and cache.is_over("new", 1, now=11.0)
    assert cache.evictions == 0


def test_a_cache_full_of_live_keys_sweeps_at_most_once_a_second() -> None:
    cache = OverLimitCache(room_for("k0", "k1"))
    cache.add("k0", 1, expires_at=100.0, now=0.0)
    cache.add("k1", 1, expires_at=100.0, now=0.0)
    cache.add("k2", 1, expires_at=100.0, now=0.0)  # sweeps (nothing expired), then evicts k0
    cache.add("k3", 1, expires_at=100.0, now=0.5)  # no second sweep within the second: evicts k1
    assert cache.evictions == 2 and len(cache) == 2


def test_a_key_larger_than_the_whole_cache_is_not_stored() -> None:
    cache = OverLimitCache(room_for("a"))
    cache.add("a", 1, expires_at=100.0, now=0.0)
    cache.add("a" * 1000, 1, expires_at=100.0, now=0.0)
    assert cache.is_over("a", 1, now=1.0)  # what was there stays
    assert len(cache) == 1


def test_many_keys_never_exceed_the_size_bound() -> None:
    cache = OverLimitCache(50_000)
    for i in range(5_000):
        cache.add(f"igw_tenant_t{i}_model_m{i % 7}_1764072000", 100, expires_at=60.0 + i, now=i / 1000)
        assert cache.used_bytes <= cache.size_bytes
    assert 0 < len(cache) < 5_000
    assert cache.used_bytes == room_for(*cache._entries)


@pytest.mark.parametrize("size", [0, -1], ids=["zero bytes", "negative bytes"])
def test_cache_of_no_size_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        OverLimitCache(size)
