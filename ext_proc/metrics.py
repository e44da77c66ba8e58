"""Prometheus metrics of the ext_proc service (namespace `igw_ext_proc`).

Tenant and model labels only ever carry known values (a tenant that authenticated, a registered
model), never client-chosen text, so label cardinality is bounded by the registry. Label children are
cached so the request path pays a dict lookup instead of prometheus-client's locked label resolution.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

NO_TENANT = "-"
NO_MODEL = "-"

REQUESTS = Counter(
    "igw_ext_proc_requests", "Requests decided, by tenant, model and decision (allowed or the HTTP status)",
    ["tenant", "model", "decision"],
)
DENIALS = Counter("igw_ext_proc_denials", "Refused requests by detailed reason", ["reason"])
PHASE_SECONDS = Histogram(
    "igw_ext_proc_phase_duration_seconds", "Time to answer one ext_proc message, by phase", ["phase"],
    buckets=(50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0),
)
STREAM_ERRORS = Counter("igw_ext_proc_stream_errors", "Streams ended with a gRPC error", ["reason"])
LOOKUPS = Counter("igw_ext_proc_cache_misses", "Lookups not answered from a fresh cache entry: miss, stale, error",
                  ["cache", "result"])
INVALIDATIONS = Counter("igw_ext_proc_cache_invalidations", "Invalidation messages received over pub/sub")
REDIS_ERRORS = Counter("igw_ext_proc_redis_errors", "Redis lookups that failed", ["reason"])
REDIS_UP = Gauge("igw_ext_proc_redis_up", "1 when the last Redis probe succeeded")
PUBSUB_UP = Gauge("igw_ext_proc_pubsub_subscribed", "1 while subscribed to the invalidation channel")

_requests: dict[tuple[str, str, str], object] = {}
_denials: dict[str, object] = {}
_phases: dict[str, object] = {}
_lookups: dict[tuple[str, str], object] = {}


def count_request(tenant: str, model: str, decision: str) -> None:
    key = (tenant, model, decision)
    child = _requests.get(key)
    if child is None:
        child = _requests[key] = REQUESTS.labels(tenant, model, decision)
    child.inc()  # type: ignore[attr-defined]


def count_denial(reason: str) -> None:
    child = _denials.get(reason)
    if child is None:
        child = _denials[reason] = DENIALS.labels(reason)
    child.inc()  # type: ignore[attr-defined]


def observe_phase(phase: str, seconds: float) -> None:
    child = _phases.get(phase)
    if child is None:
        child = _phases[phase] = PHASE_SECONDS.labels(phase)
    child.observe(seconds)  # type: ignore[attr-defined]


def count_lookup(cache: str, result: str) -> None:
    key = (cache, result)
    child = _lookups.get(key)
    if child is None:
        child = _lookups[key] = LOOKUPS.labels(cache, result)
    child.inc()  # type: ignore[attr-defined]
