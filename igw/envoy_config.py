"""The Envoy configuration of the gateway, built as plain dicts by small public functions.

The test bed bootstrap, the committed envoy/*.yaml files and (later) the Istio renderer all take their
filters and clusters from here, so what the test bed runs is what a cluster runs. Each builder is
parameterised by cluster names and timeouts and knows nothing about ports or processes.

Choices that matter (and why):
- Filter order is ext_proc -> ratelimit -> router. ext_proc sets x-igw-tenant / x-igw-model and clears
  the route cache; the rate-limit filter then computes descriptors from the route selected *after*
  those headers exist, and the router sends the request to the model's cluster.
- ext_proc fails closed (failure_mode_allow false): it authenticates callers and strips spoofed
  x-igw-* headers, so letting requests through when it is down would skip authentication and trust
  whatever tenant header a client sent. A failure answers 503 (status_on_error), a missed message_timeout 504.
- The rate limit fails open (failure_mode_deny false): a rate-limit outage should not take inference
  down; callers were already authenticated, and the filter's error stats show the gap.
- Two rate-limit modes (`RATE_LIMIT_MODES`): "rls" asks the rate-limit service per request
  (ShouldRateLimit, exact across gateways); "rlqs" puts Envoy's rate_limit_quota filter
  (igw/envoy_quota.py) in the same place, enforcing token buckets pushed by the same service over a
  stream (no call per request). Everything else is identical in both.
- Routing: the virtual host's `matcher` maps x-igw-model to that model's route with one hash lookup
  (exact_match_map); an ordered list of one header-matching route per model is scanned per request (+21 µs
  at 1,000 models, bench/scale_bench.py). One cluster per model stays: circuit breakers, stats and the
  access log's upstream_cluster are per model; one shared cluster with subset load balancing measured only
  ~8 µs/request cheaper and would share the breakers between models (README, "Envoy configuration").
- Replies Envoy makes itself (no healthy replica, upstream or processor timeout, processor unreachable, 431,
  426, the rate-limit filter's 429, ...) carry the processor's JSON error shape through the HCM's
  local_reply_config, status unchanged. Its first mapper lets our own replies (the processor's
  ImmediateResponses, the JSON 404, the quota filter's deny) through untouched, told apart by their
  response_code_details with a CEL filter; responses from model servers never pass through it.
- gRPC service clusters speak HTTP/2, use active gRPC health checks (also while idle) and outlier
  detection, and disable panic routing: a dead or unready replica gets no traffic. Without them one
  dead endpoint among 8 failed 1 request in 8 (PERF_NOTES.md).
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ext_proc.shaping import READ_HEADERS, STRIPPED_PREFIXES
from igw.topology import (
    EXT_PROC_CLUSTER,
    RATELIMIT_CLUSTER,
    Endpoint,
    Topology,
    documented_topology,
    model_cluster_name,
)

Config = dict[str, Any]

RATELIMIT_DOMAIN = "igw"
TENANT_HEADER = "x-igw-tenant"
MODEL_HEADER = "x-igw-model"
REPLICA_HEADER = "x-igw-replica"
MODEL_READY_PATH = "/v2/health/ready"

_TYPE = "type.googleapis.com/"
EXT_PROC_TYPE = _TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
RATELIMIT_TYPE = _TYPE + "envoy.extensions.filters.http.ratelimit.v3.RateLimit"
ROUTER_TYPE = _TYPE + "envoy.extensions.filters.http.router.v3.Router"
HCM_TYPE = _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
FILE_LOG_TYPE = _TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog"
HTTP_OPTIONS_TYPE = _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTE_TYPE = _TYPE + "envoy.config.route.v3.Route"
HEADER_INPUT_TYPE = _TYPE + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput"

LISTENER_BUFFER_BYTES = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED_LOCAL = REPO_ROOT / "envoy" / "envoy.yaml"
COMMITTED_COMPOSE = REPO_ROOT / "envoy" / "envoy.compose.yaml"
COMMITTED_RLQS = REPO_ROOT / "envoy" / "envoy.rlqs.yaml"
RATE_LIMIT_MODES = ("rls", "rlqs")
GATEWAY_NAME = "igw-testbed"  # node id, and the static `gw` entry of quota-push bucket ids


def duration(seconds: float) -> str:
    """Envoy's Duration as text ('0.2s'); fixed-point so the rendered YAML is stable."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


