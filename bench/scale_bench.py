"""Scale of the per-model configuration: 1,000 models x 50 tenants in the rate-limit service and in Envoy.

    .venv/bin/python -m bench.scale_bench [--models 1000] [--tenants 50] [--rounds 3] [--duration 5]
                                          [--part rls,envoy]

Part rls: the rate-limit config rendered from `igw policy generate` (igw.policy.generate + the policy's
rate-limit renderer, as `igw policy apply` writes it; about 3 MB, 18,000 [tenant, model] entries).
  - parse time in-process, and the real service from spawn to healthy, with its resident memory;
  - hot reload: the file is rewritten (atomic rename) with one limit changed; time until ShouldRateLimit
    answers with the new limit (includes the service's 0.5 s poll interval);
  - ShouldRateLimit calls/s with descriptors spread over every model (a real allowed tenant each) vs the
    same service driven on one (tenant, model) pair, alternating rounds (bench.rls_pairs_load, which
    reuses bench.grpc_load's runner). Targets: load and reload < 2 s, spread >= 0.90 of one pair.
Part envoy: Envoy bootstraps from igw.envoy_config (router only, access log off), upstream = a second
Envoy answering every request itself (so the gateway's routing, not a Python model server, is measured):
  - B  one model (the test-bed layout with one model);
  - A  1,000 models, the test-bed layout: one route matching x-igw-model and one cluster (with HTTP health
       checks every second) per model;
  - C  the redesign, built only here: one route, one cluster of all models' endpoints with subset load
       balancing on endpoint metadata `model`, chosen per request from x-igw-model by the
       header-to-metadata filter (O(1) subset lookup instead of a scan over 1,000 routes).
  Each is validated with `envoy --mode validate`, started (time to /ready, i.e. clusters initialised),
  its memory read from the admin /memory endpoint, its no-load CPU (health checks) measured, then driven
  with wrk (x-igw-model rotating over all models via a Lua script, or fixed). Configs run one at a time,
  restarted every round, so each one's background (1,000 health checks/s) is charged to it alone.
  Targets: validate OK, start < 10 s, spread over 1,000 models >= 0.90 of the one-model config.
Results: bench/results/scale_bench.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench import wrk
from bench.gateway_stack import envoy_binary, rss_kib
from bench.procstat import cpu_seconds
from bench.report import Printer, median, table, verdict, write_results
from igw.envoy_config import (
    HCM_TYPE,
    MODEL_HEADER,
    bootstrap,
    model_cluster,
    model_route,
    router_filter,
)
from igw.procs import ManagedProcess, RedisServer, free_port, http_ok, python_module
from igw.topology import EXT_PROC_CLUSTER, RATELIMIT_CLUSTER, Endpoint, ServiceEndpoint, Topology

PROBE_TENANT = "reload-probe"
LOAD_TARGET_S = 2.0
START_TARGET_S = 10.0
RATIO_TARGET = 0.90
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.Route"
HEADER_TO_METADATA_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3."
                           "Config")


# ------------------------------------------------------------------------------------------ rate limits


def generated_policy(models: int, tenants: int) -> tuple[str, list[tuple[str, str]], list[str]]:
    """The rendered rate-limit YAML, one (allowed tenant, model) pair per model, and the model names."""
    from igw.policy import ratelimit
    from igw.policy.generate import generate_policy
    from igw.policy.load import load_policy

    policy = load_policy("<igw policy generate>", generate_policy(models, tenants, namespaces=20, replicas=4,
                                                                  seed=1))
    owner: dict[str, str] = {}
    for tenant, allowed in policy.allowed.items():
        for model in allowed:
            owner.setdefault(model, tenant)
    names = list(policy.models)
    pairs = [(owner[m], m) for m in names if m in owner]
    return ratelimit.render_file(policy), pairs, names


def with_probe(text: str, limit: int) -> str:
    """The rendered config plus one top-level limit the reload test changes (the descriptors list is the
    file's last block, at indentation 0)."""
    return text + (f"- key: tenant\n  value: {PROBE_TENANT}\n"
                   f"  rate_limit: {{unit: second, requests_per_unit: {limit}}}\n")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def probe_limit(port: int) -> int | None:
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        request = rls_pb2.RateLimitRequest(domain="igw", descriptors=[ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant", value=PROBE_TENANT)])])
        try:
            answer = stub.ShouldRateLimit(request, timeout=2)
        except grpc.RpcError:
            return None
        status = answer.statuses[0]
        return status.current_limit.requests_per_unit if status.HasField("current_limit") else None


def rls_part(args: argparse.Namespace, out: Printer, work: Path) -> dict[str, Any]:
    from ratelimit_svc.loader import read_config_dir

    started = time.perf_counter()
    text, pairs, _ = generated_policy(args.models, args.tenants)
    render_s = time.perf_counter() - started
    config_dir = work / "ratelimit"
    config_dir.mkdir()
    config_file = config_dir / "igw.yaml"
    limit = 1000
    write_atomic(config_file, with_probe(text, limit))
    pairs_file = work / "pairs.txt"
    pairs_file.write_text("".join(f"{t} {m}\n" for t, m in pairs))
    parse_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        config = read_config_dir(config_dir)
        parse_times.append(time.perf_counter() - t0)
    limits = config.limit_count()

    redis = RedisServer(log_dir=work).start()
    grpc_port, http_port = free_port(), free_port()
    service = ManagedProcess("ratelimit-scale", python_module(
        "ratelimit_svc", "--config-dir", str(config_dir), "--redis-url", redis.url, "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--log-level", "warn"), log_dir=work)
    try:
        t0 = time.perf_counter()
        service.start()
        service.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/healthcheck"), 60, "healthy")
        start_s = time.perf_counter() - t0
        rss_loaded = rss_kib(service.pid)
        reloads = []
        for _ in range(args.reloads):
            limit += 1
            t0 = time.perf_counter()
            write_atomic(config_file, with_probe(text, limit))
            while probe_limit(grpc_port) != limit:
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("the new limit was not answered within 30 s")
                time.sleep(0.01)
            reloads.append(time.perf_counter() - t0)
            time.sleep(0.6)  # the old config is released; the next change starts from a settled service
        rss_reloaded = rss_kib(service.pid)

        runs: dict[str, list[dict[str, Any]]] = {"spread": [], "one": []}
        for _ in range(args.rounds):
            for name in ("spread", "one"):
                cpu0 = cpu_seconds(service.pid)
                done = subprocess.run(
                    [sys.executable, "-m", "bench.rls_pairs_load", f"127.0.0.1:{grpc_port}", "--pairs",
                     str(pairs_file), "--first", "1" if name == "one" else "0", "--concurrency",
                     str(args.concurrency), "--duration", str(args.duration)],
                    capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["cpu_us"] = (cpu_seconds(service.pid) - cpu0) / max(1, result["calls"]) * 1e6
                runs[name].append(result)
    finally:
        service.stop()
        redis.stop()
    ratio = median(s["rps"] / max(1e-9, o["rps"]) for s, o in zip(runs["spread"], runs["one"], strict=True))
    summary = {
        "models": args.models, "tenants": args.tenants, "file_bytes": config_file.stat().st_size,
        "limits": limits, "pairs": len(pairs), "render_s": render_s, "parse_s": median(parse_times),
        "start_to_healthy_s": start_s, "reload_s": median(reloads), "reload_max_s": max(reloads),
        "rss_mib_loaded": rss_loaded / 1024, "rss_mib_after_reloads": rss_reloaded / 1024,
        "spread_rps": median(r["rps"] for r in runs["spread"]), "one_rps": median(r["rps"] for r in runs["one"]),
        "spread_p99_ms": median(r["p99_ms"] for r in runs["spread"]),
        "one_p99_ms": median(r["p99_ms"] for r in runs["one"]),
        "spread_cpu_us": median(r["cpu_us"] for r in runs["spread"]),
        "one_cpu_us": median(r["cpu_us"] for r in runs["one"]),
        "errors": sum(r["errors"] for rs in runs.values() for r in rs), "ratio": ratio, "runs": runs,
    }
    s = summary
    out(f"\nRate-limit service, policy of {args.models} models x {args.tenants} tenants (igw policy generate, seed 1): "
        f"{s['file_bytes'] / 1e6:.1f} MB, {s['limits']} limits")
    out(table(["measure", "value", "target", "result"], [
        ["render (policy -> rate-limit YAML), in-process", f"{s['render_s']:.2f} s", "", ""],
        ["parse (read_config_dir), in-process, median of 3", f"{s['parse_s']:.2f} s", f"< {LOAD_TARGET_S:.0f} s",
         verdict(s["parse_s"] < LOAD_TARGET_S)],
        ["service spawn -> healthy (interpreter start included)", f"{s['start_to_healthy_s']:.2f} s",
         f"< {LOAD_TARGET_S:.0f} s", verdict(s["start_to_healthy_s"] < LOAD_TARGET_S)],
        [f"hot reload: write -> new limit answered, median of {args.reloads}", f"{s['reload_s']:.2f} s",
         f"< {LOAD_TARGET_S:.0f} s", verdict(s["reload_s"] < LOAD_TARGET_S)],
        ["hot reload, slowest", f"{s['reload_max_s']:.2f} s", "", ""],
        ["resident memory after load", f"{s['rss_mib_loaded']:.0f} MiB", "", ""],
        [f"resident memory after {args.reloads} reloads", f"{s['rss_mib_after_reloads']:.0f} MiB", "", ""],
        [f"ShouldRateLimit calls/s, spread over {len(pairs)} models", f"{s['spread_rps']:.0f}", "", ""],
        ["ShouldRateLimit calls/s, one (tenant, model)", f"{s['one_rps']:.0f}", "", ""],
        ["  ratio spread / one (median of paired rounds)", f"{ratio:.2f}", f">= {RATIO_TARGET:.2f}",
         verdict(ratio >= RATIO_TARGET)],
        ["  p99 spread / one", f"{s['spread_p99_ms']:.1f} / {s['one_p99_ms']:.1f} ms", "", ""],
        ["  service CPU per call spread / one", f"{s['spread_cpu_us']:.0f} / {s['one_cpu_us']:.0f} µs", "", ""],
        ["  CPU reading: one / spread µs per call", f"{s['one_cpu_us'] / max(1e-9, s['spread_cpu_us']):.2f}",
         f">= {RATIO_TARGET:.2f}", verdict(s["one_cpu_us"] / max(1e-9, s["spread_cpu_us"]) >= RATIO_TARGET)],
        ["  errors", str(s["errors"]), "0", verdict(s["errors"] == 0)],
    ]))
    summary["checks"] = {"load": s["parse_s"] < LOAD_TARGET_S, "start": s["start_to_healthy_s"] < LOAD_TARGET_S,
                         "reload": s["reload_s"] < LOAD_TARGET_S, "ratio": ratio >= RATIO_TARGET,
                         "errors": s["errors"] == 0}
    return summary


# ------------------------------------------------------------------------------------------------ Envoy


def upstream_bootstrap(port: int, admin: int) -> dict[str, Any]:
    hcm = {"@type": HCM_TYPE, "stat_prefix": "upstream", "route_config": {"virtual_hosts": [{
        "name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {
            "status": 200, "body": {"inline_string": '{"ready":true}'}}}]}]},
        "http_filters": [router_filter()]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [{
                "name": "upstream", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}]}}


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def per_model_bootstrap(models: list[str], upstream: Endpoint, port: int, admin: int) -> dict[str, Any]:
    """The test bed's layout (igw.envoy_config.bootstrap) for `models`, routing only: router filter, no
    access log, and without the ext_proc / rate-limit clusters the router-only chain never calls."""
    unused = ServiceEndpoint(Endpoint("127.0.0.1", 9), Endpoint("127.0.0.1", 9))
    topology = Topology(gateway=Endpoint("127.0.0.1", port), admin=Endpoint("127.0.0.1", admin),
                        redis=Endpoint("127.0.0.1", 9), ratelimit=(unused,), ext_proc=(unused,),
                        models={m: (upstream,) for m in models})
    config = bootstrap(topology)
    hcm = _hcm(config)
    hcm["access_log"] = []
    hcm["http_filters"] = [router_filter()]
    resources = config["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] not in (EXT_PROC_CLUSTER,
                                                                                   RATELIMIT_CLUSTER)]
    return config


