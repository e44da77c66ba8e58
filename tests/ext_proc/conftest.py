"""Fixtures for ext_proc: one processor per module against the session redis-server, seeded through
the same store functions operators and the test-bed launcher use.

Seeded world:
  models  llama-3-8b, llama-3-70b, mistral-7b, guarded (inspect_body); alias llama -> llama-3-8b
  tenants acme     standard tier, models 'llama-*,guarded', max body 4096 bytes, timeout 45 s, priority 2
          initech  free tier, models '*'; later suspended by a test of its own when needed
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ext_proc import store
from igw.procs import RedisServer
from tests.ext_proc.helpers import ExtProcClient
from tests.helpers import Service, ServiceFactory

MAX_BUFFER_BYTES = 1024


@dataclass
class World:
    redis_url: str
    acme_key: str
    initech_key: str


def seed(redis_url: str) -> World:
    client = store.connect(redis_url)
    client.flushall()
    for name in ("llama-3-8b", "llama-3-70b", "mistral-7b"):
        store.register_model(client, name)
    store.register_model(client, "guarded", inspect_body=True)
    store.set_alias(client, "llama", "llama-3-8b")
    store.create_tenant(client, "acme", department="research", tier="standard", models="llama-*,guarded",
                        max_body_bytes=4096, timeout_ms=45_000, priority=2)
    store.create_tenant(client, "initech", department="sales", tier="free", models="*")
    world = World(redis_url, store.issue_key(client, "acme").key, store.issue_key(client, "initech").key)
    client.close()
    return world


@pytest.fixture(scope="module")
def world(redis_server: RedisServer) -> World:
    return seed(redis_server.url)


@pytest.fixture(scope="module")
def processor(world: World, log_dir: Path) -> Iterator[Service]:
    factory = ServiceFactory(log_dir)
    try:
        yield factory.start_module("ext_proc", "--redis-url", world.redis_url,
                                   "--max-buffer-bytes", str(MAX_BUFFER_BYTES), "--cache-ttl", "30s")
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def client(processor: Service) -> Iterator[ExtProcClient]:
    c = ExtProcClient(processor.grpc_target)
    yield c
    c.close()
