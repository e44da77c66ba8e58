"""Writing and reading replica states in Redis (schema: igw.replicas), for every publisher.

The watcher, `igw replicas set` and the local test bed's launcher all publish through `send_states`,
which sends each model's `igw.replicas.write_commands` block (MULTI … EXEC, then PUBLISH) verbatim
and pipelines many models in one round trip. Each model's block is atomic, so two publishers writing
at once can only leave one whole state or the other, never a mix.

For the launcher: `publish(redis_url, model, ready_ids)` once, or `ReadinessPublisher` to probe demo
model servers' readiness URLs every second and publish the ready ones (a heartbeat: stop the launcher
and its counts expire after the TTL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import redis

from igw.replicas import (
    CHANGED_CHANNEL,
    DEFAULT_TTL,
    KEY_PREFIX,
    MODELS_SET,
    ReplicaState,
    decode_state,
    replica_key,
    write_commands,
)

log = logging.getLogger(__name__)

# Forget set members whose key has expired; atomic, so it cannot race a publisher's MULTI (which
# writes the key and the member together).
_PRUNE_SCRIPT = """
local removed = {}
for _, model in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. model) == 0 then
    redis.call('SREM', KEYS[1], model)
    table.insert(removed, model)
  end
end
return removed
"""


class PublishError(RuntimeError):
    """Redis refused or failed a write; nothing about which models were written can be assumed."""


def default_publisher(role: str) -> str:
    return f"{role}/{socket.gethostname()}/{os.getpid()}"


def connect(redis_url: str, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)


def state_commands(state: ReplicaState, ttl: int, notify: bool = True) -> list[tuple[str, ...]]:
    """write_commands, optionally without the change notification (heartbeats of unchanged counts)."""
    commands = write_commands(state, ttl)
    if not notify:
        commands = [c for c in commands if c[0] != "PUBLISH"]
    return commands


def send_states(client: redis.Redis, states: Iterable[tuple[ReplicaState, bool]], ttl: int,
                batch: int = 250) -> int:
    """Write (state, notify) pairs, `batch` models per round trip; returns how many were written."""
    pending = list(states)
    for start in range(0, len(pending), batch):
        commands: list[tuple[str, ...]] = []
        for state, notify in pending[start:start + batch]:
            commands += state_commands(state, ttl, notify)
        _send_raw(client, commands)
    return len(pending)


def _send_raw(client: redis.Redis, commands: list[tuple[str, ...]]) -> None:
    """Send commands as written (MULTI/EXEC included) and check every reply, on one connection."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        for command in commands:
            reply = conn.read_response()
            if command[0] == "EXEC":
                if reply is None:
                    raise PublishError("EXEC aborted")
                for item in reply:
                    if isinstance(item, Exception):
                        raise PublishError(f"Redis refused a replica write: {item}")
    except (redis.RedisError, OSError, PublishError):
        conn.disconnect()  # unread replies would poison the next user of this connection
        raise
    finally:
        pool.release(conn)


def publish(redis_url: str, model: str, ready_ids: Sequence[str], *, ttl: int = DEFAULT_TTL,
            version: str = "", publisher: str | None = None, notify: bool = True) -> ReplicaState:
    """Publish one model's ready replicas once (all under `version`); returns what was written."""
    state = ReplicaState(
        model=model,
        ready=len(ready_ids),
        versions={version: len(ready_ids)} if ready_ids else {},
        replicas=tuple(sorted(ready_ids)),
        updated=time.time(),
        publisher=publisher or default_publisher("publish"),
    )
    client = connect(redis_url)
    try:
        send_states(client, [(state, notify)], ttl)
    finally:
        client.close()
    return state


def read_states(client: redis.Redis) -> dict[str, tuple[ReplicaState | None, float]]:
    """Every model known to Redis → (state or None when expired/malformed, remaining TTL in seconds)."""
    models = {m.decode() if isinstance(m, bytes) else m for m in client.smembers(MODELS_SET)}
    for key in client.scan_iter(match=KEY_PREFIX + "*", count=500):
        name = key.decode() if isinstance(key, bytes) else key
        if name not in (MODELS_SET, CHANGED_CHANNEL):
            models.add(name[len(KEY_PREFIX):])
    ordered = sorted(models)
    pipe = client.pipeline(transaction=False)
    for model in ordered:
        pipe.hgetall(replica_key(model))
        pipe.pttl(replica_key(model))
    replies = pipe.execute()
    result: dict[str, tuple[ReplicaState | None, float]] = {}
    for i, model in enumerate(ordered):
        raw, pttl = replies[2 * i], replies[2 * i + 1]
        result[model] = (decode_state(model, raw), max(0.0, pttl / 1000) if pttl and pttl > 0 else 0.0)
    return result


