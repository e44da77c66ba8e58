"""Rate Limit Quota Service: push token buckets to gateways instead of answering every request.

Envoy's `rate_limit_quota` filter keeps one token bucket per bucket id, reports usage on a stream
(immediately for a new bucket, then every 5 s), and enforces whatever assignment the server last
pushed. This server computes each bucket's global budget from the same rate-limit config the RLS uses
(adaptive limits and tenant shares included), splits it between the gateways that report the bucket
(ratelimit_svc.quota_split), and pushes a new assignment to a gateway as soon as its slice changes:
on a replica change, a config reload, or a gateway joining or leaving, not only on the next report.
A stream that stops reporting (a frozen Envoy keeps its connection open) is closed and its slices go to
the others; a bucket without requests for a while is abandoned, in Envoy and here. Reports no Envoy
sends (no domain, invalid or too many bucket ids) end the stream with a status naming the problem.

Gateway streams live in this process's memory; demand per bucket and stream is kept in Redis
(`igw:rlqs:demand:<domain>|<bucket>` hashes with a TTL), so several server replicas see every gateway and
compute the same split. Each stream is one Envoy process (several gateway pods may share one config and
therefore one static `gw` bucket entry, so streams, not bucket ids, identify gateways).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from prometheus_client import Counter, Gauge

from igw.redis_sentinel import SentinelTarget, state_redis_client
from ratelimit_svc.adaptive import AdaptiveLimits
from ratelimit_svc.config import RateLimitConfig
from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.lookup import find_limit
from ratelimit_svc.quota_split import rate_per_second, split_budget, token_bucket, whole_tokens

log = logging.getLogger("ratelimit_svc.rlqs")

DEMAND_PREFIX = "igw:rlqs:demand:"
DEMAND_TTL = 30  # seconds a stream's demand stays visible to other server replicas
DEMAND_MAX_AGE = 15.0  # reports come every 5 s; three missed reports and the stream no longer counts
# Whole seconds (Envoy 1.40: unset means "expire now"). Also how long a dead server's last budgets stay
# enforced: Envoy 1.40 ignores expired_assignment_behavior reuse_last_assignment and opens an expired bucket.
ASSIGNMENT_TTL = 600
REFRESH_EVERY = 20.0  # re-send unchanged assignments well before their TTL runs out
STALE_AFTER = DEMAND_MAX_AGE  # a stream holding buckets that sent nothing for this long is a dead Envoy: closed
ABANDON_IDLE_AFTER = 300.0  # a bucket without a request for this long is abandoned (Envoy drops it)
MAX_BUCKETS_PER_STREAM = 10_000  # far above tenants x models; bounds what one stream can make us hold
MAX_BUCKET_ENTRIES = 8
MAX_BUCKET_ID_CHARS = 512  # keys and values together
DEMAND_SMOOTHING = 0.5  # weight of the newest report in a stream's demand estimate
FLOOR_FRACTION = 0.2  # share of a budget split evenly between the gateways that report the bucket
TENANT_KEY, MODEL_KEY, GATEWAY_KEY = "tenant", "model", "gw"

STREAMS = Gauge("rlqs_streams", "Open gateway streams on this server")
REPORTS = Counter("rlqs_reports", "Usage reports received")
PUSHES = Counter("rlqs_assignments_pushed", "Bucket assignments sent", ["reason"])
BUDGET = Gauge("rlqs_bucket_budget_per_second", "Global budget of a bucket", ["bucket"])

BucketKey = str
Assignment = tuple[str, int, int, int]  # (kind, max_tokens, tokens_per_fill, fill_interval_s)


def bucket_key(bucket_id: rlqs_pb2.BucketId) -> BucketKey:
    """The budget a bucket draws from: its entries without the gateway's own name, so the same tenant
    and model on every gateway share one budget."""
    return ",".join(f"{k}={v}" for k, v in sorted(bucket_id.bucket.items()) if k != GATEWAY_KEY)


def domain_bucket_key(domain: str, bucket_id: rlqs_pb2.BucketId) -> BucketKey:
    """The budget is the domain's: gateways of two domains with the same tenant and model draw from two
    budgets (and their demands must not be split together)."""
    return f"{domain}|{bucket_key(bucket_id)}"


class ReportError(Exception):
    """A report no Envoy would send: the stream is ended with this status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_bucket_id(bucket_id: rlqs_pb2.BucketId) -> str | None:
    """Why a bucket id is refused, or None. The proto requires one entry and non-empty keys and values
    (Envoy checks its config against that); the size limits keep one stream from making the server hold
    (and write to Redis) arbitrarily large ids."""
    entries = bucket_id.bucket
    if not entries:
        return "bucket_id has no entries"
    if any(not k or not v for k, v in entries.items()):
        return "bucket_id has an empty key or value"
    if len(entries) > MAX_BUCKET_ENTRIES:
        return f"bucket_id has {len(entries)} entries, at most {MAX_BUCKET_ENTRIES} are accepted"
    size = sum(len(k) + len(v) for k, v in entries.items())
    if size > MAX_BUCKET_ID_CHARS:
        return f"bucket_id has {size} characters, at most {MAX_BUCKET_ID_CHARS} are accepted"
    return None