@dataclass(frozen=True)
class Timeouts:
    """Every timeout the gateway config sets, in seconds, in one place."""

    # Per ext_proc message (headers, or a buffered body). Above ext_proc's Redis timeout (250 ms), so an
    # uncached lookup that fails is answered by ext_proc itself (a clear 503) rather than cut off by Envoy.
    ext_proc_message: float = 0.5
    ext_proc_max_message: float = 2.0  # ext_proc may raise its own message timeout up to this
    ratelimit: float = 0.2  # one ShouldRateLimit call
    connect: float = 0.25  # TCP connect to any upstream (loopback or cluster network)
    route: float = 30.0  # whole upstream request unless ext_proc sets x-envoy-upstream-rq-timeout-ms
    stream_idle: float = 60.0  # downstream stream with no activity
    request_headers: float = 10.0  # client must send its headers within this
    health_check: float = 0.5  # one active health-check probe
    health_interval: float = 1.0  # between probes, also when the cluster has no traffic
    ejection: float = 5.0  # base outlier ejection time
    http2_keepalive_interval: float = 10.0
    http2_keepalive_timeout: float = 2.0
    # An idle connection to a model server is closed by Envoy after this. It must be shorter than the
    # keep-alive timeout of every common model server, or the server closes a connection Envoy still counts as
    # reusable and a request sent on it just then fails (503, UC; see model_cluster). uvicorn closes idle
    # connections after 5 s (vLLM, KServe's Python server, most FastAPI servers), Node after 5 s, aiohttp's
    # run_app after 75 s; Envoy's own default is 1 h. 4 s stays below all of them with a second of margin
    # for Envoy's clock starting after the server's (the response's last byte still has to arrive). Its cost
    # is one TCP connect (well under a millisecond in a cluster network) for a request after 4 s without traffic to that
    # replica, next to the tens of milliseconds to seconds an inference takes; busy replicas are unaffected.
    upstream_idle: float = 4.0


DEFAULT_TIMEOUTS = Timeouts()


# ---------------------------------------------------------------------------------------------- filters


def forwarded_headers() -> list[Config]:
    """What Envoy sends the processor: the headers it reads and the prefixes it strips, nothing else.
    Cookies, user agents and forwarding headers stay in Envoy: the processor never needed them, and
    every header not sent is one Envoy does not copy into the message nor the processor decode (with a
    typical browser or SDK header set, about half of them)."""
    return [*({"exact": name} for name in READ_HEADERS),
            *({"prefix": prefix, "ignore_case": True} for prefix in STRIPPED_PREFIXES)]


