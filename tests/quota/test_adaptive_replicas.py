"""Adaptive budgets as the quota push reads them: tenant shares of one model, and replica data in Redis
that is missing, malformed or of the wrong type (real redis-server)."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from igw.replicas import MODELS_SET, replica_key
from igw.replicas_publish import publish
from ratelimit_svc.adaptive import AdaptiveLimits
from ratelimit_svc.config import parse_config
from ratelimit_svc.lookup import find_limit

MIXED_SHARES = """
domain: igw
descriptors:
  - key: tenant
    value: acme
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 10}
  - key: tenant
    value: beta
    descriptors:
      - key: model
        value: llama
        rate_limit: {unit: second, requests_per_unit_per_replica: 10, model: llama}
"""


async def refreshed(redis_url: str, models: list[str] | None = None) -> AdaptiveLimits:
    limits = AdaptiveLimits(redis_url)
    limits._client = aioredis.from_url(redis_url)
    try:
        await limits.refresh(models)
    finally:
        await limits.close()
    return limits


def limit_of(limits: AdaptiveLimits, config_text: str, tenant: str, model: str) -> int:
    config = parse_config([("c.yaml", config_text)])
    match = find_limit(config, "igw", (("tenant", tenant), ("model", model)))
    assert match is not None
    return limits.effective_limit("igw", match, time.time(), config)


def test_tenants_on_one_model_never_exceed_its_limit_when_one_names_the_model(redis_url: str) -> None:
    publish(redis_url, "llama", ["a", "b", "c", "d"], ttl=60)  # 4 ready: the model's limit is 40/s
    limits = asyncio.run(refreshed(redis_url))
    acme = limit_of(limits, MIXED_SHARES, "acme", "llama")
    beta = limit_of(limits, MIXED_SHARES, "beta", "llama")
    assert acme + beta <= 40
    assert (acme, beta) == (20, 20)


def test_a_malformed_replica_hash_does_not_stop_the_refresh_of_other_models(redis_url: str) -> None:
    publish(redis_url, "llama", ["a", "b"], ttl=60)
    client = redis.Redis.from_url(redis_url)
    client.hset(replica_key("broken"), mapping={"ready": "3", "versions": "null", "updated": "1"})
    client.sadd(MODELS_SET, "broken")
    client.close()
    limits = asyncio.run(refreshed(redis_url))
    assert limits.states["llama"].ready == 2
    assert "broken" not in limits.states


def test_a_replica_key_of_the_wrong_type_does_not_stop_the_refresh_of_other_models(redis_url: str) -> None:
    publish(redis_url, "llama", ["a", "b"], ttl=60)
    client = redis.Redis.from_url(redis_url)
    client.set(replica_key("stray"), "3")  # someone wrote a plain string where a hash belongs
    client.sadd(MODELS_SET, "stray")
    client.close()
    limits = asyncio.run(refreshed(redis_url))
    assert limits.states["llama"].ready == 2
    assert "stray" not in limits.states


def test_replica_data_with_an_impossible_count_or_time_counts_as_absent(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    for model, fields in {"negative": {"ready": "-4", "updated": "1"},
                          "forever": {"ready": "4", "updated": "inf"},
                          "nan": {"ready": "4", "updated": "nan"}}.items():
        client.hset(replica_key(model), mapping=fields)
        client.sadd(MODELS_SET, model)
    client.close()
    limits = asyncio.run(refreshed(redis_url))
    assert limits.states == {}
