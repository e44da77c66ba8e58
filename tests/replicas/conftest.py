"""Fixtures for the replica tests: the loopback Kubernetes API peer and watchers run in threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from igw.replica_watcher import ReplicaWatcher, WatcherSettings, api_client, discovery_api
from igw.replicas import ReplicaState, decode_state, replica_key
from igw.replicas_publish import connect
from tests.replicas.k8s_fake import FakeKubeAPI


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def read_state(client: redis.Redis, model: str) -> ReplicaState | None:
    return decode_state(model, client.hgetall(replica_key(model)))


@pytest.fixture
def kube_api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class WatcherRunner:
    """Start ReplicaWatchers in threads against the fake API; all are stopped at teardown."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.running: list[tuple[ReplicaWatcher, threading.Thread, redis.Redis]] = []

    def start(self, api_url: str, *, source: dict[str, Any] | None = None, **overrides: Any) -> ReplicaWatcher:
        """`source`: api_client() arguments instead of the plain `api_url` (in-cluster, kubeconfig)."""
        options: dict[str, Any] = {"heartbeat": 0.5, "ttl": 2, "backoff_initial": 0.05, "backoff_max": 0.5,
                                   "read_timeout": 10.0, "publisher": f"test-watcher-{len(self.running)}"}
        options.update(overrides)
        client = connect(self.redis_url)  # with the timeouts `igw replicas watch` uses
        watcher = ReplicaWatcher(discovery_api(api_client(**(source or {"api_server": api_url}))), client,
                                 WatcherSettings(**options))
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        self.running.append((watcher, thread, client))
        return watcher

    def stop(self, watcher: ReplicaWatcher) -> None:
        for entry in list(self.running):
            if entry[0] is watcher:
                watcher.stop()
                entry[1].join(10)
                assert not entry[1].is_alive(), "watcher did not stop"
                entry[2].close()
                self.running.remove(entry)

    def stop_all(self) -> None:
        for watcher, _, _ in list(self.running):
            self.stop(watcher)


@pytest.fixture
def watchers(redis_url: str) -> Iterator[WatcherRunner]:
    runner = WatcherRunner(redis_url)
    yield runner
    runner.stop_all()
