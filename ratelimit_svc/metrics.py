"""Prometheus metrics of the rate-limit service, named after upstream's stats.

Upstream's per-limit stats (`<domain>.<descriptor key>.total_hits` and friends) become counters with
`domain` and `key` labels. They are plain integers on one object per stats key, exported by a custom
collector: prometheus-client's counters take a lock on every inc(), and the request path made five of
those calls per descriptor (~1 µs each). The request path runs on one event-loop thread, so no lock is
needed; a scrape reads a consistent-enough snapshot, as ext_proc's request counters do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_LABELS = ("domain", "key")

_LIMIT_COUNTERS = {  # LimitStats field -> help text; exported as ratelimit_<field>_total{domain,key}
    "total_hits": "Hits counted against a limit",
    "over_limit": "Hits over the limit",
    "near_limit": "Hits above the near-limit ratio",
    "within_limit": "Hits within the limit",
    "shadow_mode": "Over-limit hits let through by shadow mode",
    "over_limit_with_local_cache": "Over-limit hits answered from the local over-limit cache, without Redis",
}
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
    total_hits: int = 0
    over_limit: int = 0
    near_limit: int = 0
    within_limit: int = 0
    shadow_mode: int = 0
    over_limit_with_local_cache: int = 0


_stats: dict[str, LimitStats] = {}
# The stats keys handed out since the statsd flusher last took them (a key is handed out to be counted), so
# a flush walks what moved, not every key ever seen. None until a flusher asks: without statsd nothing is kept.
_changed: set[str] | None = None


def limit_stats(stats_key: str) -> LimitStats:
    stats = _stats.get(stats_key)
    if stats is None:
        stats = _stats[stats_key] = LimitStats()
    if _changed is not None:
        _changed.add(stats_key)
    return stats


def forget_changes() -> None:
    """The next take_changed() answers every key: a new flusher has sent nothing yet."""
    global _changed
    _changed = None


def take_changed() -> list[tuple[str, LimitStats]]:
    """The stats keys that may have moved since the last call, with their counts (every key on the first call
    after forget_changes()); counting records keys anew from here."""
    global _changed
    taken = list(_stats.items()) if _changed is None else [(key, _stats[key]) for key in _changed]
    _changed = set()
    return taken


def all_limit_stats() -> list[tuple[str, LimitStats]]:
    """Every stats key seen so far with its counts (USE_PROMETHEUS renders them under upstream's names)."""
    return list(_stats.items())


class _LimitCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        families = {name: CounterMetricFamily(f"ratelimit_{name}", text, labels=_LABELS)
                    for name, text in _LIMIT_COUNTERS.items()}
        for stats_key, stats in list(_stats.items()):
            domain, _, key = stats_key.partition(".")
            for name, family in families.items():
                family.add_metric([domain, key], getattr(stats, name))
        yield from families.values()


REGISTRY.register(_LimitCollector())
