"""Adaptive limits: a limit that follows the ready replicas of a model, split between tenants.

    effective = clamp(floor(per_replica × ready × share / total_share), min, max)

where `total_share` is the sum of `share` over the adaptive limits of the same domain and `share_key`
group that apply to that model (the tenants that hold a share of it). With no fresh replica data
(none published, or older than `--replica-max-age`) the limit is `min`.

Replica counts live in Redis (igw.replicas). They are read into memory here, refreshed on every change
notification and by a periodic sweep, so the request path never waits on Redis for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable

import redis.asyncio as aioredis
from prometheus_client import Gauge

from igw.redis_sentinel import SentinelTarget, state_redis_client
from igw.replicas import CHANGED_CHANNEL, MODELS_SET, ReplicaState, decode_state, replica_key
from ratelimit_svc import metrics
from ratelimit_svc.config import Adaptive, Node, RateLimitConfig
from ratelimit_svc.lookup import Match

log = logging.getLogger("ratelimit_svc.adaptive")


def effective_limit(adaptive: Adaptive, ready: int | None, total_share: float) -> int:
    """Pure quota math; `ready` None means no fresh replica data."""
    if ready is None:
        return adaptive.min
    share = adaptive.share / total_share if total_share > 0 else 1.0
    value = math.floor(adaptive.per_replica * ready * share + 1e-9)
    value = max(value, adaptive.min)
    if adaptive.max is not None:
        value = min(value, adaptive.max)
    return value


def share_totals(config: RateLimitConfig) -> dict[tuple[str, str, str | None], float]:
    """Sum of shares per (domain, share_key, fixed model or None for "any model")."""
    totals: dict[tuple[str, str, str | None], float] = defaultdict(float)

    def walk(domain: str, node: Node) -> None:
        limit = node.limit
        if limit is not None and limit.adaptive is not None:
            totals[(domain, limit.adaptive.share_key, limit.adaptive.model)] += limit.adaptive.share
        for child in node.children.values():
            walk(domain, child)

    for name, domain in config.domains.items():
        walk(name, domain.root)
    return dict(totals)


def model_of(adaptive: Adaptive, match: Match) -> str | None:
    if adaptive.model:
        return adaptive.model
    for key, value in match.entries:
        if key == adaptive.model_key:
            return value
    return None


class AdaptiveLimits:
    def __init__(self, redis_url: str | SentinelTarget | None, *, max_age: float = 10.0,
                 sweep_interval: float = 1.0) -> None:
        """`redis_url` None: no replica data is ever read (no state Redis), every adaptive limit is its min;
        a SentinelTarget: the master its sentinels name (REDIS_TYPE=sentinel)."""
        self.redis_url = redis_url
        self.max_age = max_age
        self.sweep_interval = sweep_interval
        self.states: dict[str, ReplicaState] = {}
        self._totals_for: RateLimitConfig | None = None
        self._totals: dict[tuple[str, str, str | None], float] = {}
        self._client: aioredis.Redis | None = None
        self.listeners: list[Callable[[], None]] = []  # told when a model's ready count changes
        self._gauges: dict[tuple[str, str | None], Gauge] = {}

    def _total(self, config: RateLimitConfig, domain: str, adaptive: Adaptive, model: str | None) -> float:
        if self._totals_for is not config:
            self._totals = share_totals(config)
            self._totals_for = config
        # Limits that take the model from the descriptor apply to every model, fixed ones to theirs: the
        # tenants holding a share of `model` are both kinds, whichever kind this limit is.
        total = self._totals.get((domain, adaptive.share_key, None), 0.0)
        if model is not None:
            total += self._totals.get((domain, adaptive.share_key, model), 0.0)
        return total

    def ready(self, model: str, now: float) -> int | None:
        state = self.states.get(model)
        if state is None or now - state.updated > self.max_age:
            return None
        return state.ready

    def effective_limit(self, domain: str, match: Match, now: float, config: RateLimitConfig) -> int:
        adaptive = match.limit.adaptive
        assert adaptive is not None
        model = model_of(adaptive, match)
        ready = self.ready(model, now) if model else None
        value = effective_limit(adaptive, ready, self._total(config, domain, adaptive, model))
        gauge_key = (match.stats_key, model)
        gauge = self._gauges.get(gauge_key)
        if gauge is None:  # prometheus-client's labels() takes a lock and builds a tuple: once per series
            gauge = self._gauges[gauge_key] = metrics.EFFECTIVE_LIMIT.labels(
                domain, match.stats_key.partition(".")[2], model or "")
        gauge.set(value)
        return value

    # -- I/O -----------------------------------------------------------------------------------

    async def refresh(self, models: list[str] | None = None) -> None:
        client = self._client
        if client is None:
            return
        if models is None:
            models = [m.decode() if isinstance(m, bytes) else m for m in await client.smembers(MODELS_SET)]
        pipe = client.pipeline(transaction=False)
        for model in models:
            pipe.hgetall(replica_key(model))
        # One key of the wrong type (WRONGTYPE) must cost that model alone its data, not every model its refresh.
        results = await pipe.execute(raise_on_error=False)
        now = time.time()
        changed = False
        for model, raw in zip(models, results, strict=True):
            state = None if isinstance(raw, Exception) else decode_state(model, raw)
            previous = self.states.get(model)
            if state is None:
                changed |= self.states.pop(model, None) is not None
                continue
            changed |= previous is None or previous.ready != state.ready
            self.states[model] = state
            metrics.REPLICAS_SEEN.labels(model).set(state.ready)
            metrics.REPLICA_STALENESS.labels(model).set(max(0.0, now - state.updated))
        if changed:
            for listener in self.listeners:
                listener()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep replica states current: pub/sub for changes, a sweep for expiry and missed messages."""
        if self.redis_url is None:
            await stop.wait()
            return
        self._client = state_redis_client(self.redis_url, socket_timeout=2, socket_connect_timeout=1)

        async def subscriber() -> None:
            while not stop.is_set():
                try:
                    pubsub = self._client.pubsub()  # type: ignore[union-attr]
                    await pubsub.subscribe(CHANGED_CHANNEL)
                    await self.refresh()  # catch up on what changed while unsubscribed
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            await self.refresh([data.decode() if isinstance(data, bytes) else data])
                except (OSError, aioredis.RedisError) as exc:
                    log.debug("replica subscription lost: %s", exc)
                    await asyncio.sleep(0.5)

        async def sweeper() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError, aioredis.RedisError):
                    await self.refresh()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.sweep_interval)

        tasks = [asyncio.create_task(subscriber()), asyncio.create_task(sweeper())]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 1.0)
