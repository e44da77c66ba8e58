"""Local over-limit cache (LOCAL_CACHE_SIZE_IN_BYTES): Redis round trips and service CPU with the cache on
vs off, at twice the offered load the limits admit.

    .venv/bin/python -m bench.local_cache_bench [--rounds 3] [--duration 5] [--keys 10] [--limit 50]

Starts one redis-server and two copies of the service (cache off; cache on), each with its own key
prefix so they never share counters. Each round sends, open loop, `2 x keys x limit` calls a second
spread evenly over `keys` descriptors whose limit is `limit` a second: half the calls are over their
limit. The copies alternate rounds so drift on a shared machine hits both. Prints medians of Redis
counting calls (EVALSHA, from INFO commandstats) per RLS call, service CPU per call, p50/p99 and the
on/off ratios. With a 1 s window a key costs Redis `limit + 1` calls a second with the cache and
`2 x limit` without, so expect a Redis ratio near (limit + 1) / (2 x limit). Prints, never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from bench.procstat import cpu_seconds
from bench.report import Printer
from igw.procs import ManagedProcess, RedisServer, free_port, http_ok, python_module

VARIANTS = ("off", "on")


def bench_config(limit: int) -> str:
    return ("domain: bench\ndescriptors:\n  - key: tenant\n"
            f"    rate_limit: {{unit: second, requests_per_unit: {limit}}}\n")


async def offer(target: str, keys: int, rate: float, duration: float) -> dict[str, float]:
    """Open loop: a call every 1/rate s whatever the answers, so a slower server does not lower the load."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stubs = [rls_pb2_grpc.RateLimitServiceStub(ch) for ch in channels]
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    requests = [rls_pb2.RateLimitRequest(domain="bench", descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="tenant", value=f"t{k}")])]) for k in range(keys)]
    latencies: list[float] = []
    over = errors = 0

    async def one(i: int) -> None:
        nonlocal over, errors
        started = time.perf_counter()
        try:
            response = await stubs[i % len(stubs)].ShouldRateLimit(requests[i % keys], timeout=5)
        except grpc.aio.AioRpcError:
            errors += 1
            return
        latencies.append(time.perf_counter() - started)
        over += response.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT

    tasks: list[asyncio.Task[None]] = []
    begin = time.perf_counter()
    total = int(rate * duration)
    for i in range(total):
        delay = begin + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for ch in channels:
        await ch.close()
    latencies.sort()
    n = len(latencies)
    return {
        "calls": n, "errors": errors, "over": over / max(1, n),
        "offered_rps": total / duration, "answered_rps": n / (time.perf_counter() - begin),
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


def evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--keys", type=int, default=10, help="descriptors the load is spread over")
    parser.add_argument("--limit", type=int, default=50, help="requests_per_unit (a second) of each descriptor")
    parser.add_argument("--cache-bytes", type=int, default=1_000_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="igw-localcache-"))
    config = work / "config"
    config.mkdir()
    (config / "bench.yaml").write_text(bench_config(args.limit))
    server = RedisServer(log_dir=work).start()
    client = redis.Redis.from_url(server.url)
    services: dict[str, tuple[ManagedProcess, int]] = {}
    rate = 2.0 * args.keys * args.limit
    try:
        for variant in VARIANTS:
            grpc_port, http_port = free_port(), free_port()
            size = str(args.cache_bytes if variant == "on" else 0)
            proc = ManagedProcess(
                f"ratelimit-cache-{variant}",
                python_module("ratelimit_svc", "--config-dir", str(config), "--redis-url", server.url,
                              "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                              "--cache-key-prefix", f"{variant}_", "--local-cache-size-in-bytes", size,
                              "--log-level", "warn"),
                log_dir=work,
            ).start()
            proc.wait_ready(lambda p=http_port: http_ok(f"http://127.0.0.1:{p}/healthcheck"), 30, "healthy")
            services[variant] = (proc, grpc_port)

        results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant, (proc, port) in services.items():
                cpu_before, redis_before = cpu_seconds(proc.pid), evalsha_calls(client)
                result = asyncio.run(offer(f"127.0.0.1:{port}", args.keys, rate, args.duration))
                calls = max(1, result["calls"])
                result["redis_calls_per_call"] = (evalsha_calls(client) - redis_before) / calls
                result["cpu_us_per_call"] = (cpu_seconds(proc.pid) - cpu_before) / calls * 1e6
                results[variant].append(result)

        out = Printer()

        def med(variant: str, field: str) -> float:
            return statistics.median(r[field] for r in results[variant])

        out(f"\nShouldRateLimit, 1 descriptor per call, {args.keys} keys x {args.limit}/s, offered {rate:.0f} "
            f"calls/s open loop (2x what the limits admit), {args.rounds} rounds of {args.duration:.0f} s, medians")
        out(f"{'cache':<6} {'answered/s':>10} {'over':>6} {'redis calls/call':>17} {'svc CPU/call':>13} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>7}")
        for variant in VARIANTS:
            out(f"{variant:<6} {med(variant, 'answered_rps'):>10.0f} {med(variant, 'over'):>6.2f} "
                f"{med(variant, 'redis_calls_per_call'):>17.3f} {med(variant, 'cpu_us_per_call'):>10.0f} us "
                f"{med(variant, 'p50_ms'):>7.2f} {med(variant, 'p99_ms'):>7.2f} "
                f"{sum(r['errors'] for r in results[variant]):>7.0f}")
        pairs = list(zip(results["on"], results["off"], strict=True))

        def ratio(field: str) -> float:
            return statistics.median(on[field] / off[field] for on, off in pairs if off[field])

        expected = (args.limit + 1) / (2 * args.limit)
        out(f"on/off: redis calls/call {ratio('redis_calls_per_call'):.2f} (expected ~{expected:.2f}), "
            f"service CPU/call {ratio('cpu_us_per_call'):.2f}, p50 {ratio('p50_ms'):.2f}")
        return 0
    finally:
        for proc, _ in services.values():
            proc.stop()
        client.close()
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
