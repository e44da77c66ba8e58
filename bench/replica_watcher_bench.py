"""Replica watcher at scale: 4,000 pods over 1,000 models, against the loopback Kubernetes API peer.

    .venv/bin/python -m bench.replica_watcher_bench [--rounds 3] [--replay 60] [--rate 200]

1. Full sync, `--rounds` times: start `igw replicas watch --api-server URL` as a process on an empty
   Redis and time until every model's key holds its count. Quoted from process start (interpreter and
   imports included) and from its first list request. Baseline in the same run: this process fetching
   the same list with urllib, counting it with the same pure code and writing it with one pipeline.
2. Replay: `--rate` EndpointSlice events/s for `--replay` seconds (each replaces one pod of a model,
   as a rolling restart does). Lag = API server recording the event → the model's Redis state reflecting
   it, observed via the change channel. CPU per event from /proc for the watcher process, net of its
   idle (heartbeat) CPU measured just before; baseline: the same parse+count+write done in-process.

Targets: sync < 5 s; replay keeps up (all events delivered, achieved rate within 5%, lag p99 < 500 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import redis

from bench.procstat import cpu_seconds
from igw.procs import VENV_BIN, ManagedProcess, RedisServer
from igw.replica_counting import SliceIndex, count_slices
from igw.replicas import CHANGED_CHANNEL, MODELS_SET, ReplicaState, replica_key
from igw.replicas_publish import send_states
from tests.replicas.k8s_fake import FakeKubeAPI
from tests.replicas.slices import model_slice

PODS_PER_MODEL = 4


def model_name(i: int) -> str:
    return f"model-{i:04d}"


def initial_slices(models: int) -> list[dict]:
    return [model_slice(model_name(i), [f"{model_name(i)}-g{i * PODS_PER_MODEL + k}" for k in range(PODS_PER_MODEL)],
                        version="v1" if i % 2 else None, suffix="s1")
            for i in range(models)]


def all_synced(client: redis.Redis, models: int) -> bool:
    if client.scard(MODELS_SET) < models:
        return False
    pipe = client.pipeline(transaction=False)
    for i in range(models):
        pipe.hget(replica_key(model_name(i)), "ready")
    return all(r == str(PODS_PER_MODEL).encode() for r in pipe.execute())


def start_watcher(api: FakeKubeAPI, redis_url: str, log_dir: Path) -> ManagedProcess:
    return ManagedProcess("igw-replicas-watch", [str(VENV_BIN / "igw"), "--redis-url", redis_url, "replicas", "watch",
                                                 "--api-server", api.url, "--heartbeat", "5s", "--ttl", "15",
                                                 "--log-level", "warn"], log_dir=log_dir).start()


def baseline_sync(api: FakeKubeAPI, client: redis.Redis) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"{api.url}/apis/discovery.k8s.io/v1/endpointslices?labelSelector=igw.ai/model") as r:
        items = json.loads(r.read())["items"]
    now = time.time()
    states = [(ReplicaState(c.model, c.ready, c.versions, c.replicas, now, "baseline"), True)
              for c in count_slices(items).values()]
    send_states(client, states, 15, batch=len(states))
    return time.monotonic() - started


def sync_round(api: FakeKubeAPI, server: RedisServer, client: redis.Redis, models: int,
               log_dir: Path) -> tuple[float, float, float, float]:
    client.flushall()
    first_request = len(api.request_times)
    started = time.monotonic()
    proc = start_watcher(api, server.url, log_dir)
    try:
        while not all_synced(client, models):
            if not proc.alive():
                raise SystemExit(f"watcher died:\n{proc.tail()}")
            if time.monotonic() - started > 60:
                raise SystemExit(f"no sync after 60 s:\n{proc.tail()}")
            time.sleep(0.01)
        done = time.monotonic()
        list_at = api.request_times[first_request]
        cpu = cpu_seconds(proc.pid)
    finally:
        proc.stop()
    client.flushall()
    base = baseline_sync(api, client)
    assert all_synced(client, models)
    return done - started, done - list_at, cpu, base


class LagProbe:
    """Subscribes to the change channel; for each change reads the model's replicas and resolves every
    event whose new pod now appears (pods are named by the event's sequence number)."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.pending: dict[str, list[tuple[int, float]]] = {}
        self.lags: list[float] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(CHANGED_CHANNEL)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sent(self, model: str, seq: int, at: float) -> None:
        with self.lock:
            self.pending.setdefault(model, []).append((seq, at))

    def _run(self) -> None:
        while not self.stop.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if not message:
                continue
            model = message["data"].decode()
            raw = self.client.hget(replica_key(model), "replicas")
            seen = time.monotonic()
            if not raw:
                continue
            newest = max(int(r.rsplit("-g", 1)[1]) for r in json.loads(raw))
            with self.lock:
                queue = self.pending.get(model, [])
                while queue and queue[0][0] <= newest:
                    self.lags.append(seen - queue.pop(0)[1])

    def unresolved(self) -> int:
        with self.lock:
            return sum(len(q) for q in self.pending.values())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()
        self.client.close()


def replay(api: FakeKubeAPI, server: RedisServer, client: redis.Redis, models: int, rate: float, seconds: float,
           log_dir: Path) -> dict[str, float]:
    client.flushall()
    proc = start_watcher(api, server.url, log_dir)
    probe = LagProbe(server.url)
    try:
        while not all_synced(client, models):
            time.sleep(0.02)
        # Idle CPU (heartbeats of every model) over one full heartbeat period, to report events net of it.
        time.sleep(1.0)
        idle_start, idle_cpu0 = time.monotonic(), cpu_seconds(proc.pid)
        time.sleep(5.0)
        idle_rate = (cpu_seconds(proc.pid) - idle_cpu0) / (time.monotonic() - idle_start)
        pods = {i: [i * PODS_PER_MODEL + k for k in range(PODS_PER_MODEL)] for i in range(models)}
        seq = models * PODS_PER_MODEL
        total = int(rate * seconds)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        for n in range(total):
            due = t0 + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = (n * 7919) % models  # spread over all models
            pods[i] = [*pods[i][1:], seq]
            name = model_name(i)
            obj = model_slice(name, [f"{name}-g{p}" for p in pods[i]], version="v1" if i % 2 else None,
                              suffix="s1")
            api.apply("MODIFIED", obj)
            probe.sent(name, seq, time.monotonic())
            seq += 1
        sent_for = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while probe.unresolved() and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        probe.close()
        proc.stop()
    lags = sorted(probe.lags)
    net_cpu = max(0.0, cpu - idle_rate * elapsed)
    return {
        "events": total, "achieved_rate": total / sent_for, "delivered": len(lags),
        "unresolved": probe.unresolved(),
        "p50": lags[len(lags) // 2] if lags else float("nan"),
        "p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else float("nan"),
        "max": lags[-1] if lags else float("nan"),
        "cpu_per_event_us": cpu / total * 1e6, "net_cpu_per_event_us": net_cpu / total * 1e6,
        "idle_cpu_share": idle_rate,
    }


def baseline_event_cost(models: int, client: redis.Redis, events: int = 2000) -> float:
    """In-process floor per event: parse the watch line, update the index, count, write one model."""
    index = SliceIndex()
    index.replace_all(initial_slices(models))
    lines = [json.dumps({"type": "MODIFIED", "object": model_slice(
        model_name(n % models), [f"{model_name(n % models)}-g{n + k}" for k in range(PODS_PER_MODEL)],
        suffix="s1")}).encode() for n in range(events)]
    started = time.process_time()
    for line in lines:
        event = json.loads(line)
        for model in index.apply(event["type"], event["object"]):
            c = index.count(model)
            send_states(client, [(ReplicaState(model, c.ready, c.versions, c.replicas, time.time(), "b"), True)], 15)
    return (time.process_time() - started) / events * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="full-sync rounds (median quoted)")
    parser.add_argument("--replay", type=float, default=60.0, help="replay duration in seconds")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second in the replay")
    parser.add_argument("--models", type=int, default=1000)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="igw-replica-bench-"))
    server = RedisServer(log_dir=log_dir).start()
    client = redis.Redis.from_url(server.url)
    api = FakeKubeAPI().serve()
    try:
        api.load(initial_slices(args.models))
        print(f"{args.models} models x {PODS_PER_MODEL} pods = {args.models * PODS_PER_MODEL} pods, "
              f"{len(api.objects)} EndpointSlices; logs in {log_dir}", flush=True)
        rounds = [sync_round(api, server, client, args.models, log_dir) for _ in range(args.rounds)]
        total, from_list, cpu, base = (statistics.median(r[i] for r in rounds) for i in range(4))
        print("sync rounds (from start, from list, watcher CPU, baseline): "
              + "; ".join(f"{r[0]:.2f}s {r[1]:.2f}s {r[2]:.2f}s {r[3]:.2f}s" for r in rounds), flush=True)
        result = replay(api, server, client, args.models, args.rate, args.replay, log_dir)
        client.flushall()
        floor_us = baseline_event_cost(args.models, client)
    finally:
        api.close()
        client.close()
        server.stop()

    rows = [
        ("full sync, from process start (median)", f"{total:.2f} s", "< 5 s", total < 5),
        ("full sync, from first list request", f"{from_list:.2f} s", "", None),
        ("  baseline: urllib list + count + 1 pipeline", f"{base:.2f} s  (ratio {from_list / base:.1f}x)", "", None),
        ("  watcher CPU for start + sync", f"{cpu:.2f} s", "", None),
        (f"replay {result['events']} events", f"{result['achieved_rate']:.0f} ev/s sent", f">= {args.rate * 0.95:.0f}",
         result["achieved_rate"] >= args.rate * 0.95),
        ("events reflected in Redis", f"{result['delivered']}/{result['events']}", "all",
         result["unresolved"] == 0),
        ("event → Redis lag p50", f"{result['p50'] * 1000:.1f} ms", "", None),
        ("event → Redis lag p99", f"{result['p99'] * 1000:.1f} ms", "< 500 ms", result["p99"] < 0.5),
        ("event → Redis lag max", f"{result['max'] * 1000:.1f} ms", "", None),
        ("watcher CPU per event (total)", f"{result['cpu_per_event_us']:.0f} us", "", None),
        ("watcher CPU per event (net of idle)", f"{result['net_cpu_per_event_us']:.0f} us", "", None),
        ("  baseline in-process parse+count+write", f"{floor_us:.0f} us  (ratio "
                                                    f"{result['net_cpu_per_event_us'] / floor_us:.1f}x)", "", None),
        ("watcher idle CPU (heartbeats of all models)", f"{result['idle_cpu_share'] * 100:.1f} % of a core", "", None),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)}  {'value':<32} {'target':<10} result")
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{name.ljust(width)}  {value:<32} {target:<10} {verdict}")
    return 0 if all(ok is not False for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
