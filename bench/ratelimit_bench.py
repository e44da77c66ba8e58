"""Rate-limit service throughput: Redis-backed vs the same server counting in memory, same run.

    .venv/bin/python -m bench.ratelimit_bench [--rounds 3] [--duration 5] [--concurrency 16] [--workers 1]

Starts redis-server and two copies of the service (backend redis, backend memory) with a config of
1000 models x 50 tenants, then drives each in turn with a separate load-generator process, alternating
rounds so drift on a shared machine hits both. Prints medians: calls/s, p50/p99, service CPU per call,
and the ratio redis/memory, with pass/fail against the targets (>= 3000 calls/s per process, ratio >=
0.85, p99 < 10 ms at 16 concurrent calls). `--shards N` spreads the counters over N redis-servers
(--redis-shards) and prints the busiest one's CPU; bench/results/ratelimit_bench.json keeps one entry per
shard count, which bench.capacity reads to size Redis for per-request mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.procstat import cpu_seconds
from bench.report import Printer, read_results, write_results
from igw.procs import ManagedProcess, RedisServer, free_port, http_ok, python_module


def bench_config(models: int, tenants: int) -> str:
    lines = ["domain: bench", "descriptors:"]
    for t in range(tenants):
        lines += [f"  - key: tenant\n    value: tenant-{t}\n"
                  "    rate_limit: {unit: second, requests_per_unit: 1000000}"]
        lines += ["    descriptors:\n      - key: model\n        rate_limit: {unit: second, requests_per_unit: 100000}"]
    for m in range(models):
        lines += [f"  - key: model\n    value: model-{m}\n    rate_limit: {{unit: second, requests_per_unit: 1000000}}"]
    return "\n".join(lines) + "\n"


def measured_round(service_pid: int, port: int, redis_pids: list[int], args: argparse.Namespace) -> dict[str, float]:
    """One load-generator run against the service on `port` (args: concurrency, duration, spread): its
    result plus the service's CPU per call and the Redis servers' (summed, and the busiest one)."""
    cpu_before = cpu_seconds(service_pid)
    redis_before = [cpu_seconds(pid) for pid in redis_pids]
    out = subprocess.run(
        [sys.executable, "-m", "bench.grpc_load", "rls", f"127.0.0.1:{port}", "--concurrency", str(args.concurrency),
         "--duration", str(args.duration), "--warmup", "0", "--spread", str(args.spread)],
        capture_output=True, text=True, check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    calls = max(1, result["calls"])
    result["cpu_us_per_call"] = (cpu_seconds(service_pid) - cpu_before) / calls * 1e6
    per_redis = [(cpu_seconds(pid) - before) / calls * 1e6
                 for pid, before in zip(redis_pids, redis_before, strict=True)]
    result["redis_cpu_us_per_call"] = sum(per_redis)
    result["busiest_shard_cpu_us_per_call"] = max(per_redis)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--spread", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=1,
                        help="redis-servers holding the counters (--redis-shards); Redis CPU is summed over them "
                             "and the busiest one is printed too")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="igw-rlbench-"))
    config = work / "config"
    config.mkdir()
    (config / "bench.yaml").write_text(bench_config(1000, 50))
    redis = RedisServer(log_dir=work).start()
    shards = [redis, *(RedisServer(log_dir=work).start() for _ in range(args.shards - 1))]
    shard_flag = ["--redis-shards", ",".join(s.url for s in shards)] if args.shards > 1 else []
    services: dict[str, tuple[ManagedProcess, int]] = {}
    try:
        for backend in ("redis", "memory"):
            grpc_port, http_port = free_port(), free_port()
            proc = ManagedProcess(
                f"ratelimit-{backend}",
                python_module("ratelimit_svc", "--config-dir", str(config), "--redis-url", redis.url,
                              "--backend", backend, "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                              "--http-port", str(http_port), "--workers", str(args.workers),
                              "--log-level", "warn", *shard_flag),
                log_dir=work,
            ).start()
            proc.wait_ready(lambda p=http_port: http_ok(f"http://127.0.0.1:{p}/healthcheck"), 30, "healthy")
            services[backend] = (proc, grpc_port)

        results: dict[str, list[dict[str, float]]] = {"redis": [], "memory": []}
        for _ in range(args.rounds):
            for backend, (proc, port) in services.items():
                results[backend].append(measured_round(proc.pid, port, [shard.pid for shard in shards], args))

        out = Printer()

        def med(backend: str, field: str) -> float:
            return statistics.median(r[field] for r in results[backend])

        out(f"\nShouldRateLimit, 3 descriptors per call, {args.concurrency} concurrent calls, "
              f"{args.workers} service process(es), {args.shards} redis shard(s), {args.rounds} rounds of "
              f"{args.duration:.0f} s, medians")
        header = ("backend", "calls/s", "p50 ms", "p99 ms", "svc CPU/call", "redis CPU/call", "errors")
        widths = (-8, 9, 8, 8, 13, 15, 7)
        out(" ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
        for backend in ("redis", "memory"):
            out(f"{backend:<8} {med(backend, 'rps'):>9.0f} {med(backend, 'p50_ms'):>8.2f} "
                  f"{med(backend, 'p99_ms'):>8.2f} "
                  f"{med(backend, 'cpu_us_per_call'):>10.0f} us {med(backend, 'redis_cpu_us_per_call'):>12.0f} us "
                  f"{sum(r['errors'] for r in results[backend]):>7.0f}")
        if args.shards > 1:
            out(f"busiest of {args.shards} shards: {med('redis', 'busiest_shard_cpu_us_per_call'):.0f} us of "
                  f"Redis CPU per call (all shards: {med('redis', 'redis_cpu_us_per_call'):.0f} us)")
        pairs = zip(results["redis"], results["memory"], strict=True)
        ratio = statistics.median(r["rps"] / m["rps"] for r, m in pairs)
        per_process = med("redis", "rps") / args.workers
        checks = [
            ("calls/s per process >= 3000", per_process >= 3000, f"{per_process:.0f}"),
            ("redis / no-redis ratio >= 0.85", ratio >= 0.85, f"{ratio:.2f}"),
            ("p99 < 10 ms", med("redis", "p99_ms") < 10, f"{med('redis', 'p99_ms'):.2f} ms"),
        ]
        if args.shards == 1:  # the targets are set for one Redis; sharded runs only feed bench.capacity
            for name, ok, value in checks:
                out(f"{'PASS' if ok else 'FAIL'}  {name}: {value}")
        runs = (read_results("ratelimit_bench") or {}).get("runs", {})  # one entry per shard count
        runs[str(args.shards)] = {
            "calls_per_s": med("redis", "rps"), "service_cpu_us_per_call": med("redis", "cpu_us_per_call"),
            "redis_cpu_us_per_call": med("redis", "redis_cpu_us_per_call"),
            "busiest_shard_cpu_us_per_call": med("redis", "busiest_shard_cpu_us_per_call"),
            "memory_calls_per_s": med("memory", "rps"), "ratio": ratio,
        }
        write_results("ratelimit_bench", {"runs": runs}, out.text)
        return 0
    finally:
        for proc, _ in services.values():
            proc.stop()
        for shard in shards:
            shard.stop()


if __name__ == "__main__":
    sys.exit(main())