def ext_proc_filter(cluster: str = EXT_PROC_CLUSTER, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Config:
    """Headers only by default; the processor asks for a body per request (allow_mode_override)."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "allow_mode_override": True,
            "message_timeout": duration(timeouts.ext_proc_message),
            "max_message_timeout": duration(timeouts.ext_proc_max_message),
            "request_attributes": [],
            "forward_rules": {"allowed_headers": {"patterns": forwarded_headers()}},
            # Headers changed by the processor pick the route (x-igw-model), so always re-route.
            "route_cache_action": "CLEAR",
            # The processor strips client-sent x-envoy-* headers and sets the upstream timeout header;
            # a mutation Envoy refuses is an error, not a silently ignored header.
            "mutation_rules": {"allow_envoy": True, "disallow_is_error": True},
        },
    }


def ratelimit_filter(
    cluster: str = RATELIMIT_CLUSTER, timeouts: Timeouts = DEFAULT_TIMEOUTS, domain: str = RATELIMIT_DOMAIN
) -> Config:
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": RATELIMIT_TYPE,
            "domain": domain,
            "failure_mode_deny": False,
            "timeout": duration(timeouts.ratelimit),
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limited_as_resource_exhausted": False,
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                "transport_api_version": "V3",
            },
        },
    }


def router_filter() -> Config:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}


def check_rate_limit_mode(mode: str) -> str:
    if mode not in RATE_LIMIT_MODES:
        raise ValueError(f"rate-limit mode must be one of {', '.join(RATE_LIMIT_MODES)}, got {mode!r}")
    return mode


def http_filters(
    ext_proc_cluster: str = EXT_PROC_CLUSTER,
    ratelimit_cluster: str = RATELIMIT_CLUSTER,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    *,
    rate_limit_mode: str = "rls",
    gateway_name: str = GATEWAY_NAME,
) -> list[Config]:
    """In this order: see the module docstring. In "rlqs" mode `ratelimit_cluster` names the RLQS
    cluster and `gateway_name` is the static part of every bucket id."""
    if check_rate_limit_mode(rate_limit_mode) == "rlqs":
        from igw.envoy_quota import rate_limit_quota_filter  # imports this module: not at the top

        limiter = rate_limit_quota_filter(gateway_name, ratelimit_cluster, RATELIMIT_DOMAIN, timeouts)
    else:
        limiter = ratelimit_filter(ratelimit_cluster, timeouts)
    return [ext_proc_filter(ext_proc_cluster, timeouts), limiter, router_filter()]


def route_rate_limits() -> list[Config]:
    """Descriptors [tenant], [tenant, model], [model]; one is skipped when a header it needs is absent."""

    def header(name: str, key: str) -> Config:
        return {"request_headers": {"header_name": name, "descriptor_key": key}}

    def tenant() -> Config:
        return header(TENANT_HEADER, "tenant")

    def model() -> Config:
        return header(MODEL_HEADER, "model")

    # Fresh dicts for every use: a shared one would be written out as a YAML anchor and alias.
    return [{"actions": [tenant()]}, {"actions": [tenant(), model()]}, {"actions": [model()]}]


# ------------------------------------------------------------------------------------------------ routes


MODEL_RETRY_ON = "connect-failure,refused-stream,reset-before-request"


def model_route(model: str, cluster: str | None = None, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Config:
    return {
        "name": f"model-{model}",
        "match": {"prefix": "/", "headers": [{"name": MODEL_HEADER, "string_match": {"exact": model}}]},
        "route": {
            "cluster": cluster or model_cluster_name(model),
            "timeout": duration(timeouts.route),
            "rate_limits": route_rate_limits(),
            # Only failures where the model server cannot have seen any of the request are retried: an
            # inference is not idempotent (a second one costs GPU time and may be billed twice). A refused
            # connection or stream never reached the model; reset-before-request retries a reset only while
            # Envoy has not handed any request byte to the connection (Envoy >= 1.31; once one attempt has sent
            # bytes, no later reset is retried by it; rare here, as Envoy writes the headers as soon as it has
            # a connection, but safe). Plain `reset` and `5xx` would replay requests the
            # server may have run. The keep-alive race (server closes an idle connection as Envoy reuses it)
            # is prevented by the model cluster's idle timeout, not by a retry: over HTTP/1.1 Envoy has
            # already written the request when it learns of the close.
            "retry_policy": {
                "retry_on": MODEL_RETRY_ON,
                "num_retries": 2,
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": _TYPE + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }],
                "host_selection_retry_max_attempts": 3,
            },
        },
    }


def unknown_model_route() -> Config:
    return {
        "name": "unknown-model",
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {"inline_string": local_reply_body(local_reply("no_route"))},  # what an Istio gateway sends
        },
        "response_headers_to_add": [{
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }],
    }


def route_action(route: Config) -> Config:
    """A Route as the action of a generic matcher (the virtual host `matcher`)."""
    return {"name": route["name"], "typed_config": {"@type": ROUTE_TYPE, **route}}


def model_matcher(models: list[str], timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Config:
    """x-igw-model -> that model's route, by one hash lookup (exact_match_map); a missing header or a value
    naming no model falls to the JSON 404. Envoy still checks the selected route's own `match` (a failing one
    is a bare 404, measured), so each route here matches every path: the model is the whole key and the
    header is compared once."""
    routes = {m: model_route(m, timeouts=timeouts) | {"match": {"prefix": "/"}} for m in models}
    return {
        "matcher_tree": {
            "input": {"name": "x-igw-model", "typed_config": {"@type": HEADER_INPUT_TYPE, "header_name": MODEL_HEADER}},
            "exact_match_map": {"map": {m: {"action": route_action(r)} for m, r in routes.items()}},
        },
        "on_no_match": {"action": route_action(unknown_model_route())},
    }


def route_config(models: list[str], timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Config:
    """One virtual host that picks the route with `model_matcher` (O(1) in the number of models), not an
    ordered list of one header-matching route per model (a linear scan: +21 µs per request at 1,000 models,
    bench/scale_bench.py)."""
    return {
        "name": "gateway",
        "virtual_hosts": [{"name": "models", "domains": ["*"], "matcher": model_matcher(models, timeouts)}],
    }


def routes_of(virtual_host: Config) -> list[Config]:
    """The routes of a virtual host in either form (an ordered `routes` list, or the `matcher` this module
    renders), the fallback last; for checks that compare route settings across configs."""
    if "routes" in virtual_host:
        return list(virtual_host["routes"])
    tree = virtual_host["matcher"]
    found = [entry["action"]["typed_config"] for entry in tree["matcher_tree"]["exact_match_map"]["map"].values()]
    if "on_no_match" in tree:
        found.append(tree["on_no_match"]["action"]["typed_config"])
    return [{k: v for k, v in r.items() if k != "@type"} for r in found]


# -------------------------------------------------------------------------------------------- access log

ACCESS_LOG_FIELDS: dict[str, str] = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "tenant": "%REQ(X-IGW-TENANT)%",
    "model": "%REQ(X-IGW-MODEL)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "rate_limited": "%RESP(X-ENVOY-RATELIMITED)%",
    "ratelimit_limit": "%RESP(X-RATELIMIT-LIMIT)%",
    "ratelimit_remaining": "%RESP(X-RATELIMIT-REMAINING)%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "replica": "%RESP(X-IGW-REPLICA)%",
    "upstream_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream_service_time_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
}


def access_log(path: str = "/dev/stdout") -> list[Config]:
    """One JSON object per request (fields: ACCESS_LOG_FIELDS; absent values are null)."""
    return [{
        "name": "envoy.access_loggers.file",
        "typed_config": {"@type": FILE_LOG_TYPE, "path": path, "log_format": {"json_format": dict(ACCESS_LOG_FIELDS)}},
    }]


# ------------------------------------------------------------------------------------------ local replies

CEL_FILTER_TYPE = _TYPE + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
JSON_CONTENT_TYPE = "application/json"

# Local replies whose body we wrote, told apart by their response_code_details: the processor's
# ImmediateResponses (`igw_<reason>`, ext_proc/responses.py), the route config's JSON 404
# (`direct_response`) and the quota filter's deny response (igw/envoy_quota.py). Never rewritten.
OWN_REPLY_DETAILS_PREFIX = "igw_"
OWN_REPLY_DETAILS: tuple[str, ...] = ("direct_response", "rate_limited_by_quota")


@dataclass(frozen=True)
class LocalReply:
    """A reply Envoy makes itself, and the JSON error (ext_proc's shape) it is sent with. Matched on the status
    Envoy chose, which is kept, and where the status alone is ambiguous (503) on response flags or a
    response_code_details prefix as well; `status` None matches every status from 400 on."""

    code: str
    message: str
    status: int | None
    flags: tuple[str, ...] = ()
    details_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.code or not self.message:
            raise ValueError("LocalReply needs a code and a message")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"LocalReply {self.code!r}: status must be an error status (400-599), got {self.status}")


# First match wins: the processor's errors (which may be 504) before the status-only mappers, the catch-all last.
LOCAL_REPLIES: tuple[LocalReply, ...] = (
    # The ext_proc filter's own errors: the processor unreachable or its stream failed (503, status_on_error),
    # or message_timeout missed (504 in Envoy 1.40, whatever status_on_error says).
    LocalReply("processor_unavailable", "the gateway cannot check requests right now; retry shortly", None,
               details_prefix="ext_proc_error"),
    LocalReply("no_healthy_upstream", "no replica of this model is ready to serve; retry shortly", 503, ("UH",)),
    LocalReply("upstream_overloaded", "this model has too many requests in flight; retry shortly", 503, ("UO",)),
    LocalReply("upstream_unavailable",
               "the model server could not be reached or closed the connection before answering; retry shortly",
               503, ("UF", "URX", "UC", "UR", "LR")),
    LocalReply("upstream_timeout", "the model server did not answer in time", 504),
    LocalReply("bad_upstream_response", "the model server sent a response the gateway cannot forward", 502),
    # Same meaning, same code as the processor's own 413 (ext_proc/decisions.py).
    LocalReply("request_too_large", "the request body exceeds the gateway's buffer limit", 413),
    LocalReply("headers_too_large", "the request headers are too many or too large", 431),
    LocalReply("upgrade_required", "HTTP/1.0 is not supported: use HTTP/1.1 or HTTP/2", 426),
    LocalReply("rate_limited", "rate limit exceeded", 429),
    LocalReply("request_timeout", "the request timed out before the gateway could answer", 408),
    # An Istio gateway's route_not_found; the test bed answers this with its own JSON 404 (direct_response).
    LocalReply("no_route", "no model route: x-igw-model is missing or names no served model", 404),
    LocalReply("bad_request", "the request is not valid HTTP", 400),
    LocalReply("gateway_error", "the gateway could not complete this request", None),
)


def local_reply(code: str) -> LocalReply:
    """The reply with this error code: the one wording every path that answers it uses."""
    return next(reply for reply in LOCAL_REPLIES if reply.code == code)


def local_reply_body(reply: LocalReply) -> str:
    """The error body in the processor's exact bytes (compact JSON, code then message)."""
    return json.dumps({"error": {"code": reply.code, "message": reply.message}}, separators=(",", ":"))


def _cel_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _cel_filter(expression: str) -> Config:
    return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel",
                                 "typed_config": {"@type": CEL_FILTER_TYPE, "expression": expression}}}


