"""gRPC and HTTP wiring of the rate-limit service: the servicer, health, Redis probe, config watcher."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import Gauge

from igw.redis_cluster import RedisCluster
from igw.redis_conn import PipelinedRedis, RedisError, parse_redis_url
from igw.redis_sentinel import SentinelRedis
from igw.service_runtime import AioBackend, ServiceRuntime, max_connection_age_options
from ratelimit_svc import metrics, upstream_prometheus
from ratelimit_svc.adaptive import AdaptiveLimits
from ratelimit_svc.counters import SCRIPTS, ClusterCounters, MemoryCounters, RedisCounters
from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.rlqs import QuotaBudgets, QuotaServer
from ratelimit_svc.service import InvalidRequest, Limiter, NoConfig
from ratelimit_svc.settings import Settings
from ratelimit_svc.statsd import StatsdFlusher

log = logging.getLogger("ratelimit_svc")

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"
HEALTH_NAMES = (SERVICE_NAME, "envoy.service.rate_limit_quota.v3.RateLimitQuotaService")


@functools.cache
def _persecond_up() -> Gauge:
    """Registered only with a per-second Redis, so the metric's absence says there is none."""
    return Gauge("ratelimit_redis_persecond_up", "1 when the last health probe of the per-second Redis "
                 "(REDIS_PERSECOND) succeeded")


def _shown(redis: PipelinedRedis | SentinelRedis, per_second: bool = False) -> str:
    """A Redis as /healthcheck and the logs name it: the URL without its password (a sentinel-managed
    master: its name, where it is, its sentinels and what is wrong)."""
    if isinstance(redis, SentinelRedis):
        return f"per-second {redis.shown()}" if per_second else redis.shown()
    address = redis.address
    if address.password:
        address = dataclasses.replace(address, password="***")
    return f"per-second {address.url}" if per_second else address.url


def _masked(url: str) -> str:
    address = parse_redis_url(url)
    return dataclasses.replace(address, password="***").url if address.password else address.url


def _cluster_down(cluster: RedisCluster, masters: dict[str, bool]) -> str:
    """What /healthcheck says about a cluster (by its label: the main or the per-second one): "" when every
    master of the map answered a PING."""
    if not masters:
        seeds = ", ".join(f"{seed.host}:{seed.port}" for seed in cluster.seeds)
        return f"{cluster.label} (seeds {seeds}): {cluster.last_error or 'slot map not read yet'}"
    down = [cluster.shown(name) for name, ok in masters.items() if not ok]
    if down:
        return f"{cluster.label} node(s) {', '.join(down)}"
    return "" if cluster.complete else f"{cluster.label}: {cluster.last_error}"


def _cluster_shown(seeds: tuple[str, ...]) -> str:
    """A cluster in the startup log line: its seeds, passwords masked."""
    return "cluster:" + ",".join(_masked(seed) for seed in seeds)


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
            upstream_prometheus.CALLS.no_config += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except RedisError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate limit backend unavailable: {exc}")
        raise AssertionError("unreachable")


