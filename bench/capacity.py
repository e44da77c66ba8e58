"""Cores and service processes the gateway needs for a request rate, from measured CPU per request.

    .venv/bin/python -m bench.capacity [--rate 66000] [--headroom 0.7]

Reads what bench.gateway_bench and bench.latency_bench wrote (bench/results/*.json; run those first) and
multiplies each component's measured CPU per request by the rate. Two modes, every feature on:
  per-request  ext_proc (headers) + rate-limit filter calling ShouldRateLimit for every request
               (gateway_bench variant c; latency_bench path d)
  quota push   ext_proc (headers) + rate_limit_quota filter, RLQS reports only
               (gateway_bench variant f; latency_bench path e)
Two sources: gateway_bench runs every component flat out (closed loop; batching makes CPU per request
lowest there), latency_bench at a fixed 1,000 req/s (processes well below a core busy: less batching,
higher CPU per request). Processes planned at --headroom (70 %) busy are close to the saturated case,
so that is the planning figure by default (--planning saturated); --planning max takes the larger of
the two (a pessimistic bound, also printed as its own cores column). Python services use one core per process (GIL), so
processes = ceil(cores / headroom); Envoy workers likewise. Redis is single-threaded: above one core
the rate-limit service spreads its counters over shards (--redis-shards). That does not divide the load
evenly (a request's descriptors can land on two shards, each a round trip), so the shard count comes from
bench.ratelimit_bench runs with --shards N: the busiest shard's Redis CPU per call against one Redis's,
applied to the Redis cores above. Without such runs the count is marked "(unmeasured)".
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from bench.report import Printer, read_results, table, write_results

COMPONENTS = ("envoy", "ext_proc", "ratelimit", "redis")
MODES = {  # mode -> (gateway_bench variant, latency_bench path)
    "per-request (RLS)": ("c", "d"),
    "quota push (RLQS)": ("f", "e"),
}
PYTHON = {"ext_proc", "ratelimit"}


def source_costs(gateway: dict[str, Any] | None, latency: dict[str, Any] | None,
                 latency_key: str) -> dict[str, dict[str, dict[str, float]]]:
    """mode -> source -> component -> µs per request."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mode, (variant, path) in MODES.items():
        out[mode] = {}
        if gateway and variant in gateway.get("summary", {}):
            out[mode]["gateway_bench (saturated)"] = {c: gateway["summary"][variant]["cpu_us"][c] for c in COMPONENTS}
        key = f"{latency_key}/{path}"
        if latency and key in latency.get("summary", {}):
            rate = latency_key.split("/")[1]
            out[mode][f"latency_bench ({rate} req/s)"] = {c: latency["summary"][key]["cpu_us"][c] for c in COMPONENTS}
    return out


def shard_shares(ratelimit: dict[str, Any] | None) -> dict[int, float]:
    """Measured shard count -> the busiest shard's share of what one Redis carries for the same calls."""
    runs = (ratelimit or {}).get("runs", {})
    if "1" not in runs:
        return {}
    single = runs["1"]["redis_cpu_us_per_call"]
    return {int(n): run["busiest_shard_cpu_us_per_call"] / single for n, run in runs.items()}


def redis_count(cores: float, headroom: float, shares: dict[int, float]) -> str:
    if cores <= headroom:
        return "1"
    fitting = [n for n, share in sorted(shares.items()) if cores * share <= headroom]
    if fitting:
        return f"{fitting[0]} shards"
    if len(shares) > 1:
        return f"> {max(shares)} shards"
    return f"{math.ceil(cores / headroom)}+ shards (unmeasured)"