def own_reply_filter() -> Config:
    """Matches the local replies whose body we wrote (OWN_REPLY_DETAILS*)."""
    details = "response.code_details"
    listed = ", ".join(_cel_quote(d) for d in OWN_REPLY_DETAILS)
    return _cel_filter(f"{details}.startsWith({_cel_quote(OWN_REPLY_DETAILS_PREFIX)}) || {details} in [{listed}]")


def _status_filter(op: str, status: int, code: str) -> Config:
    # Envoy requires a runtime key; none is ever set, so the status is the one written here.
    return {"status_code_filter": {"comparison": {"op": op, "value": {
        "default_value": status, "runtime_key": f"igw.local_reply.{code}.status"}}}}


def local_reply_mapper(reply: LocalReply) -> Config:
    """One ResponseMapper: the reply's status (and flags / details prefix) in, its JSON body, content-type and
    the request's x-request-id out (absent when Envoy refused the request before reading its headers)."""
    filters = [_status_filter("GE", 400, reply.code) if reply.status is None
               else _status_filter("EQ", reply.status, reply.code)]
    if reply.flags:
        filters.append({"response_flag_filter": {"flags": list(reply.flags)}})
    if reply.details_prefix:
        filters.append(_cel_filter(f"response.code_details.startsWith({_cel_quote(reply.details_prefix)})"))
    return {
        "filter": filters[0] if len(filters) == 1 else {"and_filter": {"filters": filters}},
        "headers_to_add": [{"header": {"key": "x-request-id", "value": "%REQ(X-REQUEST-ID)%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "body_format_override": {
            "text_format_source": {"inline_string": local_reply_body(reply).replace("%", "%%")},
            "content_type": JSON_CONTENT_TYPE,
        },
    }


def local_reply_config(replies: tuple[LocalReply, ...] = LOCAL_REPLIES) -> Config:
    """The HCM's local_reply_config: every reply Envoy makes itself becomes a JSON error of ext_proc's shape
    (ext_proc/responses.py) with content-type application/json and the request's x-request-id, its status
    unchanged. The first mapper matches our own replies (OWN_REPLY_DETAILS*) and rewrites nothing, so they
    pass byte for byte; there is no top-level body_format, which would apply to them too. Upstream
    responses never pass through local_reply_config."""
    return {"mappers": [{"filter": own_reply_filter()}, *(local_reply_mapper(r) for r in replies)]}


# ---------------------------------------------------------------------------------------------- clusters


def _endpoints(name: str, endpoints: list[Endpoint]) -> Config:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": e.host, "port_value": e.port}}}}
            for e in endpoints
        ]}],
    }


