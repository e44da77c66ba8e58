"""Adaptive limits: per-replica rate x ready replicas x tenant share, following replica changes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from igw.replicas import ReplicaState, write_commands
from ratelimit_svc.adaptive import effective_limit, share_totals
from ratelimit_svc.config import Adaptive, ConfigError, parse_config
from tests.helpers import ServiceFactory
from tests.ratelimit.rls_client import OK, RlsClient, descriptor

CONFIG = """
domain: igw
descriptors:
  - key: tenant
    value: acme
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 10, share: 2, min: 3}
  - key: tenant
    value: beta
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 10, share: 1, min: 3}
  - key: model
    rate_limit: {unit: second, requests_per_unit_per_replica: 10, min: 5, max: 35, share_key: per-model}
"""


def adaptive(per_replica: int = 10, share: float = 1.0, low: int = 0, high: int | None = None) -> Adaptive:
    return Adaptive(per_replica=per_replica, model=None, model_key="model", min=low, max=high, share=share,
                    share_key="")


def test_limit_is_per_replica_rate_times_ready_replicas() -> None:
    assert effective_limit(adaptive(), 4, 1.0) == 40


def test_tenant_gets_its_share_of_the_weights() -> None:
    assert effective_limit(adaptive(share=2), 3, 3.0) == 20
    assert effective_limit(adaptive(share=1), 3, 3.0) == 10


def test_no_fresh_replica_data_falls_back_to_min() -> None:
    assert effective_limit(adaptive(low=7), None, 1.0) == 7


def test_min_and_max_clamp() -> None:
    assert effective_limit(adaptive(low=5), 0, 1.0) == 5
    assert effective_limit(adaptive(high=25), 4, 1.0) == 25


def test_share_totals_group_by_domain_and_share_key() -> None:
    config = parse_config([("c.yaml", CONFIG)])
    assert share_totals(config) == {("igw", "", None): 3.0, ("igw", "per-model", None): 1.0}


def test_adaptive_fields_need_requests_per_unit_per_replica() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([("c.yaml", "domain: d\ndescriptors:\n  - key: m\n    rate_limit: {unit: second, share: 2}\n")])
    assert "'share' requires 'requests_per_unit_per_replica'" in str(info.value)
    assert str(info.value).startswith("c.yaml:4: d.m:")


def test_max_below_min_is_rejected() -> None:
    text = ("domain: d\ndescriptors:\n  - key: m\n"
            "    rate_limit: {unit: second, requests_per_unit_per_replica: 1, min: 5, max: 2}\n")
    with pytest.raises(ConfigError, match=r"'max' \(2\) is below 'min' \(5\)"):
        parse_config([("c.yaml", text)])


def publish(redis_url: str, model: str, ready: int, updated: float | None = None, ttl: int = 15) -> None:
    state = ReplicaState(model, ready, {"": ready}, tuple(f"{model}-{i}" for i in range(ready)),
                         time.time() if updated is None else updated, "test")
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for command in write_commands(state, ttl):
        pipe.execute_command(*command)
    pipe.execute()
    client.close()


def limit_now(client: RlsClient, tenant: str, model: str) -> int:
    # hits_addend 0: look at the limit without spending a hit
    response = client.call(descriptor([("tenant", tenant), ("model", model)], hits=0), domain="igw")
    return response.statuses[0].current_limit.requests_per_unit


def wait_for_limit(client: RlsClient, tenant: str, model: str, expected: int, within: float) -> float:
    started = time.monotonic()
    while True:
        if limit_now(client, tenant, model) == expected:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            pytest.fail(f"limit of {tenant} on {model} not {expected} within {within}s "
                        f"(now {limit_now(client, tenant, model)})")
        time.sleep(0.02)


@pytest.fixture
def adaptive_client(services: ServiceFactory, tmp_path: Path, redis_url: str) -> RlsClient:
    directory = tmp_path / "cfg"
    directory.mkdir()
    (directory / "igw.yaml").write_text(CONFIG)
    return RlsClient(services.ratelimit(directory, redis_url, "--replica-max-age", "3s").grpc_target, domain="igw")


def test_service_uses_min_before_any_replica_data(adaptive_client: RlsClient) -> None:
    assert limit_now(adaptive_client, "acme", "resnet") == 3


def test_service_limit_follows_replica_count_within_one_second(adaptive_client: RlsClient, redis_url: str) -> None:
    publish(redis_url, "resnet", 2)
    wait_for_limit(adaptive_client, "acme", "resnet", 13, 1.0)  # 10 x 2 x 2/3
    publish(redis_url, "resnet", 6)
    switch = wait_for_limit(adaptive_client, "acme", "resnet", 40, 1.0)  # 10 x 6 x 2/3
    assert switch < 1.0
    assert limit_now(adaptive_client, "beta", "resnet") == 20  # half acme's share


def test_stale_replica_data_falls_back_to_min(adaptive_client: RlsClient, redis_url: str) -> None:
    publish(redis_url, "bert", 4, updated=time.time() - 60)
    time.sleep(0.3)
    assert limit_now(adaptive_client, "acme", "bert") == 3


def test_expired_publisher_falls_back_to_min(adaptive_client: RlsClient, redis_url: str) -> None:
    publish(redis_url, "gpt", 4, ttl=1)
    wait_for_limit(adaptive_client, "acme", "gpt", 26, 1.0)
    wait_for_limit(adaptive_client, "acme", "gpt", 3, 3.0)


def test_admitted_requests_follow_the_effective_limit(adaptive_client: RlsClient, redis_url: str) -> None:
    publish(redis_url, "tiny", 1)
    wait_for_limit(adaptive_client, "beta", "tiny", 3, 1.0)  # 10 x 1 x 1/3 = 3 (and min 3)
    publish(redis_url, "tiny", 3)
    wait_for_limit(adaptive_client, "beta", "tiny", 10, 1.0)
    while time.time() % 1 > 0.5:
        time.sleep(0.01)
    codes = [adaptive_client.call([("tenant", "beta"), ("model", "tiny")], domain="igw").overall_code
             for _ in range(12)]
    assert codes.count(OK) == 10


def test_model_level_limit_uses_clamps(adaptive_client: RlsClient, redis_url: str) -> None:
    publish(redis_url, "big", 10)
    deadline = time.monotonic() + 1
    while adaptive_client.call([("model", "big")], domain="igw").statuses[0].current_limit.requests_per_unit != 35:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_share_may_be_fractional() -> None:
    text = ("domain: d\ndescriptors:\n  - key: m\n"
            "    rate_limit: {unit: second, requests_per_unit_per_replica: 1, share: 0.5}\n")
    limit = parse_config([("c.yaml", text)]).domains["d"].root.children["m"].limit
    assert limit is not None and limit.adaptive is not None and limit.adaptive.share == 0.5


def test_floats_stay_invalid_in_upstream_keys() -> None:
    text = "domain: d\ndescriptors:\n  - key: m\n    rate_limit: {unit: second, requests_per_unit: 1.5}\n"
    with pytest.raises(ConfigError, match="error checking config"):
        parse_config([("c.yaml", text)])
