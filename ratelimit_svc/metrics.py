"""Prometheus metrics of the rate-limit service, named after upstream's stats.

Upstream's per-limit stats (`<domain>.<descriptor key>.total_hits` and friends) become counters with
`domain` and `key` labels. Label children are cached per stats key so the request path pays one dict
lookup per descriptor instead of prometheus-client's locked label resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge

_LABELS = ("domain", "key")

TOTAL_HITS = Counter("ratelimit_total_hits", "Hits counted against a limit", _LABELS)
OVER_LIMIT = Counter("ratelimit_over_limit", "Hits over the limit", _LABELS)
NEAR_LIMIT = Counter("ratelimit_near_limit", "Hits above the near-limit ratio", _LABELS)
WITHIN_LIMIT = Counter("ratelimit_within_limit", "Hits within the limit", _LABELS)
SHADOW_MODE = Counter("ratelimit_shadow_mode", "Over-limit hits let through by shadow mode", _LABELS)
DOMAIN_NOT_FOUND = Counter("ratelimit_domain_not_found", "Requests for a domain with no config", ["domain"])
GLOBAL_SHADOW_MODE = Counter("ratelimit_global_shadow_mode", "OVER_LIMIT answers turned OK by SHADOW_MODE")

CONFIG_LOAD_SUCCESS = Counter("ratelimit_config_load_success", "Config loads that succeeded")
CONFIG_LOAD_ERROR = Counter("ratelimit_config_load_error", "Config loads rejected (last good config kept)")
CONFIG_LIMITS = Gauge("ratelimit_config_limits", "Limits in the config in force")
REDIS_ERRORS = Counter("ratelimit_redis_errors", "ShouldRateLimit calls that failed on Redis")
FAILED_OPEN = Counter("ratelimit_redis_failed_open", "Calls answered OK because Redis failed and fail-open is on")
SERVICE_ERRORS = Counter("ratelimit_service_errors", "ShouldRateLimit calls rejected as invalid", ["reason"])
REDIS_UP = Gauge("ratelimit_redis_up", "1 when the last Redis health probe succeeded")

EFFECTIVE_LIMIT = Gauge(
    "ratelimit_adaptive_effective_limit", "Effective adaptive limit last applied", ["domain", "key", "model"]
)
REPLICAS_SEEN = Gauge("ratelimit_adaptive_replicas", "Ready replicas seen for a model", ["model"])
REPLICA_STALENESS = Gauge("ratelimit_adaptive_replica_age_seconds", "Age of the replica data for a model", ["model"])


@dataclass(slots=True)
class LimitStats:
    total_hits: object
    over_limit: object
    near_limit: object
    within_limit: object
    shadow_mode: object


_cache: dict[str, LimitStats] = {}


def limit_stats(stats_key: str) -> LimitStats:
    stats = _cache.get(stats_key)
    if stats is None:
        domain, _, key = stats_key.partition(".")
        stats = LimitStats(
            TOTAL_HITS.labels(domain, key),
            OVER_LIMIT.labels(domain, key),
            NEAR_LIMIT.labels(domain, key),
            WITHIN_LIMIT.labels(domain, key),
            SHADOW_MODE.labels(domain, key),
        )
        _cache[stats_key] = stats
    return stats
