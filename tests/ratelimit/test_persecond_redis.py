"""REDIS_PERSECOND: counters of limits whose unit is second live on a Redis of their own, as upstream's
"two Redis instances" mode; everything else stays on the main Redis (or its shards, REDIS_SHARDS)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from igw.procs import RedisServer
from ratelimit_svc.counters import shard_of
from ratelimit_svc.lookup import counter_group
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.rls_client import OK, RlsClient, avoid_window_edges

# The GCRA bucket's key lives only as long as one emission interval (1 s at one request a second; at 100 it
# was 10 ms and could expire before the test listed the keys).
CONFIG = """
domain: test-domain
descriptors:
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 100}
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: bucket
    rate_limit: {unit: second, requests_per_unit: 1, algorithm: gcra}
"""


@pytest.fixture
def persecond(log_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(log_dir=log_dir).start()
    yield server
    server.stop()


def keys(url: str, **auth: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True, **auth)
    try:
        return sorted(client.scan_iter("test-domain_*"))
    finally:
        client.close()


def persecond_flags(server: RedisServer) -> tuple[str, ...]:
    return ("--redis-persecond", "true", "--redis-persecond-url", server.url)


def call_both(svc: Service) -> None:
    client = RlsClient(svc.grpc_target)
    avoid_window_edges()
    assert client.call([("per_second", "p")], [("minute", "m")], [("bucket", "b")]).overall_code == OK
    client.close()


def test_a_per_second_counter_lands_in_the_per_second_redis_and_a_minute_counter_in_the_main_one(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisServer
) -> None:
    svc = services.ratelimit(config_dir, redis_url, *persecond_flags(persecond))
    call_both(svc)
    second_keys, main_keys = keys(persecond.url), keys(redis_url)
    assert [k.rsplit("_", 1)[0] for k in second_keys] == ["test-domain_bucket_b", "test-domain_per_second_p"]
    assert [k.rsplit("_", 1)[0] for k in main_keys] == ["test-domain_minute_m"]


def test_without_the_setting_every_counter_stays_in_the_main_redis_even_with_the_url_set(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisServer
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-persecond-url", persecond.url)
    call_both(svc)
    assert len(keys(redis_url)) == 3 and keys(persecond.url) == []
    assert "REDIS_PERSECOND_URL is ignored" in svc.proc.log_path.read_text()


def test_upstream_environment_form_with_socket_type_and_auth(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisServer
) -> None:
    admin = redis.Redis.from_url(persecond.url)
    admin.config_set("requirepass", "s3cret:pw")
    admin.close()
    env = {"REDIS_PERSECOND": "true", "REDIS_PERSECOND_SOCKET_TYPE": "tcp",
           "REDIS_PERSECOND_URL": f"127.0.0.1:{persecond.port}", "REDIS_PERSECOND_AUTH": "default:s3cret:pw"}
    svc = services.ratelimit(config_dir, redis_url, env=env)
    call_both(svc)
    assert len(keys(persecond.url, password="s3cret:pw")) == 2
    assert "s3cret" not in svc.proc.log_path.read_text()


def test_with_shards_the_main_counters_are_spread_and_the_per_second_ones_stay_on_their_redis(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisServer, own_redis: RedisServer
) -> None:
    shards = [redis_url, own_redis.url]
    svc = services.ratelimit(config_dir, redis_url, "--redis-shards", ",".join(shards), *persecond_flags(persecond))
    client = RlsClient(svc.grpc_target)
    avoid_window_edges()
    for i in range(20):
        client.call([("per_second", f"p{i}")], [("minute", f"m{i}")])
    client.close()
    assert len(keys(persecond.url)) == 20
    assert all("per_second" in k for k in keys(persecond.url))
    for i in range(20):
        shard = shards[shard_of(counter_group("test-domain", f"test-domain_minute_m{i}_"), 2)]
        assert [k for k in keys(shard) if k.startswith(f"test-domain_minute_m{i}_")], i
    assert sum(len(keys(url)) for url in shards) == 20


def test_a_per_second_redis_that_does_not_answer_turns_health_503_naming_it(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisServer
) -> None:
    svc = services.ratelimit(config_dir, redis_url, *persecond_flags(persecond), "--redis-timeout", "200ms")
    assert "ratelimit_redis_persecond_up 1.0" in metrics(svc)
    persecond.kill()
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 10, "unhealthy")
    assert health(svc)[1] == f"redis unreachable: per-second {persecond.url}"
    assert "ratelimit_redis_persecond_up 0.0" in metrics(svc)
    assert "ratelimit_redis_up 1.0" in metrics(svc)
    client = RlsClient(svc.grpc_target)
    assert client.call([("minute", "m")]).overall_code == OK  # limits of other units still answer
    client.close()


def test_the_per_second_metric_is_absent_without_a_per_second_redis(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc = services.ratelimit(config_dir, redis_url)
    assert "ratelimit_redis_persecond_up" not in metrics(svc)


def test_the_setting_without_a_url_exits_with_a_clear_message(config_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30, env={**os.environ, "REDIS_PERSECOND": "true"})
    assert proc.returncode == 2
    assert "REDIS_PERSECOND=true (--redis-persecond) needs REDIS_PERSECOND_URL" in proc.stderr


def health(svc: Service) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=2) as resp:
            return resp.status, resp.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def metrics(svc: Service) -> str:
    return urllib.request.urlopen(f"{svc.http_base}/metrics", timeout=5).read().decode()
