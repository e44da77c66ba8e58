"""The watcher against a real HTTP server speaking the Kubernetes list/watch protocol, and a real Redis."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import redis

from igw.replicas import MODELS_SET, replica_key
from tests.replicas.conftest import WatcherRunner, read_state, wait_for
from tests.replicas.k8s_fake import FakeKubeAPI
from tests.replicas.slices import model_slice

DATA = Path(__file__).parent / "data"


def ready_is(client: redis.Redis, model: str, ready: int) -> bool:
    state = read_state(client, model)
    return state is not None and state.ready == ready


def test_watcher_initial_list_publishes_every_model(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                    rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["l1", "l2"]), model_slice("mistral", ["m1"], ready=[False])])
    watcher = watchers.start(kube_api.url)
    wait_for(lambda: ready_is(rclient, "llama", 2) and ready_is(rclient, "mistral", 0), what="initial sync")
    state = read_state(rclient, "llama")
    assert state is not None
    assert state.replicas == ("models/l1", "models/l2")
    assert state.publisher == "test-watcher-0"
    assert {m.decode() for m in rclient.smembers(MODELS_SET)} == {"llama", "mistral"}
    assert watcher.health()[0]


def test_watcher_lists_with_the_label_selector_and_pagination(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                             rclient: redis.Redis) -> None:
    kube_api.load([model_slice(f"m{i}", [f"p{i}"], suffix=str(i)) for i in range(7)])
    watchers.start(kube_api.url, page_size=3)
    wait_for(lambda: all(ready_is(rclient, f"m{i}", 1) for i in range(7)), what="7 models")
    lists = [q for path, q in kube_api.requests if q.get("watch") is None]
    assert len(lists) == 3
    assert all(q["labelSelector"] == "igw.ai/model" and q["limit"] == "3" for q in lists)
    assert "continue" in lists[1]


def test_watcher_namespace_restricts_what_is_counted(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                     rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"], namespace="team-a", suffix="a"),
                   model_slice("llama", ["b"], namespace="team-b", suffix="b")])
    watchers.start(kube_api.url, namespace="team-a")
    wait_for(lambda: ready_is(rclient, "llama", 1), what="team-a only")
    assert all(path == "/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices"
               for path, _ in kube_api.requests)


def test_watcher_follows_a_recorded_rollout_event_by_event(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                           rclient: redis.Redis) -> None:
    expected = [  # llama's (ready, versions) after each recorded event
        (2, {"v1": 2}), (2, {"v1": 2}), (2, {"v1": 2}), (2, {"v1": 2}), (3, {"v1": 2, "v2": 1}),
        (2, {"v1": 1, "v2": 1}), (2, {"v1": 1, "v2": 1}), (3, {"v1": 1, "v2": 2}), (2, {"v2": 2}),
        (2, {"v2": 2}),
    ]
    watcher = watchers.start(kube_api.url)
    wait_for(watcher.synced.is_set, what="first list")
    wait_for(lambda: kube_api.active_watches == 1, what="watch open")
    events = [json.loads(line) for line in (DATA / "rollout_events.jsonl").read_text().splitlines()]
    for event, (ready, versions) in zip(events, expected, strict=True):
        kube_api.apply(event["type"], event["object"])
        wait_for(lambda r=ready, v=versions: (s := read_state(rclient, "llama")) is not None
                 and (s.ready, s.versions) == (r, v), what=f"{event['type']} → ready {ready} {versions}")
    assert ready_is(rclient, "mistral", 1)
    assert read_state(rclient, "kubernetes") is None  # not selected: no model label


def test_watcher_writes_only_models_whose_count_changed(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                        rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"]), model_slice("mistral", ["b"])])
    watcher = watchers.start(kube_api.url, heartbeat=30, ttl=60)
    wait_for(lambda: ready_is(rclient, "llama", 1) and ready_is(rclient, "mistral", 1), what="sync")
    before = read_state(rclient, "mistral")
    relabelled = model_slice("mistral", ["b"])
    relabelled["metadata"]["annotations"]["note"] = "only an annotation changed"
    kube_api.apply("MODIFIED", relabelled)
    kube_api.apply("MODIFIED", model_slice("llama", ["a", "c"]))
    wait_for(lambda: ready_is(rclient, "llama", 2), what="llama change")
    wait_for(lambda: watcher.events >= 2, what="both events seen")
    assert read_state(rclient, "mistral") == before


def test_watcher_deleted_model_is_published_as_zero_then_expires(kube_api: FakeKubeAPI,
                                                                 watchers: WatcherRunner,
                                                                 rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"]), model_slice("mistral", ["b"])])
    watchers.start(kube_api.url)
    wait_for(lambda: ready_is(rclient, "llama", 1), what="sync")
    kube_api.delete("models", "llama-x1")
    wait_for(lambda: ready_is(rclient, "llama", 0), what="ready 0 after deletion")
    wait_for(lambda: not rclient.exists(replica_key("llama")), timeout=6, what="llama expiry")
    wait_for(lambda: b"llama" not in rclient.smembers(MODELS_SET), timeout=3, what="pruned from the set")
    assert ready_is(rclient, "mistral", 1)  # still heartbeated


def test_watcher_relists_after_a_410_error_event(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                 rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(kube_api.url)
    wait_for(lambda: ready_is(rclient, "llama", 1) and kube_api.active_watches == 1, what="sync")
    kube_api.expire_watches()  # ERROR 410 on the open stream; history is gone
    kube_api.apply("MODIFIED", model_slice("llama", ["a", "b", "c"]))
    wait_for(lambda: ready_is(rclient, "llama", 3), what="state after relist")
    assert watcher.relists == 2


def test_watcher_relists_after_an_http_410_on_resume(watchers: WatcherRunner, rclient: redis.Redis) -> None:
    with FakeKubeAPI(watch_410_as_http=True) as api:
        api.load([model_slice("llama", ["a"])])
        watcher = watchers.start(api.url)
        wait_for(lambda: ready_is(rclient, "llama", 1) and api.active_watches == 1, what="sync")
        api.compact()
        api.apply("ADDED", model_slice("mistral", ["m"]))
        api.compact()  # the resume point is now too old
        api.drop_watches()
        wait_for(lambda: ready_is(rclient, "mistral", 1), what="mistral after relist")
        assert watcher.relists == 2
        watchers.stop(watcher)


def test_watcher_resumes_a_dropped_connection_from_the_last_resource_version(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(kube_api.url)
    wait_for(lambda: kube_api.active_watches == 1, what="watch open")
    last_rv = str(kube_api.apply("MODIFIED", model_slice("llama", ["a", "b"])))
    wait_for(lambda: ready_is(rclient, "llama", 2), what="first change")
    kube_api.drop_watches(mid_line=True)  # half an event line, then the connection closes
    wait_for(lambda: kube_api.request_count(watch=True) == 2, what="resumed watch")
    kube_api.apply("MODIFIED", model_slice("llama", ["a", "b", "c"]))
    wait_for(lambda: ready_is(rclient, "llama", 3), what="change after resume")
    watches = [q for _, q in kube_api.requests if q.get("watch")]
    assert watches[1]["resourceVersion"] == last_rv
    assert watches[1]["allowWatchBookmarks"] == "true"
    assert watcher.relists == 1


def test_watcher_resumes_from_a_bookmark_resource_version(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                          rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(kube_api.url)
    wait_for(lambda: kube_api.active_watches == 1, what="watch open")
    kube_api.load([model_slice("other", ["z"])])  # moves the resourceVersion on without history
    kube_api.send_bookmark()
    wait_for(lambda: watcher.resource_version == str(kube_api.rv), what="bookmark seen")
    kube_api.drop_watches()
    wait_for(lambda: kube_api.request_count(watch=True) == 2, what="resumed watch")
    watches = [q for _, q in kube_api.requests if q.get("watch")]
    assert watches[1]["resourceVersion"] == str(kube_api.rv)


def test_watcher_backs_off_on_api_errors_and_recovers(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                      rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a", "b"])])
    kube_api.fail_next(10_000)
    watchers.start(kube_api.url, backoff_initial=0.05, backoff_max=0.4)
    time.sleep(1.0)
    attempts = kube_api.request_count()
    assert 3 <= attempts <= 20  # retried, but with growing pauses rather than in a tight loop
    with kube_api.cond:
        kube_api.fail_queue.clear()
    wait_for(lambda: ready_is(rclient, "llama", 2), what="recovery")


def test_watcher_stops_refreshing_when_the_api_server_is_gone(watchers: WatcherRunner,
                                                              rclient: redis.Redis) -> None:
    api = FakeKubeAPI().serve()
    api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(api.url, ttl=2, heartbeat=0.5)
    wait_for(lambda: ready_is(rclient, "llama", 1), what="sync")
    api.close()  # the watch drops and every retry is refused
    wait_for(lambda: not rclient.exists(replica_key("llama")), timeout=8, what="counts expire")
    assert not watcher.health()[0]


def test_dead_watcher_counts_expire_after_the_ttl(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                  rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(kube_api.url, ttl=1, heartbeat=0.3)
    wait_for(lambda: ready_is(rclient, "llama", 1), what="sync")
    time.sleep(1.5)
    assert ready_is(rclient, "llama", 1)  # heartbeats keep it alive past one TTL
    watchers.stop(watcher)
    wait_for(lambda: not rclient.exists(replica_key("llama")), timeout=3, what="expiry")


def test_two_concurrent_watchers_agree_and_never_publish_a_mixed_state(
        kube_api: FakeKubeAPI, watchers: WatcherRunner, rclient: redis.Redis, redis_url: str) -> None:
    kube_api.load([model_slice("llama", ["p0"])])
    watchers.start(kube_api.url)
    watchers.start(kube_api.url)
    wait_for(lambda: ready_is(rclient, "llama", 1) and kube_api.active_watches == 2, what="both synced")
    violations: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        with redis.Redis.from_url(redis_url) as c:
            while not stop.is_set():
                state = read_state(c, "llama")
                if state and not (state.ready == len(state.replicas) == sum(state.versions.values())):
                    violations.append(repr(state))

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(1, 60):  # alternate sizes so two different states differ in every field
        size = 1 + (n * 7) % 11
        kube_api.apply("MODIFIED", model_slice("llama", [f"p{i}" for i in range(size)]))
        time.sleep(0.005)
    kube_api.apply("MODIFIED", model_slice("llama", [f"q{i}" for i in range(5)]))
    wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.replicas == tuple(
        f"models/q{i}" for i in range(5)), what="final state")
    time.sleep(0.6)  # a heartbeat from each watcher
    stop.set()
    thread.join()
    assert violations == []
    final = read_state(rclient, "llama")
    assert final is not None and final.ready == 5


def test_watcher_relists_after_an_error_event_other_than_410(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                            rclient: redis.Redis) -> None:
    kube_api.load([model_slice("llama", ["a"])])
    watcher = watchers.start(kube_api.url)
    wait_for(lambda: ready_is(rclient, "llama", 1) and kube_api.active_watches == 1, what="sync")
    with kube_api.cond:  # the change is made as the stream fails: only a relist can show it
        kube_api.apply("MODIFIED", model_slice("llama", ["a", "b"]))
        kube_api.send_error(500, "InternalError", "etcdserver: request timed out")
    wait_for(lambda: ready_is(rclient, "llama", 2), what="state after relist")
    assert watcher.relists == 2
    assert watcher.events == 0


def test_watcher_restarts_a_list_whose_continue_token_expired(kube_api: FakeKubeAPI, watchers: WatcherRunner,
                                                              rclient: redis.Redis) -> None:
    kube_api.load([model_slice(f"m{i}", [f"p{i}"], suffix=str(i)) for i in range(4)])

    def between_pages() -> None:  # a model goes and another comes, and etcd compacts past the list
        kube_api.delete("models", "m0-0")
        kube_api.apply("ADDED", model_slice("m9", ["p9"], suffix="9"))
        kube_api.compact()

    kube_api.after_first_page = between_pages
    watcher = watchers.start(kube_api.url, page_size=2)
    wait_for(lambda: all(ready_is(rclient, f"m{i}", 1) for i in (1, 2, 3, 9)), what="the restarted list")
    assert read_state(rclient, "m0") is None  # only whole snapshots are published, never the expired half
    lists = [q for _, q in kube_api.requests if q.get("watch") is None]
    assert ["continue" in q for q in lists] == [False, True, False, True]
    assert watcher.relists == 1
