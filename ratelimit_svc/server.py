"""gRPC and HTTP wiring of the rate-limit service: the servicer, health, Redis probe, config watcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from igw.redis_conn import PipelinedRedis, RedisError
from igw.service_runtime import AioBackend, ServiceRuntime
from ratelimit_svc import metrics
from ratelimit_svc.adaptive import AdaptiveLimits
from ratelimit_svc.counters import MemoryCounters, RedisCounters
from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.rlqs import QuotaBudgets, QuotaServer
from ratelimit_svc.service import InvalidRequest, Limiter, NoConfig
from ratelimit_svc.settings import Settings

log = logging.getLogger("ratelimit_svc")

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"
HEALTH_NAMES = (SERVICE_NAME, "envoy.service.rate_limit_quota.v3.RateLimitQuotaService")


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        try:
            return await self.limiter.should_rate_limit(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NoConfig as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except RedisError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate limit backend unavailable: {exc}")
        raise AssertionError("unreachable")


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    holder = ConfigHolder(settings.config_dir, merge_domains=settings.merge_domains,
                          ignore_dotfiles=settings.ignore_dotfiles)
    holder.reload()
    shards = [PipelinedRedis(url, timeout=settings.redis_timeout, connect_timeout=settings.redis_timeout)
              for url in settings.redis_shards]
    adaptive = AdaptiveLimits(settings.redis_url, max_age=settings.replica_max_age)
    counters = MemoryCounters() if settings.backend == "memory" else RedisCounters(*shards)
    limiter = Limiter(settings, holder, counters, adaptive=adaptive)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_concurrent_streams", 1000)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter), server)
    quota = QuotaServer(QuotaBudgets(holder, adaptive), settings.redis_url)
    rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(quota, server)
    holder.listeners.append(quota.wake)
    adaptive.listeners.append(quota.wake)
    runtime = ServiceRuntime(AioBackend(server), HEALTH_NAMES, log)
    redis_down: list[str] = [shard.address.url for shard in shards]

    async def health_state() -> tuple[bool, str]:
        if holder.config is None:
            return False, f"no config loaded: {holder.last_error}"
        if redis_down and settings.backend == "redis":
            return False, f"redis unreachable: {', '.join(redis_down)}"
        return True, "OK"

    if not await runtime.start(settings.host, settings.grpc_port, settings.http_port, health_state):
        return 1

    async def probe_redis() -> None:
        nonlocal redis_down
        while not stop.is_set():
            up = await asyncio.gather(*(shard.ping() for shard in shards))
            redis_down = [shard.address.url for shard, ok in zip(shards, up, strict=True) if not ok]
            metrics.REDIS_UP.set(0 if redis_down else 1)
            await runtime.set_serving((not redis_down or settings.backend == "memory") and holder.config is not None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    for work in (holder.watch(settings.poll_interval, stop), probe_redis(), adaptive.run(stop), quota.run(stop)):
        runtime.spawn(work)
    log.info(
        "ratelimit_svc ready: grpc=%s http=%s:%d config_dir=%s redis=%s counters=%s local_cache=%dB pid=%d",
        runtime.address, settings.host, settings.http_port, settings.config_dir, settings.redis_url,
        ",".join(shard.address.url for shard in shards), settings.local_cache_size_bytes, os.getpid(),
    )
    await stop.wait()
    log.info("ratelimit_svc stopping")
    await runtime.stop()
    for shard in shards:
        shard.close()
    await adaptive.close()
    await quota.close()
    return 0
