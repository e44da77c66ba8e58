"""Fixtures that start real servers (redis-server, our services, Envoy) on free loopback ports and stop
them afterwards. Nothing here fakes Redis or Envoy."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from igw.procs import RedisServer
from tests.helpers import ServiceFactory

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(log_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(log_dir=log_dir).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(log_dir: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, for tests that kill, freeze (SIGSTOP) or restart it."""
    server = RedisServer(log_dir=log_dir).start()
    yield server
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the shared session server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def services(log_dir: Path) -> Iterator[ServiceFactory]:
    factory = ServiceFactory(log_dir)
    yield factory
    factory.stop_all()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing: expected {SHARED} beside the repository")
    return SHARED