def report_domain(current: str, report: rlqs_pb2.RateLimitQuotaUsageReports) -> str:
    """The stream's domain after this report. Without one the budgets cannot be looked up (every bucket would
    be unlimited), and a stream's buckets are keyed by one domain, so it may not change midway."""
    if not current:
        if not report.domain:
            raise ReportError(grpc.StatusCode.INVALID_ARGUMENT, "the first usage report has no domain")
        return report.domain
    if report.domain and report.domain != current:
        raise ReportError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"domain changed from {current!r} to {report.domain!r} within one stream")
    return current


def parse_demand(value: str) -> tuple[float, float] | None:
    """(demand per second, time reported) from a `<demand>:<time>` field, or None when it is not one: a
    value another replica (another version, a hand edit) wrote must cost its own entry, not every stream
    (NaN or infinity would turn every slice into NaN)."""
    demand, _, at = value.partition(":")
    try:
        parsed = float(demand), float(at)
    except ValueError:
        return None
    if not all(math.isfinite(v) and v >= 0 for v in parsed):
        return None
    return parsed


@dataclass
class BucketState:
    bucket_id: rlqs_pb2.BucketId
    demand: float = 0.0
    reported_at: float = 0.0
    active_at: float = 0.0  # last report with a request in it (or the bucket's first)


@dataclass
class GatewayStream:
    stream_id: str
    domain: str = ""
    buckets: dict[BucketKey, BucketState] = field(default_factory=dict)
    sent: dict[BucketKey, tuple[Assignment, float]] = field(default_factory=dict)
    outbox: asyncio.Queue[rlqs_pb2.RateLimitQuotaResponse] = field(default_factory=asyncio.Queue)
    last_report: float = field(default_factory=time.time)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set: the server closes the stream


class QuotaBudgets:
    """Global per-second budget of a bucket, from the rate-limit config the RLS serves."""

    def __init__(self, holder: ConfigHolder, adaptive: AdaptiveLimits | None) -> None:
        self.holder = holder
        self.adaptive = adaptive

    def budget(self, domain: str, entries: dict[str, str], now: float) -> float | None:
        """The tenant-on-model limit, capped by the tenant-wide and model-wide limits (each as if the
        other buckets were idle); None when no limit applies (the bucket is unlimited)."""
        config = self.holder.config
        if config is None:
            return None
        tenant, model = entries.get(TENANT_KEY), entries.get(MODEL_KEY)
        candidates: list[tuple[tuple[str, str], ...]] = []
        if tenant and model:
            candidates.append(((TENANT_KEY, tenant), (MODEL_KEY, model)))
        if tenant:
            candidates.append(((TENANT_KEY, tenant),))
        if model:
            candidates.append(((MODEL_KEY, model),))
        rates = [r for r in (self._rate(config, domain, c, now) for c in candidates) if r is not None]
        return min(rates) if rates else None

    def _rate(self, config: RateLimitConfig, domain: str, entries: tuple[tuple[str, str], ...],
              now: float) -> float | None:
        match = find_limit(config, domain, entries)
        if match is None or match.limit.unlimited or match.limit.shadow_mode:
            return None
        requests = match.limit.requests_per_unit
        if match.limit.adaptive is not None and self.adaptive is not None:
            requests = self.adaptive.effective_limit(domain, match, now, config)
        return rate_per_second(requests, match.limit.window_seconds)


def assignment_for(rate: float | None) -> Assignment:
    if rate is None:
        return ("allow", 0, 0, 0)
    bucket = token_bucket(rate)
    if bucket is None:
        return ("deny", 0, 0, 0)
    return ("tokens", bucket.max_tokens, bucket.tokens_per_fill, bucket.fill_interval_s)


