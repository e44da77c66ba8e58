"""Prometheus metrics of the ext_proc service (namespace `igw_ext_proc`).

The two per-request metrics (decisions and phase latency) are plain Python counters exported by a
custom collector: prometheus-client's Counter/Histogram take a lock and resolve labels on every call,
which costs several microseconds per message on a path whose whole budget is a few tens (see
../shared/PERF_NOTES.md). The request path runs on one event-loop thread, so no lock is needed; a
scrape reads a consistent-enough snapshot. Tenant and model labels only ever carry known values (a
tenant that authenticated, a registered model), never client-chosen text, so cardinality is bounded.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

NO_TENANT = "-"
NO_MODEL = "-"

PHASE_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0)

STREAM_ERRORS = Counter("igw_ext_proc_stream_errors", "Streams ended with a gRPC error", ["reason"])
LOOKUPS = Counter("igw_ext_proc_cache_misses", "Lookups not answered from a fresh cache entry: miss, stale, error",
                  ["cache", "result"])
INVALIDATIONS = Counter("igw_ext_proc_cache_invalidations", "Invalidation messages received over pub/sub")
REDIS_ERRORS = Counter("igw_ext_proc_redis_errors", "Redis lookups that failed", ["reason"])
REDIS_UP = Gauge("igw_ext_proc_redis_up", "1 when the last Redis probe succeeded")
PUBSUB_UP = Gauge("igw_ext_proc_pubsub_subscribed", "1 while subscribed to the invalidation channel")

_requests: dict[tuple[str, str, str], int] = {}
_denials: dict[str, int] = {}
_phase_counts: dict[str, list[int]] = {}
_phase_sums: dict[str, float] = {}


def count_request(tenant: str, model: str, decision: str) -> None:
    key = (tenant, model, decision)
    _requests[key] = _requests.get(key, 0) + 1


def count_denial(reason: str) -> None:
    _denials[reason] = _denials.get(reason, 0) + 1


def observe_phase(phase: str, seconds: float) -> None:
    counts = _phase_counts.get(phase)
    if counts is None:
        counts = _phase_counts[phase] = [0] * (len(PHASE_BUCKETS) + 1)
        _phase_sums[phase] = 0.0
    counts[bisect.bisect_left(PHASE_BUCKETS, seconds)] += 1
    _phase_sums[phase] += seconds


def count_lookup(cache: str, result: str) -> None:
    LOOKUPS.labels(cache, result).inc()


class _RequestPathCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "igw_ext_proc_requests", "Requests decided, by tenant, model and decision (allowed or the HTTP status)",
            labels=["tenant", "model", "decision"])
        for (tenant, model, decision), value in list(_requests.items()):
            requests.add_metric([tenant, model, decision], value)
        yield requests
        denials = CounterMetricFamily("igw_ext_proc_denials", "Refused requests by detailed reason", labels=["reason"])
        for reason, value in list(_denials.items()):
            denials.add_metric([reason], value)
        yield denials
        phases = HistogramMetricFamily("igw_ext_proc_phase_duration_seconds",
                                       "Time to answer one ext_proc message, by phase", labels=["phase"])
        for phase, counts in list(_phase_counts.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*PHASE_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            phases.add_metric([phase], buckets, _phase_sums[phase])
        yield phases


REGISTRY.register(_RequestPathCollector())
