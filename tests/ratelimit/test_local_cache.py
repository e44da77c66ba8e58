"""The local over-limit cache (LOCAL_CACHE_SIZE_IN_BYTES) in the real service, with a real redis-server:
what it answers, what it leaves uncounted in Redis, and when Redis is asked again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.type.v3 import ratelimit_unit_pb2

from igw.procs import RedisServer
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor
from tests.ratelimit.test_adaptive import publish

CONFIG = """
domain: test-domain
descriptors:
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: bucket
    rate_limit: {unit: minute, requests_per_unit: 1, algorithm: gcra}
"""

ADAPTIVE = """
domain: igw
descriptors:
  - key: model
    rate_limit: {unit: minute, requests_per_unit_per_replica: 2, min: 1}
"""

CACHE = ("--local-cache-size-in-bytes", "1000000")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "test.yaml").write_text(CONFIG)
    (directory / "igw.yaml").write_text(ADAPTIVE)
    return directory


@pytest.fixture
def service(services: ServiceFactory, config_dir: Path, redis_url: str) -> Service:
    return services.ratelimit(config_dir, redis_url, *CACHE)


@pytest.fixture
def client(service: Service) -> Iterator[RlsClient]:
    c = RlsClient(service.grpc_target)
    yield c
    c.close()


def counter(r: redis.Redis, key: str, value: str, domain: str = "test-domain") -> int:
    """The fixed-window counter of one descriptor in Redis (the only window the test touched)."""
    keys = r.keys(f"{domain}_{key}_{value}_*")
    assert len(keys) <= 1, keys
    return int(r.get(keys[0])) if keys else 0


def counter_calls(r: redis.Redis) -> int:
    """EVALSHA calls Redis has run: one per counting round trip of the service."""
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def metric(service: Service, name: str, key: str, domain: str = "test-domain") -> float:
    text = urllib.request.urlopen(f"{service.http_base}/metrics", timeout=5).read().decode()
    prefix = f'{name}_total{{domain="{domain}",key="{key}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def codes(client: RlsClient, entries: list[tuple[str, str]], n: int) -> list[int]:
    return [client.call(entries).overall_code for _ in range(n)]


def test_over_limit_key_is_answered_from_the_cache_without_counting_in_redis(
    client: RlsClient, store: redis.Redis
) -> None:
    avoid_window_edges(minute_margin_s=3)
    assert codes(client, [("minute", "a")], 3) == [OK, OK, OVER]  # the third is Redis's answer: 3 > 2
    calls = counter_calls(store)
    assert codes(client, [("minute", "a")], 4) == [OVER] * 4
    assert counter(store, "minute", "a") == 3
    assert counter_calls(store) == calls


def test_cached_answer_carries_the_limit_nothing_remaining_and_the_time_until_the_window_ends(
    client: RlsClient,
) -> None:
    avoid_window_edges(minute_margin_s=3)
    codes(client, [("minute", "s")], 3)
    status = client.call([("minute", "s")]).statuses[0]
    assert status.code == OVER
    assert status.current_limit.requests_per_unit == 2
    assert status.current_limit.unit == ratelimit_unit_pb2.MINUTE
    assert status.limit_remaining == 0
    assert 0 < status.duration_until_reset.seconds <= 60 - time.time() % 60 + 1


def test_cached_hits_count_as_over_limit_and_over_limit_with_local_cache(client: RlsClient, service: Service) -> None:
    avoid_window_edges(minute_margin_s=3)
    codes(client, [("minute", "m")], 6)
    assert metric(service, "ratelimit_over_limit_with_local_cache", "minute") == 3
    assert metric(service, "ratelimit_over_limit", "minute") == 4  # 1 from Redis + 3 from the cache
    assert metric(service, "ratelimit_total_hits", "minute") == 6
    assert metric(service, "ratelimit_within_limit", "minute") == 2


def test_other_descriptors_of_a_request_with_a_cached_key_are_still_counted(
    client: RlsClient, store: redis.Redis
) -> None:
    avoid_window_edges(minute_margin_s=3)
    codes(client, [("minute", "hot")], 3)
    response = client.call([("minute", "hot")], [("minute", "cold")])
    assert response.overall_code == OVER
    assert [s.code for s in response.statuses] == [OVER, OK]
    assert counter(store, "minute", "hot") == 3
    assert counter(store, "minute", "cold") == 1


def test_cached_key_is_asked_again_after_its_window_ends(client: RlsClient, store: redis.Redis) -> None:
    while time.time() % 1 > 0.3:  # a burst early in a second stays in one 1 s window
        time.sleep(0.02)
    assert codes(client, [("per_second", "x")], 3) == [OK, OVER, OVER]
    time.sleep(1.05 - time.time() % 1)
    calls = counter_calls(store)
    assert client.call([("per_second", "x")]).overall_code == OK
    assert counter_calls(store) == calls + 1


def test_cached_key_answers_over_limit_while_redis_is_down_and_an_uncached_one_fails(
    services: ServiceFactory, config_dir: Path, own_redis: RedisServer
) -> None:
    svc = services.ratelimit(config_dir, own_redis.url, "--redis-timeout", "200ms", *CACHE)
    c = RlsClient(svc.grpc_target)
    try:
        avoid_window_edges(minute_margin_s=3)
        codes(c, [("minute", "a")], 3)
        own_redis.kill()
        assert c.call([("minute", "a")]).overall_code == OVER
        with pytest.raises(grpc.RpcError) as info:
            c.call([("minute", "b")])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        c.close()


def test_cached_key_is_answered_at_once_while_redis_is_frozen(
    services: ServiceFactory, config_dir: Path, own_redis: RedisServer
) -> None:
    svc = services.ratelimit(config_dir, own_redis.url, "--redis-timeout", "500ms", *CACHE)
    c = RlsClient(svc.grpc_target)
    try:
        avoid_window_edges(minute_margin_s=3)
        codes(c, [("minute", "a")], 3)
        os.kill(own_redis.pid, signal.SIGSTOP)  # the fixture sends SIGCONT on the way out
        started = time.monotonic()
        assert c.call([("minute", "a")]).overall_code == OVER
        assert time.monotonic() - started < 0.4  # well under the Redis deadline: Redis was not waited for
        with pytest.raises(grpc.RpcError) as info:
            c.call([("minute", "b")])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        c.close()


def test_shadow_mode_key_is_cached_and_still_answered_ok(
    client: RlsClient, service: Service, store: redis.Redis
) -> None:
    avoid_window_edges(minute_margin_s=3)
    responses = [client.call([("shadow", "s")]) for _ in range(4)]
    assert [r.overall_code for r in responses] == [OK] * 4
    assert [r.statuses[0].code for r in responses] == [OK] * 4
    assert counter(store, "shadow", "s") == 2  # the 2nd went over and was cached: the 3rd and 4th skip Redis
    assert metric(service, "ratelimit_over_limit_with_local_cache", "shadow") == 2
    assert metric(service, "ratelimit_shadow_mode", "shadow") == 3
    assert metric(service, "ratelimit_over_limit", "shadow") == 3


def test_cache_off_counts_every_over_limit_hit_in_redis(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    svc = services.ratelimit(config_dir, redis_url)
    c = RlsClient(svc.grpc_target)
    try:
        avoid_window_edges(minute_margin_s=3)
        assert codes(c, [("minute", "a")], 5) == [OK, OK, OVER, OVER, OVER]
        assert counter(store, "minute", "a") == 5
        assert metric(svc, "ratelimit_over_limit_with_local_cache", "minute") == 0
    finally:
        c.close()


def test_upstream_environment_variable_turns_the_cache_on(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    svc = services.ratelimit(config_dir, redis_url, env={"LOCAL_CACHE_SIZE_IN_BYTES": "1000000"})
    c = RlsClient(svc.grpc_target)
    try:
        avoid_window_edges(minute_margin_s=3)
        assert codes(c, [("minute", "a")], 5) == [OK, OK, OVER, OVER, OVER]
        assert counter(store, "minute", "a") == 3
    finally:
        c.close()


def test_adaptive_limit_that_rose_is_not_denied_by_an_entry_of_the_lower_limit(
    client: RlsClient, redis_url: str, store: redis.Redis
) -> None:
    avoid_window_edges(minute_margin_s=8)
    model = [("model", "m")]

    def limit_now() -> int:
        return client.call(descriptor(model, hits=0), domain="igw").statuses[0].current_limit.requests_per_unit

    def wait_for_limit(expected: int) -> None:
        deadline = time.monotonic() + 3
        while limit_now() != expected:
            assert time.monotonic() < deadline, f"limit not {expected} within 3 s"
            time.sleep(0.02)

    publish(redis_url, "m", 1)
    wait_for_limit(2)
    assert [client.call(model, domain="igw").overall_code for _ in range(3)] == [OK, OK, OVER]
    assert client.call(model, domain="igw").overall_code == OVER  # from the cache: the counter stays at 3
    assert counter(store, "model", "m", domain="igw") == 3
    publish(redis_url, "m", 3)  # 2 per replica x 3 = 6 > 3
    wait_for_limit(6)
    assert client.call(model, domain="igw").overall_code == OK
    assert counter(store, "model", "m", domain="igw") == 4


def test_request_override_with_a_higher_limit_is_not_denied_by_an_entry_of_a_lower_one(client: RlsClient) -> None:
    def override(requests: int) -> ratelimit_pb2.RateLimitDescriptor:
        d = descriptor([("anything", "v")])  # override counters are keyed by the entries, not by the limit
        d.limit.CopyFrom(ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(
            requests_per_unit=requests, unit=ratelimit_unit_pb2.MINUTE))
        return d

    avoid_window_edges(minute_margin_s=3)
    assert [client.call(override(1)).overall_code for _ in range(3)] == [OK, OVER, OVER]
    assert client.call(override(10)).overall_code == OK


def test_gcra_limits_are_not_cached(services: ServiceFactory, config_dir: Path, own_redis: RedisServer) -> None:
    svc = services.ratelimit(config_dir, own_redis.url, "--redis-timeout", "200ms", *CACHE)
    c = RlsClient(svc.grpc_target)
    try:
        assert codes(c, [("bucket", "g")], 2) == [OK, OVER]
        own_redis.kill()
        with pytest.raises(grpc.RpcError) as info:
            c.call([("bucket", "g")])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        c.close()


def test_negative_cache_size_exits_with_clear_message(config_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "LOCAL_CACHE_SIZE_IN_BYTES": "-1"})
    assert proc.returncode == 2
    assert "LOCAL_CACHE_SIZE_IN_BYTES" in proc.stderr and "must not be negative" in proc.stderr