class TimedRateLimitServicer(RateLimitServicer):
    """With USE_PROMETHEUS or statsd: also upstream's per-call stats (total_requests, response_time), which its
    gRPC interceptor counts for every call, failed ones too. A subclass, so that without it the calls cost
    nothing."""

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        calls = upstream_prometheus.CALLS
        calls.requests += 1
        start = time.perf_counter()
        try:
            return await super().ShouldRateLimit(request, context)
        finally:
            calls.observe(time.perf_counter() - start)


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    holder = ConfigHolder(settings.config_dir, merge_domains=settings.merge_domains,
                          ignore_dotfiles=settings.ignore_dotfiles)
    for warning in settings.upstream_warnings:
        log.warning("%s", warning)
    if not settings.force_start_without_initial_config:
        holder.reload()  # as upstream, which waits for its first config event (files send theirs at once)
    # Chosen here, once: a single Redis stays a bare PipelinedRedis, and only sentinel mode pays for the
    # indirection that follows failovers.
    shards: list[PipelinedRedis | SentinelRedis] = [
        PipelinedRedis(url, timeout=settings.redis_timeout, connect_timeout=settings.redis_timeout)
        for url in settings.redis_shards]
    sentinels: list[SentinelRedis] = []
    if settings.redis_sentinel is not None and settings.backend == "redis":
        sentinels.append(SentinelRedis(settings.redis_sentinel, timeout=settings.redis_timeout,
                                       connect_timeout=settings.redis_timeout))
        shards = [sentinels[0]]
    per_second: PipelinedRedis | SentinelRedis | None = None
    if settings.backend == "redis" and settings.redis_persecond_sentinel is not None:
        per_second = SentinelRedis(settings.redis_persecond_sentinel, timeout=settings.redis_persecond_timeout,
                                   connect_timeout=settings.redis_persecond_timeout)
        sentinels.append(per_second)
    elif settings.redis_persecond_url and settings.backend == "redis":
        per_second = PipelinedRedis(settings.redis_persecond_url, timeout=settings.redis_persecond_timeout,
                                    connect_timeout=settings.redis_persecond_timeout)
    cluster = (RedisCluster(settings.redis_cluster, timeout=settings.redis_timeout,
                            connect_timeout=settings.redis_timeout, scripts=SCRIPTS)
               if settings.redis_type == "cluster" and settings.backend == "redis" else None)
    # REDIS_PERSECOND_TYPE=cluster: the same cluster client, on the per-second cluster's seeds.
    persecond_cluster = (RedisCluster(settings.redis_persecond_cluster, timeout=settings.redis_persecond_timeout,
                                      connect_timeout=settings.redis_persecond_timeout, scripts=SCRIPTS,
                                      label="per-second redis cluster")
                         if settings.redis_persecond_cluster and settings.backend == "redis" else None)
    clusters = [each for each in (cluster, persecond_cluster) if each is not None]
    counters: RedisCounters | MemoryCounters
    if settings.backend == "memory":
        counters = MemoryCounters()
    elif cluster is not None:
        counters = ClusterCounters(cluster, per_second=persecond_cluster or per_second)
    else:
        # A SentinelRedis is a CommandRunner, as a PipelinedRedis is: the counters take either.
        counters = RedisCounters(*shards, per_second=persecond_cluster or per_second)
    for each in clusters:
        try:
            await each.refresh()
        except RedisError as exc:  # as a single Redis that is down: start unhealthy, the probe keeps trying
            log.warning("%s: cannot read the slot map yet: %s", each.label, exc)
    for sentinel in sentinels:
        try:
            await sentinel.discover()
        except RedisError as exc:  # as a single Redis that is down: start unhealthy, the probe keeps asking
            log.warning("redis sentinel: cannot find the master yet: %s", exc)
    state_url = settings.state_redis
    if state_url is None:
        log.warning("REDIS_TYPE=cluster without IGW_STATE_REDIS_URL (--state-redis-url): replica counts and "
                    "quota-push demand are not shared, so adaptive limits stay at their min and RLQS demand is "
                    "not shared between replicas of this service")
    adaptive = AdaptiveLimits(state_url, max_age=settings.replica_max_age)
    limiter = Limiter(settings, holder, counters, adaptive=adaptive)

    tls = settings.grpc_tls
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_concurrent_streams", 1000),
                 *max_connection_age_options(settings.grpc_max_connection_age, settings.grpc_max_connection_age_grace)],
        interceptors=tls.interceptors(log) if tls else None,
    )
    timed = settings.prometheus is not None or settings.statsd is not None
    servicer = TimedRateLimitServicer if timed else RateLimitServicer
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer(limiter), server)
    quota = QuotaServer(QuotaBudgets(holder, adaptive), state_url)
    rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(quota, server)
    holder.listeners.append(quota.wake)
    adaptive.listeners.append(quota.wake)
    backend = AioBackend(server, tls.credentials(log) if tls else None, settings.grpc_uds)
    runtime = ServiceRuntime(backend, HEALTH_NAMES, log)
    probed = [*shards, per_second] if per_second is not None else shards
    # What /healthcheck names, in this order: the main cluster, the shards, the per-second Redis or cluster.
    redis_down: list[str] = [_shown(redis, redis is per_second) for redis in probed]
    if cluster is not None:
        redis_down.insert(0, _cluster_down(cluster, {}))
    if persecond_cluster is not None:
        redis_down.append(_cluster_down(persecond_cluster, {}))
    need_a_domain = settings.healthy_with_at_least_one_config_loaded

    async def health_state() -> tuple[bool, str]:
        if (why := holder.unhealthy_reason(need_a_domain=need_a_domain)) is not None:
            return False, why
        if redis_down and settings.backend == "redis":
            return False, f"redis unreachable: {', '.join(redis_down)}"
        return True, "OK"

    if not await runtime.start(settings.host, settings.grpc_port, settings.http_port, health_state):
        return 1
    upstream_http: asyncio.Server | None = None
    if (prom := settings.prometheus) is not None:
        upstream_http = await upstream_prometheus.start(prom.host, prom.port, prom.path, log)
        if upstream_http is None:
            await runtime.stop()
            return 1

    async def probe_redis() -> None:
        nonlocal redis_down
        while not stop.is_set():
            *maps, up = await asyncio.gather(*(each.ping_all() for each in clusters),
                                             asyncio.gather(*(redis.ping() for redis in probed)))
            cluster_down = {each: _cluster_down(each, masters) for each, masters in zip(clusters, maps, strict=True)}
            down = [_shown(redis, redis is per_second) for redis, ok in zip(probed, up, strict=True) if not ok]
            if cluster is not None:
                if main_down := cluster_down[cluster]:
                    down.insert(0, main_down)
                metrics.REDIS_UP.set(0 if main_down else 1)
            else:
                metrics.REDIS_UP.set(1 if all(up[:len(shards)]) else 0)
            if persecond_cluster is not None:
                if persecond_down := cluster_down[persecond_cluster]:
                    down.append(persecond_down)
                _persecond_up().set(0 if persecond_down else 1)
            elif per_second is not None:
                _persecond_up().set(1 if up[-1] else 0)
            redis_down = down
            await runtime.set_serving((not redis_down or settings.backend == "memory")
                                      and holder.unhealthy_reason(need_a_domain=need_a_domain) is None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    watch = holder.watch(settings.poll_interval, stop, load_first=settings.force_start_without_initial_config)
    for work in (watch, probe_redis(), adaptive.run(stop), quota.run(stop)):
        runtime.spawn(work)
    flusher: StatsdFlusher | None = None
    if settings.statsd is not None:
        flusher = StatsdFlusher(settings.statsd, log)
        flusher.start(stop)  # not runtime.spawn: cancelled mid-flush, it would lose the counts it had taken
        log.info("statsd: upstream's stats to %s:%d over %s every %gs%s", settings.statsd.host, settings.statsd.port,
                 settings.statsd.protocol, settings.statsd.flush_interval,
                 " (dogstatsd)" if settings.statsd.dogstatsd else "")
    log.info(
        "ratelimit_svc ready: grpc=%s http=%s:%d config_dir=%s redis=%s counters=%s persecond=%s local_cache=%dB "
        "pid=%d", runtime.address, settings.host, settings.http_port, settings.config_dir,
        (_masked(state_url) if isinstance(state_url, str) else f"sentinel:{state_url.master_name}") if state_url
        else "-",
        ",".join(_shown(shard) for shard in shards) if cluster is None else _cluster_shown(settings.redis_cluster),
        _shown(per_second) if per_second
        else _cluster_shown(settings.redis_persecond_cluster) if persecond_cluster else "-",
        settings.local_cache_size_bytes, os.getpid(),
    )
    await stop.wait()
    log.info("ratelimit_svc stopping")
    await runtime.stop()
    if flusher is not None:  # the flush under way, then what the last calls counted
        await flusher.finish()
    if upstream_http is not None:
        upstream_http.close()
    for redis in probed:
        redis.close()
    for each in clusters:
        each.close()
    await adaptive.close()
    await quota.close()
    return 0
