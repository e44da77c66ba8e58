"""The processes and Envoy bootstraps the gateway benchmarks drive: one stack, several Envoys side by side.

Every Envoy (one worker each) gets the bootstrap `igw.envoy_config.bootstrap` renders for the same
topology (listener, HCM settings, clusters), with only its filter chain and, for the direct-response
baselines, its routes changed. So a variant differs from production only in what it is named after.
The stack is: redis-server (seeded through ext_proc.store), ext_proc, the rate-limit service (which also
serves RLQS), two demo model servers (a headers-only model and one registered with body inspection).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procstat import cpu_seconds
from igw.envoy_config import (
    EXT_PROC_TYPE,
    ext_proc_filter,
    http_filters,
    router_filter,
    service_cluster,
)
from igw.envoy_config import bootstrap as gateway_bootstrap
from igw.envoy_quota import RLQS_CLUSTER, RLQS_HEALTH_SERVICE, rate_limit_quota_filter
from igw.procs import VENV_BIN, ManagedProcess, RedisServer, free_port, http_ok, python_module
from igw.topology import Endpoint, ServiceEndpoint, Topology

Config = dict[str, Any]

TENANT = "bench"
MODEL = "bench-model"  # headers only
BODY_MODEL = "bench-inspect"  # registered with body inspection: ext_proc reads the JSON body (BUFFERED)
MODELS = (MODEL, BODY_MODEL)
NEVER_REACHED = 1_000_000  # per second, for every descriptor: limits exist and are counted, never hit

RLS_CONFIG = f"""\
# Limits that exist (every request is counted, in Redis) but are never reached.
domain: igw
descriptors:
  - key: tenant
    rate_limit: {{unit: second, requests_per_unit: {NEVER_REACHED}}}
    descriptors:
      - key: model
        rate_limit: {{unit: second, requests_per_unit: {NEVER_REACHED}}}
  - key: model
    rate_limit: {{unit: second, requests_per_unit: {NEVER_REACHED}}}