def prune_models(client: redis.Redis) -> list[str]:
    """Remove expired models from the models set; returns their names."""
    removed = client.eval(_PRUNE_SCRIPT, 1, MODELS_SET, KEY_PREFIX)
    return [m.decode() if isinstance(m, bytes) else m for m in removed or ()]


@dataclass(frozen=True)
class ModelServer:
    """One demo model server of the test bed: it counts as a ready replica while ready_url answers 2xx."""

    model: str
    replica_id: str  # e.g. "127.0.0.1:8101"
    ready_url: str
    version: str = ""


def http_ready(url: str, timeout: float) -> bool:
    from igw.procs import http_ok

    return http_ok(url, timeout)


class ReadinessPublisher:
    """Probe model servers every `interval` seconds and publish each model's ready ones.

    A model's key is rewritten on every round (heartbeat), with a change notification only when its
    ready set changed. Models listed with no ready server are published as ready 0 (the servers exist
    but are not up yet). Runs in a daemon thread, so it suits a synchronous launcher; `stop()` joins it
    and, with withdraw=True, publishes ready 0 for every model so quotas drop at once.
    """

    def __init__(self, redis_url: str, servers: Sequence[ModelServer], *, interval: float = 1.0,
                 ttl: int = DEFAULT_TTL, probe_timeout: float = 0.5, publisher: str | None = None,
                 probe: Callable[[str, float], bool] = http_ready) -> None:
        if interval <= 0 or probe_timeout <= 0:
            raise ValueError("interval and probe_timeout must be positive")
        if ttl < 1 or ttl < 2 * interval:
            raise ValueError(f"ttl {ttl}s must be at least 2 × interval ({interval}s) and 1s")
        self.redis_url = redis_url
        self.servers = list(servers)
        self.interval = interval
        self.ttl = ttl
        self.probe_timeout = probe_timeout
        self.publisher = publisher or default_publisher("launcher")
        self.probe = probe
        self.last: dict[str, ReplicaState] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = connect(redis_url)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(16, len(self.servers))),
                                        thread_name_prefix="igw-ready-probe")

    def poll_once(self) -> dict[str, ReplicaState]:
        """Probe all servers and publish every model; returns the states written."""
        results = list(self._pool.map(lambda s: self.probe(s.ready_url, self.probe_timeout), self.servers))
        now = time.time()
        by_model: dict[str, list[ModelServer]] = {}
        for server, ok in zip(self.servers, results, strict=True):
            by_model.setdefault(server.model, [])
            if ok:
                by_model[server.model].append(server)
        writes: list[tuple[ReplicaState, bool]] = []
        states: dict[str, ReplicaState] = {}
        for model, ready in by_model.items():
            versions: dict[str, int] = {}
            for server in ready:
                versions[server.version] = versions.get(server.version, 0) + 1
            state = ReplicaState(model, len(ready), versions, tuple(sorted(s.replica_id for s in ready)),
                                 now, self.publisher)
            previous = self.last.get(model)
            changed = previous is None or (previous.ready, previous.versions, previous.replicas) != (
                state.ready, state.versions, state.replicas)
            writes.append((state, changed))
            states[model] = state
        send_states(self._client, writes, self.ttl)
        self.last.update(states)
        return states

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except (redis.RedisError, OSError, PublishError) as exc:
                self.errors += 1
                log.warning("replica publish failed (will retry): %s", exc)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> ReadinessPublisher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="igw-readiness-publisher", daemon=True)
            self._thread.start()
        return self

    def stop(self, withdraw: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + self.probe_timeout * 2 + 5)
            self._thread = None
        if withdraw and self.last:
            now = time.time()
            with contextlib.suppress(redis.RedisError, OSError, PublishError):
                send_states(self._client, [(replace(s, ready=0, versions={}, replicas=(), updated=now), True)
                                           for s in self.last.values()], self.ttl)
        self._pool.shutdown(wait=False)
        self._client.close()

    def __enter__(self) -> ReadinessPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