def _health_check(timeouts: Timeouts, probe: Config) -> Config:
    interval = duration(timeouts.health_interval)
    return {
        "timeout": duration(timeouts.health_check),
        "interval": interval,
        # Envoy probes idle clusters only every 60s by default; a dead replica must be seen at once.
        "no_traffic_interval": interval,
        "unhealthy_interval": interval,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        **probe,
    }


def _outlier_detection(timeouts: Timeouts) -> Config:
    return {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 2,
        "enforcing_consecutive_local_origin_failure": 100,
        "consecutive_gateway_failure": 3,
        "enforcing_consecutive_gateway_failure": 100,
        "consecutive_5xx": 5,
        "interval": duration(timeouts.health_interval),
        "base_ejection_time": duration(timeouts.ejection),
        "max_ejection_percent": 100,
    }


def _base_cluster(name: str, endpoints: list[Endpoint], discovery: str, timeouts: Timeouts) -> Config:
    if discovery not in ("STATIC", "STRICT_DNS"):
        raise ValueError(f"discovery must be STATIC or STRICT_DNS, got {discovery!r}")
    if not endpoints:
        raise ValueError(f"cluster {name!r} needs at least one endpoint")
    cluster: Config = {
        "name": name,
        **({"type": "STATIC"} if discovery == "STATIC" else {"cluster_type": _dns_cluster_type()}),
        "connect_timeout": duration(timeouts.connect),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": _endpoints(name, endpoints),
        # Never route to hosts known dead just because few are healthy (Envoy's default panics at <50%).
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "circuit_breakers": {"thresholds": [{
            "max_connections": 4096, "max_pending_requests": 4096, "max_requests": 4096, "max_retries": 64,
        }]},
        "outlier_detection": _outlier_detection(timeouts),
    }
    return cluster