def subset_bootstrap(models: list[str], upstream: Endpoint, port: int, admin: int) -> dict[str, Any]:
    """The redesign: one route and one cluster for all models; x-igw-model -> dynamic metadata envoy.lb
    `model` (header-to-metadata filter) -> the subset of endpoints whose metadata names that model."""
    config = per_model_bootstrap(models[:1], upstream, port, admin)
    hcm = _hcm(config)
    route = model_route(models[0], cluster="models")
    route["name"] = "models"
    route["match"] = {"prefix": "/", "headers": [{"name": MODEL_HEADER, "present_match": True}]}
    hcm["route_config"]["virtual_hosts"][0]["routes"][0] = route
    hcm["http_filters"] = [{
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {"@type": HEADER_TO_METADATA_TYPE, "request_rules": [{
            "header": MODEL_HEADER,
            "on_header_present": {"metadata_namespace": "envoy.lb", "key": "model", "type": "STRING"},
            "remove": False,
        }]},
    }, router_filter()]
    cluster = model_cluster("models", [upstream])
    cluster["name"] = "models"
    cluster["load_assignment"] = {"cluster_name": "models", "endpoints": [{"lb_endpoints": [{
        "endpoint": {"address": {"socket_address": {"address": upstream.host, "port_value": upstream.port}}},
        "metadata": {"filter_metadata": {"envoy.lb": {"model": m}}},
    } for m in models]}]}
    cluster["lb_subset_config"] = {"fallback_policy": "NO_FALLBACK", "subset_selectors": [{"keys": ["model"]}]}
    config["static_resources"]["clusters"] = [cluster]
    return config


