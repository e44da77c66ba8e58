"""RedisCounters against a real redis-server: scripts that Redis lost are loaded again without counting
anything twice."""

from __future__ import annotations

import asyncio

import redis

from igw.redis_conn import PipelinedRedis
from ratelimit_svc.counters import FIXED_SHA, Hit, RedisCounters
from ratelimit_svc.gcra import LUA, GcraResult


def test_after_a_script_flush_each_hit_is_counted_once(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.script_flush()
    sync.script_load(LUA)  # Redis knows the GCRA script but not the fixed-window one
    hits = [Hit("bucket", 1, "gcra", interval_ms=1000.0, burst=10), Hit("window", 1, "fixed_window", ttl=60)]

    async def run() -> list[object]:
        client = PipelinedRedis(redis_url)
        try:
            return await RedisCounters(client).apply(hits)
        finally:
            client.close()

    gcra, fixed = asyncio.run(run())
    assert isinstance(gcra, GcraResult) and gcra.allowed and gcra.remaining == 9
    assert fixed == 1
    assert int(sync.get("window")) == 1
    assert sync.script_exists(FIXED_SHA) == [True]  # loaded again for the next calls
    sync.close()
