"""Gateway throughput, feature by feature, side by side in one run (wrk closed loop, Envoy --concurrency 1).

    .venv/bin/python -m bench.gateway_bench [--rounds 3] [--duration 5] [--connections 16] [--variants ...]

Variants (each its own Envoy, all running at once, driven in turn; rounds alternate a..f so drift on a
shared machine hits all of them):
  a   plain Envoy routing to the demo model server (client sends x-igw-model itself)
  b   + ext_proc, headers only (API key -> tenant -> model; the production filter settings)
  b0  the same filter calling bench/ext_proc_echo.py (same framework, no logic; the client sends x-igw-*):
      b against b0 is ext_proc's cost over an empty processor with Envoy as the client
  c   + ext_proc + the rate-limit filter (RLS; limits exist, are counted in Redis, never reached)
  d   + ext_proc with the body read (model registered with body inspection: BUFFERED, full JSON parse)
  e   the quota filter (rate_limit_quota, RLQS = ratelimit_svc) with a budget never reached, no ext_proc
  f   + ext_proc + the quota filter (quota push with authentication: what bench.capacity needs)
  a', e'  the a/e pair again with Envoy answering by direct_response (as PERF_NOTES measured)

Prints RPS, p50/p99, errors (non-2xx and socket errors) and the ratio to (a) per variant, then the CPU per
request of every process from /proc. The demo model server is Python: when it is the bottleneck of (a)
(about one core busy), the (e)/(a) target is judged on the direct_response pair (e')/(a') instead, and
the output says so. Results: bench/results/gateway_bench.json (read by bench.capacity) and .txt.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any

from bench import wrk
from bench.gateway_stack import (
    VARIANTS,
    Stack,
    infer_body,
    request_headers,
    request_path,
    start_envoy,
    start_stack,
    wait_until_ok,
)
from bench.report import Printer, median, table, verdict, write_results

COMPONENTS = ("envoy", "ext_proc", "ratelimit", "redis", "model")
TARGETS = {"b": 0.18, "c": 0.10, "e": 0.85}
MODEL_BOUND_CORES = 0.8  # the model server busier than this during (a): it, not Envoy, sets (a)'s RPS


def measure(stack: Stack, name: str, args: argparse.Namespace, body: bytes) -> dict[str, Any]:
    envoy = stack.envoys[name]
    variant = envoy.variant
    script = wrk.lua_script("POST", request_headers(stack, variant), body)
    url = envoy.url + request_path(variant)
    if args.warmup > 0:
        wrk.run(url, duration=args.warmup, connections=args.connections, script=script, cpu=args.wrk_cpu)
    before, started, children = stack.cpu(name), time.monotonic(), _children_cpu()
    result = wrk.run(url, duration=args.duration, connections=args.connections, script=script, cpu=args.wrk_cpu)
    elapsed = time.monotonic() - started
    after = stack.cpu(name)
    before["wrk"], after["wrk"] = children, _children_cpu()
    out: dict[str, Any] = result.as_dict()
    requests = max(1, result.requests)
    out["cpu_us_gross"] = {c: (after[c] - before[c]) / requests * 1e6 for c in (*COMPONENTS, "wrk")}
    # Net of the no-load background (health checks, sweeps): that part does not grow with the request rate.
    out["cpu_us"] = {c: max(0.0, after[c] - before[c] - args.idle.get(c, 0.0) * elapsed) / requests * 1e6
                     for c in (*COMPONENTS, "wrk")}
    out["cpu_cores"] = {c: (after[c] - before[c]) / elapsed for c in (*COMPONENTS, "wrk")}
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, rounds in results.items():
        summary[name] = {
            "title": VARIANTS[name].title,
            "rps": median(r["rps"] for r in rounds),
            "p50_ms": median(r["p50_ms"] for r in rounds),
            "p99_ms": median(r["p99_ms"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
            "requests": sum(r["requests"] for r in rounds),
            "cpu_us": {c: median(r["cpu_us"][c] for r in rounds) for c in (*COMPONENTS, "wrk")},
            "cpu_cores": {c: median(r["cpu_cores"][c] for r in rounds) for c in (*COMPONENTS, "wrk")},
        }
    for name, rounds in results.items():
        base = "a'" if VARIANTS[name].direct else "a"
        if base in results:
            pairs = zip(rounds, results[base], strict=True)
            summary[name]["ratio"] = median(r["rps"] / max(1e-9, b["rps"]) for r, b in pairs)
            summary[name]["ratio_to"] = base
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of wrk before each measured run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " +
                        " ".join(VARIANTS))
    parser.add_argument("--wrk-cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU wrk is pinned to")
    parser.add_argument("--access-log", action="store_true", help="keep the JSON access log (file) in every Envoy")
    parser.add_argument("--ext-proc-workers", type=int, default=1)
    parser.add_argument("--results-name", default="gateway_bench")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {' '.join(VARIANTS)}")
    wrk.wrk_binary()

    out = Printer()
    body = infer_body()
    stack = start_stack(ext_proc_workers=args.ext_proc_workers,
                        echo_processor=any(VARIANTS[n].processor == "ext_proc_echo" for n in names))
    try:
        for name in names:
            envoy = start_envoy(stack, VARIANTS[name], access_log=args.access_log)
            wait_until_ok(envoy.url + request_path(envoy.variant), request_headers(stack, envoy.variant), body)
        args.idle = stack.idle_cores()
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for round_no in range(args.rounds):
            for name in names:
                results[name].append(measure(stack, name, args, body))
                r = results[name][-1]
                print(f"  round {round_no + 1} {name:<2} {r['rps']:8.0f} rps  p99 {r['p99_ms']:6.2f} ms  "
                      f"errors {r['errors']}", file=sys.stderr, flush=True)
        summary = summarize(results)
        model_cores = summary["a"]["cpu_cores"]["model"] if "a" in summary else 0.0
        # The model server sets (a)'s pace when it is nearly a core busy, or when it spends more CPU per request
        # than Envoy does (then on a shared 2-core box its share of the CPU, not Envoy, limits the rate).
        model_bound = "a" in summary and (model_cores >= MODEL_BOUND_CORES or
                                          summary["a"]["cpu_us"]["model"] >= summary["a"]["cpu_us"]["envoy"])

        out(f"\nGateway throughput: wrk 1 thread, {args.connections} connections, pinned to CPU {args.wrk_cpu}; "
            f"Envoy --concurrency 1; {args.rounds} rounds of {args.duration:.0f} s (+{args.warmup:.0f} s warm-up), "
            f"medians; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
        out(f"access log {'on' if args.access_log else 'off'}; KServe v2 infer body {len(body)} bytes; "
            f"ext_proc workers {args.ext_proc_workers}")
        out("no-load background (subtracted from CPU per request): "
            + ", ".join(f"{c} {v:.3f}" for c, v in args.idle.items()) + " cores")
        rows = []
        for name in names:
            s = summary[name]
            ratio = f"{s['ratio']:.2f} of {s['ratio_to']}" if "ratio" in s else "-"
            rows.append([name, s["title"], f"{s['rps']:.0f}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", ratio,
                         s["errors"]])
        out(table(["", "variant", "RPS", "p50 ms", "p99 ms", "ratio", "errors"], rows))
        out("\nCPU per request (µs, from /proc, net of the no-load background; model = both demo model servers) and "
            "busy cores during the run")
        rows = []
        for name in names:
            s = summary[name]
            cpu = s["cpu_us"]
            rows.append([name, *(f"{cpu[c]:.0f}" for c in COMPONENTS), f"{sum(cpu[c] for c in COMPONENTS):.0f}",
                         " ".join(f"{s['cpu_cores'][c]:.2f}" for c in (*COMPONENTS, "wrk"))])
        out(table(["", *COMPONENTS, "total", "busy cores: envoy ext_proc rls redis model wrk"], rows))

        checks: list[tuple[str, bool | None, str]] = []
        for target_name in ("b", "c"):
            if target_name in summary and "ratio" in summary[target_name]:
                ratio = summary[target_name]["ratio"]
                checks.append((f"({target_name}) >= {TARGETS[target_name]:.2f} of (a)", ratio >= TARGETS[target_name],
                               f"{ratio:.2f}"))
        if "a" in summary:
            a = summary["a"]["cpu_us"]
            out(f"\nmodel server during (a): {model_cores:.2f} cores busy, {a['model']:.0f} µs/request against "
                f"Envoy's {a['envoy']:.0f} µs -> "
                + ("it is the bottleneck of (a) and (e): the (e) target is judged on the direct_response pair "
                   "(e')/(a')." if model_bound else "not the bottleneck: the (e) target is judged on (e)/(a)."))
            if model_bound:
                out("(b) and (c) are judged on (a) as specified; with (a) capped by the model server those ratios are "
                    "flattering. Their ratio to the direct_response (a') is printed as the strict reading.")
        judged_e = "e'" if model_bound and "e'" in summary else "e"
        if judged_e in summary and "ratio" in summary[judged_e]:
            ratio = summary[judged_e]["ratio"]
            base = summary[judged_e]["ratio_to"]
            checks.append((f"({judged_e}) >= {TARGETS['e']:.2f} of ({base})", ratio >= TARGETS["e"], f"{ratio:.2f}"))
        if "a'" in summary:
            for strict in ("b", "c", "d"):
                if strict in summary:
                    value = summary[strict]["rps"] / max(1e-9, summary["a'"]["rps"])
                    summary[strict]["ratio_to_direct"] = value
                    out(f"  strict reading: ({strict}) / (a') = {value:.2f}")
        if "a'" in summary and "e'" in summary:
            envoy_a, envoy_e = summary["a'"]["cpu_us"]["envoy"], summary["e'"]["cpu_us"]["envoy"]
            busy = summary["a'"]["cpu_cores"]["envoy"]
            summary["e'"]["envoy_cpu_ratio"] = envoy_a / max(1e-9, envoy_e)
            checks.append(("(e') Envoy-CPU capacity >= 0.85 of (a') (second reading)",
                           envoy_a / max(1e-9, envoy_e) >= TARGETS["e"], f"{envoy_a / max(1e-9, envoy_e):.2f}"))
            out(f"  quota filter cost in Envoy: {envoy_e - envoy_a:+.0f} µs/request ({envoy_a:.0f} -> {envoy_e:.0f}); "
                f"Envoy-CPU capacity ratio (a')/(e') = {envoy_a / max(1e-9, envoy_e):.2f}; Envoy was {busy:.2f} "
                "cores busy in (a')" + ("" if busy >= 0.9 else
                                       " (not saturated: the load generator / shared CPU bounded (a'), so the "
                                       "RPS ratio understates the filter's cost; the CPU ratio is the capacity "
                                       "reading)"))
        if "b" in summary and "b0" in summary:
            pairs = zip(results["b"], results["b0"], strict=True)
            rps_ratio = median(b["rps"] / max(1e-9, e["rps"]) for b, e in pairs)
            cpu_b, cpu_e = summary["b"]["cpu_us"]["ext_proc"], summary["b0"]["cpu_us"]["ext_proc"]
            summary["b"]["vs_echo"] = {"rps_ratio": rps_ratio, "cpu_ratio": cpu_e / max(1e-9, cpu_b)}
            out(f"  ext_proc against the echo processor through Envoy: RPS (b)/(b0) = {rps_ratio:.2f}; processor CPU "
                f"per request {cpu_e:.0f} -> {cpu_b:.0f} µs, capacity ratio echo/ext_proc = "
                f"{cpu_e / max(1e-9, cpu_b):.2f} (issue 4's 0.85, here with Envoy as the client)")
        errors = sum(s["errors"] for s in summary.values())
        checks.append(("zero errors (non-2xx and socket errors) in every variant", errors == 0, f"{errors}"))
        out("")
        for what, ok, value in checks:
            out(f"{verdict(ok)}  {what}: {value}")
        out("Noise: other sessions share these cores; compare ratios from the same run, not absolute RPS.")
        path = write_results(args.results_name, {
            "settings": {k: v for k, v in vars(args).items()},
            "idle_cores": args.idle,
            "model_bound": model_bound,
            "judged_e_on": judged_e,
            "summary": summary,
            "rounds": {n: [{k: v for k, v in r.items()} for r in rs] for n, rs in results.items()},
            "checks": [{"what": w, "ok": ok, "value": v} for w, ok, v in checks],
        }, out.text)
        out(f"results: {path}")
        return 0 if all(ok is not False for _, ok, _ in checks) else 1
    finally:
        stack.close()


if __name__ == "__main__":
    sys.exit(main())
