"""bench.grpc_load's closed-loop ShouldRateLimit runner, with descriptors taken from a list of real
(tenant, model) pairs instead of grpc_load's synthetic `tenant-N` / `model-N` names, so every call
matches the [tenant], [tenant, model] and [model] entries of a generated policy.

    python -m bench.rls_pairs_load TARGET --pairs FILE [--first N] --concurrency 16 --duration 5

FILE holds one `tenant model` pair per line; `--first 1` drives a single pair (the one-model baseline).
Prints grpc_load's JSON line. The runner itself is grpc_load.run, unchanged: only its request factory
is swapped in this process.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable

import grpc

from bench import grpc_load


def pairs_call_factory(pairs: list[tuple[str, str]]) -> Callable[[grpc.aio.Channel, int, str], Callable[[], object]]:
    def factory(channel: grpc.aio.Channel, _spread: int, domain: str) -> Callable[[], object]:
        from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
        from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        entry = ratelimit_pb2.RateLimitDescriptor.Entry
        requests = [rls_pb2.RateLimitRequest(domain=domain, descriptors=[
            ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="tenant", value=tenant)]),
            ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="tenant", value=tenant),
                                                       entry(key="model", value=model)]),
            ratelimit_pb2.RateLimitDescriptor(entries=[entry(key="model", value=model)]),
        ]) for tenant, model in pairs]

        def call() -> object:
            return stub.ShouldRateLimit(random.choice(requests), timeout=5)

        return call

    return factory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("--pairs", required=True, help="file of `tenant model` lines")
    parser.add_argument("--first", type=int, default=0, help="use only the first N pairs (0: all)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--domain", default="igw")
    args = parser.parse_args()
    with open(args.pairs) as handle:
        pairs = [tuple(line.split()[:2]) for line in handle if line.strip()]
    if args.first:
        pairs = pairs[:args.first]
    if not pairs or any(len(p) != 2 for p in pairs):
        parser.error(f"{args.pairs}: expected `tenant model` lines")
    grpc_load.rls_call_factory = pairs_call_factory(pairs)  # type: ignore[assignment]
    import uvloop

    result = uvloop.run(grpc_load.run(args.target, "rls", args.concurrency, args.duration, args.warmup, len(pairs),
                                      args.domain))
    result["pairs"] = len(pairs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