def replicas_bootstrap(models: list[str], replicas: int, upstream: Endpoint, port: int, admin: int) -> dict[str, Any]:
    """Control: one model whose cluster has `replicas` endpoints (round robin), so requests spread over as
    many upstream hosts (connection pools, health checks) as the 1,000-model configs, with one route."""
    config = per_model_bootstrap(models[:1], upstream, port, admin)
    cluster = config["static_resources"]["clusters"][0]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] *= replicas
    return config


def matcher_bootstrap(models: list[str], upstream: Endpoint, port: int, admin: int) -> dict[str, Any]:
    """Redesign 2: the test-bed routes and per-model clusters, but the virtual host selects the route with a
    matcher tree (exact-match map on x-igw-model: a hash lookup) instead of scanning 1,000 routes in order."""
    config = per_model_bootstrap(models, upstream, port, admin)
    vhost = _hcm(config)["route_config"]["virtual_hosts"][0]
    routes = vhost.pop("routes")
    by_model = {m: r for m, r in zip(models, routes, strict=False)}
    vhost["matcher"] = {"matcher_tree": {
        "input": {"name": "x-igw-model", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": MODEL_HEADER}},
        "exact_match_map": {"map": {m: {"action": {"name": r["name"], "typed_config": {
            "@type": ROUTE_TYPE, **r}}} for m, r in by_model.items()}},
    }, "on_no_match": {"action": {"name": routes[-1]["name"], "typed_config": {"@type": ROUTE_TYPE,
                                                                              **routes[-1]}}}}
    return config


def admin_json(admin: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as resp:
        return json.load(resp)


def validate(config_path: Path) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_path), "-l", "error"],
                          capture_output=True, text=True, timeout=120)
    return done.returncode == 0, time.perf_counter() - t0, (done.stdout + done.stderr)[-1500:]


