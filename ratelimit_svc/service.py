"""ShouldRateLimit: the decision for one request, with all its counters in one Redis round trip.

The flow follows upstream: find a limit per descriptor, drop unlimited and replaced ones, count the rest
in Redis, derive each status (shadow mode turns OVER_LIMIT into OK after counting), then the overall
code (quota-mode descriptors only deny when all of them are over).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2

from igw.redis_conn import RedisError
from ratelimit_svc import metrics
from ratelimit_svc.adaptive import AdaptiveLimits
from ratelimit_svc.config import UNIT_SECONDS, UNITS, RateLimit, RateLimitConfig
from ratelimit_svc.counters import Counted, Hit, Increment, MemoryCounters, PartialCount, RedisCounters
from ratelimit_svc.gcra import GcraResult
from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.lookup import Match, counter_group, find_limit
from ratelimit_svc.over_limit_cache import OverLimitCache
from ratelimit_svc.response_metadata import response_metadata
from ratelimit_svc.settings import Settings
from ratelimit_svc.window import OK, OVER_LIMIT, gcra_outcome, outcome, seconds_until_reset, window_start

log = logging.getLogger("ratelimit_svc")

UINT32_MAX = 2**32 - 1
# A descriptor's hits_addend is a uint64, limits are uint32: any count above UINT32_MAX is over every limit,
# so larger ones are counted as this many. Counted as sent, they would overflow Redis's int64 counters
# (or lose digits in Lua) and turn a plain OVER_LIMIT into a backend error, which --fail-open answers OK.
HITS_CAP = UINT32_MAX + 1
SECOND = UNITS["SECOND"]  # limits of this unit count on the per-second Redis (REDIS_PERSECOND) when there is one
Response = rls_pb2.RateLimitResponse
DescriptorStatus = rls_pb2.RateLimitResponse.DescriptorStatus
RateLimitOverride = RateLimitDescriptor.RateLimitOverride


class InvalidRequest(ValueError):
    """The request is malformed; answered with INVALID_ARGUMENT."""


class NoConfig(RuntimeError):
    """No config has ever loaded; answered with UNAVAILABLE."""


class Limiter:
    def __init__(
        self,
        settings: Settings,
        holder: ConfigHolder,
        counters: RedisCounters | MemoryCounters,
        clock: Callable[[], float] = time.time,
        adaptive: AdaptiveLimits | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.holder = holder
        self.counters = counters
        self.clock = clock
        self.adaptive = adaptive
        self.monotonic = monotonic  # times the over-limit cache's entries: wall-clock steps do not stretch them
        self.local_cache = (OverLimitCache(settings.local_cache_size_bytes)
                            if settings.local_cache_size_bytes else None)
        self._jitter = settings.expiration_jitter_max_seconds
        self._prefix = settings.cache_key_prefix
        self._stop_when_over = settings.stop_cache_key_increment_when_overlimit

    async def should_rate_limit(self, request: rls_pb2.RateLimitRequest) -> Response:
        domain = request.domain
        if not domain:
            metrics.SERVICE_ERRORS.labels("empty_domain").inc()
            raise InvalidRequest("rate limit domain must not be empty")
        if not request.descriptors:
            metrics.SERVICE_ERRORS.labels("empty_descriptors").inc()
            raise InvalidRequest("rate limit descriptor list must not be empty")
        config = self.holder.config  # one reference for the whole call: reloads never split a request
        if config is None:
            raise NoConfig("no rate limit configuration loaded")

        request_hits = max(1, request.hits_addend)
        count = len(request.descriptors)
        matches: list[Match | None] = [None] * count
        hits_list = [request_hits] * count
        unlimited = [False] * count
        replaced_names: set[str] = set()
        for i, descriptor in enumerate(request.descriptors):
            entries = tuple([(e.key, e.value) for e in descriptor.entries])
            if not entries:
                metrics.SERVICE_ERRORS.labels("empty_entries").inc()
                raise InvalidRequest(f"descriptor {i} has no entries")
            for key, _ in entries:
                if not key:
                    metrics.SERVICE_ERRORS.labels("empty_key").inc()
                    raise InvalidRequest(f"descriptor {i} has an entry with an empty key")
            if descriptor.HasField("hits_addend"):
                hits_list[i] = min(descriptor.hits_addend.value, HITS_CAP)
            if descriptor.HasField("limit"):
                if descriptor.limit.unit not in UNIT_SECONDS:
                    metrics.SERVICE_ERRORS.labels("bad_override_unit").inc()
                    raise InvalidRequest(f"descriptor {i} has a limit override with unknown unit "
                                         f"{descriptor.limit.unit} (expected 1-7: SECOND to WEEK)")
                match = self._override(domain, entries, descriptor.limit)
                if domain not in config.domains:
                    metrics.DOMAIN_NOT_FOUND.labels(domain).inc()
                    match = None
            else:
                match = find_limit(config, domain, entries)
                if match is None and domain not in config.domains:
                    metrics.DOMAIN_NOT_FOUND.labels(domain).inc()
            if match is None:
                continue
            replaced_names.update(match.limit.replaces)  # an unlimited limit replaces others too, as upstream
            if match.limit.unlimited:
                unlimited[i] = True
                continue
            matches[i] = match
        if replaced_names:
            for i, match in enumerate(matches):
                if match is not None and match.limit.name in replaced_names:
                    matches[i] = None

        wall = self.clock()
        # Statuses are filled in place in the response (building them apart and copying them in cost twice as much).
        response = Response()
        statuses = [response.statuses.add(code=OK) for _ in range(count)]
        await self._count(config, domain, matches, hits_list, wall, statuses)
        for i in range(count):
            if unlimited[i]:
                statuses[i].limit_remaining = UINT32_MAX
        response.overall_code = self._overall(matches, statuses)
        if self.settings.response_headers:
            self._add_headers(response, matches, statuses)
        if self.settings.response_dynamic_metadata:
            response.dynamic_metadata.update(response_metadata(request, matches, statuses))
        return response

    def _override(
        self, domain: str, entries: tuple[tuple[str, str], ...], override: RateLimitOverride
    ) -> Match:
        """Envoy's per-descriptor limit override: counted like a config limit, never shadow or named."""
        key = domain + "." + ".".join(f"{k}_{v}" if v else k for k, v in entries)
        limit = RateLimit(full_key=key, requests_per_unit=override.requests_per_unit, unit=override.unit)
        counter = domain + "_" + "".join(f"{k}_{v}_" for k, v in entries)
        return Match(limit, key, counter, entries, counter_group(domain, counter))

    async def _count(
        self, config: RateLimitConfig, domain: str, matches: list[Match | None], hits_list: list[int], wall: float,
        statuses: list[DescriptorStatus],
    ) -> None:
        """Count the matched descriptors and fill their statuses (each starts as a bare OK).

        With the over-limit cache on, a fixed-window key it holds is answered OVER_LIMIT here and left out
        of the Redis batch (its counter is not incremented), as upstream does; the request's other
        descriptors are counted as usual. GCRA limits are never cached: a denial of n hits says nothing
        about n - 1, and the bucket frees a token within one emission interval (often milliseconds), on
        Redis's clock, not ours.

        STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT changes which fixed-window counters get the hits, as
        upstream decides it: if a key of the request is in the over-limit cache, none (they are only read);
        otherwise, if the hits would take some counters over their limit, only those; otherwise all.
        Any over-limit counter counts, shadow-mode and quota-mode ones too, as upstream. A counter left as
        it was gets the status of its current count (upstream's INCRBY 0): OK with what remains."""
        now = int(wall)
        cache = self.local_cache  # None unless LOCAL_CACHE_SIZE_IN_BYTES: then this is all the cache costs
        mono = self.monotonic() if cache is not None else 0.0
        increment = Increment.ONLY_OVER if self._stop_when_over else Increment.ALL
        batch: list[Hit] = []
        plan: list[tuple[int, Match, int, int, int]] = []  # (index, match, hits, limit, window)
        for i, match in enumerate(matches):
            if match is None:
                continue
            limit = match.limit
            window = limit.window_seconds
            hits = hits_list[i]
            requests = limit.requests_per_unit
            if limit.adaptive is not None and self.adaptive is not None:
                requests = self.adaptive.effective_limit(domain, match, now, config)
            group = match.group
            if limit.algorithm == "gcra":
                burst = (limit.burst or requests) if requests else 0
                # More than the bucket holds is never admitted and a denial leaves the bucket as it was, so
                # burst + 1 answers the same; the real count would push the wait past int64 in Lua.
                batch.append(Hit(
                    key=f"{self._prefix}{match.counter_key}gcra", hits=min(hits, burst + 1), algorithm="gcra",
                    interval_ms=window * 1000 / requests if requests else float(window * 1000),
                    burst=burst, group=group, per_second=limit.unit == SECOND,
                ))
            else:
                key = f"{self._prefix}{match.counter_key}{window_start(now, window)}"
                if cache is not None and cache.is_over(key, requests, mono):
                    self._over_from_cache(match, hits, requests, seconds_until_reset(now, window), statuses[i])
                    if increment is Increment.ONLY_OVER:
                        increment = Increment.NONE
                    continue
                ttl = window + (int(random.random() * self._jitter) if self._jitter > 0 else 0)
                batch.append(Hit(key, hits, "fixed_window", ttl=ttl, group=group, limit=requests,
                                 per_second=limit.unit == SECOND))
            plan.append((i, match, hits, requests, window))

        if not plan:
            return
        counted: list[Counted | None]
        try:
            counted = await self.counters.apply(batch, increment)  # type: ignore[assignment]
        except RedisError as exc:
            metrics.REDIS_ERRORS.inc()
            if not self.settings.fail_open:
                raise
            metrics.FAILED_OPEN.inc()
            if not isinstance(exc, PartialCount):
                return
            counted = exc.results  # the shards that answered still decide for their descriptors
        near_ratio = self.settings.near_limit_ratio
        for (i, match, hits, requests, window), hit, value in zip(plan, batch, counted, strict=True):
            if value is None:  # on a shard that failed, under --fail-open: a bare OK
                continue
            status = statuses[i]
            reset = status.duration_until_reset
            reset.SetInParent()
            if isinstance(value, GcraResult):
                result = gcra_outcome(value, requests, hits, near_ratio)
                reset.seconds, reset.nanos = value.wait_ms // 1000, value.wait_ms % 1000 * 1_000_000
            else:
                result = outcome(requests, value, hits, near_ratio)
                reset.seconds = seconds_until_reset(now, window)
                if cache is not None and result.code == OVER_LIMIT:  # shadow-mode limits too, as upstream
                    cache.add(hit.key, requests, mono + (window_start(now, window) + window - wall), mono)
            stats = metrics.limit_stats(match.stats_key)
            stats.total_hits += hits
            code = result.code
            if result.over:
                stats.over_limit += result.over
                if match.limit.shadow_mode:
                    stats.shadow_mode += result.over
                    code = OK
            stats.near_limit += result.near
            stats.within_limit += result.within
            limit = match.limit
            status.code = code
            current = status.current_limit
            current.SetInParent()
            current.name, current.requests_per_unit, current.unit = limit.name, requests, limit.unit
            status.limit_remaining = result.remaining

    @staticmethod
    def _over_from_cache(match: Match, hits: int, requests: int, reset_seconds: int, status: DescriptorStatus) -> None:
        """Upstream's status and stats for a key in the local cache: OVER_LIMIT with nothing remaining until
        the window ends; every hit counts as over_limit and over_limit_with_local_cache (and shadow_mode,
        answered OK, on a shadow-mode limit), none as near or within."""
        stats = metrics.limit_stats(match.stats_key)
        stats.total_hits += hits
        stats.over_limit += hits
        stats.over_limit_with_local_cache += hits
        limit = match.limit
        if limit.shadow_mode:
            stats.shadow_mode += hits
        else:
            status.code = OVER_LIMIT
        reset = status.duration_until_reset
        reset.SetInParent()
        reset.seconds = reset_seconds
        current = status.current_limit
        current.SetInParent()
        current.name, current.requests_per_unit, current.unit = limit.name, requests, limit.unit
        status.limit_remaining = 0

    def _overall(self, matches: list[Match | None], statuses: list[DescriptorStatus]) -> int:
        quota_total = quota_over = 0
        over = False
        for match, status in zip(matches, statuses, strict=True):
            is_quota = match is not None and (match.limit.quota_mode or self.settings.quota_mode)
            if is_quota:
                quota_total += 1
                quota_over += status.code == OVER_LIMIT
            elif status.code == OVER_LIMIT:
                over = True
        if quota_total and quota_over == quota_total:
            over = True
        if over and self.settings.shadow_mode:
            metrics.GLOBAL_SHADOW_MODE.inc()
            return OK
        return OVER_LIMIT if over else OK

    def _add_headers(self, response: Response, matches: list[Match | None], statuses: list[DescriptorStatus]) -> None:
        """Upstream's choice: the descriptor with the least remaining, but a (non-quota) descriptor over its
        limit always wins, the last one if several, so a refused client learns the limit that refused it."""
        chosen, least = None, UINT32_MAX + 1
        for match, status in zip(matches, statuses, strict=True):
            if status.HasField("current_limit") and status.limit_remaining < least:
                chosen, least = status, status.limit_remaining
            quota = match is not None and (match.limit.quota_mode or self.settings.quota_mode)
            if status.code == OVER_LIMIT and not quota:
                chosen, least = status, 0
        if chosen is None:
            return
        s = self.settings
        response.response_headers_to_add.extend(
            [
                base_pb2.HeaderValue(key=s.limit_header, value=str(chosen.current_limit.requests_per_unit)),
                base_pb2.HeaderValue(key=s.remaining_header, value=str(chosen.limit_remaining)),
                base_pb2.HeaderValue(key=s.reset_header, value=str(chosen.duration_until_reset.seconds)),
            ]
        )
