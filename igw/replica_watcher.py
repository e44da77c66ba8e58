"""Follow the EndpointSlices of model Services in Kubernetes and publish ready replicas per model to Redis.

Two threads share one SliceIndex under a lock:
- the watch loop lists the slices selected by label (paginated), then watches from the list's
  resourceVersion with bookmarks. A 410 Gone (HTTP status or ERROR event), or any other ERROR event,
  means the history is lost: relist. A dropped connection or a read timeout resumes the watch from the
  last resourceVersion seen (object or bookmark). API errors back off exponentially with jitter; a watch
  that stayed open a second or more (a quiet one ending at its timeout, servers need not send bookmarks)
  is no error and is reopened at once, or the pauses of a quiet cluster would outgrow the TTL.
- the writer publishes, one MULTI block per model (igw.replicas.write_commands), only the models whose
  count changed, batched per round trip, and rewrites every model each heartbeat (without a change
  notification) so the TTL keeps a dead watcher from freezing quotas.

A model whose slices all disappear (its Services deleted) is published once as ready 0, with a change
notification, and then no longer refreshed: its key expires after the TTL and the heartbeat prunes it
from `igw:replica-models`. A Service that still exists with no ready pods keeps publishing ready 0.

A watcher that has lost the API server (no open watch and no successful call for `ttl` seconds) stops
heartbeating: counts it can no longer vouch for expire, rather than another replica's fresh ones being
overwritten with stale ones forever. Once back (relisted or resuming its watch), it rewrites everything.

Why concurrent replicas and no leader election: what each watcher writes is a pure function of the
API server's state, each model's write is one atomic MULTI block, and every write is a full replacement,
so two watchers can only ever publish whole states, and they agree as soon as both have seen the same
events. Leader election would add a Lease, RBAC to write it, and a failover gap during which counts
freeze or expire; running 2 replicas instead costs one extra watch and a few hundred small Redis
writes per heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import urllib3
from prometheus_client import Counter, Gauge, Histogram

from igw.replica_counting import MODEL_LABEL, VERSION_LABEL, ModelReplicas, SliceIndex
from igw.replicas import DEFAULT_TTL, ReplicaState
from igw.replicas_publish import PublishError, default_publisher, prune_models, send_states

log = logging.getLogger(__name__)

EVENTS = Counter("igw_replicas_watch_events_total", "Watch events received", ["type"])
RELISTS = Counter("igw_replicas_relists_total", "Full lists of EndpointSlices", ["reason"])
API_ERRORS = Counter("igw_replicas_api_errors_total", "Failed Kubernetes API calls", ["reason"])
WRITES = Counter("igw_replicas_writes_total", "Model states written to Redis", ["kind"])
WRITE_ERRORS = Counter("igw_replicas_write_errors_total", "Failed Redis writes")
MODELS = Gauge("igw_replicas_models", "Models currently published by this watcher")
# A watch that stayed open this long proves the API usable even if it delivered nothing (client-go's reflector
# draws the same line): a quiet cluster's watches end at the server timeout or the read timeout without a
# single event, and servers need not send bookmarks. Only shorter ones may grow the backoff.
MIN_USABLE_WATCH = 1.0

LAG = Histogram("igw_replicas_publish_lag_seconds", "Watch event received → its model written to Redis",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


class Gone(Exception):
    """The API server no longer has the history we asked for (410): relist."""


class WatchError(Exception):
    """An ERROR event other than 410: the watch is unusable; relist after a backoff."""


@dataclass(frozen=True)
class WatcherSettings:
    namespace: str | None = None
    selector: str = MODEL_LABEL
    model_label: str = MODEL_LABEL
    version_label: str = VERSION_LABEL
    heartbeat: float = 5.0
    ttl: int = DEFAULT_TTL
    publisher: str = ""
    page_size: int = 500
    watch_timeout: int = 300  # server-side; jittered up to 2× like client-go's reflector
    read_timeout: float = 120.0  # no byte (event or bookmark) for this long: resume the watch
    backoff_initial: float = 0.2
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        if self.ttl < 2 * self.heartbeat:
            raise ValueError(f"ttl ({self.ttl}s) must be at least twice the heartbeat ({self.heartbeat}s)")
        if self.page_size < 1:
            raise ValueError("page size must be at least 1")


class Backoff:
    """Exponential backoff with equal jitter: uniform(c/2, c), c = min(max, initial × 2^n).

    Half the delay is kept fixed so that a watcher failing in a tight loop (a 410 on every relist) always
    waits a real pause; the random half still spreads several replicas' retries apart."""

    def __init__(self, initial: float, maximum: float, rng: Callable[[], float] = random.random) -> None:
        self.initial, self.maximum, self.rng = initial, maximum, rng
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.failures = 0

    def next_after_first(self) -> float:
        """0 for the first failure in a row (a dropped stream or an expired watch is routine), then next()."""
        if self.failures == 0:
            self.failures = 1
            return 0.0
        return self.next()


