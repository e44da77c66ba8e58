"""The request path's view of tenants, API keys and models: Redis behind a short-TTL in-process cache.

A cached entry answers without any I/O. Operators' changes reach every process through Redis pub/sub
(`store.INVALIDATION_CHANNEL`), so a revoked key stops working within milliseconds rather than after
the TTL. A generation counter closes the race where a lookup that started before an invalidation
would store the old value after it. After the subscriber reconnects, everything cached is dropped,
because messages sent while it was away are lost.

When Redis cannot answer, a cached entry keeps working until its TTL (plus `stale_if_error`), and an
uncached lookup raises `Unavailable`, which the caller turns into a 503: fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from ext_proc import metrics, store
from ext_proc.records import (
    ApiKey,
    Model,
    RecordError,
    Tenant,
    api_key_from_hash,
    hash_from_reply,
    model_from_hash,
    tenant_from_hash,
)
from igw.redis_conn import PipelinedRedis, RedisError

log = logging.getLogger(__name__)

V = TypeVar("V")


class Unavailable(Exception):
    """Redis could not answer and no usable cached entry exists."""


class TTLCache(Generic[V]):
    """key -> (value, expires_at). Bounded: when full, the oldest insertions go first."""

    def __init__(self, name: str, max_entries: int) -> None:
        self.name = name
        self.max_entries = max_entries
        self.entries: dict[str, tuple[V, float]] = {}

    def put(self, key: str, value: V, expires_at: float) -> None:
        entries = self.entries
        entries.pop(key, None)
        if len(entries) >= self.max_entries:
            for old in list(entries)[: max(1, self.max_entries // 10)]:
                del entries[old]
        entries[key] = (value, expires_at)

    def clear(self) -> None:
        self.entries.clear()


class Directory:
    def __init__(
        self,
        redis: PipelinedRedis,
        *,
        ttl: float,
        stale_if_error: float = 0.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.clock = clock
        self.generation = 0
        self.keys: TTLCache[ApiKey | None] = TTLCache("api_key", max_entries)
        self.tenants: TTLCache[Tenant | None] = TTLCache("tenant", max_entries)
        self.models: TTLCache[Model | None] = TTLCache("model", max_entries)
        self.subscribed = False

    async def _lookup(self, cache: TTLCache[V], key: str, fetch: Callable[[str], Awaitable[V]]) -> V:
        entry = cache.entries.get(key)
        now = self.clock()
        if entry is not None and entry[1] > now:
            return entry[0]
        generation = self.generation
        try:
            value = await fetch(key)
        except (RedisError, RecordError) as exc:
            metrics.REDIS_ERRORS.labels("corrupt_record" if isinstance(exc, RecordError) else "unavailable").inc()
            if entry is not None and entry[1] + self.stale_if_error > now:
                metrics.count_lookup(cache.name, "stale")
                return entry[0]
            metrics.count_lookup(cache.name, "error")
            if isinstance(exc, RecordError):
                log.error("%s", exc)
            raise Unavailable(f"{cache.name} lookup failed: {exc}") from None
        metrics.count_lookup(cache.name, "miss")
        if generation == self.generation:
            cache.put(key, value, self.clock() + self.ttl)
        return value

    async def api_key(self, digest: str) -> ApiKey | None:
        return await self._lookup(self.keys, digest, self._fetch_key)

    async def tenant(self, tenant_id: str) -> Tenant | None:
        return await self._lookup(self.tenants, tenant_id, self._fetch_tenant)

    async def model(self, name: str) -> Model | None:
        """The registered model `name` refers to, directly or through an alias."""
        return await self._lookup(self.models, name, self._fetch_model)

    async def _fetch_key(self, digest: str) -> ApiKey | None:
        return api_key_from_hash(hash_from_reply(await self.redis.execute("HGETALL", store.api_key_key(digest))))

    async def _fetch_tenant(self, tenant_id: str) -> Tenant | None:
        reply = await self.redis.execute("HGETALL", store.tenant_key(tenant_id))
        return tenant_from_hash(tenant_id, hash_from_reply(reply))

    async def _fetch_model(self, name: str) -> Model | None:
        alias, model = await self.redis.execute_many(
            [("GET", store.alias_key(name)), ("HGETALL", store.model_key(name))]
        )
        if isinstance(alias, bytes):
            canonical = alias.decode()
            model = await self.redis.execute("HGETALL", store.model_key(canonical))
            return model_from_hash(canonical, hash_from_reply(model))
        return model_from_hash(name, hash_from_reply(model))

    def invalidate(self, message: str) -> None:
        """Apply one message from the invalidation channel (format: see store.invalidation_message)."""
        self.generation += 1
        metrics.INVALIDATIONS.inc()
        kind, _, name = message.partition(":")
        if kind == "key":
            self.keys.entries.pop(name, None)
        elif kind == "tenant":
            self.tenants.entries.pop(name, None)
        elif kind == "model":
            self.models.clear()  # aliases point at models: any change may affect any name
        else:
            self.clear()

    def clear(self) -> None:
        self.generation += 1
        self.keys.clear()
        self.tenants.clear()
        self.models.clear()

    async def watch_invalidations(self, redis_url: str, stop: asyncio.Event, retry_seconds: float = 0.5) -> None:
        """Subscribe and apply invalidations until `stop`; reconnect after errors, dropping the cache."""
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError as PyRedisError

        connected_before = False
        while not stop.is_set():
            client = aioredis.from_url(redis_url, socket_connect_timeout=1, socket_keepalive=True,
                                       health_check_interval=5)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(store.INVALIDATION_CHANNEL)
                if connected_before:
                    log.info("invalidation channel resubscribed; dropping cached entries")
                    self.clear()
                connected_before = True
                self.subscribed = True
                metrics.PUBSUB_UP.set(1)
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self.invalidate(data.decode() if isinstance(data, bytes) else str(data))
            except (PyRedisError, OSError) as exc:
                if self.subscribed:
                    log.warning("invalidation subscriber lost Redis: %s", exc)
            finally:
                self.subscribed = False
                metrics.PUBSUB_UP.set(0)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_seconds)
