"""Closed-loop gRPC load generator, run as its own process so it does not share the service's core.

`python -m bench.grpc_load rls TARGET --concurrency 16 --duration 5` drives ShouldRateLimit with
descriptors spread over many values and prints one JSON line: calls, errors, calls/s, p50/p99 (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable

import grpc


def rls_call_factory(channel: grpc.aio.Channel, spread: int, domain: str) -> Callable[[], object]:
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    stub = rls_pb2_grpc.RateLimitServiceStub(channel)
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    requests = []
    for i in range(max(1, spread)):
        tenant = f"tenant-{i % 50}"
        model = f"model-{i}"
        requests.append(rls_pb2.RateLimitRequest(domain=domain, descriptors=[
            ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="tenant", value=tenant)]),
            ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="tenant", value=tenant),
                                                       entry(key="model", value=model)]),
            ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="model", value=model)]),
        ]))

    def call() -> object:
        return stub.ShouldRateLimit(random.choice(requests), timeout=5)

    return call


async def run(target: str, kind: str, concurrency: int, duration: float, warmup: float, spread: int,
              domain: str) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    # Several channels so HTTP/2 connections spread over SO_REUSEPORT workers, like several Envoy workers.
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(concurrency, 4))]
    calls = [rls_call_factory(ch, spread, domain) for ch in channels]
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup

    async def worker(call: Callable[[], object]) -> None:
        nonlocal errors
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            try:
                await call()  # type: ignore[misc]
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if start >= measure_from:
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    latencies.sort()
    n = len(latencies)
    return {
        "calls": n,
        "errors": errors,
        "rps": n / duration,
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["rls"])
    parser.add_argument("target")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--spread", type=int, default=1000, help="distinct models in the descriptors")
    parser.add_argument("--domain", default="bench")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(run(args.target, args.kind, args.concurrency, args.duration, args.warmup, args.spread,
                            args.domain))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