def bucket_action(bucket_id: rlqs_pb2.BucketId, assignment: Assignment,
                  ttl_s: int = ASSIGNMENT_TTL) -> rlqs_pb2.RateLimitQuotaResponse.BucketAction:
    kind, max_tokens, per_fill, interval = assignment
    strategy = ratelimit_strategy_pb2.RateLimitStrategy()
    if kind == "allow":
        strategy.blanket_rule = ratelimit_strategy_pb2.RateLimitStrategy.ALLOW_ALL
    elif kind == "deny":
        strategy.blanket_rule = ratelimit_strategy_pb2.RateLimitStrategy.DENY_ALL
    else:
        strategy.token_bucket.CopyFrom(token_bucket_pb2.TokenBucket(
            max_tokens=max_tokens, tokens_per_fill=wrappers_pb2.UInt32Value(value=per_fill),
            fill_interval=duration_pb2.Duration(seconds=interval)))
    action = rlqs_pb2.RateLimitQuotaResponse.BucketAction(bucket_id=bucket_id)
    action.quota_assignment_action.assignment_time_to_live.CopyFrom(duration_pb2.Duration(seconds=ttl_s))
    action.quota_assignment_action.rate_limit_strategy.CopyFrom(strategy)
    return action


class QuotaServer(rlqs_pb2_grpc.RateLimitQuotaServiceServicer):
    def __init__(self, budgets: QuotaBudgets, redis_url: str | SentinelTarget | None,
                 floor_fraction: float = FLOOR_FRACTION, *, stale_after: float = STALE_AFTER,
                 abandon_idle_after: float = ABANDON_IDLE_AFTER,
                 max_buckets_per_stream: int = MAX_BUCKETS_PER_STREAM, assignment_ttl: int = ASSIGNMENT_TTL) -> None:
        """`redis_url` None: no state Redis, demand is this process's streams alone (not shared); a
        SentinelTarget: the master its sentinels name (REDIS_TYPE=sentinel)."""
        self.budgets = budgets
        self.floor_fraction = floor_fraction
        self.stale_after = stale_after
        self.abandon_idle_after = abandon_idle_after
        self.max_buckets_per_stream = max_buckets_per_stream
        self.assignment_ttl = assignment_ttl
        self.refresh_every = min(REFRESH_EVERY, assignment_ttl / 3)
        self.streams: dict[str, GatewayStream] = {}
        self.redis = (state_redis_client(redis_url, socket_timeout=1, socket_connect_timeout=1)
                      if redis_url is not None else None)
        self._wake = asyncio.Event()
        # Per bucket, the other server replicas' streams as last read from Redis: while Redis is down they
        # still count, so the replicas together stay within the budget instead of each handing out all of it.
        self._remote: dict[BucketKey, dict[str, float]] = {}
        self._gauged: set[BucketKey] = set()  # buckets with a BUDGET series, removed when no stream holds them

    # -- gRPC ---------------------------------------------------------------------------------

    async def StreamRateLimitQuotas(
        self, request_iterator: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rlqs_pb2.RateLimitQuotaResponse]:
        stream = GatewayStream(f"{context.peer()}/{uuid.uuid4().hex[:8]}")
        self.streams[stream.stream_id] = stream
        STREAMS.set(len(self.streams))
        log.info("gateway stream opened: %s", stream.stream_id)
        reader = asyncio.create_task(self._read(stream, request_iterator))
        ender = asyncio.create_task(stream.ended.wait())
        getter: asyncio.Task[rlqs_pb2.RateLimitQuotaResponse] | None = None
        try:
            while True:
                getter = asyncio.create_task(stream.outbox.get())
                done, _ = await asyncio.wait({getter, reader, ender}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not stream.outbox.empty():
                    yield stream.outbox.get_nowait()
                if not reader.done():  # ended by sweep(): a gateway alive after all reconnects and reports anew
                    log.info("gateway stream %s sent nothing for %.0f s: closing it", stream.stream_id,
                             self.stale_after)
                    return
                if isinstance(error := reader.exception(), ReportError):
                    log.warning("gateway stream %s refused: %s", stream.stream_id, error)
                    await context.abort(error.code, str(error))
                reader.result()  # re-raise anything else
                return
        finally:
            for task in (reader, ender, getter):
                if task is not None:
                    task.cancel()
            self.streams.pop(stream.stream_id, None)
            STREAMS.set(len(self.streams))
            await self._forget(stream)
            self._wake.set()  # the others' slices grow now
            log.info("gateway stream closed: %s", stream.stream_id)

    async def _read(self, stream: GatewayStream,
                    request_iterator: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports]) -> None:
        async for report in request_iterator:
            REPORTS.inc()
            now = time.time()
            stream.last_report = now
            stream.domain = report_domain(stream.domain, report)
            for usage in report.bucket_quota_usages:
                if (why := check_bucket_id(usage.bucket_id)) is not None:
                    raise ReportError(grpc.StatusCode.INVALID_ARGUMENT, f"{why}: {dict(usage.bucket_id.bucket)!r:.200}")
            new = False
            for usage in report.bucket_quota_usages:
                key = domain_bucket_key(stream.domain, usage.bucket_id)
                state = stream.buckets.get(key)
                new_bucket = state is None
                if state is None:
                    if len(stream.buckets) >= self.max_buckets_per_stream:
                        raise ReportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          f"more than {self.max_buckets_per_stream} buckets on one stream")
                    state = stream.buckets[key] = BucketState(usage.bucket_id, active_at=now)
                    new = True
                elapsed = usage.time_elapsed.seconds + usage.time_elapsed.nanos / 1e9
                count = usage.num_requests_allowed + usage.num_requests_denied
                if count:
                    state.active_at = now
                demand = count / elapsed if elapsed >= 0.5 else float(count)
                # Smoothed: two gateways' 5 s report windows never line up, and every shift of slices
                # lets the growing side spend its new rate while the shrinking side already spent its old.
                if not new_bucket:
                    demand = DEMAND_SMOOTHING * demand + (1 - DEMAND_SMOOTHING) * state.demand
                # Kept at the precision _publish_demand writes, so every server replica splits the same numbers.
                state.demand = round(demand, 3)
                state.reported_at = now
            await self._publish_demand(stream, now)
            # Every local gateway holding these buckets gets its new slice now, not at the next sweep:
            # otherwise one gateway's grown slice and another's shrunk one overlap for up to a second.
            await self.recompute(keys=set(stream.buckets), reason="new_bucket" if new else "report")

    # -- coordination -------------------------------------------------------------------------

    async def _publish_demand(self, stream: GatewayStream, now: float) -> None:
        if self.redis is None:
            return
        with contextlib.suppress(OSError, aioredis.RedisError):
            pipe = self.redis.pipeline(transaction=False)
            for key, state in stream.buckets.items():
                pipe.hset(DEMAND_PREFIX + key, stream.stream_id, f"{state.demand:.3f}:{now:.3f}")
                pipe.expire(DEMAND_PREFIX + key, DEMAND_TTL)
            await pipe.execute()

    async def _forget(self, stream: GatewayStream, keys: list[BucketKey] | None = None) -> None:
        if self.redis is None:
            return
        with contextlib.suppress(OSError, aioredis.RedisError):
            pipe = self.redis.pipeline(transaction=False)
            for key in stream.buckets if keys is None else keys:
                pipe.hdel(DEMAND_PREFIX + key, stream.stream_id)
            await pipe.execute()

    def _live(self) -> list[GatewayStream]:
        """Streams that count: one the server is closing no longer holds a slice, even before its closing ends."""
        return [s for s in self.streams.values() if not s.ended.is_set()]

    async def sweep(self, now: float) -> None:
        """Close the streams of Envoys that went silent, and abandon the buckets nobody uses.

        A stream whose Envoy froze or lost its network stays open on our side (no keepalive ends it),
        and would keep its slices forever; other server replicas already stop counting it after
        DEMAND_MAX_AGE. An idle bucket keeps its floor on every gateway that ever saw it, taken from the
        busy ones, and stays in Envoy's cache; abandoning it gives both back (a new request makes it anew)."""
        for stream in self._live():
            if stream.buckets and now - stream.last_report > self.stale_after:
                stream.ended.set()  # StreamRateLimitQuotas closes it and forgets its demand
                self._wake.set()
                continue
            idle = [k for k, st in stream.buckets.items() if now - st.active_at > self.abandon_idle_after]
            if not idle:
                continue
            response = rlqs_pb2.RateLimitQuotaResponse()
            for key in idle:
                action = response.bucket_action.add(bucket_id=stream.buckets.pop(key).bucket_id)
                action.abandon_action.SetInParent()
                stream.sent.pop(key, None)
            stream.outbox.put_nowait(response)
            PUSHES.labels("abandon").inc(len(idle))
            log.debug("abandon %s on %s (idle)", idle, stream.stream_id)
            await self._forget(stream, idle)
            self._wake.set()

    async def _global_demands(self, keys: list[BucketKey], now: float) -> dict[BucketKey, dict[str, float]]:
        """Demand of every stream (on any server replica) per bucket. While Redis is down: the local streams
        plus the other replicas' streams as last seen (an under-estimate of what is free, never an over-)."""
        local = {k: {s.stream_id: s.buckets[k].demand for s in self._live() if k in s.buckets} for k in keys}
        if self.redis is None:
            return local
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(DEMAND_PREFIX + key)
            replies = await pipe.execute()
        except (OSError, aioredis.RedisError):
            return {k: {**self._remote.get(k, {}), **local[k]} for k in keys}
        result: dict[BucketKey, dict[str, float]] = {}
        for key, raw in zip(keys, replies, strict=True):
            demands = dict(local[key])
            for sid, value in raw.items():
                sid = sid.decode() if isinstance(sid, bytes) else sid
                parsed = parse_demand(value.decode(errors="replace") if isinstance(value, bytes) else value)
                if sid not in demands and parsed is not None and now - parsed[1] <= DEMAND_MAX_AGE:
                    demands[sid] = parsed[0]
            result[key] = demands
            self._remote[key] = {sid: d for sid, d in demands.items() if sid not in local[key]}
        return result

    async def recompute(self, keys: set[BucketKey] | None = None, reason: str = "change") -> None:
        """Compute the slices of the given buckets (all by default) for every local gateway holding them
        and push the ones that changed, shrinking slices first so that the sum never overshoots."""
        now = time.time()
        targets = self._live()
        wanted = sorted({k for s in targets for k in s.buckets} if keys is None else keys)
        if keys is None:  # buckets no local stream holds any more: their series and other replicas' view go
            self._remote = {k: v for k, v in self._remote.items() if k in wanted}
            for key in self._gauged - set(wanted):
                with contextlib.suppress(KeyError):
                    BUDGET.remove(key)
            self._gauged &= set(wanted)
        if not wanted:
            return
        demands = await self._global_demands(wanted, now)
        pushes: list[tuple[float, GatewayStream, BucketKey, Assignment]] = []
        for key in wanted:
            holders = [s for s in targets if key in s.buckets]
            if not holders:
                continue
            entries = dict(holders[0].buckets[key].bucket_id.bucket)
            budget = self.budgets.budget(holders[0].domain, entries, now)
            BUDGET.labels(key).set(-1 if budget is None else budget)
            self._gauged.add(key)
            slices = self._slices(budget, demands[key])
            for stream in holders:
                rate = None if budget is None else slices.get(stream.stream_id, 0.0)
                previous = stream.sent.get(key)
                growth = (rate or 0.0) - (previous[0][2] / max(1, previous[0][3]) if previous else 0.0)
                pushes.append((growth, stream, key, assignment_for(rate)))
        for _, stream, key, assignment in sorted(pushes, key=lambda p: p[0]):
            self._send(stream, key, assignment, now, reason)

    def _slices(self, budget: float | None, demands: dict[str, float]) -> dict[str, float]:
        if budget is None:
            return {}
        shares = split_budget(budget, demands, self.floor_fraction)
        if budget >= len(shares) and budget == int(budget):
            whole = whole_tokens(shares, int(budget))
            # Rounding a floor of under one token to 0 would DENY_ALL an idle gateway: keep the exact shares
            # then (token_bucket meets each one or stays below it, so they still add up to the budget at most).
            if all(v >= 1 for k, v in whole.items() if shares[k] > 0):
                return {k: float(v) for k, v in whole.items()}
        return shares

    def _send(self, stream: GatewayStream, key: BucketKey, assignment: Assignment, now: float, reason: str) -> None:
        previous = stream.sent.get(key)
        if previous is not None and previous[0] == assignment and now - previous[1] < self.refresh_every:
            return
        response = rlqs_pb2.RateLimitQuotaResponse()
        response.bucket_action.append(bucket_action(stream.buckets[key].bucket_id, assignment, self.assignment_ttl))
        stream.outbox.put_nowait(response)
        stream.sent[key] = (assignment, now)
        log.debug("push %s to %s: %s (%s)", key, stream.stream_id, assignment, reason)
        PUSHES.labels(reason if previous is None or previous[0] != assignment else "refresh").inc()

    def wake(self) -> None:
        """Something a budget depends on changed (config reload, replica counts): recompute now."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Recompute at least every second (gateways on other replicas joining or leaving, TTL refresh),
        and at once when woken."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            try:
                await self.sweep(time.time())
                await self.recompute(reason="change")
            except Exception:  # keep the loop alive; the next round retries
                log.exception("quota recompute failed")

    async def close(self) -> None:
        if self.redis is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 1.0)
