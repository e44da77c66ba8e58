"""STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT with a real redis-server: a request whose hits would take some
fixed-window counters over their limit increments only those; the others keep their count.

Upstream's rule (src/redis/fixed_cache_impl.go): with a key of the request in the local over-limit cache,
no counter gets the hits; otherwise the counters are read first, and if any would end above its limit only
those are incremented; otherwise all are."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis

from igw.procs import RedisServer
from igw.redis_conn import PipelinedRedis
from ratelimit_svc.counters import Counted, Hit, Increment, MemoryCounters, RedisCounters
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor
from tests.ratelimit.test_local_cache import counter, metric

CONFIG = """
domain: test-domain
descriptors:
  - key: small
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: big
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 1}
"""

STOP = ("--stop-cache-key-increment-when-overlimit", "true")


def start(services: ServiceFactory, config_dir: Path, redis_url: str, *args: str) -> tuple[Service, RlsClient]:
    svc = services.ratelimit(config_dir, redis_url, *args)
    return svc, RlsClient(svc.grpc_target)


def test_a_request_over_one_limit_leaves_the_other_counters_as_they_were(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    _, client = start(services, config_dir, redis_url, *STOP)
    avoid_window_edges(minute_margin_s=3)
    for _ in range(2):
        assert client.call([("small", "a")], [("big", "b")]).overall_code == OK
    response = client.call([("small", "a")], [("big", "b")])
    assert [s.code for s in response.statuses] == [OVER, OK]
    assert counter(store, "small", "a") == 3  # the counter that went over gets the hit, as upstream
    assert counter(store, "big", "b") == 2
    assert response.statuses[1].limit_remaining == 98  # its current count, as if this hit had not come
    client.close()


def test_without_the_setting_every_counter_of_a_refused_request_is_incremented(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    _, client = start(services, config_dir, redis_url)
    avoid_window_edges(minute_margin_s=3)
    for _ in range(3):
        client.call([("small", "a")], [("big", "b")])
    assert counter(store, "big", "b") == 3
    client.close()


def test_a_request_within_every_limit_increments_every_counter(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    _, client = start(services, config_dir, redis_url, *STOP)
    avoid_window_edges(minute_margin_s=3)
    response = client.call([("small", "a")], [("big", "b")], hits_addend=2)
    assert [s.code for s in response.statuses] == [OK, OK]
    assert (counter(store, "small", "a"), counter(store, "big", "b")) == (2, 2)
    client.close()


def test_hits_that_would_cross_the_limit_are_counted_only_on_the_counter_they_cross(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    _, client = start(services, config_dir, redis_url, *STOP)
    avoid_window_edges(minute_margin_s=3)
    client.call([("small", "a")])
    response = client.call(descriptor([("small", "a")], hits=2), descriptor([("big", "b")], hits=5))
    assert [s.code for s in response.statuses] == [OVER, OK]
    assert (counter(store, "small", "a"), counter(store, "big", "b")) == (3, 0)
    client.close()


def test_a_shadow_mode_limit_going_over_also_stops_the_others_as_upstream(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    _, client = start(services, config_dir, redis_url, *STOP)
    avoid_window_edges(minute_margin_s=3)
    client.call([("shadow", "s")])
    response = client.call([("shadow", "s")], [("big", "b")])
    assert response.overall_code == OK  # shadow mode answers OK ...
    assert counter(store, "big", "b") == 0  # ... yet its counter went over, so the other was not counted
    client.close()


def test_a_key_in_the_local_cache_stops_every_other_counter_of_the_request(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    svc, client = start(services, config_dir, redis_url, *STOP, "--local-cache-size-in-bytes", "1000000")
    avoid_window_edges(minute_margin_s=3)
    for _ in range(3):
        client.call([("small", "hot")])  # the third goes over and enters the local cache
    response = client.call([("small", "hot")], [("big", "b")], [("big", "c")])
    assert [s.code for s in response.statuses] == [OVER, OK, OK]
    assert metric(svc, "ratelimit_over_limit_with_local_cache", "small") == 1
    assert (counter(store, "small", "hot"), counter(store, "big", "b"), counter(store, "big", "c")) == (3, 0, 0)
    assert store.keys("test-domain_big_*") == []  # read only: a missing counter is not created
    client.close()


def test_counters_on_two_redis_are_read_before_either_is_written(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis, own_redis: RedisServer
) -> None:
    """The per-second counter lives on its own Redis: upstream's two round trips (read all, then write)."""
    _, client = start(services, config_dir, redis_url, *STOP, "--redis-persecond", "true",
                      "--redis-persecond-url", own_redis.url)
    persecond = redis.Redis.from_url(own_redis.url)
    avoid_window_edges(margin_s=0.6, minute_margin_s=3)
    assert client.call([("per_second", "p")], [("big", "b")]).overall_code == OK
    response = client.call([("per_second", "p")], [("big", "b")])
    assert [s.code for s in response.statuses] == [OVER, OK]
    assert counter(persecond, "per_second", "p") == 2
    assert counter(store, "big", "b") == 1
    persecond.close()
    client.close()


# --- the counters alone: the Redis script and the memory backend apply the same rule -----------------------


def _hits() -> list[Hit]:
    return [Hit("small", 1, "fixed_window", ttl=60, limit=2), Hit("big", 1, "fixed_window", ttl=60, limit=100)]


def _run_both(redis_url: str, rounds: int, increment: Increment) -> tuple[list[list[Counted]], list[list[Counted]]]:
    async def run() -> tuple[list[list[Counted]], list[list[Counted]]]:
        client = PipelinedRedis(redis_url)
        try:
            in_redis, in_memory = RedisCounters(client), MemoryCounters()
            a = [await in_redis.apply(_hits(), increment) for _ in range(rounds)]
            b = [await in_memory.apply(_hits(), increment) for _ in range(rounds)]
            return a, b
        finally:
            client.close()

    return asyncio.run(run())


def test_memory_backend_stops_increments_by_the_same_rule_as_the_redis_script(redis_url: str) -> None:
    in_redis, in_memory = _run_both(redis_url, 4, Increment.ONLY_OVER)
    assert in_redis == in_memory == [[1, 1], [2, 2], [3, 2], [4, 2]]


def test_reading_only_returns_the_counts_and_creates_no_counter(redis_url: str, store: redis.Redis) -> None:
    store.set("small", 5)
    in_redis, in_memory = _run_both(redis_url, 1, Increment.NONE)
    assert in_redis == [[5, 0]] and in_memory == [[0, 0]]
    assert store.get("small") == b"5" and store.exists("big") == 0