def start_gateway(name: str, config: dict[str, Any], work: Path, admin: int) -> tuple[ManagedProcess, float]:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = ManagedProcess(name, [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                                 "-l", "warning"], log_dir=work)
    t0 = time.perf_counter()
    proc.start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 120, "ready")
    return proc, time.perf_counter() - t0


def envoy_part(args: argparse.Namespace, out: Printer, work: Path) -> dict[str, Any]:
    _, _, names = generated_policy(args.models, args.tenants)
    up_port, up_admin = free_port(), free_port()
    (work / "upstream.yaml").write_text(yaml.safe_dump(upstream_bootstrap(up_port, up_admin)))
    upstream_proc = ManagedProcess("upstream", [envoy_binary(), "-c", str(work / "upstream.yaml"), "--concurrency",
                                                "1", "--disable-hot-restart", "-l", "warning"], log_dir=work).start()
    upstream = Endpoint("127.0.0.1", up_port)
    configs = {
        "B": ("one model (test-bed layout)", per_model_bootstrap(names[:1], upstream, 0, 0), [names[0]]),
        "A": (f"{len(names)} models, route + cluster per model (test-bed layout)",
              per_model_bootstrap(names, upstream, 0, 0), names),
        "R": (f"control: one model, {len(names)} replicas", replicas_bootstrap(names, len(names), upstream, 0, 0),
              [names[0]]),
        "C": (f"{len(names)} models, one cluster + subset LB by header (redesign 1)",
              subset_bootstrap(names, upstream, 0, 0), names),
        "D": (f"{len(names)} models, cluster per model, matcher-tree route lookup (redesign 2)",
              matcher_bootstrap(names, upstream, 0, 0), names),
    }
    loads = {  # run name -> (config, models rotated in x-igw-model, description)
        "B one": ("B", [names[0]], "one model"),
        "A spread": ("A", names, f"x-igw-model over all {len(names)}"),
        "A last": ("A", [names[-1]], "the last route only"),
        "R one": ("R", [names[0]], f"one model, round robin over {len(names)} hosts"),
        "C spread": ("C", names, f"x-igw-model over all {len(names)}"),
        "C one": ("C", [names[0]], "one model"),
        "D spread": ("D", names, f"x-igw-model over all {len(names)}"),
    }
    info: dict[str, dict[str, Any]] = {k: {"title": v[0], "start_s": [], "idle_cores": [], "memory": {}}
                                       for k, v in configs.items()}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in loads}
    try:
        upstream_proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{up_admin}/ready"), 30, "ready")
        for key, (_, config, _) in configs.items():
            path = work / f"validate-{key}.yaml"
            config = json.loads(json.dumps(config))
            config["admin"]["address"]["socket_address"]["port_value"] = free_port()
            config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = free_port()
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            ok, seconds, text = validate(path)
            info[key].update(validate_ok=ok, validate_s=seconds, validate_tail="" if ok else text,
                             config_bytes=path.stat().st_size,
                             clusters=len(config["static_resources"]["clusters"]),
                             routes=len(_hcm(config)["route_config"]["virtual_hosts"][0].get("routes", [])) or
                             "matcher")
        for _ in range(args.rounds):
            for key, (_, config, _) in configs.items():
                port, admin = free_port(), free_port()
                config = json.loads(json.dumps(config))
                config["admin"]["address"]["socket_address"]["port_value"] = admin
                config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
                proc, started = start_gateway(f"gateway-{key}", config, work, admin)
                try:
                    info[key]["start_s"].append(started)
                    time.sleep(1.0)
                    up0, gw0, t0 = cpu_seconds(upstream_proc.pid), cpu_seconds(proc.pid), time.monotonic()
                    time.sleep(args.idle)
                    elapsed = time.monotonic() - t0
                    info[key]["idle_cores"].append((cpu_seconds(proc.pid) - gw0) / elapsed)
                    info[key].setdefault("upstream_idle_cores", []).append(
                        (cpu_seconds(upstream_proc.pid) - up0) / elapsed)
                    memory = admin_json(admin, "/memory")
                    info[key]["memory"] = {k: int(memory.get(k, 0)) for k in ("allocated", "heap_size",
                                                                                "pageheap_unmapped")}
                    info[key]["rss_mib"] = rss_kib(proc.pid) / 1024
                    for run_name, (config_key, rotate, _) in loads.items():
                        if config_key != key:
                            continue
                        script = wrk.lua_script("GET", {MODEL_HEADER: rotate[0]}, b"", MODEL_HEADER, rotate)
                        url = f"http://127.0.0.1:{port}/v2/health/ready"
                        if args.warmup:
                            wrk.run(url, duration=args.warmup, connections=args.connections, script=script,
                                    cpu=args.wrk_cpu)
                        c0 = cpu_seconds(proc.pid)
                        result = wrk.run(url, duration=args.duration, connections=args.connections, script=script,
                                         cpu=args.wrk_cpu)
                        entry = result.as_dict()
                        entry["envoy_cpu_us"] = (cpu_seconds(proc.pid) - c0) / max(1, result.requests) * 1e6
                        runs[run_name].append(entry)
                        print(f"  {run_name:<9} {result.rps:8.0f} rps  p99 {result.p99_ms:6.2f} ms  errors "
                              f"{result.errors}", file=sys.stderr, flush=True)
                finally:
                    proc.stop()
    finally:
        upstream_proc.stop()

    base = runs["B one"]
    summary: dict[str, Any] = {"configs": {}, "runs": {}}
    for key, data in info.items():
        summary["configs"][key] = {**{k: v for k, v in data.items() if k not in ("start_s", "idle_cores",
                                                                                  "upstream_idle_cores")},
                                   "start_s": median(data["start_s"]), "start_max_s": max(data["start_s"]),
                                   "idle_cores": median(data["idle_cores"]),
                                   "upstream_idle_cores": median(data.get("upstream_idle_cores", [0.0]))}
    for run_name, results in runs.items():
        summary["runs"][run_name] = {
            "rps": median(r["rps"] for r in results), "p99_ms": median(r["p99_ms"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "envoy_cpu_us": median(r["envoy_cpu_us"] for r in results),
            "ratio": median(r["rps"] / max(1e-9, b["rps"]) for r, b in zip(results, base, strict=True)),
            "rounds": results,
        }
    out(f"\nEnvoy 1.40, --concurrency 1, router only; upstream: an Envoy answering itself; wrk 1 thread, "
        f"{args.connections} connections pinned to CPU {args.wrk_cpu}; {args.rounds} rounds, each config restarted "
        "every round, medians")
    rows = []
    for key, c in summary["configs"].items():
        rows.append([key, c["title"], c["routes"], c["clusters"], f"{c['config_bytes'] / 1e6:.1f} MB",
                     verdict(c["validate_ok"]) + f" {c['validate_s']:.1f}s", f"{c['start_s']:.2f} s",
                     f"{c['memory'].get('allocated', 0) / 2**20:.0f} / {c['memory'].get('heap_size', 0) / 2**20:.0f}",
                     f"{c['rss_mib']:.0f}", f"{c['idle_cores']:.3f} / {c['upstream_idle_cores']:.3f}"])
    out(table(["", "config", "routes", "clusters", "yaml", "validate", "start→ready", "/memory alloc/heap MiB",
               "RSS MiB", "idle cores gw / upstream"], rows))
    rows = []
    base_cpu = summary["runs"]["B one"]["envoy_cpu_us"]
    hosts_cpu = summary["runs"]["R one"]["envoy_cpu_us"]
    for run_name, r in summary["runs"].items():
        r["cpu_ratio"] = base_cpu / max(1e-9, r["envoy_cpu_us"])
        r["cpu_ratio_to_r"] = hosts_cpu / max(1e-9, r["envoy_cpu_us"])
        rows.append([run_name, loads[run_name][2], f"{r['rps']:.0f}", f"{r['p99_ms']:.2f}", f"{r['ratio']:.2f}",
                     f"{r['envoy_cpu_us']:.0f}", f"{r['cpu_ratio']:.2f}", f"{r['cpu_ratio_to_r']:.2f}", r["errors"]])
    out(table(["run", "x-igw-model", "RPS", "p99 ms", "RPS ratio to B", "Envoy µs/req", "CPU ratio to B",
               "CPU ratio to R", "errors"], rows))
    out("CPU ratio = Envoy µs/request of the baseline / of the run: the capacity reading of one Envoy worker, steadier "
        "than RPS here because Envoy is not saturated (wrk and the neighbours share its two cores).")
    a, c, d = summary["runs"]["A spread"], summary["runs"]["C spread"], summary["runs"]["D spread"]
    conf_a = summary["configs"]["A"]
    checks = {
        "validate": conf_a["validate_ok"],
        "start": conf_a["start_max_s"] < START_TARGET_S,
        "ratio": a["ratio"] >= RATIO_TARGET,
        "errors": all(r["errors"] == 0 for r in summary["runs"].values()),
    }
    out(f"{verdict(checks['validate'])}  A ({len(names)} models) accepted by envoy --mode validate")
    out(f"{verdict(checks['start'])}  A starts in under {START_TARGET_S:.0f} s: slowest {conf_a['start_max_s']:.2f} s")
    out(f"{verdict(checks['ratio'])}  A spread over {len(names)} models >= {RATIO_TARGET:.2f} of B (one model): "
        f"{a['ratio']:.2f} (RPS); Envoy-CPU reading {a['cpu_ratio']:.2f}")
    for label, run in (("C (redesign 1)", c), ("D (redesign 2)", d)):
        out(f"{verdict(run['ratio'] >= RATIO_TARGET)}  {label} spread >= {RATIO_TARGET:.2f} of B: {run['ratio']:.2f} "
            f"(RPS); Envoy-CPU reading {run['cpu_ratio']:.2f}, {run['cpu_ratio_to_r']:.2f} of the {len(names)}-host "
            "control R")
    r = summary["runs"]["R one"]
    out(f"  control R (one model over {len(names)} hosts) is {r['ratio']:.2f} of B: the part of the gap that comes "
        "from spreading over that many upstream hosts (connection pools), which any layout serving 1,000 models "
        "with their own replicas pays")
    out(f"{verdict(checks['errors'])}  zero errors in every run")
    summary["checks"] = checks
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--part", default="rls,envoy", help="rls, envoy or both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of no-load CPU measurement per config")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent ShouldRateLimit calls")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--wrk-cpu", type=int, default=(os.cpu_count() or 1) - 1)
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    if not parts <= {"rls", "envoy"} or not parts:
        parser.error("--part takes rls, envoy or rls,envoy")
    if "envoy" in parts:
        wrk.wrk_binary()
    out = Printer()
    work = Path(tempfile.mkdtemp(prefix="igw-scale-"))
    results: dict[str, Any] = {"settings": vars(args)}
    if "rls" in parts:
        results["rls"] = rls_part(args, out, work)
    if "envoy" in parts:
        results["envoy"] = envoy_part(args, out, work)
    out("Noise: other sessions share these cores; ratios come from paired rounds of the same run.")
    path = write_results("scale_bench", results, out.text)
    out(f"results: {path}")
    ok = all(all(part["checks"].values()) for key, part in results.items() if key in ("rls", "envoy"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
