"""Cached lookups: operator changes arrive through pub/sub within a second; a Redis outage keeps cached
callers working and fails uncached ones closed (503)."""

from __future__ import annotations

import time

from ext_proc import store
from igw.procs import RedisServer
from tests.ext_proc.conftest import World, seed
from tests.ext_proc.helpers import ExtProcClient, allowed_headers, denial, request_headers
from tests.helpers import ServiceFactory


def wait_for_status(client: ExtProcClient, key: str, status: int, deadline_seconds: float) -> float:
    started = time.monotonic()
    while True:
        answer = client.one(request_headers(key=key))
        current = answer.immediate_response.status.code if answer.HasField("immediate_response") else 200
        elapsed = time.monotonic() - started
        if current == status:
            return elapsed
        assert elapsed < deadline_seconds, f"still {current} after {elapsed:.2f}s"
        time.sleep(0.01)


def test_revoked_key_stops_working_within_one_second(client: ExtProcClient, world: World) -> None:
    c = store.connect(world.redis_url)
    issued = store.issue_key(c, "acme")
    allowed_headers(client.one(request_headers(key=issued.key)))  # now cached for 30 s
    store.revoke_key(c, key_id=issued.key_id)
    wait_for_status(client, issued.key, 401, 1.0)


def test_suspending_a_tenant_takes_effect_within_one_second(client: ExtProcClient, world: World) -> None:
    c = store.connect(world.redis_url)
    store.create_tenant(c, "umbrella", department="bio", tier="free", models="*")
    key = store.issue_key(c, "umbrella").key
    allowed_headers(client.one(request_headers(key=key)))
    store.suspend_tenant(c, "umbrella")
    wait_for_status(client, key, 403, 1.0)
    store.activate_tenant(c, "umbrella")
    wait_for_status(client, key, 200, 1.0)


def test_new_alias_is_seen_within_one_second(client: ExtProcClient, world: World) -> None:
    c = store.connect(world.redis_url)
    path = "/v2/models/big-llama/infer"
    assert denial(client.one(request_headers(path, key=world.acme_key))).status == 404  # cached as unknown
    store.set_alias(c, "big-llama", "llama-3-70b")
    deadline = time.monotonic() + 1.0
    while client.one(request_headers(path, key=world.acme_key)).HasField("immediate_response"):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_removed_model_answers_404_within_one_second(client: ExtProcClient, world: World) -> None:
    c = store.connect(world.redis_url)
    store.register_model(c, "llama-retired")
    path = "/v2/models/llama-retired/infer"
    allowed_headers(client.one(request_headers(path, key=world.acme_key)))  # cached, memoised
    store.remove_model(c, "llama-retired")
    deadline = time.monotonic() + 1.0
    while not client.one(request_headers(path, key=world.acme_key)).HasField("immediate_response"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert denial(client.one(request_headers(path, key=world.acme_key))).status == 404


def test_redis_outage_keeps_cached_keys_and_fails_uncached_ones_closed(
    own_redis: RedisServer, services: ServiceFactory
) -> None:
    outage_world = seed(own_redis.url)
    service = services.start_module("ext_proc", "--redis-url", own_redis.url, "--cache-ttl", "30s",
                                    "--redis-timeout", "200ms")
    client = ExtProcClient(service.grpc_target)
    try:
        assert allowed_headers(client.one(request_headers(key=outage_world.acme_key))).set["x-igw-tenant"] == "acme"
        own_redis.stop()

        cached = allowed_headers(client.one(request_headers(key=outage_world.acme_key)))
        assert cached.set["x-igw-model"] == "llama-3-8b"
        denied = denial(client.one(request_headers(key=outage_world.initech_key)))
        assert (denied.status, denied.code, denied.headers["retry-after"]) == (503, "unavailable", "1")
        assert "redis" not in denied.message.lower()
    finally:
        client.close()