"""

INFER_BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def infer_body(pad_bytes: int = 0) -> bytes:
    """A KServe v2 infer body; `pad_bytes` > 0 pads it (parameters.pad, ignored by the model) to that size."""
    body = dict(INFER_BODY)
    if pad_bytes:
        base = len(json.dumps({**body, "parameters": {"pad": ""}}, separators=(",", ":")))
        body["parameters"] = {"pad": "x" * max(0, pad_bytes - base)}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Variant:
    """One gateway configuration under test."""

    name: str
    title: str
    filters: Callable[[], list[Config]]
    direct: bool = False  # answer with a direct_response route instead of routing to the model server
    model: str = MODEL
    ext_proc: bool = True  # requests are authenticated by ext_proc (else the client sends x-igw-* itself)
    processor: str = "ext_proc"  # the service behind Envoy's ext_proc cluster: ext_proc or ext_proc_echo


def _ext_proc_only() -> list[Config]:
    return [ext_proc_filter(), router_filter()]


def _quota(gateway: str) -> Callable[[], list[Config]]:
    return lambda: [rate_limit_quota_filter(gateway), router_filter()]


def _ext_proc_quota(gateway: str) -> Callable[[], list[Config]]:
    return lambda: [ext_proc_filter(), rate_limit_quota_filter(gateway), router_filter()]


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("a", "plain Envoy -> model server", lambda: [router_filter()], ext_proc=False),
    Variant("b", "+ ext_proc (headers)", _ext_proc_only),
    Variant("b0", "+ echo processor (same framework, no logic)", _ext_proc_only, ext_proc=False,
            processor="ext_proc_echo"),
    Variant("c", "+ ext_proc + rate limit (RLS)", http_filters),
    Variant("d", "+ ext_proc (buffered body)", _ext_proc_only, model=BODY_MODEL),
    Variant("e", "+ quota filter (RLQS push)", _quota("bench-e"), ext_proc=False),
    Variant("f", "+ ext_proc + quota filter", _ext_proc_quota("bench-f")),
    Variant("a'", "plain Envoy, direct_response", lambda: [router_filter()], direct=True, ext_proc=False),
    Variant("e'", "quota filter, direct_response", _quota("bench-e2"), direct=True, ext_proc=False),
)}


def _direct_routes() -> Config:
    body = json.dumps({"model_name": MODEL, "outputs": []}, separators=(",", ":"))
    return {"name": "direct", "virtual_hosts": [{"name": "direct", "domains": ["*"], "routes": [{
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
    }]}]}


def _walk_hcm(config: Config) -> Config:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def envoy_bootstrap(variant: Variant, topology: Topology, rlqs: Endpoint, access_log: str | None) -> Config:
    config = gateway_bootstrap(topology, access_log_path=access_log or "/dev/null")
    hcm = _walk_hcm(config)
    if access_log is None:
        hcm["access_log"] = []
    hcm["http_filters"] = variant.filters()
    if variant.direct:
        hcm["route_config"] = _direct_routes()
    config["node"] = {"id": f"bench-{variant.name}", "cluster": "igw-bench"}
    clusters = config["static_resources"]["clusters"]
    if RLQS_CLUSTER not in {c["name"] for c in clusters}:
        clusters.append(service_cluster(RLQS_CLUSTER, [rlqs], grpc_health_service=RLQS_HEALTH_SERVICE))
    return config


def uses_ext_proc(config: Config) -> bool:
    return any(f.get("typed_config", {}).get("@type") == EXT_PROC_TYPE for f in _walk_hcm(config)["http_filters"])


@dataclass
class EnvoyProc:
    variant: Variant
    proc: ManagedProcess
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Stack:
    """redis + ext_proc + rate-limit service + model servers + one Envoy per variant; `close()` stops all."""

    work: Path
    redis: RedisServer
    key: str
    services: dict[str, ManagedProcess] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    envoys: dict[str, EnvoyProc] = field(default_factory=dict)
    model_ports: dict[str, int] = field(default_factory=dict)

    def pids(self) -> dict[str, list[int]]:
        """Process groups whose CPU the benches report, by component (the echo processor, when started,
        counts as ext_proc: only one of them works in any variant)."""
        return {
            "ext_proc": [self.services[s].pid for s in ("ext_proc", "ext_proc_echo") if s in self.services],
            "ratelimit": [self.services["ratelimit"].pid],
            "redis": [self.redis.pid],
            "model": [self.services[f"model-{m}"].pid for m in MODELS],
        }

    def cpu(self, envoy: str | None) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids().items()}
        if envoy is not None:
            out["envoy"] = cpu_seconds(self.envoys[envoy].proc.pid)
        return out

    def idle_cores(self, seconds: float = 2.0) -> dict[str, float]:
        """Background CPU with no load (health checks, timers, sweeps), per component; `envoy` is the mean of
        the running Envoys. Subtracted from loaded runs to get CPU per request net of the background."""
        envoys = [e.proc.pid for e in self.envoys.values()]
        before, started = self.cpu(None), time.monotonic()
        envoy_before = [cpu_seconds(p) for p in envoys]
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        after = self.cpu(None)
        out = {c: (after[c] - before[c]) / elapsed for c in after}
        out["envoy"] = (sum(cpu_seconds(p) for p in envoys) - sum(envoy_before)) / elapsed / max(1, len(envoys))
        return out

    def close(self) -> None:
        for envoy in self.envoys.values():
            envoy.proc.stop()
        for proc in self.services.values():
            proc.stop()
        self.redis.stop()


def seed(redis_url: str) -> str:
    from ext_proc import store

    client = store.connect(redis_url)
    try:
        store.register_model(client, MODEL)
        store.register_model(client, BODY_MODEL, inspect_body=True)
        store.create_tenant(client, TENANT, department="perf", tier="premium", models="bench-*")
        return store.issue_key(client, TENANT).key
    finally:
        client.close()


def _start_service(name: str, args: list[str], work: Path, http_port: int, log_level: str = "warn") -> ManagedProcess:
    proc = ManagedProcess(name, [*args, "--log-level", log_level], log_dir=work).start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/healthcheck"), 30, "healthy")
    return proc


def start_stack(work: Path | None = None, *, ext_proc_workers: int = 1, ratelimit_workers: int = 1,
                echo_processor: bool = False) -> Stack:
    work = work or Path(tempfile.mkdtemp(prefix="igw-gwbench-"))
    redis = RedisServer(log_dir=work).start()
    stack = Stack(work=work, redis=redis, key="")
    try:
        stack.key = seed(redis.url)
        config_dir = work / "ratelimit"
        config_dir.mkdir(exist_ok=True)
        (config_dir / "igw.yaml").write_text(RLS_CONFIG)
        for name in ("ext_proc", "ratelimit", "ext_proc_echo"):
            stack.ports[f"{name}_grpc"], stack.ports[f"{name}_http"] = free_port(), free_port()
        if echo_processor:
            stack.services["ext_proc_echo"] = _start_service("ext_proc_echo", python_module(
                "bench.ext_proc_echo", "--host", "127.0.0.1", "--grpc-port", str(stack.ports["ext_proc_echo_grpc"]),
                "--http-port", str(stack.ports["ext_proc_echo_http"]), "--workers", str(ext_proc_workers)),
                work, stack.ports["ext_proc_echo_http"])
        stack.services["ext_proc"] = _start_service("ext_proc", python_module(
            "ext_proc", "--redis-url", redis.url, "--host", "127.0.0.1", "--cache-ttl", "1h",
            "--grpc-port", str(stack.ports["ext_proc_grpc"]), "--http-port", str(stack.ports["ext_proc_http"]),
            "--workers", str(ext_proc_workers)), work, stack.ports["ext_proc_http"])
        stack.services["ratelimit"] = _start_service("ratelimit", python_module(
            "ratelimit_svc", "--config-dir", str(config_dir), "--redis-url", redis.url, "--host", "127.0.0.1",
            "--grpc-port", str(stack.ports["ratelimit_grpc"]), "--http-port", str(stack.ports["ratelimit_http"]),
            "--workers", str(ratelimit_workers)), work, stack.ports["ratelimit_http"])
        for model in MODELS:
            port = stack.model_ports[model] = free_port()
            proc = ManagedProcess(f"model-{model}", python_module(
                "igw.model_server", "--model", model, "--port", str(port), "--log-level", "warning"),
                log_dir=work).start()
            proc.wait_ready(lambda p=port: http_ok(f"http://127.0.0.1:{p}/v2/health/ready"), 30, "ready")
            stack.services[f"model-{model}"] = proc
        return stack
    except BaseException:
        stack.close()
        raise


def topology_for(stack: Stack, gateway_port: int, admin_port: int, processor: str = "ext_proc") -> Topology:
    def svc(name: str) -> tuple[ServiceEndpoint, ...]:
        return (ServiceEndpoint(Endpoint("127.0.0.1", stack.ports[f"{name}_grpc"]),
                                Endpoint("127.0.0.1", stack.ports[f"{name}_http"])),)

    return Topology(
        gateway=Endpoint("127.0.0.1", gateway_port),
        admin=Endpoint("127.0.0.1", admin_port),
        redis=Endpoint("127.0.0.1", stack.redis.port),
        ratelimit=svc("ratelimit"),
        ext_proc=svc(processor),
        models={m: (Endpoint("127.0.0.1", p),) for m, p in stack.model_ports.items()},
    )


def envoy_binary() -> str:
    found = VENV_BIN / "envoy"
    return str(found) if found.exists() else (shutil.which("envoy") or "envoy")


def healthy_clusters(admin_port: int) -> set[str]:
    """Clusters with at least one host Envoy's health checks consider healthy."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters?format=json", timeout=2) as resp:
            data = json.load(resp)
    except Exception:
        return set()
    out = set()
    for cluster in data.get("cluster_statuses", []):
        for host in cluster.get("host_statuses", []):
            if not host.get("health_status", {}).get("failed_active_health_check"):
                out.add(cluster["name"])
    return out