def _dns_cluster_type() -> Config:
    """STRICT_DNS through the DNS cluster extension: Envoy 1.40 deprecates the cluster-level DNS fields
    (a startup warning, and slated for removal). Every address a name resolves to is an endpoint."""
    return {"name": "envoy.cluster.dns", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster",
        "dns_lookup_family": "V4_ONLY", "dns_refresh_rate": "5s", "all_addresses_in_single_endpoint": False}}


TLS_SOCKET_TYPE = _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


@dataclass(frozen=True)
class UpstreamTls:
    """Envoy's side of a gRPC service served over TLS (ext_proc's GRPC_SERVER_USE_TLS): the CA that signed
    the service's certificate, the name to send as SNI and require among the certificate's SANs (an IP
    address is required among its IP SANs and not sent as SNI; without a name Envoy checks the chain
    only, so any certificate of that CA would do), and for mutual TLS the client certificate Envoy
    presents. Paths are as Envoy sees them."""

    ca_file: str
    server_name: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("UpstreamTls: a client certificate needs both cert_file and key_file")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def upstream_tls_socket(tls: UpstreamTls) -> Config:
    """The cluster's transport_socket: TLS with ALPN h2 (gRPC servers require it)."""
    validation: Config = {"trusted_ca": {"filename": tls.ca_file}}
    is_ip = _is_ip_address(tls.server_name)
    if tls.server_name:  # an IP address is checked against IP SANs, and is never sent as SNI (RFC 6066)
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "IP_ADDRESS" if is_ip else "DNS", "matcher": {"exact": tls.server_name}}]
    common: Config = {"alpn_protocols": ["h2"], "validation_context": validation}
    if tls.cert_file:
        common["tls_certificates"] = [{"certificate_chain": {"filename": tls.cert_file},
                                       "private_key": {"filename": tls.key_file}}]
    context: Config = {"@type": TLS_SOCKET_TYPE, "common_tls_context": common}
    if tls.server_name and not is_ip:
        context["sni"] = tls.server_name
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


@dataclass(frozen=True)
class UpstreamTlsSds:
    """As UpstreamTls, for a proxy whose certificates arrive over SDS on its ADS stream instead of files
    (an Istio gateway: istiod serves a Secret of the gateway's namespace as `kubernetes://<name>`, the
    certificate and key, and `kubernetes://<name>-cacert`, its ca.crt). `server_name` is sent as SNI
    and required among the server certificate's DNS SANs; `certificate_secret`, for mutual TLS, is the
    client certificate Envoy presents."""

    server_name: str
    validation_secret: str
    certificate_secret: str = ""

    def __post_init__(self) -> None:
        if not self.server_name or _is_ip_address(self.server_name):
            raise ValueError("UpstreamTlsSds: server_name must be a DNS name (sent as SNI and matched as a DNS SAN)")
        if not self.validation_secret:
            raise ValueError("UpstreamTlsSds: validation_secret names the SDS secret of the trusted CA")


