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

Per-second Redis (upstream's REDIS_PERSECOND): counters of limits whose unit is second churn the most
(a new key every second), so upstream lets them live on a Redis of their own. When one is given, every
hit marked `per_second` goes there and the shards keep the rest; it is one more target of the same
spreading, so a request touching both writes to both concurrently. The per-second Redis may be a Redis
Cluster of its own (REDIS_PERSECOND_TYPE=cluster), beside main counters of any kind: its hits are then
placed by slot and master as below, and a request's writes to both go out concurrently all the same.

Redis Cluster (REDIS_TYPE=cluster, `ClusterCounters`): the targets are slots instead of shards. Upstream's
keys carry no hash tag, so each counter is on the slot of its own key, and one script (which in a cluster
may only touch one slot) counts the fixed-window keys of a slot; the slots of a request are grouped by the
master holding them and each master gets one pipelined write, concurrently (igw/redis_cluster.py follows
MOVED/ASK). Under STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT, counters on several slots take the read-then-write
path of counters spread over several Redis. While a slot migrates, Redis refuses a multi-key script whose keys
are not all on the node asked (TRYAGAIN, for as long as the migration lasts); the fixed-window hits of that
slot are then sent again one key per script, which the cluster serves wherever each key is (ASK followed),
as upstream's single-key commands are. That is exact for plain counting and for reads; under
STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT it is the read-then-write of counters on several Redis, as upstream.

Stopping increments (upstream's STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT), see `Increment`: the counters
of a request are read first, and when its hits would take any fixed-window counter over its limit, only
those counters get the hits. Upstream reads in one round trip and writes in a second; when the request's
fixed-window counters live on one Redis, one script here does both atomically (no request slips in
between), and only counters spread over several Redis need the two round trips.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import hiredis

from igw.redis_cluster import RedisCluster, key_slot
from igw.redis_conn import CommandRunner, RedisError
from ratelimit_svc.gcra import LUA, GcraResult, gcra

GCRA_SHA = hashlib.sha1(LUA.encode()).hexdigest()

# INCRBY + EXPIRE for every fixed-window key of a request in one command: the same effect as upstream's
# pipelined pairs, but one command to encode and one reply to parse on the request path, and the TTL is
# set only when the increment created the key (the script is atomic, so no key is left without one). A TTL
# that Redis refuses (out of its range) must not leave a counter that never expires: the key just created is
# deleted again and the script answers EXPIRE's error (a script's writes before an error are not undone).
# KEYS: counter keys. ARGV: hits_1, ttl_1, hits_2, ttl_2, ...  Returns the counts after increment.
FIXED_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local hits = tonumber(ARGV[2 * i - 1])
  local n = redis.call('INCRBY', key, hits)
  if n == hits then
    local set = redis.pcall('EXPIRE', key, ARGV[2 * i])
    if type(set) == 'table' and set.err then redis.call('DEL', key) return set end
  end
  out[i] = n
end
return out
"""
FIXED_SHA = hashlib.sha1(FIXED_LUA.encode()).hexdigest()

# The fixed-window keys of a request under STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT, in one atomic script: read
# every counter; when some counter plus its hits would exceed its limit, increment only those, otherwise all.
# ARGV[1] '1' reads without incrementing anything (a key of the request is already known over, or the first
# round of counters spread over several Redis). KEYS: counter keys. ARGV[1 + 3i - 2 ..]: hits_i, ttl_i,
# limit_i. Returns each counter after the call (unchanged when not incremented; 0 for a missing key, which
# a read does not create).
STOP_LUA = """
local read_only = ARGV[1] == '1'
local counts, over = {}, false
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', key) or '0')
  counts[i] = n
  if n + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i + 1]) then over = true end
