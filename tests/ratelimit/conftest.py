"""Fixtures shared by the rate-limit tests: the module's CONFIG as a config directory, and a Redis client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


@pytest.fixture
def config_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A directory holding the test module's CONFIG as test.yaml (a module may define its own instead)."""
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "test.yaml").write_text(request.module.CONFIG)
    return directory


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