ADS_SDS_CONFIG: Config = {"ads": {}, "resource_api_version": "V3"}


def upstream_tls_sds_socket(tls: UpstreamTlsSds) -> Config:
    """The cluster's transport_socket with certificates from SDS over ADS: TLS with ALPN h2, SNI and a DNS
    SAN match on `server_name`, and with `certificate_secret` a client certificate (mutual TLS)."""
    common: Config = {
        "alpn_protocols": ["h2"],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": tls.server_name}}]},
            "validation_context_sds_secret_config": {"name": tls.validation_secret,
                                                     "sds_config": copy.deepcopy(ADS_SDS_CONFIG)},
        },
    }
    if tls.certificate_secret:
        common["tls_certificate_sds_secret_configs"] = [{"name": tls.certificate_secret,
                                                         "sds_config": copy.deepcopy(ADS_SDS_CONFIG)}]
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS_SOCKET_TYPE, "common_tls_context": common, "sni": tls.server_name}}


def service_cluster(
    name: str,
    endpoints: list[Endpoint],
    *,
    discovery: str = "STATIC",
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    grpc_health_service: str = "",
    tls: UpstreamTls | UpstreamTlsSds | None = None,
) -> Config:
    """A gRPC service (ext_proc, rate limit): HTTP/2, gRPC health checks, outlier detection; over TLS
    with `tls` (health checks too; certificates from files, or from SDS with UpstreamTlsSds), plain text
    without."""
    cluster = _base_cluster(name, endpoints, discovery, timeouts)
    if isinstance(tls, UpstreamTlsSds):
        cluster["transport_socket"] = upstream_tls_sds_socket(tls)
    elif tls is not None:
        cluster["transport_socket"] = upstream_tls_socket(tls)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS_TYPE,
            "explicit_http_config": {"http2_protocol_options": {"connection_keepalive": {
                "interval": duration(timeouts.http2_keepalive_interval),
                "timeout": duration(timeouts.http2_keepalive_timeout),
            }}},
        }
    }
    cluster["health_checks"] = [_health_check(timeouts, {"grpc_health_check": {"service_name": grpc_health_service}})]
    return cluster


