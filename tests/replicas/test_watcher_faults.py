"""The watcher under API-server and Redis faults a demanding operator meets: outages longer than the TTL,
resumed watches, auth errors. Against the loopback Kubernetes API peer and a real redis-server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis

from igw.procs import RedisServer
from igw.replicas import replica_key
from tests.replicas.conftest import WatcherRunner, read_state, wait_for
from tests.replicas.k8s_fake import FakeKubeAPI
from tests.replicas.slices import endpoint, endpoint_slice, model_slice


def ready_is(client: redis.Redis, model: str, ready: int) -> bool:
    state = read_state(client, model)
    return state is not None and state.ready == ready


def test_counts_come_back_when_the_api_returns_after_an_outage_longer_than_the_ttl(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a", "b"])])
    watcher = watchers.start(kube_api.url, ttl=2, heartbeat=0.5)
    wait_for(lambda: ready_is(rclient, "llama", 2) and kube_api.active_watches == 1, what="sync")
    kube_api.fail_next(100_000, 503)  # the API server answers nothing but 503 for a while
    kube_api.drop_watches()
    wait_for(lambda: not rclient.exists(replica_key("llama")), timeout=8, what="counts expire during the outage")
    with kube_api.cond:
        kube_api.fail_queue.clear()  # back, with its history intact: the watch resumes without a relist
    wait_for(lambda: watcher.health()[0], timeout=5, what="watcher healthy again")
    wait_for(lambda: ready_is(rclient, "llama", 2), timeout=5, what="counts published again")


def test_not_ready_pods_of_a_service_publishing_not_ready_addresses_do_not_count(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis) -> None:
    # With publishNotReadyAddresses the controller sets ready=true for every pod; serving keeps the pod's
    # own readiness (k8s.io/api discovery/v1 EndpointConditions).
    eps = [endpoint("up", "10.0.0.1", ready=True, serving=True),
           endpoint("starting", "10.0.0.2", ready=True, serving=False)]
    kube_api.load([endpoint_slice("llama-x1", "llama", eps, model="llama")])
    watchers.start(kube_api.url)
    wait_for(lambda: read_state(rclient, "llama") is not None, what="sync")
    state = read_state(rclient, "llama")
    assert state is not None and (state.ready, state.replicas) == (1, ("models/up",))


def test_a_service_relabelled_to_another_model_moves_its_replicas(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a", "b"], service="svc"), model_slice("mistral", ["m"])])
    watchers.start(kube_api.url)
    wait_for(lambda: ready_is(rclient, "llama", 2) and kube_api.active_watches == 1, what="sync")
    kube_api.apply("MODIFIED", model_slice("mistral", ["a", "b"], service="svc"))
    wait_for(lambda: ready_is(rclient, "mistral", 3) and ready_is(rclient, "llama", 0), what="moved")
    moved = model_slice("mistral", ["a", "b"], service="svc")
    del moved["metadata"]["labels"]["igw.ai/model"]  # leaves the selector: the watch says DELETED
    kube_api.apply("MODIFIED", moved)
    wait_for(lambda: ready_is(rclient, "mistral", 1), what="unlabelled")


def test_a_watch_that_always_answers_410_does_not_relist_in_a_tight_loop(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"])])
    with kube_api.cond:
        kube_api.compacted_rv = 10**9  # every watch is "too old" (a lagging watch cache): ERROR 410 at once
    watchers.start(kube_api.url, backoff_initial=0.05, backoff_max=0.5)
    wait_for(lambda: ready_is(rclient, "llama", 1), what="sync")
    time.sleep(2.0)
    lists = kube_api.request_count(watch=False)
    assert lists <= 20, f"{lists} full lists in about 2 s"  # backed off, not one relist per round trip


def test_the_watch_connection_probes_a_silent_peer_with_tcp_keepalive_within_the_ttl(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis) -> None:
    """A dead API server node sends no FIN: without keepalive the watch would hang until the read timeout
    while the writer kept heartbeating counts nobody watches any more."""
    import socket

    from igw.replica_watcher import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, WatcherSettings

    kube_api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(kube_api.url)
    wait_for(lambda: kube_api.active_watches == 1 and watcher._resp is not None, what="a watch in progress")
    sock = watcher._resp.connection.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
    count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
    assert (idle, interval, count) == (KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    assert idle + interval * count < WatcherSettings().ttl
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # urllib3's default kept


def test_a_stop_while_a_watch_is_being_opened_ends_the_watcher_at_once(
    kube_api: FakeKubeAPI, redis_url: str
) -> None:
    runner = WatcherRunner(redis_url)
    kube_api.load([model_slice("llama", ["a"])])
    watcher = runner.start(kube_api.url)
    wait_for(lambda: kube_api.active_watches == 1, what="watch open")
    open_call = watcher._list_call

    def stopped_as_the_watch_opens(**kwargs: object) -> object:
        resp = open_call(**kwargs)
        if kwargs.get("watch"):
            watcher.stop()  # as a signal handler would, before the watcher knows the stream to shut
        return resp

    watcher._list_call = stopped_as_the_watch_opens  # type: ignore[method-assign]
    kube_api.drop_watches()  # the watcher opens its next watch through the wrapper
    thread = runner.running[0][1]
    thread.join(5)  # the read timeout is 10 s: a watcher blocked in the read would still be alive
    assert not thread.is_alive()


class PresenceMonitor:
    """Polls a model's key from another thread and remembers whether it was ever missing."""

    def __init__(self, redis_url: str, model: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.model = model
        self.missing = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.client.exists(replica_key(self.model)):
                self.missing += 1
            time.sleep(0.01)

    def __enter__(self) -> PresenceMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def test_quiet_watches_ended_by_the_server_timeout_keep_the_counts_published(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis, redis_url: str) -> None:
    """No event and no bookmark for a whole watch is normal (a quiet cluster; servers need not send
    bookmarks): each such watch must be reopened at once, not after a pause that grows past the TTL."""
    kube_api.load([model_slice("llama", ["a"])])  # the fake sends bookmarks only when told to
    watcher = watchers.start(kube_api.url, ttl=2, heartbeat=0.5, watch_timeout=1, backoff_initial=1.0,
                             backoff_max=20.0)
    wait_for(lambda: ready_is(rclient, "llama", 1) and kube_api.active_watches == 1, what="sync")
    with PresenceMonitor(redis_url, "llama") as monitor:
        wait_for(lambda: kube_api.request_count(watch=True) >= 7, timeout=60, what="six quiet watches ended")
    assert monitor.missing == 0, "the counts expired between quiet watches"
    assert watcher.health()[0]


def test_quiet_watches_ended_by_the_read_timeout_keep_the_counts_published(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis, redis_url: str) -> None:
    """A silent stream that reaches the client's read timeout is resumed at once, however often it happens."""
    kube_api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(kube_api.url, ttl=2, heartbeat=0.5, read_timeout=1.5, backoff_initial=1.0,
                             backoff_max=20.0)
    wait_for(lambda: ready_is(rclient, "llama", 1) and kube_api.active_watches == 1, what="sync")
    with PresenceMonitor(redis_url, "llama") as monitor:
        wait_for(lambda: kube_api.request_count(watch=True) >= 7, timeout=60, what="six silent watches timed out")
    assert monitor.missing == 0, "the counts expired between silent watches"
    assert watcher.health()[0]
    assert watcher.relists == 1  # resumed each time, never relisted


def test_changes_seen_while_redis_is_down_are_published_when_it_comes_back(
        kube_api: FakeKubeAPI, own_redis: RedisServer, log_dir: Path) -> None:
    """Redis restarts empty (no persistence): the change made meanwhile and the unchanged model both come back,
    from the watch alone (no relist)."""
    runner = WatcherRunner(own_redis.url)
    kube_api.load([model_slice("llama", ["a"]), model_slice("mistral", ["m"])])
    watcher = runner.start(kube_api.url, ttl=30, heartbeat=0.5)
    client = redis.Redis.from_url(own_redis.url)
    restarted: RedisServer | None = None
    try:
        wait_for(lambda: ready_is(client, "llama", 1) and ready_is(client, "mistral", 1), what="sync")
        own_redis.stop()
        kube_api.apply("MODIFIED", model_slice("llama", ["a", "b", "c"]))
        wait_for(lambda: watcher.events >= 1, what="the event seen while Redis is down")
        wait_for(lambda: watcher.write_failures > 0, what="a failed write")
        restarted = RedisServer(log_dir=log_dir, port=own_redis.port).start()
        wait_for(lambda: ready_is(client, "llama", 3), timeout=15, what="the change published after the outage")
        wait_for(lambda: ready_is(client, "mistral", 1), timeout=15, what="the unchanged model rewritten")
        assert watcher.relists == 1
    finally:
        client.close()
        runner.stop_all()
        if restarted is not None:
            restarted.stop()


def test_a_model_deleted_while_the_watch_history_was_lost_is_published_as_zero_after_the_relist(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"]), model_slice("mistral", ["m"])])
    watcher = watchers.start(kube_api.url, ttl=30, heartbeat=0.5)
    wait_for(lambda: ready_is(rclient, "llama", 1) and kube_api.active_watches == 1, what="sync")
    with kube_api.cond:  # deleted and compacted away before the watch could deliver the DELETED event
        kube_api.delete("models", "llama-x1")
        kube_api.expire_watches()
    wait_for(lambda: ready_is(rclient, "llama", 0), what="llama published as 0 after the relist")
    assert watcher.relists == 2
    assert ready_is(rclient, "mistral", 1)


def test_a_brief_api_outage_neither_wipes_nor_expires_the_counts(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis, redis_url: str) -> None:
    kube_api.load([model_slice("llama", ["a", "b"])])
    watcher = watchers.start(kube_api.url, ttl=2, heartbeat=0.5)
    wait_for(lambda: ready_is(rclient, "llama", 2) and kube_api.active_watches == 1, what="sync")
    with PresenceMonitor(redis_url, "llama") as monitor:
        kube_api.fail_next(3, 503)
        kube_api.drop_watches()
        wait_for(lambda: kube_api.request_count(watch=True) >= 5 and kube_api.active_watches == 1,
                 what="the watch back after three 503s")
        kube_api.apply("MODIFIED", model_slice("llama", ["a", "b", "c"]))
        wait_for(lambda: ready_is(rclient, "llama", 3), what="a change after the outage")
    assert monitor.missing == 0
    assert watcher.relists == 1  # resumed, history intact