end
if not read_only then
  for i, key in ipairs(KEYS) do
    local hits = tonumber(ARGV[3 * i - 1])
    if not over or counts[i] + hits > tonumber(ARGV[3 * i + 1]) then
      local n = redis.call('INCRBY', key, hits)
      if n == hits then
        local set = redis.pcall('EXPIRE', key, ARGV[3 * i])
        if type(set) == 'table' and set.err then redis.call('DEL', key) return set end
      end
      counts[i] = n
    end
  end
end
return counts
"""
STOP_SHA = hashlib.sha1(STOP_LUA.encode()).hexdigest()
SCRIPTS = (LUA, FIXED_LUA, STOP_LUA)  # what a Redis that answers NOSCRIPT gets loaded


class Increment(enum.Enum):
    """Which fixed-window counters of a request get its hits. GCRA buckets are always applied as usual: a
    denial leaves a bucket as it was, so there is nothing to stop."""

    ALL = "all"
    # STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT: when the hits would take some counters over their limit,
    # only those (the request is refused anyway, it should not use up the others); otherwise all.
    ONLY_OVER = "only_over"
    # The same setting when a key of the request is already known over (local cache): none; the counters
    # are only read, for the statuses.
    NONE = "none"


@dataclass(slots=True)
class Hit:
    key: str  # fixed window: includes the window start; gcra: the bucket key
    hits: int
    algorithm: str  # "fixed_window" or "gcra"
    ttl: int = 0  # fixed window: seconds the counter lives
    interval_ms: float = 0.0  # gcra: window / limit
    burst: int = 0  # gcra: bucket size in hits
    group: str = ""  # what picks the Redis shard: domain and the descriptor's first entry
    limit: int = 0  # fixed window: the limit in force (Increment.ONLY_OVER compares against it)
    per_second: bool = False  # a limit of unit second: counted on the per-second Redis when there is one


Counted = int | GcraResult  # fixed window: the counter after the increment


class PartialCount(RedisError):
    """Some shards counted and one did not: `results` has None for the hits that were not counted, so
    fail-open can still enforce the counted ones."""

    def __init__(self, message: str, results: list[Counted | None]) -> None:
        super().__init__(message)
        self.results = results


def _gathered(count: int, groups: list[list[int]], parts: list[list[Counted] | BaseException],
              whats: list[str]) -> list[Counted]:
    """The results of hits sent in groups (hit indexes per group, in send order) from each group's part;
    PartialCount when a part is a RedisError, with None for its hits, named by that group's `whats` entry."""
    results: list[Counted | None] = [None] * count
    failure: tuple[str, BaseException] | None = None
    for indexes, part, what in zip(groups, parts, whats, strict=True):
        if isinstance(part, BaseException):
            failure = failure or (what, part)
            continue
        for i, value in zip(indexes, part, strict=True):
            results[i] = value
    if failure is not None:
        what, exc = failure
        if not isinstance(exc, RedisError):
            raise exc
        raise PartialCount(f"{what}: {exc}", results)
    return results  # type: ignore[return-value]


def shard_of(group: str, shards: int) -> int:
    return zlib.crc32(group.encode()) % shards


# Where a kind of counter lives: Redis shards (one, or REDIS_SHARDS; a sentinel-managed master is one too), or
# a Redis Cluster. The main store holds every counter but those of unit=second when there is a per-second one.
Store = tuple[CommandRunner, ...] | RedisCluster
MAIN, PER_SECOND = 0, 1
# A hit's target: (store, where in it): the shard's index, or in a cluster the key's slot.
Target = tuple[int, int]


