"""--redis-shards: counters spread over several redis-servers, each counter on exactly one of them, the
same one in every process, so limits hold exactly as with one Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from igw.procs import RedisServer
from ratelimit_svc.counters import shard_of
from ratelimit_svc.lookup import counter_group
from tests.helpers import ServiceFactory
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges

CONFIG = """
domain: test-domain
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 5}
    descriptors:
      - key: model
        rate_limit: {unit: minute, requests_per_unit: 1000}
  - key: model
    rate_limit: {unit: minute, requests_per_unit: 1000}
  - key: team
    value: "team-*"
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 3}
"""


@pytest.fixture
def shards(log_dir: Path) -> Iterator[list[RedisServer]]:
    servers = [RedisServer(log_dir=log_dir).start() for _ in range(2)]
    yield servers
    for server in servers:
        os.kill(server.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "test.yaml").write_text(CONFIG)
    return tmp_path


def shard_flag(servers: list[RedisServer]) -> str:
    return ",".join(s.url for s in servers)


def counter_keys(url: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return list(client.scan_iter("test-domain_*"))
    finally:
        client.close()


def test_counters_spread_over_the_shards_with_a_tenant_and_its_nested_descriptors_together(
    services: ServiceFactory, config_dir: Path, redis_url: str, shards: list[RedisServer]
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-shards", shard_flag(shards))
    client = RlsClient(svc.grpc_target)
    for i in range(40):
        client.call([("tenant", f"t{i}")], [("tenant", f"t{i}"), ("model", f"m{i}")], [("model", f"m{i}")])
    client.close()
    placed = [counter_keys(server.url) for server in shards]
    assert all(len(keys) > 10 for keys in placed), [len(k) for k in placed]
    for i in range(40):
        home = [n for n, keys in enumerate(placed) if any(k.startswith(f"test-domain_tenant_t{i}_") for k in keys)]
        assert len(home) == 1, f"tenant t{i}'s counters are on shards {home}"
        assert sum(k.startswith(f"test-domain_tenant_t{i}_model_m{i}_") for k in placed[home[0]]) == 1
    assert not counter_keys(redis_url)  # nothing on the --redis-url server


def test_limits_hold_exactly_across_workers_sharing_the_shards(
    services: ServiceFactory, config_dir: Path, redis_url: str, shards: list[RedisServer]
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-shards", shard_flag(shards), "--workers", "2")
    avoid_window_edges()
    codes = []
    for _ in range(7):  # a new connection each time: the calls spread over both workers
        client = RlsClient(svc.grpc_target)
        codes.append(client.call([("tenant", "acme")], [("model", "llama")]).overall_code)
        client.close()
    assert codes == [OK] * 5 + [OVER] * 2


def test_a_shared_threshold_wildcard_keeps_one_counter_whatever_the_value(
    services: ServiceFactory, config_dir: Path, redis_url: str, shards: list[RedisServer]
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-shards", shard_flag(shards))
    client = RlsClient(svc.grpc_target)
    avoid_window_edges()
    codes = [client.call([("team", f"team-{name}")]).overall_code for name in "abcdef"]
    client.close()
    assert codes == [OK] * 3 + [OVER] * 3


def test_a_shard_that_stops_answering_fails_calls_and_health_naming_it(
    services: ServiceFactory, config_dir: Path, redis_url: str, shards: list[RedisServer]
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-shards", shard_flag(shards), "--redis-timeout", "0.2")
    os.kill(shards[1].pid, signal.SIGSTOP)
    client = RlsClient(svc.grpc_target)
    failures = 0
    for i in range(20):  # some tenants live on the frozen shard
        try:
            client.call([("tenant", f"t{i}")])
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            failures += 1
    client.close()
    assert 0 < failures < 20
    deadline = time.monotonic() + 5
    while True:
        try:
            urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=2)
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            assert f"redis unreachable: {shards[1].url}" in exc.read().decode()
            break
        assert time.monotonic() < deadline, "health stayed OK with a shard down"
        time.sleep(0.2)


def values_on(shard: int, key: str, shards: int = 2) -> str:
    """A descriptor value whose counters live on `shard`."""
    return next(v for v in (f"{key}{i}" for i in range(1000)) if shard_of(f"test-domain_{key}_{v}", shards) == shard)


def test_with_fail_open_the_shards_that_answer_still_enforce_their_limits(
    services: ServiceFactory, config_dir: Path, redis_url: str, shards: list[RedisServer]
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-shards", shard_flag(shards), "--redis-timeout", "0.2",
                             "--fail-open", "true")
    tenant, model = values_on(0, "tenant"), values_on(1, "model")
    os.kill(shards[1].pid, signal.SIGSTOP)  # the model's shard stops answering
    client = RlsClient(svc.grpc_target)
    # Every call waits out the frozen shard's 0.2 s timeout: the seven take 1.4 s or more, all in one minute.
    avoid_window_edges(minute_margin_s=4)
    codes = [client.call([("tenant", tenant)], [("model", model)]).overall_code for _ in range(7)]
    client.close()
    assert codes == [OK] * 5 + [OVER] * 2  # the tenant's 5/minute still holds on the shard that answers


@pytest.mark.parametrize(("value", "problem"), [
    ("redis://127.0.0.1:1/0,redis://127.0.0.1:1/0", "redis shard listed more than once: redis://127.0.0.1:1/0"),
    ("redis://127.0.0.1:1/0,http://x", "scheme must be redis:// or unix://"),
    (" , ", "give at least one redis URL"),
])
def test_a_bad_shard_list_exits_2_naming_the_problem(config_dir: Path, value: str, problem: str) -> None:
    result = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir),
                             "--redis-shards", value], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and problem in result.stderr, result.stderr


def test_the_shard_group_is_a_function_of_the_counter_key_alone() -> None:
    # [(a, b), (c, d)] and [(a, "b_c_d")] spell the same counter key (upstream's format): one shard for both.
    assert counter_group("d", "d_a_b_c_d_") == "d_a_b"
    assert counter_group("my_domain", "my_domain_tenant_acme_model_llama_") == "my_domain_tenant_acme"
    assert counter_group("my_domain", "my_domain_tenant_acme_") == "my_domain_tenant_acme"
    assert counter_group("d", "d_team_team-*_") == "d_team_team-*"  # a shared-threshold wildcard's one counter