def same_count(a: ModelReplicas, b: ModelReplicas) -> bool:
    return (a.ready, a.versions, a.replicas) == (b.ready, b.versions, b.replicas)


class ReplicaWatcher:
    """`run(stop)` blocks until `stop` is set (or `stop()` is called from another thread or a signal)."""

    def __init__(self, api: Any, redis_client: redis.Redis, settings: WatcherSettings) -> None:
        self.api = api  # kubernetes.client.DiscoveryV1Api
        self.redis = redis_client
        self.settings = settings
        self.publisher = settings.publisher or default_publisher("watcher")
        self.index = SliceIndex(settings.model_label, settings.version_label)
        self.cond = threading.Condition()
        self.dirty: dict[str, float] = {}  # model → monotonic time of the first unpublished event
        self.published: dict[str, ModelReplicas] = {}
        self.resource_version: str | None = None
        self.synced = threading.Event()  # set after the first successful list
        self.watch_open = False
        self.api_ok_at = float("-inf")
        self.abandoned = False  # counts were left to expire while the API was unreachable
        self.relists = 0
        self.events = 0
        self.write_failures = 0  # failed Redis round trips (the writer retries them)
        self.watch_lines = 0  # lines the current (or last) watch delivered before ending or failing
        self.watch_opened_at: float | None = None  # monotonic; None until the current attempt's stream opens
        self._stop = threading.Event()
        self._resp: Any = None

    # -- the API side ----------------------------------------------------------------------------

    def _list_call(self, **kwargs: Any) -> Any:
        common = {"label_selector": self.settings.selector, "_preload_content": False}
        if self.settings.namespace:
            return self.api.list_namespaced_endpoint_slice(self.settings.namespace, **common, **kwargs)
        return self.api.list_endpoint_slice_for_all_namespaces(**common, **kwargs)

    def relist(self, reason: str) -> str:
        """List every selected slice (a consistent paginated snapshot) and replace the index."""
        from kubernetes.client.exceptions import ApiException

        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            try:
                resp = self._list_call(limit=self.settings.page_size, _continue=token,
                                       _request_timeout=(5, 60))
            except ApiException as exc:
                if exc.status == 410 and token:  # continue token expired mid-list: start over
                    items, token = [], None
                    continue
                raise
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items += body.get("items") or []
            token = (body.get("metadata") or {}).get("continue") or None
            if not token:
                break
        rv = str(body["metadata"]["resourceVersion"])
        now = time.monotonic()
        with self.cond:
            touched = self.index.replace_all(items)
            for model in touched:
                self.dirty.setdefault(model, now)
            self.resource_version = rv
            self.api_ok_at = now
            self.cond.notify_all()
        self.relists += 1
        RELISTS.labels(reason).inc()
        self.synced.set()
        log.info("listed %d EndpointSlices for %d models at resourceVersion %s (%s)",
                 len(items), len(self.index.models()), rv, reason)
        return rv

    def _lines(self, resp: Any) -> Iterator[bytes]:
        buffer = b""
        for chunk in resp.stream(None, decode_content=False):
            buffer += chunk
            while True:
                cut = buffer.find(b"\n")
                if cut < 0:
                    break
                line, buffer = buffer[:cut], buffer[cut + 1:]
                if line.strip():
                    yield line

    def watch_once(self) -> int:
        """One watch request from the current resourceVersion; returns how many lines it delivered.

        Returns normally when the server ends the stream; raises Gone, WatchError, ApiException or a
        urllib3/OS error otherwise.
        """
        timeout = random.randint(self.settings.watch_timeout, 2 * self.settings.watch_timeout)
        self.watch_lines = 0
        resp = self._list_call(watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
                               timeout_seconds=timeout, _request_timeout=(5, self.settings.read_timeout))
        self._resp = resp
        delivered = 0
        with self.cond:
            self.watch_open = True
            self.api_ok_at = self.watch_opened_at = time.monotonic()
        try:
            # stop() may have run while the request was made, before _resp was set, and so shut no socket:
            # reading now would block until the read timeout.
            lines = () if self._stop.is_set() else self._lines(resp)
            for line in lines:
                if self._stop.is_set():
                    break
                self._handle_line(line)
                delivered += 1
                self.watch_lines = delivered  # counts only lines that were not errors
        finally:
            with self.cond:
                self.watch_open = False
                self.api_ok_at = time.monotonic()
            self._resp = None
            # Close before releasing: a stream cut short must not go back to the pool half-read.
            with contextlib.suppress(Exception):
                resp.close()
            resp.release_conn()
        return delivered

    def _handle_line(self, line: bytes) -> None:
        received = time.monotonic()
        event = json.loads(line)
        kind = event.get("type", "")
        obj = event.get("object") or {}
        EVENTS.labels(kind).inc()
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", "410 Gone"))
            raise WatchError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        with self.cond:
            if kind != "BOOKMARK":
                self.events += 1
                for model in self.index.apply(kind, obj):
                    self.dirty.setdefault(model, received)
                self.cond.notify_all()
            if rv:
                self.resource_version = str(rv)
            self.api_ok_at = received

    def _watch_proved_usable(self) -> bool:
        """Whether the last watch attempt shows the API working: it delivered a line or stayed open a while."""
        opened = self.watch_opened_at
        return self.watch_lines > 0 or (opened is not None and time.monotonic() - opened >= MIN_USABLE_WATCH)

    def _watch_loop(self) -> None:
        from kubernetes.client.exceptions import ApiException

        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        reason = "start"
        while not self._stop.is_set():
            delay = 0.0
            self.watch_lines, self.watch_opened_at = 0, None
            try:
                # A successful relist does not reset the backoff: a watch failing at once after every list
                # (a lagging watch cache answering 410) would otherwise relist in a tight loop. Only a
                # watch that delivered something or stayed open a while proves the API usable again.
                if self.resource_version is None:
                    self.relist(reason)
                self.watch_once()
                if self._watch_proved_usable():
                    backoff.reset()  # e.g. a quiet watch ended by the server timeout: reopen at once
                else:
                    delay = backoff.next()  # ended at once without a single line: do not spin
            except Gone as exc:
                if self._watch_proved_usable():
                    backoff.reset()
                log.info("watch expired (%s): relisting", exc)
                self.resource_version, reason = None, "gone"
                delay = backoff.next_after_first()
            except WatchError as exc:
                if self._watch_proved_usable():
                    backoff.reset()
                API_ERRORS.labels("watch_error_event").inc()
                log.warning("watch error event (%s): relisting", exc)
                self.resource_version, reason = None, "error_event"
                delay = backoff.next()
            except ApiException as exc:
                if exc.status == 410:
                    self.resource_version, reason = None, "gone"
                    delay = backoff.next_after_first()
                else:
                    API_ERRORS.labels(f"http_{exc.status}").inc()
                    delay = backoff.next()
                    log.warning("Kubernetes API error %s %s; retrying in %.1fs", exc.status, exc.reason, delay)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                API_ERRORS.labels(type(exc).__name__).inc()
                if self._watch_proved_usable():
                    backoff.reset()
                # A broken stream resumes from the last resourceVersion; the first retry is immediate.
                delay = backoff.next_after_first()
                log.info("watch connection lost (%s); resuming from %s in %.1fs",
                         exc, self.resource_version, delay)
            if delay:
                self._stop.wait(delay)

    # -- the Redis side --------------------------------------------------------------------------

    def api_healthy(self, now: float) -> bool:
        return self.watch_open or now - self.api_ok_at < self.settings.ttl

    def _collect(self, heartbeat: bool) -> tuple[list[tuple[ReplicaState, bool]], dict[str, Any], list[float]]:
        """Under the lock: the writes due now, the `published` updates they imply, their event times."""
        now_wall = time.time()
        writes: list[tuple[ReplicaState, bool]] = []
        updates: dict[str, Any] = {}
        firsts: list[float] = []
        dirty, self.dirty = self.dirty, {}
        for model, first in dirty.items():
            current = self.index.count(model) if self.index.has_model(model) else None
            previous = self.published.get(model)
            if current is None:
                if previous is None:
                    continue
                current = ModelReplicas(model, 0)
                updates[model] = None  # gone: written once, then left to expire
            elif previous is not None and same_count(previous, current):
                continue
            else:
                updates[model] = current
            writes.append((ReplicaState(model, current.ready, current.versions, current.replicas, now_wall,
                                        self.publisher), True))
            firsts.append(first)
        if heartbeat:
            for model, count in self.published.items():
                if model not in updates:
                    writes.append((ReplicaState(model, count.ready, count.versions, count.replicas, now_wall,
                                                self.publisher), False))
        return writes, {"updates": updates, "dirty": dirty}, firsts

    def _writer_loop(self) -> None:
        settings = self.settings
        next_heartbeat = time.monotonic() + settings.heartbeat
        failures = 0
        while True:
            with self.cond:
                while not self.dirty and not self._stop.is_set() and time.monotonic() < next_heartbeat:
                    self.cond.wait(max(0.0, next_heartbeat - time.monotonic()))
                if self._stop.is_set():
                    return
                now = time.monotonic()
                heartbeat = now >= next_heartbeat
                if heartbeat:
                    next_heartbeat = now + settings.heartbeat
                    healthy = self.api_healthy(now)
                    if not healthy and self.published:
                        log.warning("no contact with the Kubernetes API for %.0fs: not refreshing %d models "
                                    "(they expire in at most %ds)", now - self.api_ok_at, len(self.published),
                                    settings.ttl)
                        self.published.clear()
                        self.abandoned = True
                        MODELS.set(0)
                        heartbeat = False
                    elif healthy and self.abandoned:
                        # A resumed watch (history intact) relists nothing and may bring no event for a
                        # model for hours: republish every model we know instead of waiting for one.
                        self.abandoned = False
                        for model in self.index.models():
                            self.dirty.setdefault(model, now)
                writes, pending, firsts = self._collect(heartbeat)
            if not writes and not heartbeat:
                continue
            try:
                send_states(self.redis, writes, settings.ttl)
                if heartbeat:
                    prune_models(self.redis)
            except (redis.RedisError, OSError, PublishError) as exc:
                WRITE_ERRORS.inc()
                self.write_failures += 1
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning("Redis write failed (%s); retrying in %.1fs", exc, delay)
                with self.cond:
                    for model, first in pending["dirty"].items():
                        self.dirty.setdefault(model, first)
                    if heartbeat:
                        next_heartbeat = time.monotonic()  # the heartbeat is still owed
                self._stop.wait(delay)
                continue
            failures = 0
            done = time.monotonic()
            with self.cond:
                for model, count in pending["updates"].items():
                    if count is None:
                        self.published.pop(model, None)
                    else:
                        self.published[model] = count
                MODELS.set(len(self.published))
            for first in firsts:
                LAG.observe(done - first)
            WRITES.labels("change").inc(len(firsts))
            WRITES.labels("heartbeat").inc(len(writes) - len(firsts))

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        if stop is not None:
            threading.Thread(target=lambda: (stop.wait(), self.stop()), daemon=True,
                             name="igw-watcher-stop").start()
        writer = threading.Thread(target=self._writer_loop, name="igw-replica-writer", daemon=True)
        writer.start()
        try:
            self._watch_loop()
        finally:
            self.stop()
            writer.join(10)

    def stop(self) -> None:
        """Safe from any thread or a signal handler: unblocks the watch read and the writer."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            # Shut the socket down so a read blocked in another thread returns at once.
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self.cond.acquire(timeout=0.1):  # never block a signal handler on the lock
            try:
                self.cond.notify_all()
            finally:
                self.cond.release()

    def health(self) -> tuple[bool, str]:
        now = time.monotonic()
        if not self.synced.is_set():
            return False, "not synced yet"
        if not self.api_healthy(now):
            return False, f"no contact with the Kubernetes API for {now - self.api_ok_at:.0f}s"
        return True, f"ok: {len(self.published)} models, resourceVersion {self.resource_version}"


def api_client(*, api_server: str | None = None, kubeconfig: str | None = None, in_cluster: bool = False,
               context: str | None = None) -> Any:
    """A kubernetes ApiClient: an explicit URL (no auth, e.g. a loopback test server or `kubectl proxy`),
    in-cluster service account, or a kubeconfig; with none given, in-cluster when running in a Pod,
    else the default kubeconfig."""
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    if api_server:
        configuration.host = api_server.rstrip("/")
    elif in_cluster or (not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST")):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    configuration.socket_options = keepalive_socket_options()
    return client.ApiClient(configuration)


# A watch is a long read on one connection. If the API server's node dies or a NAT forgets the flow, no
# FIN or RST ever comes and the read would only end at read_timeout (120 s), while the writer kept
# heartbeating counts nobody watches any more. TCP keepalive probes find the dead peer in about
# KEEPALIVE_IDLE + KEEPALIVE_COUNT × KEEPALIVE_INTERVAL = 11 s, under the default 15 s TTL; the watch then
# fails and resumes (or, with the API unreachable, heartbeats stop and the counts expire).
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 2, 3


def keepalive_socket_options() -> list[tuple[int, int, int]]:
    import socket

    import urllib3

    # urllib3 replaces its defaults (TCP_NODELAY) with the list given, so start from them.
    options = list(urllib3.connection.HTTPConnection.default_socket_options)
    options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):  # Linux; other platforms keep the kernel's timings
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def discovery_api(api: Any) -> Any:
    from kubernetes import client

    return client.DiscoveryV1Api(api)
