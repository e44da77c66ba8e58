"""Rate-limit service on a Redis Cluster (REDIS_TYPE=cluster) against the same service on one redis-server.

    .venv/bin/python -m bench.redis_cluster_bench [--rounds 3] [--duration 5] [--concurrency 16] [--masters 3]

Starts one redis-server, a Redis Cluster of `--masters` masters on the same machine, and two copies of the
service with the same config (1000 models x 50 tenants, 3 descriptors per call spread over them): one with
REDIS_TYPE=single on the lone server, one with REDIS_TYPE=cluster on the cluster. A separate load-generator
process drives each in turn, alternating rounds so drift on a shared machine hits both. Prints medians of
calls/s, p50/p99, service CPU per call and Redis CPU per call (summed over the masters), and the ratios
cluster/single. No target: a cluster spreads Redis's CPU over several cores, and what it costs the service is
a write to each master a call touches (three descriptors land on up to three masters) instead of one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.ratelimit_bench import bench_config, measured_round
from bench.report import Printer
from igw.procs import ManagedProcess, RedisServer, free_port, http_ok, python_module
from tests.ratelimit.cluster import RedisClusterProcs

MODES = ("single", "cluster")


def _service(name: str, config: Path, work: Path, env: dict[str, str]) -> tuple[ManagedProcess, int]:
    grpc_port, http_port = free_port(), free_port()
    proc = ManagedProcess(
        f"ratelimit-{name}",
        python_module("ratelimit_svc", "--config-dir", str(config), "--host", "127.0.0.1", "--grpc-port",
                      str(grpc_port), "--http-port", str(http_port), "--log-level", "warn"),
        log_dir=work, env=env,
    ).start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/healthcheck"), 30, "healthy")
    return proc, grpc_port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--spread", type=int, default=1000)
    parser.add_argument("--masters", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="igw-clusterbench-"))
    config = work / "config"
    config.mkdir()
    (config / "bench.yaml").write_text(bench_config(1000, 50))
    single = RedisServer(log_dir=work).start()
    cluster = RedisClusterProcs(work, args.masters).start()
    services: dict[str, tuple[ManagedProcess, int]] = {}
    redis_pids = {"single": [single.pid], "cluster": [server.pid for server in cluster.servers]}
    try:
        services["single"] = _service("single", config, work, {"REDIS_URL": single.url})
        services["cluster"] = _service("cluster", config, work, {"REDIS_TYPE": "cluster", "REDIS_URL": cluster.seeds})
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                proc, port = services[mode]
                results[mode].append(measured_round(proc.pid, port, redis_pids[mode], args))

        out = Printer()

        def med(mode: str, field: str) -> float:
            return statistics.median(r[field] for r in results[mode])

        def ratio(field: str) -> float:
            pairs = zip(results["cluster"], results["single"], strict=True)
            return statistics.median(c[field] / s[field] for c, s in pairs if s[field])

        out(f"\nShouldRateLimit, 3 descriptors per call over {args.spread} models, {args.concurrency} concurrent "
            f"calls, one service process, cluster of {args.masters} masters on this machine, {args.rounds} rounds "
            f"of {args.duration:.0f} s, medians")
        out(f"{'redis':<8} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'svc CPU/call':>13} {'redis CPU/call':>15} "
            f"{'errors':>7}")
        for mode in MODES:
            out(f"{mode:<8} {med(mode, 'rps'):>9.0f} {med(mode, 'p50_ms'):>8.2f} {med(mode, 'p99_ms'):>8.2f} "
                f"{med(mode, 'cpu_us_per_call'):>10.0f} us {med(mode, 'redis_cpu_us_per_call'):>12.0f} us "
                f"{sum(r['errors'] for r in results[mode]):>7.0f}")
        out(f"cluster / single: calls/s {ratio('rps'):.2f}, service CPU per call {ratio('cpu_us_per_call'):.2f}, "
            f"Redis CPU per call {ratio('redis_cpu_us_per_call'):.2f}, p99 {ratio('p99_ms'):.2f}")
        errors = sum(r["errors"] for mode in MODES for r in results[mode])
        return 1 if errors else 0
    finally:
        for proc, _ in services.values():
            proc.stop()
        cluster.stop()
        single.stop()


if __name__ == "__main__":
    sys.exit(main())