class RedisCounters:
    """Counters on Redis shards (REDIS_TYPE single or sentinel), the per-second ones on their own Redis or
    Redis Cluster when there is one (REDIS_PERSECOND)."""

    def __init__(self, *shards: CommandRunner, per_second: CommandRunner | RedisCluster | None = None) -> None:
        if not shards:
            raise ValueError("RedisCounters needs at least one Redis")
        self._place(shards, per_second)

    def _place(self, main: Store, per_second: CommandRunner | RedisCluster | None) -> None:
        """Every combination of main and per-second store goes through the same targets, so a request
        with counters on both writes to each concurrently, whatever kind each is."""
        self.shards = main if isinstance(main, tuple) else ()
        self.per_second = per_second
        stores: list[Store] = [main]
        if per_second is not None:
            stores.append(per_second if isinstance(per_second, RedisCluster) else (per_second,))
        self.stores: tuple[Store, ...] = tuple(stores)
        # The Redis connections that are not a cluster's (tests close them between event loops).
        self.targets: tuple[CommandRunner, ...] = tuple(
            runner for store in self.stores if isinstance(store, tuple) for runner in store)
        # One Redis and nothing else: every call goes straight to it, with no placing at all.
        self._sole = self.targets[0] if len(self.targets) == 1 and len(self.stores) == 1 else None

    def _target_of(self, hit: Hit) -> Target:
        store = PER_SECOND if hit.per_second and len(self.stores) > 1 else MAIN
        where = self.stores[store]
        if isinstance(where, RedisCluster):
            return store, key_slot(hit.key)
        return store, 0 if len(where) == 1 else shard_of(hit.group, len(where))

    async def apply(self, hits: list[Hit], increment: Increment = Increment.ALL) -> list[Counted]:
        if self._sole is not None:
            return await self._apply_on(self._sole, hits, increment)
        placed: dict[Target, list[int]] = {}
        for i, hit in enumerate(hits):
            placed.setdefault(self._target_of(hit), []).append(i)
        if len(placed) == 1:
            ((store, index),) = placed
            where = self.stores[store]
            if isinstance(where, tuple):
                return await self._apply_on(where[index], hits, increment)
        if increment is Increment.ONLY_OVER:
            fixed_on = {t for t, indexes in placed.items() if any(hits[i].algorithm != "gcra" for i in indexes)}
            if len(fixed_on) > 1:  # several Redis, or several slots (one script cannot span slots: CROSSSLOT)
                return await self._only_over_across(hits, placed)
        # NONE is decided by each Redis alone (read only), and so is ONLY_OVER when one Redis (one slot) holds
        # every fixed-window counter of the request.
        return await self._spread(hits, placed, increment)

    async def _spread(self, hits: list[Hit], placed: dict[Target, list[int]],
                      increment: Increment) -> list[Counted]:
        """One pipelined write to each Redis, concurrently: a shard, or a cluster master with every slot of the
        request it holds. A Redis that fails leaves None for its hits (PartialCount), so fail-open can still
        enforce the ones counted elsewhere."""
        by_redis: dict[tuple[int, int | str | None], list[Target]] = {}
        for target in placed:
            store, index = target
            where = self.stores[store]
            redis = (store, where.node_of(index)) if isinstance(where, RedisCluster) else target
            by_redis.setdefault(redis, []).append(target)
        groups: list[list[int]] = []
        whats: list[str] = []
        calls = []
        for (store, node), targets in by_redis.items():
            where = self.stores[store]
            groups.append([i for target in targets for i in placed[target]])
            slot_hits = [[hits[i] for i in placed[target]] for target in targets]
            kind = "per-second " if store == PER_SECOND else ""
            if isinstance(where, RedisCluster):
                whats.append(f"a {kind}redis cluster node failed")
                calls.append(self._apply_on_node(where, node, [slot for _, slot in targets],  # type: ignore[arg-type]
                                                 slot_hits, increment))
            else:
                whats.append("the per-second redis failed" if kind else "a counter shard failed")
                calls.append(self._apply_on(where[node], slot_hits[0], increment))  # type: ignore[index]
        parts = await asyncio.gather(*calls, return_exceptions=True)
        return _gathered(len(hits), groups, parts, whats)

    async def _only_over_across(self, hits: list[Hit], placed: dict[Target, list[int]]) -> list[Counted]:
        """Increment.ONLY_OVER with fixed-window counters on several Redis (or slots): read them all (one round
        trip to each, concurrently), decide, then write, as upstream does. A request in between can be counted
        in the read of one and not the other; upstream has the same window.

        A Redis whose read fails is left out of the rest: the decision is made among the counters that were
        read and only the Redis that answered are written to, then PartialCount names the hits left without a
        count, so --fail-open still enforces the limits of the Redis that answer (as without the setting)."""
        fixed = [i for i, hit in enumerate(hits) if hit.algorithm != "gcra"]
        read_placed: dict[Target, list[int]] = {}
        for j, i in enumerate(fixed):
            read_placed.setdefault(self._target_of(hits[i]), []).append(j)
        failure: PartialCount | None = None
        current: Sequence[Counted | None]
        try:
            current = await self._spread([hits[i] for i in fixed], read_placed, Increment.NONE)
        except PartialCount as exc:
            failure, current = exc, exc.results
        counts = {i: value for i, value in zip(fixed, current, strict=True) if value is not None}
        down = {self._target_of(hits[i]) for i in fixed if i not in counts}
        over = {i for i, value in counts.items() if value + hits[i].hits > hits[i].limit}  # type: ignore[operator]
        written = [i for i, hit in enumerate(hits) if self._target_of(hit) not in down
                   and (hit.algorithm == "gcra" or not over or i in over)]
        results: list[Counted | None] = [counts.get(i) for i in range(len(hits))]
        if written:
            write_placed: dict[Target, list[int]] = {}
            for j, i in enumerate(written):
                write_placed.setdefault(self._target_of(hits[i]), []).append(j)
            try:
                done: Sequence[Counted | None] = await self._spread(
                    [hits[i] for i in written], write_placed, Increment.ALL)
            except PartialCount as exc:
                failure, done = failure or exc, exc.results
            for i, value in zip(written, done, strict=True):
                results[i] = value
        if failure is not None:
            raise PartialCount(str(failure), results)
        return results  # type: ignore[return-value]

    @staticmethod
    async def _apply_on(redis: CommandRunner, hits: list[Hit], increment: Increment = Increment.ALL) -> list[Counted]:
        commands, has_fixed = _commands(hits, increment)
        replies = await redis.execute_many(commands)  # type: ignore[arg-type]
        missing = [i for i, reply in enumerate(replies)
                   if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")]
        if missing:  # a Redis that restarted or flushed its scripts: load them, re-send only what did not run
            await redis.execute_many([("SCRIPT", "LOAD", script) for script in SCRIPTS])
            for i, reply in zip(missing, await redis.execute_many([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        return _counted(hits, replies, has_fixed)

    async def _apply_on_node(self, cluster: RedisCluster, node: str | None, slots: list[int],
                             slot_hits: list[list[Hit]], increment: Increment) -> list[Counted]:
        """Every slot's commands in one write to the master `node` of `cluster`; the results in slot order."""
        if node is None:
            cluster.refresh_soon()
            raise RedisError(f"no {cluster.label} node serves slot {slots[0]} (the cluster map is empty or "
                             f"incomplete: {cluster.last_error or 'slot not assigned'})")
        commands: list[tuple[object, ...]] = []
        spans: list[tuple[int, int, bool]] = []
        for hits in slot_hits:
            slot_commands, has_fixed = _commands(hits, increment)
            spans.append((len(commands), len(slot_commands), has_fixed))
            commands += slot_commands
        replies = await cluster.execute_many(node, commands)  # type: ignore[arg-type]
        # A slot being migrated: its fixed-window script (the last command of the slot, the only one with
        # several keys) is refused with TRYAGAIN; its GCRA commands have one key each and already ran.
        refused = [k for k, (start, length, has_fixed) in enumerate(spans)
                   if has_fixed and _is_tryagain(replies[start + length - 1])]
        if refused:
            redone = await self._key_by_key(
                cluster, [(slots[k], [hit for hit in slot_hits[k] if hit.algorithm != "gcra"]) for k in refused],
                increment)
            for k, counts in zip(refused, redone, strict=True):
                start, length, _ = spans[k]
                replies[start + length - 1] = counts
        results: list[Counted] = []
        for hits, (start, length, has_fixed) in zip(slot_hits, spans, strict=True):
            results += _counted(hits, replies[start:start + length], has_fixed)
        return results

    async def _key_by_key(self, cluster: RedisCluster, slot_hits: list[tuple[int, list[Hit]]],
                          increment: Increment) -> list[list[int]]:
        """The counts of fixed-window hits whose slot refused their multi-key script, one key per script,
        sent to the slot's master (which serves the keys it still has and answers ASK for the others). Each
        key is counted atomically, as upstream's INCRBY + EXPIRE; under Increment.ONLY_OVER every counter is
        read first and only then are the chosen ones written, as upstream and as counters on several Redis.
        RedisError when a key is refused even alone."""
        if increment is Increment.ONLY_OVER:
            current = await self._key_by_key(cluster, slot_hits, Increment.NONE)
            over = [[j for j, (hit, count) in enumerate(zip(hits, counts, strict=True)) if count + hit.hits > hit.limit]
                    for (_, hits), counts in zip(slot_hits, current, strict=True)]
            picked = over if any(over) else [list(range(len(hits))) for _, hits in slot_hits]
            written = await self._key_by_key(
                cluster, [(slot, [hits[j] for j in js]) for (slot, hits), js in zip(slot_hits, picked, strict=True)],
                Increment.ALL)
            for counts, js, done in zip(current, picked, written, strict=True):
                for j, count in zip(js, done, strict=True):
                    counts[j] = count
            return current
        by_node: dict[str, list[int]] = {}
        for k, (slot, hits) in enumerate(slot_hits):
            if not hits:
                continue
            node = cluster.node_of(slot)
            if node is None:
                raise RedisError(f"no {cluster.label} node serves slot {slot} any more (it was being migrated)")
            by_node.setdefault(node, []).append(k)

        async def on(node: str, ks: list[int]) -> list[object]:
            return await cluster.execute_many(node, [_single_key(hit, increment)  # type: ignore[misc]
                                                     for k in ks for hit in slot_hits[k][1]])

        parts = await asyncio.gather(*(on(node, ks) for node, ks in by_node.items()))
        counts: list[list[int]] = [[] for _ in slot_hits]
        for ks, replies in zip(by_node.values(), parts, strict=True):
            flat = iter(replies)
            for k in ks:
                for _ in slot_hits[k][1]:
                    reply = next(flat)
                    if isinstance(reply, hiredis.ReplyError):
                        raise RedisError(f"redis rejected a counter update: {reply}")
                    counts[k].append(reply[0])  # type: ignore[index]
        return counts


def _commands(hits: list[Hit], increment: Increment) -> tuple[list[tuple[object, ...]], bool]:
    """The commands that count `hits` on one Redis (or one cluster slot): an EVALSHA per GCRA bucket, then
    one for every fixed-window key together; and whether that last one is there."""
    commands: list[tuple[object, ...]] = []
    fixed_keys: list[str] = []
    fixed_args: list[int] = []
    for hit in hits:
        if hit.algorithm == "gcra":
            commands.append(("EVALSHA", GCRA_SHA, 1, hit.key, repr(hit.interval_ms), hit.burst, hit.hits))
        elif increment is Increment.ALL:
            fixed_keys.append(hit.key)
            fixed_args += (hit.hits, hit.ttl)
        else:
            fixed_keys.append(hit.key)
            fixed_args += (hit.hits, hit.ttl, hit.limit)
    if fixed_keys:
        if increment is Increment.ALL:
            commands.append(("EVALSHA", FIXED_SHA, len(fixed_keys), *fixed_keys, *fixed_args))
        else:
            read_only = 1 if increment is Increment.NONE else 0
            commands.append(("EVALSHA", STOP_SHA, len(fixed_keys), *fixed_keys, read_only, *fixed_args))
    return commands, bool(fixed_keys)


def _is_tryagain(reply: object) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("TRYAGAIN")


def _single_key(hit: Hit, increment: Increment) -> tuple[object, ...]:
    """The fixed-window script of `_commands` for one key: Increment.ALL counts, Increment.NONE reads."""
    if increment is Increment.ALL:
        return ("EVALSHA", FIXED_SHA, 1, hit.key, hit.hits, hit.ttl)
    return ("EVALSHA", STOP_SHA, 1, hit.key, 1, hit.hits, hit.ttl, hit.limit)


def _counted(hits: list[Hit], replies: list[object], has_fixed: bool) -> list[Counted]:
    """`hits` counted from the replies of their `_commands`; RedisError if Redis refused one."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(f"redis rejected a counter update: {reply}")
    fixed_counts = iter(replies[-1]) if has_fixed else iter(())  # type: ignore[call-overload]
    gcra_replies = iter(replies)
    results: list[Counted] = []
    for hit in hits:
        if hit.algorithm == "gcra":
            allowed, remaining, wait = next(gcra_replies)  # type: ignore[misc]
            results.append(GcraResult(allowed == 1, 0, remaining, wait))
        else:
            results.append(next(fixed_counts))
    return results


class ClusterCounters(RedisCounters):
    """Counters in a Redis Cluster (REDIS_TYPE=cluster). A hit's target is its key's slot (the multi-key
    scripts need their keys in one slot, and upstream's keys carry no hash tag, so each key is on its own);
    the slots of a request are then grouped by the master that holds them, and each master gets one
    pipelined write, concurrently, as shards do. The per-second counters go to their own Redis or Redis
    Cluster when there is one."""

    def __init__(self, cluster: RedisCluster, per_second: CommandRunner | RedisCluster | None = None) -> None:
        self.cluster = cluster
        self._place(cluster, per_second)


class MemoryCounters:
    """Counters in this process only: exact for one instance, not shared between replicas."""

    def __init__(self) -> None:
        self.fixed: dict[str, tuple[int, float]] = {}
        self.tats: dict[str, float] = {}
        self._next_sweep = 0.0

    async def apply(self, hits: list[Hit], increment: Increment = Increment.ALL) -> list[Counted]:
        now = time.time()
        if now > self._next_sweep:
            self._sweep(now)
        counted = self._incremented(hits, increment, now)
        results: list[Counted] = []
        for hit in hits:
            if hit.algorithm == "gcra":
                result = gcra(self.tats.get(hit.key), now * 1000, hit.interval_ms, hit.burst, hit.hits)
                if result.allowed and hit.hits:
                    self.tats[hit.key] = result.tat_ms
                results.append(result)
            else:
                count, expires = self.fixed.get(hit.key, (0, now + hit.ttl))
                if counted is None or hit.key in counted:
                    count += hit.hits
                    self.fixed[hit.key] = (count, expires)
                results.append(count)
        return results

    def _incremented(self, hits: list[Hit], increment: Increment, now: float) -> set[str] | None:
        """The fixed-window keys that get their hits (None: all), by the same rule as the Redis script."""
        if increment is Increment.ALL:
            return None
        if increment is Increment.NONE:
            return set()
        current = {hit.key: self.fixed.get(hit.key, (0, now))[0] for hit in hits if hit.algorithm != "gcra"}
        over = {hit.key for hit in hits if hit.algorithm != "gcra" and current[hit.key] + hit.hits > hit.limit}
        return over or None

    def _sweep(self, now: float) -> None:
        self.fixed = {k: v for k, v in self.fixed.items() if v[1] > now}
        now_ms = int(now * 1000)
        self.tats = {k: v for k, v in self.tats.items() if v > now_ms}
        self._next_sweep = now + 1.0
