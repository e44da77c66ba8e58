"""Where hits are counted: Redis for the service, or process memory for a single instance.

The service hands over every counted descriptor of a request at once; the Redis backend turns them into
one pipelined write (fixed window: INCRBY + EXPIRE per key, as upstream; GCRA: one EVALSHA per key),
so a request costs one round trip however many descriptors it has. The memory backend applies the same
arithmetic without I/O: useful for a single-process deployment without Redis, and as the benchmark's
"same server, no Redis" baseline.

Sharding (`--redis-shards`): one redis-server is single-threaded, and per-request rate limiting at the
platform's peak needs more than one core of it (README, capacity). Each counter lives on the shard its
`group` hashes to (CRC-32, the same in every process): the domain and the first entry as the counter
key spells them (lookup.counter_group), so a descriptor and the ones nested under the same first entry
([tenant] and [tenant, model]) share a shard and a round trip, like a Redis Cluster hash tag. A request
whose counters span shards sends one pipelined write to each, concurrently. Changing the shard list moves
counters: their current windows restart from zero, nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from dataclasses import dataclass

import hiredis

from igw.redis_conn import PipelinedRedis, RedisError
from ratelimit_svc.gcra import LUA, GcraResult, gcra

GCRA_SHA = hashlib.sha1(LUA.encode()).hexdigest()

# INCRBY + EXPIRE for every fixed-window key of a request in one command: the same effect as upstream's
# pipelined pairs, but one command to encode and one reply to parse on the request path, and the TTL is
# set only when the increment created the key (the script is atomic, so no key is left without one).
# KEYS: counter keys. ARGV: hits_1, ttl_1, hits_2, ttl_2, ...  Returns the counts after increment.
FIXED_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local hits = tonumber(ARGV[2 * i - 1])
  local n = redis.call('INCRBY', key, hits)
  if n == hits then redis.call('EXPIRE', key, ARGV[2 * i]) end
  out[i] = n
end
return out
"""
FIXED_SHA = hashlib.sha1(FIXED_LUA.encode()).hexdigest()


@dataclass(slots=True)
class Hit:
    key: str  # fixed window: includes the window start; gcra: the bucket key
    hits: int
    algorithm: str  # "fixed_window" or "gcra"
    ttl: int = 0  # fixed window: seconds the counter lives
    interval_ms: float = 0.0  # gcra: window / limit
    burst: int = 0  # gcra: bucket size in hits
    group: str = ""  # what picks the Redis shard: domain and the descriptor's first entry


Counted = int | GcraResult  # fixed window: the counter after the increment


class PartialCount(RedisError):
    """Some shards counted and one did not: `results` has None for the hits that were not counted, so
    fail-open can still enforce the counted ones."""

    def __init__(self, message: str, results: list[Counted | None]) -> None:
        super().__init__(message)
        self.results = results


def shard_of(group: str, shards: int) -> int:
    return zlib.crc32(group.encode()) % shards


class RedisCounters:
    def __init__(self, *shards: PipelinedRedis) -> None:
        if not shards:
            raise ValueError("RedisCounters needs at least one Redis")
        self.shards = shards

    async def apply(self, hits: list[Hit]) -> list[Counted]:
        shards = self.shards
        if len(shards) == 1:
            return await self._apply_on(shards[0], hits)
        placed: dict[int, list[int]] = {}
        for i, hit in enumerate(hits):
            placed.setdefault(shard_of(hit.group, len(shards)), []).append(i)
        if len(placed) == 1:
            ((shard, _),) = placed.items()
            return await self._apply_on(shards[shard], hits)
        parts = await asyncio.gather(*(self._apply_on(shards[shard], [hits[i] for i in indexes])
                                       for shard, indexes in placed.items()), return_exceptions=True)
        results: list[Counted | None] = [None] * len(hits)
        failure: BaseException | None = None
        for indexes, part in zip(placed.values(), parts, strict=True):
            if isinstance(part, BaseException):
                failure = failure or part
                continue
            for i, value in zip(indexes, part, strict=True):
                results[i] = value
        if failure is not None:
            if not isinstance(failure, RedisError):
                raise failure
            raise PartialCount(f"a counter shard failed: {failure}", results)
        return results  # type: ignore[return-value]

    @staticmethod
    async def _apply_on(redis: PipelinedRedis, hits: list[Hit]) -> list[Counted]:
        commands: list[tuple[object, ...]] = []
        fixed_keys: list[str] = []
        fixed_args: list[int] = []
        for hit in hits:
            if hit.algorithm == "gcra":
                commands.append(("EVALSHA", GCRA_SHA, 1, hit.key, repr(hit.interval_ms), hit.burst, hit.hits))
            else:
                fixed_keys.append(hit.key)
                fixed_args += (hit.hits, hit.ttl)
        if fixed_keys:
            commands.append(("EVALSHA", FIXED_SHA, len(fixed_keys), *fixed_keys, *fixed_args))
        replies = await redis.execute_many(commands)  # type: ignore[arg-type]
        missing = [i for i, reply in enumerate(replies)
                   if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")]
        if missing:  # a Redis that restarted or flushed its scripts: load them, re-send only what did not run
            await redis.execute_many([("SCRIPT", "LOAD", LUA), ("SCRIPT", "LOAD", FIXED_LUA)])
            for i, reply in zip(missing, await redis.execute_many([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RedisError(f"redis rejected a counter update: {reply}")
        fixed_counts = iter(replies[-1]) if fixed_keys else iter(())  # type: ignore[call-overload]
        gcra_replies = iter(replies)
        results: list[Counted] = []
        for hit in hits:
            if hit.algorithm == "gcra":
                allowed, remaining, wait = next(gcra_replies)  # type: ignore[misc]
                results.append(GcraResult(allowed == 1, 0, remaining, wait))
            else:
                results.append(next(fixed_counts))
        return results


class MemoryCounters:
    """Counters in this process only: exact for one instance, not shared between replicas."""

    def __init__(self) -> None:
        self.fixed: dict[str, tuple[int, float]] = {}
        self.tats: dict[str, float] = {}
        self._next_sweep = 0.0

    async def apply(self, hits: list[Hit]) -> list[Counted]:
        now = time.time()
        if now > self._next_sweep:
            self._sweep(now)
        results: list[Counted] = []
        for hit in hits:
            if hit.algorithm == "gcra":
                result = gcra(self.tats.get(hit.key), now * 1000, hit.interval_ms, hit.burst, hit.hits)
                if result.allowed and hit.hits:
                    self.tats[hit.key] = result.tat_ms
                results.append(result)
            else:
                count, expires = self.fixed.get(hit.key, (0, now + hit.ttl))
                count += hit.hits
                self.fixed[hit.key] = (count, expires)
                results.append(count)
        return results

    def _sweep(self, now: float) -> None:
        self.fixed = {k: v for k, v in self.fixed.items() if v[1] > now}
        now_ms = int(now * 1000)
        self.tats = {k: v for k, v in self.tats.items() if v > now_ms}
        self._next_sweep = now + 1.0
