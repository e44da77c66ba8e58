"""Interactions between today's rate-limit features (local over-limit cache, STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT,
per-second Redis, fail-open, shadow mode), found in review. The Limiter runs in this process on a fixed clock (no
window edge to dodge) against a real redis-server, so each test reads exactly what the service would answer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis
from envoy.service.ratelimit.v3 import rls_pb2

from igw.redis_conn import PipelinedRedis
from ratelimit_svc.counters import RedisCounters
from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.over_limit_cache import MIN_SIZE_BYTES, OverLimitCache, entry_bytes
from ratelimit_svc.service import Limiter
from ratelimit_svc.settings import parse_settings
from tests.ratelimit.rls_client import OK, OVER, descriptor

CONFIG = """
domain: d
descriptors:
  - key: small
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: sec
    rate_limit: {unit: second, requests_per_unit: 1}
"""
NOW = 1_000_020.0  # 20 s into a minute window
STOP = ("--stop-cache-key-increment-when-overlimit", "true")
CACHE = ("--local-cache-size-in-bytes", "1000000")
Calls = Sequence[Sequence[tuple[str, str]]]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "limits.yaml").write_text(CONFIG)
    return tmp_path


def closed_port() -> int:
    """A port nothing listens on: a Redis there refuses every connection at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def limiter(config_dir: Path, redis_url: str, *args: str) -> Limiter:
    settings = parse_settings(["--config-dir", str(config_dir), "--redis-url", redis_url,
                               "--expiration-jitter-max-seconds", "0", *args])
    holder = ConfigHolder(config_dir)
    assert holder.reload()
    per_second = (PipelinedRedis(settings.redis_persecond_url, timeout=0.2, connect_timeout=0.2)
                  if settings.redis_persecond_url else None)
    counters = RedisCounters(PipelinedRedis(redis_url), per_second=per_second)
    return Limiter(settings, holder, counters, clock=lambda: NOW)


def run(lim: Limiter, calls: Calls) -> list[int]:
    """Overall codes of the calls, in order, each call one descriptor per entry."""
    async def go() -> list[int]:
        codes = []
        try:
            for entries in calls:
                request = rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor([e]) for e in entries])
                codes.append((await lim.should_rate_limit(request)).overall_code)
        finally:
            for target in lim.counters.targets:  # type: ignore[union-attr]
                target.close()  # a connection belongs to this loop; the next run() connects again in its own
        return codes

    return asyncio.run(go())


def count(store: redis.Redis, key: str, value: str) -> int:
    return int(store.get(f"d_{key}_{value}_{int(NOW) // 60 * 60}") or 0)


# --- LOCAL_CACHE_SIZE_IN_BYTES ---------------------------------------------------------------------------------


def test_a_local_cache_size_below_freecaches_minimum_gets_the_minimum_as_upstream(
    config_dir: Path, redis_url: str
) -> None:
    # Upstream's freecache raises any size under 512 KiB to 512 KiB: LOCAL_CACHE_SIZE_IN_BYTES=1000 caches
    # about 3,000 keys there. Taken literally here it held no key at all (one entry is ~260 bytes + key).
    lim = limiter(config_dir, redis_url, "--local-cache-size-in-bytes", "1000")
    assert lim.local_cache is not None and lim.local_cache.size_bytes == MIN_SIZE_BYTES == 512 * 1024
    bigger = limiter(config_dir, redis_url, "--local-cache-size-in-bytes", str(4 * MIN_SIZE_BYTES))
    assert bigger.local_cache is not None and bigger.local_cache.size_bytes == 4 * MIN_SIZE_BYTES


def test_the_smallest_cache_setting_is_named_in_a_startup_warning(config_dir: Path, redis_url: str) -> None:
    settings = parse_settings(["--config-dir", str(config_dir), "--local-cache-size-in-bytes", "1000"])
    assert any(w.startswith("LOCAL_CACHE_SIZE_IN_BYTES=1000 is below the smallest cache: using 524288 bytes")
               for w in settings.upstream_warnings)


def test_full_cache_evicts_and_the_evicted_key_is_counted_in_redis_again(
    config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    # A one-entry cache cannot be asked for through the setting any more (its floor is 512 KiB), so the Limiter
    # gets it directly: the eviction path is the same.
    lim = limiter(config_dir, redis_url, *CACHE)
    lim.local_cache = OverLimitCache(entry_bytes(f"d_small_a_{int(NOW) // 60 * 60}"))
    a, b = [("small", "a")], [("small", "b")]
    assert run(lim, [a] * 5) == [OK, OK, OVER, OVER, OVER]
    assert count(store, "small", "a") == 3  # cached after the third
    assert run(lim, [b] * 3) == [OK, OK, OVER]  # b goes over and takes the only slot
    assert run(lim, [a]) == [OVER]
    assert count(store, "small", "a") == 4  # a was evicted: Redis counted it again
    assert run(lim, [a]) == [OVER]
    assert count(store, "small", "a") == 4  # and cached it again


# --- STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT with a per-second Redis and fail-open ---------------------------


def test_with_fail_open_a_down_per_second_redis_does_not_stop_the_main_redis_limits_under_stop_increment(
    config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    # Fail-open's promise (README, test_sharding): the Redis that answer still enforce their limits. With
    # STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT the counters spread over two Redis are read first; a failed read
    # on the per-second one used to fail the whole call, so fail-open answered OK and `small` was never counted.
    lim = limiter(config_dir, redis_url, *STOP, "--fail-open", "true", "--redis-persecond", "true",
                  "--redis-persecond-url", f"redis://127.0.0.1:{closed_port()}/0")
    codes = run(lim, [[("sec", "a"), ("small", "b")]] * 4)
    assert codes == [OK, OK, OVER, OVER]
    assert count(store, "small", "b") == 4  # counted in every call: alone among the counters read, it went over


# --- shadow mode with STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT ---------------------------------------------------
# Upstream's rule, kept on purpose (README, "Stopping increments"): a shadow-mode counter over its limit stops the
# request's other counters, yet the request is answered OK, so a real limit beside it stops counting for the rest
# of the window. test_stop_increment.py pins the plain case; this pins it with the local cache in front.


def test_a_cached_shadow_mode_key_also_stops_the_other_counters_as_upstream(
    config_dir: Path, redis_url: str
) -> None:
    codes = run(limiter(config_dir, redis_url, *STOP, *CACHE), [[("shadow", "a"), ("small", "b")]] * 4)
    assert codes == [OK, OK, OK, OK]  # small is 2/minute, but once shadow is cached it is only read
