"""Closed-loop load for an external processor, run as its own process(es) so it does not share the
service's core: each simulated HTTP request is one Process stream, as Envoy opens it.

    python -m bench.ext_proc_load TARGET --mode headers|buffered --key KEY [--concurrency 64] [--duration 5]

Prints one JSON line: requests, messages, errors, requests/s, p50/p99 per request (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from igw.envoy_config import forwarded_headers

BODY = json.dumps({"model": "bench-alias", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "benchmark " * 80}]}).encode()


def forwarded(name: str) -> bool:
    """Whether the shipped ext_proc filter (igw.envoy_config forward_rules) sends this header."""
    for pattern in forwarded_headers():
        if pattern.get("exact") == name or ("prefix" in pattern and name.lower().startswith(pattern["prefix"])):
            return True
    return False


def request_messages(mode: str, key: str, all_headers: bool = False) -> list[pb.ProcessingRequest]:
    """What Envoy sends for a typical inference call: the headers our filter config forwards from a usual
    header set (`all_headers`: the whole set, as without forward_rules), plus the body when buffered."""
    path = "/v2/models/bench-model/infer" if mode == "headers" else "/v1/chat/completions"
    headers = [
        (":authority", "gateway.example.com"), (":path", path), (":method", "POST"), (":scheme", "https"),
        ("user-agent", "python-httpx/0.27.0"), ("accept", "*/*"), ("content-type", "application/json"),
        ("content-length", str(len(BODY))), ("authorization", f"Bearer {key}"),
        ("x-forwarded-proto", "https"), ("x-forwarded-for", "10.1.2.3"),
        ("x-request-id", "6f1c1f8e-3c2a-4b8e-9d2f-2f0c6a1b7e55"), ("x-igw-tenant", "forged"),
    ]
    headers = [(k, v) for k, v in headers if all_headers or forwarded(k)]
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers])))
    if mode == "headers":
        return [first]
    return [first, pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True))]


async def run(target: str, mode: str, key: str, concurrency: int, duration: float, warmup: float,
              all_headers: bool) -> dict[str, float]:
    messages = request_messages(mode, key, all_headers)
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(concurrency, 4))]
    stubs = [pb_grpc.ExternalProcessorStub(ch) for ch in channels]
    latencies: list[float] = []
    errors = denied = 0
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup

    async def worker(stub: pb_grpc.ExternalProcessorStub) -> None:
        nonlocal errors, denied
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            try:
                async for response in stub.Process(iter(messages), timeout=5):
                    if response.HasField("immediate_response"):
                        denied += 1
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if start >= measure_from:
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "messages": n * len(messages),
        "errors": errors,
        "denied": denied,
        "rps": n / duration,
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("--mode", choices=("headers", "buffered"), default="headers")
    parser.add_argument("--key", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--all-headers", action="store_true", help="send every header, as without forward_rules")
    args = parser.parse_args()
    import uvloop

    print(json.dumps(uvloop.run(run(args.target, args.mode, args.key, args.concurrency, args.duration,
                                    args.warmup, args.all_headers))))


if __name__ == "__main__":
    main()
