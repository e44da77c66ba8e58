"""`igw demo`: the README's main job.

Starts redis-server and the rate-limit service with the example config on free loopback ports, sends
sample ShouldRateLimit calls the way Envoy would, and prints OK/OVER_LIMIT counts per descriptor.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from igw.procs import REPO_ROOT, ManagedProcess, RedisServer, free_port, http_ok, python_module

EXAMPLE_CONFIG = REPO_ROOT / "config" / "ratelimit"

SAMPLES: list[tuple[str, list[tuple[str, str]], int]] = [
    ("tenant=acme (5/s)", [("tenant", "acme")], 8),
    ("tenant=gold (20/s)", [("tenant", "gold")], 8),
    ("model=experimental (shadow 3/min)", [("model", "experimental")], 6),
    ("path=/healthz (unlimited)", [("path", "/healthz")], 4),
    ("unknown descriptor", [("nothing", "here")], 2),
]


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the local demo and print what happened")
    demo.add_argument("--keep-logs", action="store_true", help="print where the process logs are kept")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
    from rich.console import Console
    from rich.table import Table

    console = Console()
    log_dir = Path(tempfile.mkdtemp(prefix="igw-demo-"))
    redis = RedisServer(log_dir=log_dir).start()
    grpc_port, http_port = free_port(), free_port()
    service = ManagedProcess(
        "ratelimit",
        python_module("ratelimit_svc", "--config-dir", str(EXAMPLE_CONFIG), "--redis-url", redis.url,
                      "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port)),
        log_dir=log_dir,
    ).start()
    try:
        service.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/healthcheck"), 20, "healthy")
        console.print(f"redis-server on {redis.url}; rate-limit service gRPC :{grpc_port}, HTTP :{http_port}")
        table = Table(title="ShouldRateLimit, domain 'demo', calls sent back to back")
        for column in ("descriptor", "calls", "OK", "OVER_LIMIT", "limit", "remaining after"):
            table.add_column(column)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            for label, entries, calls in SAMPLES:
                descriptor = ratelimit_pb2.RateLimitDescriptor(
                    entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
                )
                ok = over = 0
                last = None
                for _ in range(calls):
                    last = stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="demo", descriptors=[descriptor]),
                                                timeout=2)
                    if last.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
                        over += 1
                    else:
                        ok += 1
                status = last.statuses[0] if last else None
                limit = (f"{status.current_limit.requests_per_unit}/"
                         f"{rls_pb2.RateLimitResponse.RateLimit.Unit.Name(status.current_limit.unit).lower()}"
                         if status and status.HasField("current_limit") else "-")
                table.add_row(label, str(calls), str(ok), str(over), limit,
                              str(status.limit_remaining) if status else "-")
        console.print(table)
        if args.keep_logs:
            console.print(f"logs in {log_dir}")
        return 0
    finally:
        service.stop()
        redis.stop()
