"""Would the rate-limit service add less latency per Envoy request on grpclib than on grpc.aio?

    .venv/bin/python -m bench.rls_framework_bench [--rate 500] [--rates 500,1000] [--duration 6] [--rounds 3]

Why this exists: igw/grpclib_server.py and the README keep the rate-limit service on grpc.aio because a
Python client driving *echo* ShouldRateLimit calls saw grpc.aio carry more unary calls/s at a lower p50.
Through Envoy, ext_proc on grpclib gained. What matters to a gateway is what the hop costs behind Envoy: the
latency it adds to each request and the service CPU per call (capacity). This bench measures exactly that
for the same Limiter on both frameworks, side by side in one run.

Variants, one Envoy 1.40 (--concurrency 1) each, all running at once, every request counted in Redis:
  P  baseline: same listener and route, no rate-limit filter
  A  rate-limit filter -> the real service (python -m ratelimit_svc, grpc.aio + uvloop)
  G  rate-limit filter -> the same Limiter (ConfigHolder, PipelinedRedis, RedisCounters, AdaptiveLimits
     built as ratelimit_svc.server.serve builds them) served by grpclib through igw.grpclib_server
     (`--serve grpclib`, an internal mode of this module)
  E  control: rate-limit filter -> a grpc.aio echo answering OK without Redis (`--serve echo`)
Each route carries the production rate_limits (igw.envoy_config.route_rate_limits: the client sends
x-igw-tenant only, so Envoy sends the one descriptor [tenant]) and routes to a shared upstream Envoy that
answers 200 itself. Not a direct_response route: Envoy's rate-limit filter only calls the service for a route
that has a route entry and an upstream cluster (a direct_response route has neither, and the filter silently
skips the call). The limit (1,000,000/s) is never reached; before measuring, a tenant with a limit of one per
minute must get a 429 through A and G (proof the filter calls the service and the answer is enforced), and
after every run Envoy's stats must show one ShouldRateLimit call per request.

The generator is bench/openloop.py (open loop, latency from each request's scheduled send time) in its own
process pinned to the last CPU. Rounds alternate P, A, G, E at each rate; added latency is the median of the
per-round differences to P. Service CPU per request is read from /proc around each run, net of the service's
own idle background (health probes, Redis probe, config polling) measured with no load.
Results: bench/results/rls_framework_bench.json and .txt.

Measured (2-core machine, three runs, 3/3/5 rounds): grpclib did not cut the hop. At 500 req/s its p50 was
0.06-0.13 ms higher than grpc.aio's in every round, at 1,000 req/s within +-0.1 ms; p99 differences were
within the round-to-round noise (medians -0.25..+0.54 ms); the service's CPU per call was 0-9 % higher on
grpclib (474-494 vs 445-455 us at 500 req/s, 384-429 vs 377-405 us at 1,000). So the service stays on grpc.aio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpclib.server
import yaml
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError

from bench.gateway_stack import envoy_binary
from bench.procstat import cpu_seconds
from bench.report import Printer, median, table, write_results
from igw.envoy_config import (
    HCM_TYPE,
    TENANT_HEADER,
    model_cluster,
    ratelimit_filter,
    route_rate_limits,
    router_filter,
    service_cluster,
)
from igw.grpclib_server import GrpclibBackend
from igw.procs import ManagedProcess, RedisServer, free_port, http_ok, python_module
from igw.redis_conn import PipelinedRedis, RedisError
from igw.runtime import service_main
from igw.service_runtime import AioBackend, ServiceRuntime
from igw.topology import Endpoint
from ratelimit_svc.adaptive import AdaptiveLimits
from ratelimit_svc.counters import RedisCounters
from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.server import SERVICE_NAME
from ratelimit_svc.service import InvalidRequest, Limiter, NoConfig
from ratelimit_svc.settings import Settings, parse_settings

Config = dict[str, Any]

RLS_METHOD = f"/{SERVICE_NAME}/ShouldRateLimit"
RLS_CLUSTER = "rls"
UPSTREAM = "bench-upstream"  # model_cluster() names it model-bench-upstream
TENANT = "t1"
SANITY_TENANT = "sanity"  # limited to one request per minute: the second one must be refused
NEVER_REACHED = 1_000_000
RLS_CONFIG = f"""\
domain: igw
descriptors:
  - key: tenant
    value: {SANITY_TENANT}
    rate_limit: {{unit: minute, requests_per_unit: 1}}
  - key: tenant
    rate_limit: {{unit: second, requests_per_unit: {NEVER_REACHED}}}
