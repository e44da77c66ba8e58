"""How RLQS server replicas share a bucket's budget through Redis, and what they assume while Redis is
down: the other replicas' gateways still count as last seen, so together they stay within the budget."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis

from igw.procs import RedisServer
from ratelimit_svc.rlqs import DEMAND_PREFIX, QuotaServer


def test_other_replicas_gateways_keep_counting_while_redis_is_down(own_redis: RedisServer) -> None:
    key = "igw|tenant=acme|model=llama"
    other = redis.Redis(port=own_redis.port)
    other.hset(DEMAND_PREFIX + key, "gateway-on-replica-2", f"40.000:{time.time():.3f}")  # what replica 2 publishes

    async def run() -> tuple[dict[str, float], dict[str, float]]:
        server = QuotaServer(None, own_redis.url)  # type: ignore[arg-type]  # budgets are not used here
        seen = (await server._global_demands([key], time.time()))[key]
        os.kill(own_redis.pid, signal.SIGSTOP)
        during_outage = (await server._global_demands([key], time.time()))[key]
        await server.close()
        return seen, during_outage

    seen, during_outage = asyncio.run(run())
    assert seen == {"gateway-on-replica-2": 40.0}
    assert during_outage == {"gateway-on-replica-2": 40.0}
    other.close()