def start_envoy(stack: Stack, variant: Variant, *, access_log: bool = False, concurrency: int = 1) -> EnvoyProc:
    port, admin = free_port(), free_port()
    config = envoy_bootstrap(variant, topology_for(stack, port, admin, variant.processor),
                             Endpoint("127.0.0.1", stack.ports["ratelimit_grpc"]),
                             str(stack.work / f"access-{variant.name}.log") if access_log else None)
    safe = variant.name.replace("'", "2")
    path = stack.work / f"envoy-{safe}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = ManagedProcess(f"envoy-{safe}", [envoy_binary(), "-c", str(path), "--concurrency", str(concurrency),
                                            "--disable-hot-restart", "-l", "warning"], log_dir=stack.work).start()
    envoy = EnvoyProc(variant, proc, port, admin)
    stack.envoys[variant.name] = envoy
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
    needed = {"ext_proc", "ratelimit", RLQS_CLUSTER, *(f"model-{m}" for m in MODELS)}
    proc.wait_ready(lambda: needed <= healthy_clusters(admin), 30, "seeing every cluster healthy")
    return envoy


def request_headers(stack: Stack, variant: Variant) -> dict[str, str]:
    """What a client sends: the API key when ext_proc authenticates, else the headers ext_proc would set."""
    headers = {"content-type": "application/json"}
    if variant.ext_proc:
        headers["authorization"] = f"Bearer {stack.key}"
    else:
        headers.update({"x-igw-tenant": TENANT, "x-igw-model": variant.model})
    return headers


def request_path(variant: Variant) -> str:
    return f"/v2/models/{variant.model}/infer"


def check_once(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read(300).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode(errors="replace")


def wait_until_ok(url: str, headers: dict[str, str], body: bytes, timeout: float = 15) -> None:
    """The first requests of a quota bucket wait for RLQS; ext_proc warms its cache: probe until 200."""
    deadline = time.monotonic() + timeout
    status, text = 0, ""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status, text = check_once(url, headers, body)
            if status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: no 200 within {timeout:.0f}s (last {status}: {text})")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