"""
VARIANTS: dict[str, str] = {
    "P": "Envoy, no rate-limit filter (baseline)",
    "A": "ratelimit_svc on grpc.aio (the service)",
    "G": "same Limiter on grpclib",
    "E": "grpc.aio echo, no Redis (control)",
}
SERVICES = {"A": "ratelimit_svc", "G": "grpclib", "E": "echo"}
LAG_LIMIT_MS = 1.0

log = logging.getLogger("rls_framework_bench")


# ------------------------------------------------------------------------------ the back ends (--serve)


class GrpclibRateLimitServicer:
    """ShouldRateLimit on grpclib, answering exactly as ratelimit_svc.server.RateLimitServicer does."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def __mapping__(self) -> dict[str, Handler]:
        return {RLS_METHOD: Handler(self.ShouldRateLimit, Cardinality.UNARY_UNARY, rls_pb2.RateLimitRequest,
                                    rls_pb2.RateLimitResponse)}

    async def ShouldRateLimit(
        self, stream: grpclib.server.Stream[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        try:
            response = await self.limiter.should_rate_limit(request)
        except InvalidRequest as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        except NoConfig as exc:
            raise GRPCError(Status.UNAVAILABLE, str(exc)) from None
        except RedisError as exc:
            raise GRPCError(Status.UNAVAILABLE, f"rate limit backend unavailable: {exc}") from None
        await stream.send_message(response)


async def serve_grpclib(settings: Settings, stop: asyncio.Event) -> int:
    """The Limiter as ratelimit_svc.server.serve builds it, on grpclib. The config is loaded once (no watch)
    and adaptive.run is not started: the bench's limits are not adaptive, so the Limiter never asks it."""
    holder = ConfigHolder(settings.config_dir, merge_domains=settings.merge_domains,
                          ignore_dotfiles=settings.ignore_dotfiles)
    holder.reload()
    redis = PipelinedRedis(settings.redis_url, timeout=settings.redis_timeout,
                           connect_timeout=settings.redis_timeout)
    adaptive = AdaptiveLimits(settings.redis_url, max_age=settings.replica_max_age)
    limiter = Limiter(settings, holder, RedisCounters(redis), adaptive=adaptive)
    # The same stream limit the grpc.aio service sets (grpc.max_concurrent_streams 1000).
    runtime = ServiceRuntime(GrpclibBackend([GrpclibRateLimitServicer(limiter)], 1000), [SERVICE_NAME], log)

    async def healthy() -> tuple[bool, str]:
        return (holder.config is not None, "OK" if holder.config is not None else f"no config: {holder.last_error}")

    if not await runtime.start(settings.host, settings.grpc_port, settings.http_port, healthy):
        return 1
    if not await redis.ping():
        log.error("redis at %s does not answer", settings.redis_url)
        return 1
    await runtime.set_serving(holder.config is not None)
    await stop.wait()
    await runtime.stop(0.5)
    redis.close()
    await adaptive.close()
    return 0


class EchoServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Always OK, one status per descriptor, no Redis: what grpc.aio and Envoy cost without the Limiter."""

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest,
                              context: grpc.aio.ServicerContext) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        for _ in request.descriptors:
            response.statuses.add(code=rls_pb2.RateLimitResponse.OK)
        return response


async def serve_echo(settings: Settings, stop: asyncio.Event) -> int:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_concurrent_streams", 1000)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(EchoServicer(), server)
    runtime = ServiceRuntime(AioBackend(server), [SERVICE_NAME], log)
    return await runtime.serve_until(stop, settings.host, settings.grpc_port, settings.http_port)


SERVERS = {"grpclib": serve_grpclib, "echo": serve_echo}


# ------------------------------------------------------------------------------------------- the stack


def upstream_bootstrap(port: int, admin: int) -> Config:
    """The shared upstream: an Envoy answering 200 to everything (what every variant routes to)."""
    hcm = {"@type": HCM_TYPE, "stat_prefix": "upstream", "route_config": {"virtual_hosts": [{
        "name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {
            "status": 200, "body": {"inline_string": '{"ok":true}'}}}]}]},
        "http_filters": [router_filter()]}
    return _bootstrap("upstream", hcm, port, admin, [])


def gateway_bootstrap(name: str, port: int, admin: int, upstream: Endpoint, rls: Endpoint | None) -> Config:
    """One variant's Envoy: one route to the upstream with the production rate_limits; the rate-limit filter
    and its cluster only when `rls` is given (None: the baseline P)."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": f"model-{UPSTREAM}", "timeout": "5s",
                                                 "rate_limits": route_rate_limits()}}
    filters = [router_filter()] if rls is None else [ratelimit_filter(RLS_CLUSTER), router_filter()]
    hcm = {"@type": HCM_TYPE, "stat_prefix": f"bench_{name}", "codec_type": "AUTO",
           "route_config": {"name": "bench", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
           "http_filters": filters}
    clusters = [model_cluster(UPSTREAM, [upstream])]
    if rls is not None:
        clusters.append(service_cluster(RLS_CLUSTER, [rls]))
    return _bootstrap(name, hcm, port, admin, clusters)


def _bootstrap(name: str, hcm: Config, port: int, admin: int, clusters: list[Config]) -> Config:
    return {
        "node": {"id": f"rls-bench-{name}", "cluster": "rls-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": clusters,
        },
    }


@dataclass
class Gateway:
    name: str
    proc: ManagedProcess
    port: int
    admin: int
    service: ManagedProcess | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/bench/infer"


def admin_stats(admin: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json", timeout=5) as resp:
        data = json.load(resp)
    return {s["name"]: s["value"] for s in data.get("stats", []) if isinstance(s.get("value"), int)}


def rls_calls(gateway: Gateway) -> int:
    """ShouldRateLimit calls this Envoy completed (its rate-limit cluster's requests, health checks apart)."""
    stats = admin_stats(gateway.admin)
    return stats.get(f"cluster.{RLS_CLUSTER}.upstream_rq_total", 0)


def cluster_healthy(admin: int, cluster: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters?format=json", timeout=2) as resp:
            data = json.load(resp)
    except Exception:
        return False
    for status in data.get("cluster_statuses", []):
        if status["name"] == cluster:
            return any(not h.get("health_status", {}).get("failed_active_health_check")
                       for h in status.get("host_statuses", []))
    return False


def status_of(url: str, tenant: str) -> int:
    request = urllib.request.Request(url, data=b"{}", headers={TENANT_HEADER: tenant}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass
class Stack:
    work: Path
    redis: RedisServer
    procs: list[ManagedProcess]
    gateways: dict[str, Gateway]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.redis.stop()


def start_service(variant: str, work: Path, config_dir: Path, redis_url: str) -> ManagedProcess:
    grpc_port, http_port = free_port(), free_port()
    flags = ["--config-dir", str(config_dir), "--redis-url", redis_url, "--host", "127.0.0.1",
             "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--log-level", "warning"]
    kind = SERVICES[variant]
    args = (python_module("ratelimit_svc", *flags) if kind == "ratelimit_svc"
            else python_module("bench.rls_framework_bench", "--serve", kind, *flags))
    proc = ManagedProcess(f"rls-{variant}", args, log_dir=work).start()
    proc.grpc_port = grpc_port  # type: ignore[attr-defined]
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/healthcheck"), 30, "healthy")
    return proc


def start_envoy(name: str, config: Config, work: Path, admin: int, needed: list[str]) -> ManagedProcess:
    path = work / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = ManagedProcess(f"envoy-{name}", [envoy_binary(), "-c", str(path), "--concurrency", "1",
                                             "--disable-hot-restart", "-l", "warning"], log_dir=work).start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
    for cluster in needed:
        proc.wait_ready(lambda c=cluster: cluster_healthy(admin, c), 30, f"seeing {cluster} healthy")
    return proc


def start_stack(variants: list[str]) -> Stack:
    work = Path(tempfile.mkdtemp(prefix="igw-rlsfw-"))
    redis = RedisServer(log_dir=work).start()
    stack = Stack(work, redis, [], {})
    try:
        config_dir = work / "ratelimit"
        config_dir.mkdir()
        (config_dir / "igw.yaml").write_text(RLS_CONFIG)
        up_port, up_admin = free_port(), free_port()
        stack.procs.append(start_envoy("upstream", upstream_bootstrap(up_port, up_admin), work, up_admin, []))
        upstream = Endpoint("127.0.0.1", up_port)
        for variant in variants:
            service = None if variant == "P" else start_service(variant, work, config_dir, redis.url)
            if service is not None:
                stack.procs.append(service)
            port, admin = free_port(), free_port()
            rls = None if service is None else Endpoint("127.0.0.1", service.grpc_port)  # type: ignore[attr-defined]
            needed = [f"model-{UPSTREAM}", *([RLS_CLUSTER] if rls else [])]
            envoy = start_envoy(variant, gateway_bootstrap(variant, port, admin, upstream, rls), work, admin, needed)
            stack.procs.append(envoy)
            stack.gateways[variant] = Gateway(variant, envoy, port, admin, service)
        return stack
    except BaseException:
        stack.close()
        raise


def sanity(stack: Stack) -> list[str]:
    """The filter really calls each back end and enforces its answer: with a limit of one per minute the
    second request is refused through A and G; P and the echo never refuse. Problems, as text."""
    import redis as redis_sync  # redis-py, off the measured path

    problems = []
    client = redis_sync.Redis.from_url(stack.redis.url)
    try:
        for name, gateway in stack.gateways.items():
            client.flushdb()
            before = rls_calls(gateway) if name != "P" else 0
            codes = [status_of(gateway.url, SANITY_TENANT) for _ in range(3)]
            expected = [200, 429, 429] if name in ("A", "G") else [200, 200, 200]
            if codes != expected:
                problems.append(f"{name}: tenant {SANITY_TENANT!r} got {codes}, expected {expected}")
            if name != "P" and rls_calls(gateway) - before < 3:
                problems.append(f"{name}: Envoy counted {rls_calls(gateway) - before} ShouldRateLimit calls for 3")
        client.flushdb()
    finally:
        client.close()
    return problems


# ------------------------------------------------------------------------------------------ measuring


def idle_cores(stack: Stack, seconds: float) -> dict[str, float]:
    """Each service's background CPU with no load (cores), subtracted from loaded runs."""
    services = {n: g.service.pid for n, g in stack.gateways.items() if g.service is not None}
    before, started = {n: cpu_seconds(p) for n, p in services.items()}, time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {n: (cpu_seconds(p) - before[n]) / elapsed for n, p in services.items()}


def run_one(stack: Stack, name: str, rate: float, args: argparse.Namespace, idle: dict[str, float]) -> dict[str, Any]:
    gateway = stack.gateways[name]
    cmd = [sys.executable, "-m", "bench.openloop", gateway.url, "--rate", str(rate), "--duration",
           str(args.duration), "--warmup", str(args.warmup), "--cpu", str(args.generator_cpu),
           "--header", f"{TENANT_HEADER}:{TENANT}", "--header", "content-type:application/json"]
    service_pid = gateway.service.pid if gateway.service is not None else None
    calls0 = rls_calls(gateway) if service_pid else 0
    svc0, envoy0, started = (cpu_seconds(service_pid) if service_pid else 0.0), cpu_seconds(gateway.proc.pid), \
        time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + args.warmup + 60, check=False)
    elapsed = time.monotonic() - started
    svc1, envoy1 = (cpu_seconds(service_pid) if service_pid else 0.0), cpu_seconds(gateway.proc.pid)
    if out.returncode != 0:
        raise RuntimeError(f"open-loop generator failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    sent = rate * (args.duration + args.warmup)
    result["envoy_cpu_us"] = (envoy1 - envoy0) / sent * 1e6
    if service_pid:
        result["rls_calls"] = rls_calls(gateway) - calls0
        result["service_cpu_us_gross"] = (svc1 - svc0) / sent * 1e6
        result["service_cpu_us"] = max(0.0, svc1 - svc0 - idle.get(name, 0.0) * elapsed) / sent * 1e6
        result["service_cores"] = (svc1 - svc0) / elapsed
    return result


def summarize(runs: dict[str, list[dict[str, Any]]], base: str) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for key, results in runs.items():
        rate, name = key.split("/")
        pairs = list(zip(results, runs[f"{rate}/{base}"], strict=True))
        s: dict[str, Any] = {
            "p50_ms": median(r["p50_ms"] for r in results),
            "p99_ms": median(r["p99_ms"] for r in results),
            "p999_ms": median(r["p999_ms"] for r in results),
            "added_p50_ms": median(r["p50_ms"] - b["p50_ms"] for r, b in pairs),
            "added_p99_ms": median(r["p99_ms"] - b["p99_ms"] for r, b in pairs),
            "errors": sum(r["errors"] for r in results),
            "envoy_cpu_us": median(r["envoy_cpu_us"] for r in results),
            "send_lag_p99_ms": median(r["send_lag_p99_ms"] for r in results),
            "achieved_send_rate": min(r["achieved_send_rate"] for r in results),
        }
        if name != base:
            s["service_cpu_us"] = median(r["service_cpu_us"] for r in results)
            s["service_cpu_us_gross"] = median(r["service_cpu_us_gross"] for r in results)
            s["service_cores"] = median(r["service_cores"] for r in results)
        summary[key] = s
    return summary


def bench(args: argparse.Namespace) -> int:
    variants = ["P", "A", "G", *(["E"] if args.echo else [])]
    out = Printer()
    stack = start_stack(variants)
    try:
        problems = sanity(stack)
        if problems:
            for problem in problems:
                out(f"SANITY FAIL  {problem}")
            return 1
        out("sanity: a 1/minute tenant got 200 then 429 through A and G (the filter calls the service and "
            "enforces it); P and E never refused")
        for gateway in stack.gateways.values():  # warm every path once (connections, lookup caches)
            for _ in range(20):
                status_of(gateway.url, TENANT)
        idle = idle_cores(stack, args.idle_seconds)
        runs: dict[str, list[dict[str, Any]]] = {}
        call_gaps = []
        for round_index in range(args.rounds):
            for rate in args.rate_list:
                for name in variants:
                    result = run_one(stack, name, rate, args, idle)
                    runs.setdefault(f"{rate:.0f}/{name}", []).append(result)
                    total = rate * (args.duration + args.warmup)
                    if name != "P" and result["rls_calls"] < 0.99 * total:
                        call_gaps.append(f"{rate:.0f}/{name} round {round_index + 1}: {result['rls_calls']} "
                                         f"ShouldRateLimit calls for {total:.0f} requests")
                    print(f"  round {round_index + 1} {rate:.0f}/{name}: p50 {result['p50_ms']:.2f} p99 "
                          f"{result['p99_ms']:.2f} ms, errors {result['errors']}, service "
                          f"{result.get('service_cpu_us', 0):.0f} us/req, lag p99 {result['send_lag_p99_ms']:.2f}",
                          file=sys.stderr, flush=True)
        summary = summarize(runs, "P")
        out(f"\nShouldRateLimit behind Envoy 1.40 (--concurrency 1): open loop, generator pinned to CPU "
            f"{args.generator_cpu}; {args.rounds} round(s) of {args.duration:g} s (+{args.warmup:g} s warm-up) per "
            f"variant and rate, variants alternating; medians; {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}")
        out("service idle background (subtracted from CPU/request): "
            + ", ".join(f"{n} {v * 1000:.1f} ms/s" for n, v in idle.items()))
        for rate in args.rate_list:
            rows = []
            for name in variants:
                s = summary[f"{rate:.0f}/{name}"]
                base = name == "P"
                rows.append([name, VARIANTS[name], f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
                             "-" if base else f"{s['added_p50_ms']:+.2f}", "-" if base else f"{s['added_p99_ms']:+.2f}",
                             "-" if base else f"{s['service_cpu_us']:.0f}",
                             "-" if base else f"{s['service_cpu_us_gross']:.0f}", f"{s['envoy_cpu_us']:.0f}",
                             s["errors"], f"{s['send_lag_p99_ms']:.2f}"])
            out(f"\n{rate:.0f} requests/s")
            out(table(["", "variant", "p50 ms", "p99 ms", "+p50 vs P", "+p99 vs P", "svc us/req", "svc gross",
                       "envoy us/req", "errors", "lag p99"], rows))
        for rate in args.rate_list:
            a, g = summary[f"{rate:.0f}/A"], summary[f"{rate:.0f}/G"]
            pairs = list(zip(runs[f"{rate:.0f}/G"], runs[f"{rate:.0f}/A"], strict=True))
            d50 = median(x["p50_ms"] - y["p50_ms"] for x, y in pairs)
            d99 = median(x["p99_ms"] - y["p99_ms"] for x, y in pairs)
            out(f"G - A at {rate:.0f} req/s (median of per-round differences): p50 {d50:+.3f} ms, p99 {d99:+.3f} ms; "
                f"service CPU {g['service_cpu_us']:.0f} vs {a['service_cpu_us']:.0f} us/request "
                f"({g['service_cpu_us'] / max(1e-9, a['service_cpu_us']):.2f}x)")
            out("  per round, G - A p50: " + ", ".join(f"{x['p50_ms'] - y['p50_ms']:+.2f}" for x, y in pairs)
                + " ms; p99: " + ", ".join(f"{x['p99_ms'] - y['p99_ms']:+.2f}" for x, y in pairs)
                + " ms; P p99 per round: " + ", ".join(f"{r['p99_ms']:.2f}" for r in runs[f"{rate:.0f}/P"]) + " ms")
            summary[f"{rate:.0f}/G-A"] = {"p50_ms": d50, "p99_ms": d99,
                                          "cpu_ratio": g["service_cpu_us"] / max(1e-9, a["service_cpu_us"])}
        lagged = [k for k, s in summary.items() if s.get("send_lag_p99_ms", 0) > LAG_LIMIT_MS]
        if lagged:
            out(f"generator send lag p99 above {LAG_LIMIT_MS:.0f} ms in {', '.join(lagged)} (counted in the latencies)")
        for gap in call_gaps:
            out(f"WARNING  {gap}")
        if not call_gaps:
            out("every run: Envoy made one ShouldRateLimit call per request (its rate-limit cluster's request count)")
        out("Noise: other sessions share these cores; compare variants within one run, rounds alternate.")
        path = write_results("rls_framework_bench", {"settings": {k: v for k, v in vars(args).items()},
                                                     "idle_cores": idle, "summary": summary, "runs": runs,
                                                     "call_gaps": call_gaps}, out.text)
        out(f"results: {path}")
        return 0 if not call_gaps else 1
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        if len(argv) < 2 or argv[1] not in SERVERS:
            print(f"--serve needs one of {', '.join(SERVERS)}", file=sys.stderr)
            return 2
        return service_main("bench.rls_framework_bench", parse_settings, SERVERS[argv[1]], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0, help="first rate, requests/s")
    parser.add_argument("--rates", default="", help="comma-separated rates (default: --rate, then 1000)")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent first and not measured")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the grpc.aio echo control (E)")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--generator-cpu", type=int, default=(os.cpu_count() or 1) - 1)
    args = parser.parse_args(argv)
    if args.rates:
        args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    else:
        args.rate_list = [args.rate] if args.rate == 1000 else [args.rate, 1000.0]
    if not args.rate_list or any(r <= 0 for r in args.rate_list) or args.rounds < 1 or args.duration <= 0:
        parser.error("rates, --rounds and --duration must be positive")
    with contextlib.suppress(AttributeError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
