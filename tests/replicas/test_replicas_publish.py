"""Publishing replica states: the launcher's helpers, against real Redis and real model servers."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from igw.procs import ManagedProcess, free_port, python_module
from igw.replicas import MODELS_SET, ReplicaState, replica_key
from igw.replicas_publish import ModelServer, ReadinessPublisher, prune_models, publish, send_states
from tests.replicas.conftest import read_state, wait_for


class ReadyServer:
    """A loopback HTTP server whose /ready answers 200 or 503 as the test decides."""

    def __init__(self) -> None:
        self.ready = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200 if outer.ready else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ready_servers() -> Iterator[list[ReadyServer]]:
    servers = [ReadyServer() for _ in range(3)]
    yield servers
    for server in servers:
        server.close()


def test_publish_writes_one_model_with_its_ready_ids(redis_url: str, rclient: redis.Redis) -> None:
    written = publish(redis_url, "llama", ["127.0.0.1:9002", "127.0.0.1:9001"], ttl=5, version="v1",
                      publisher="launcher")
    state = read_state(rclient, "llama")
    assert state == written
    assert state is not None and state.replicas == ("127.0.0.1:9001", "127.0.0.1:9002")
    assert state.versions == {"v1": 2}
    assert 4 <= rclient.ttl(replica_key("llama")) <= 5


def test_publish_notifies_readers_on_the_changed_channel(redis_url: str, rclient: redis.Redis) -> None:
    pubsub = rclient.pubsub()
    pubsub.subscribe("igw:replicas:changed")
    wait_for(lambda: pubsub.get_message(timeout=0.1), what="subscribe confirmation")
    publish(redis_url, "llama", ["a"])
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), what="change message")
    assert message["data"] == b"llama"
    pubsub.close()


def test_publish_replaces_the_whole_previous_state(redis_url: str, rclient: redis.Redis) -> None:
    publish(redis_url, "llama", ["a", "b", "c"], version="v1")
    publish(redis_url, "llama", ["d"], version="v2")
    state = read_state(rclient, "llama")
    assert state is not None and (state.ready, state.versions, state.replicas) == (1, {"v2": 1}, ("d",))


def test_send_states_batches_many_models_in_one_call(rclient: redis.Redis) -> None:
    states = [(ReplicaState(f"m{i}", i, {"": i} if i else {}, (), time.time(), "t"), i % 2 == 0)
              for i in range(600)]
    assert send_states(rclient, states, ttl=5, batch=250) == 600
    assert rclient.scard(MODELS_SET) == 600
    assert read_state(rclient, "m599") is not None


def test_prune_forgets_only_expired_models(rclient: redis.Redis) -> None:
    send_states(rclient, [(ReplicaState("alive", 1, {"": 1}, ("a",), time.time(), "t"), True)], ttl=30)
    rclient.sadd(MODELS_SET, "gone")
    assert prune_models(rclient) == ["gone"]
    assert rclient.smembers(MODELS_SET) == {b"alive"}


def test_readiness_publisher_counts_only_servers_that_answer_ready(
        redis_url: str, rclient: redis.Redis, ready_servers: list[ReadyServer]) -> None:
    a, b, c = ready_servers
    servers = [ModelServer("llama", s.address, f"http://{s.address}/ready") for s in (a, b)]
    servers.append(ModelServer("mistral", c.address, f"http://{c.address}/ready"))
    a.ready = True
    with ReadinessPublisher(redis_url, servers, interval=0.1, ttl=2, publisher="launcher"):
        wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.replicas == (a.address,),
                 what="one ready llama replica")
        mistral = read_state(rclient, "mistral")
        assert mistral is not None and mistral.ready == 0  # listed but not ready yet
        b.ready = True
        wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.ready == 2, what="second ready")
        a.ready = False
        wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.replicas == (b.address,),
                 what="first unready")


def test_readiness_publisher_withdraws_its_models_on_stop(
        redis_url: str, rclient: redis.Redis, ready_servers: list[ReadyServer]) -> None:
    server = ready_servers[0]
    server.ready = True
    publisher = ReadinessPublisher(redis_url, [ModelServer("llama", server.address,
                                                           f"http://{server.address}/ready")],
                                   interval=0.1, ttl=2).start()
    wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.ready == 1, what="published")
    publisher.stop()
    state = read_state(rclient, "llama")
    assert state is not None and state.ready == 0


def test_readiness_publisher_counts_expire_when_it_dies(
        redis_url: str, rclient: redis.Redis, ready_servers: list[ReadyServer]) -> None:
    server = ready_servers[0]
    server.ready = True
    publisher = ReadinessPublisher(redis_url, [ModelServer("llama", server.address,
                                                           f"http://{server.address}/ready")],
                                   interval=0.1, ttl=1).start()
    wait_for(lambda: read_state(rclient, "llama") is not None, what="published")
    publisher.stop(withdraw=False)  # as if the launcher were killed: no goodbye
    wait_for(lambda: not rclient.exists(replica_key("llama")), timeout=3, what="expiry")


def test_readiness_publisher_rejects_a_ttl_shorter_than_two_intervals(redis_url: str) -> None:
    with pytest.raises(ValueError, match="ttl"):
        ReadinessPublisher(redis_url, [], interval=1.0, ttl=1)


def test_readiness_publisher_follows_real_demo_model_servers(redis_url: str, rclient: redis.Redis,
                                                             log_dir: Path) -> None:
    ports = [free_port(), free_port()]
    procs = [ManagedProcess(f"model-llama-{p}", python_module("igw.model_server", "--model", "llama",
                                                              "--port", str(p), "--load-delay", "0.3"),
                            log_dir=log_dir).start() for p in ports]
    servers = [ModelServer("llama", f"127.0.0.1:{p}", f"http://127.0.0.1:{p}/v2/health/ready") for p in ports]
    try:
        with ReadinessPublisher(redis_url, servers, interval=0.1, ttl=2):
            wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.ready == 2, timeout=15,
                     what="both replicas loaded")
            procs[0].signal(signal.SIGUSR1)  # the replica reports unready without stopping
            wait_for(lambda: (s := read_state(rclient, "llama")) is not None
                     and s.replicas == (f"127.0.0.1:{ports[1]}",), what="one replica out")
    finally:
        for proc in procs:
            proc.stop()
