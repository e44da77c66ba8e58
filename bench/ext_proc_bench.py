"""ext_proc throughput: the full auth + shaping path (cached tenant) against an echo processor
(bench/ext_proc_echo.py: same framework, no logic), measured side by side in the same run.

    .venv/bin/python -m bench.ext_proc_bench [--rounds 3] [--duration 5] [--concurrency 64] [--workers 1]
                                             [--clients 1]

Starts redis-server (seeded through ext_proc.store: one tenant, one key, a model and an alias), the
processor and the echo processor, then drives each with separate load-generator processes
(bench/ext_proc_load.py, one Process stream per simulated request), alternating in every round so
drift on a shared machine hits both. The services and the load generators run on CPUs of their own
when the machine has enough (as the gateway benches pin wrk; --no-pin to let them share), so the
ratio measures the processors rather than how the scheduler splits two cores between four processes.
Two request shapes: headers-only (KServe v2 path) and buffered body (OpenAI-style path, headers + a 1 KB
JSON body whose "model" is an alias). Of the request's 13 headers, the messages carry the 7 that the
shipped filter config forwards (igw.envoy_config forward_rules); --all-headers sends all 13.

Prints medians: requests/s, messages/s, p50/p99 per request, service CPU per request, and the ratio
processor/echo, with pass/fail against the targets (ratio >= 0.85, >= 2500 requests/s per process in
headers-only mode). The load generator is Python too: when it, not the service, is the bottleneck,
the throughput ratio understates the gap and the CPU-per-request ratio (also printed) is the better
measure of what the processor's logic costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.procstat import cpu_seconds, pin
from igw.procs import ManagedProcess, RedisServer, free_port, http_ok, python_module

MODES = ("headers", "buffered")
SERVICES = ("echo", "ext_proc")


def seed(redis_url: str) -> str:
    from ext_proc import store

    client = store.connect(redis_url)
    store.register_model(client, "bench-model")
    store.set_alias(client, "bench-alias", "bench-model")
    store.create_tenant(client, "bench", department="perf", tier="premium", models="bench-*")
    key = store.issue_key(client, "bench").key
    client.close()
    return key


def start(name: str, module: str, work: Path, workers: int, *extra: str) -> tuple[ManagedProcess, int]:
    grpc_port, http_port = free_port(), free_port()
    proc = ManagedProcess(name, python_module(module, "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                                              "--http-port", str(http_port), "--workers", str(workers),
                                              "--log-level", "warn", *extra), log_dir=work).start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/healthcheck"), 30, "healthy")
    return proc, grpc_port


def load(port: int, mode: str, key: str, args: argparse.Namespace, cpus: set[int] | None) -> dict[str, float]:
    """Run args.clients load processes at once (on `cpus` when given) and add up what they measured."""
    per_client = max(1, args.concurrency // args.clients)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "bench.ext_proc_load", f"127.0.0.1:{port}", "--mode", mode, "--key", key,
         "--concurrency", str(per_client), "--duration", str(args.duration),
         *(["--all-headers"] if args.all_headers else [])],
        stdout=subprocess.PIPE, text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None) for _ in range(args.clients)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.duration + 60)
        if proc.returncode != 0:
            raise SystemExit(f"load generator failed with exit code {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    total = {k: sum(r[k] for r in results) for k in ("requests", "messages", "errors", "denied", "rps")}
    total["p50_ms"] = statistics.median(r["p50_ms"] for r in results)
    total["p99_ms"] = max(r["p99_ms"] for r in results)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent streams in total")
    parser.add_argument("--workers", type=int, default=1, help="service processes (SO_REUSEPORT), as the services")
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes")
    parser.add_argument("--all-headers", action="store_true",
                        help="send all 13 headers of the request, as Envoy would without our forward_rules")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not give the services and the load generators CPUs of their own")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    service_cpus = set(range(args.workers)) if args.pin and args.workers < cpus else None
    load_cpus = set(range(args.workers, cpus)) if service_cpus else None

    work = Path(tempfile.mkdtemp(prefix="igw-epbench-"))
    redis = RedisServer(log_dir=work).start()
    procs: dict[str, tuple[ManagedProcess, int]] = {}
    try:
        key = seed(redis.url)
        procs["echo"] = start("echo", "bench.ext_proc_echo", work, args.workers)
        procs["ext_proc"] = start("ext_proc", "ext_proc", work, args.workers, "--redis-url", redis.url,
                                  "--cache-ttl", "1h")
        pinned = service_cpus is not None and all(pin(proc.pid, service_cpus) for proc, _ in procs.values())
        results: dict[tuple[str, str], list[dict[str, float]]] = {(m, s): [] for m in MODES for s in SERVICES}
        for _ in range(args.rounds):
            for mode in MODES:
                for service in SERVICES:
                    proc, port = procs[service]
                    cpu_before = cpu_seconds(proc.pid)
                    result = load(port, mode, key, args, load_cpus if pinned else None)
                    result["cpu_us"] = (cpu_seconds(proc.pid) - cpu_before) / max(1, result["requests"]) * 1e6
                    results[(mode, service)].append(result)

        def med(mode: str, service: str, field: str) -> float:
            return statistics.median(r[field] for r in results[(mode, service)])

        print(f"\nProcess streams, {args.concurrency} concurrent, {args.workers} service process(es), "
              f"{args.clients} load process(es), {args.rounds} rounds of {args.duration:.0f} s, medians, "
              + ("all 13 request headers, " if args.all_headers else "the 7 forwarded request headers of 13, ")
              + (f"services on CPU {sorted(service_cpus)}, load on {sorted(load_cpus)}" if pinned  # type: ignore[arg-type]
                 else "not pinned"))
        header = f"{'mode':<9} {'service':<9} {'req/s':>7} {'msg/s':>7} {'p50 ms':>7} {'p99 ms':>7} " \
                 f"{'CPU/req':>9} {'errors':>6} {'denied':>6}"
        print(header)
        for mode in MODES:
            for service in SERVICES:
                rows = results[(mode, service)]
                print(f"{mode:<9} {service:<9} {med(mode, service, 'rps'):>7.0f} "
                      f"{med(mode, service, 'rps') * rows[0]['messages'] / max(1, rows[0]['requests']):>7.0f} "
                      f"{med(mode, service, 'p50_ms'):>7.2f} {med(mode, service, 'p99_ms'):>7.2f} "
                      f"{med(mode, service, 'cpu_us'):>6.0f} us {sum(r['errors'] for r in rows):>6.0f} "
                      f"{sum(r['denied'] for r in rows):>6.0f}")
        checks = []
        for mode in MODES:
            pairs = zip(results[(mode, "ext_proc")], results[(mode, "echo")], strict=True)
            ratio = statistics.median(e["rps"] / b["rps"] for e, b in pairs)
            cpu_ratio = med(mode, "echo", "cpu_us") / med(mode, "ext_proc", "cpu_us")
            print(f"{mode}: throughput ratio ext_proc/echo {ratio:.2f}; CPU-per-request ratio echo/ext_proc "
                  f"{cpu_ratio:.2f}; ext_proc capacity at one core ~{1e6 / med(mode, 'ext_proc', 'cpu_us'):.0f} req/s")
            checks.append((f"{mode}: ext_proc/echo throughput >= 0.85", ratio >= 0.85, f"{ratio:.2f}"))
        per_process = med("headers", "ext_proc", "rps") / args.workers
        checks.append(("headers-only: >= 2500 requests/s per process", per_process >= 2500, f"{per_process:.0f}"))
        checks.append(("no errors or denials", all(r["errors"] == 0 and r["denied"] == 0
                                                   for rows in results.values() for r in rows), ""))
        for name, ok, value in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {value}")
        return 0
    finally:
        for proc, _ in procs.values():
            proc.stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