def model_cluster(
    model: str,
    endpoints: list[Endpoint],
    *,
    discovery: str = "STATIC",
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> Config:
    """A model's replicas (KServe v2 over HTTP/1.1), probed on /v2/health/ready. Idle connections are closed
    by Envoy before the model server's keep-alive timeout would close them (Timeouts.upstream_idle): a request
    Envoy sends on a connection the server is closing at that moment fails with 503 and cannot be retried
    safely (the route's retry policy), so the race must not happen at all."""
    if not timeouts.upstream_idle > 0:  # Envoy reads 0 as "never close": the 1 h default's race again
        raise ValueError(f"model cluster {model!r}: upstream idle timeout must be above 0 s, "
                         f"got {timeouts.upstream_idle!r}")
    cluster = _base_cluster(model_cluster_name(model), endpoints, discovery, timeouts)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS_TYPE,
            "common_http_protocol_options": {"idle_timeout": duration(timeouts.upstream_idle)},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    cluster["health_checks"] = [_health_check(timeouts, {"http_health_check": {"path": MODEL_READY_PATH}})]
    return cluster


# --------------------------------------------------------------------------------------------- bootstrap


def bootstrap(
    topology: Topology,
    *,
    access_log_path: str = "/dev/stdout",
    discovery: str = "STATIC",
    listen_host: str | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    rate_limit_mode: str = "rls",
    gateway_name: str = GATEWAY_NAME,
) -> Config:
    """The whole static bootstrap of the test bed. `listen_host` overrides the listener/admin bind address
    (compose binds 0.0.0.0 while the topology names the 'envoy' host). In "rlqs" mode the rate-limit
    service replicas are reached as the RLQS cluster (same process, same gRPC port) instead of the
    RLS cluster. Model clusters list every endpoint of `topology.model_endpoints` (spares included)."""
    models = list(topology.models)
    if check_rate_limit_mode(rate_limit_mode) == "rlqs":
        from igw.envoy_quota import RLQS_CLUSTER, RLQS_HEALTH_SERVICE

        limiter_cluster = service_cluster(RLQS_CLUSTER, [s.grpc for s in topology.ratelimit], discovery=discovery,
                                          timeouts=timeouts, grpc_health_service=RLQS_HEALTH_SERVICE)
    else:
        limiter_cluster = service_cluster(RATELIMIT_CLUSTER, [s.grpc for s in topology.ratelimit],
                                          discovery=discovery, timeouts=timeouts)
    listen = listen_host or topology.gateway.host
    hcm: Config = {
        "@type": HCM_TYPE,
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        "use_remote_address": True,
        # The path ext_proc authorises must be the path the model server acts on: dot segments and repeated
        # slashes resolved before any filter (RFC 3986), %2F kept as sent (model names use it: meta%2Fllama).
        # Istio's gateways do the same by default (meshConfig pathNormalization BASE).
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "generate_request_id": True,
        "preserve_external_request_id": True,
        "stream_idle_timeout": duration(timeouts.stream_idle),
        "request_headers_timeout": duration(timeouts.request_headers),
        "access_log": access_log(access_log_path),
        "local_reply_config": local_reply_config(),
        "route_config": route_config(models, timeouts),
        "http_filters": http_filters(EXT_PROC_CLUSTER, limiter_cluster["name"], timeouts,
                                     rate_limit_mode=rate_limit_mode, gateway_name=gateway_name),
    }
    clusters = [
        service_cluster(EXT_PROC_CLUSTER, [s.grpc for s in topology.ext_proc], discovery=discovery, timeouts=timeouts),
        limiter_cluster,
        *(model_cluster(m, list(topology.model_endpoints(m)), discovery=discovery, timeouts=timeouts)
          for m in models),
    ]
    return {
        "node": {"id": gateway_name, "cluster": "igw-testbed"},
        "admin": {"address": {"socket_address": {"address": listen, "port_value": topology.admin.port}}},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": listen, "port_value": topology.gateway.port}},
                # Must stay >= ext_proc's --max-buffer-bytes (1 MiB) or Envoy answers 413 to BUFFERED bodies.
                "per_connection_buffer_limit_bytes": LISTENER_BUFFER_BYTES,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }


HEADER = "# Generated by `python -m igw.envoy_config --write` from igw/envoy_config.py ({what}). Do not edit:\n" \
         "# tests/testbed/test_envoy_config.py fails when this file and the generator differ.\n"


def render_yaml(config: Config, what: str) -> str:
    return HEADER.format(what=what) + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)


def compose_hostname(component: str) -> str:
    """Compose service names equal the component names used by the topology."""
    return component


def committed_files() -> dict[Path, str]:
    """The committed renderings: loopback with the documented ports (per-request rate limits, and quota
    push), and compose hostnames."""
    local = bootstrap(documented_topology())
    rlqs = bootstrap(documented_topology(), rate_limit_mode="rlqs")
    compose = bootstrap(
        documented_topology(host=compose_hostname), access_log_path="/dev/stdout", discovery="STRICT_DNS",
        listen_host="0.0.0.0",
    )
    return {
        COMMITTED_LOCAL: render_yaml(local, "documented ports on 127.0.0.1"),
        COMMITTED_COMPOSE: render_yaml(compose, "docker-compose hostnames, documented ports"),
        COMMITTED_RLQS: render_yaml(rlqs, "documented ports on 127.0.0.1, quota push (rate_limit_quota filter)"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igw.envoy_config",
                                     description="Render the committed Envoy configs, or check them for drift.")
    parser.add_argument("--write", action="store_true",
                        help="rewrite envoy/envoy.yaml, envoy/envoy.rlqs.yaml and envoy/envoy.compose.yaml")
    args = parser.parse_args(argv)
    stale = []
    for path, text in committed_files().items():
        if args.write:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
        elif not path.exists() or path.read_text() != text:
            stale.append(str(path.relative_to(REPO_ROOT)))
    if stale:
        print(f"out of date: {', '.join(stale)} (run python -m igw.envoy_config --write)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