def processes(component: str, cores: float, headroom: float, shares: dict[int, float] | None = None) -> str:
    if component == "redis":
        return redis_count(cores, headroom, shares or {})
    return str(max(1, math.ceil(cores / headroom)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=66_000, help="requests per second to size for")
    parser.add_argument("--headroom", type=float, default=0.7,
                        help="busy fraction of a core each process is planned at (1.0: run flat out)")
    parser.add_argument("--planning", choices=("saturated", "max"), default="saturated",
                        help="planning CPU per request: gateway_bench's (saturated) or the larger of both sources")
    parser.add_argument("--latency-block", default="small/1000",
                        help="which latency_bench run supplies the second source (BODY/RATE)")
    args = parser.parse_args(argv)
    if not 0 < args.headroom <= 1:
        parser.error("--headroom must be in (0, 1]")
    gateway, latency = read_results("gateway_bench"), read_results("latency_bench")
    shares = shard_shares(read_results("ratelimit_bench"))
    if gateway is None and latency is None:
        print("no results: run `python -m bench.gateway_bench` and `python -m bench.latency_bench` first",
              file=sys.stderr)
        return 1
    out = Printer()
    costs = source_costs(gateway, latency, args.latency_block)
    result: dict[str, Any] = {"rate": args.rate, "headroom": args.headroom, "modes": {}}
    out(f"\nCapacity for {args.rate:,.0f} requests/s, every feature on (ext_proc auth + quota), from measured CPU per "
        f"request ({args.planning}); processes/workers planned at {args.headroom:.0%} of a core each (one Python "
        "process = one core)")
    for source_name, data in (("gateway_bench", gateway), ("latency_bench", latency)):
        if data:
            out(f"  {source_name}: {data['machine']['time']}, {data['machine']['cpus']} CPUs, load average "
                f"{data['machine']['load_avg_1m']:.1f}")
    for mode, sources in costs.items():
        if not sources:
            out(f"\n{mode}: no measurement")
            continue
        saturated = next((s for name, s in sources.items() if name.startswith("gateway_bench")), None)
        if args.planning == "max" or saturated is None:
            planning = {c: max(s[c] for s in sources.values()) for c in COMPONENTS}
        else:
            planning = dict(saturated)
        worst = {c: max(s[c] for s in sources.values()) for c in COMPONENTS}
        rows = []
        for component in COMPONENTS:
            per_source = [f"{s[component]:.0f}" for s in sources.values()]
            cores = args.rate * planning[component] / 1e6
            kind = "Envoy workers" if component == "envoy" else (
                "processes" if component in PYTHON else "redis-server")
            rows.append([component, *per_source, f"{planning[component]:.0f}", f"{cores:.1f}",
                         processes(component, cores, args.headroom, shares), kind,
                         f"{args.rate * worst[component] / 1e6:.1f}"])
        total_us = sum(planning.values())
        total_cores = args.rate * total_us / 1e6
        rows.append(["total", *(f"{sum(s.values()):.0f}" for s in sources.values()), f"{total_us:.0f}",
                     f"{total_cores:.1f}", "", "", f"{args.rate * sum(worst.values()) / 1e6:.1f}"])
        out(f"\n{mode}")
        out(table(["component", *(f"µs/req {name}" for name in sources), "µs/req planned", "cores",
                   "count", "of", "cores (pessimistic)"], rows))
        redis_cores = args.rate * planning["redis"] / 1e6
        if redis_cores > args.headroom and shares:
            out("Redis sharded (bench.ratelimit_bench --shards N): busiest shard's share of one Redis's load -> cores "
                "per shard: " + ", ".join(f"{n}: {share:.2f} -> {redis_cores * share:.2f}"
                                          for n, share in sorted(shares.items())))
        result["modes"][mode] = {"sources": sources, "planning_us": planning,
                                 "cores": {c: args.rate * planning[c] / 1e6 for c in COMPONENTS},
                                 "total_cores": total_cores}
    if all(m in result["modes"] for m in MODES):
        per_request, quota = (result["modes"][m]["total_cores"] for m in MODES)
        out(f"\nquota push needs {quota:.1f} cores against {per_request:.1f} for per-request rate limiting "
            f"({per_request - quota:.1f} fewer, {quota / per_request:.0%}); largest component: "
            + "; ".join(f"{m.split(' ')[0]} {max(result['modes'][m]['cores'], key=result['modes'][m]['cores'].get)}"
                        for m in MODES))
    out("Not counted: the model servers, the load balancer in front, TLS, access logs (off in the benches), and "
        "multi-process scaling losses (PERF_NOTES: about 0.7-0.75 efficiency per added process).")
    write_results("capacity", result, out.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
