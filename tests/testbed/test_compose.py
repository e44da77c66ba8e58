"""docker-compose runs the topology of `igw up`: checked statically (no Docker engine on our machines).

The launcher's side comes from its own code (service_commands, envoy_args, the topology and config
constants), rendered for the compose hostnames, never from a copy of the compose file.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from ext_proc import store
from igw import envoy_config, topology
from igw.launcher import (
    DEFAULT_MAX_MODEL_REPLICAS,
    DEFAULT_RATELIMIT_CONFIG,
    PUBLISH_INTERVAL,
    READY_TIMEOUT,
    SERVICE_ENV,
    BedOptions,
    Command,
    GatewayBed,
    envoy_args,
    service_commands,
)
from igw.procs import REPO_ROOT, RedisServer
from igw.testbed_seed import DEMO_TENANT  # noqa: F401 - the seed module must import without ext_proc running
from igw.topology import Endpoint

COMPOSE_DIR = REPO_ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
DOCKERIGNORE = COMPOSE_DIR / "Dockerfile.dockerignore"
BED_JOBS = COMPOSE_DIR / "bed_jobs.py"
JOBS = {"seed", "publisher"}  # the launcher's in-process seeding and replica publishing (compose/bed_jobs.py)
FIXED = {"redis", "envoy", *JOBS}
# Build-time pip settings: the only image environment the launcher does not give its children.
BUILD_ONLY_ENV = {"PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (resolved against the compose directory) of each bind mount."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        out[container] = (COMPOSE_DIR / host).resolve()
    return out


def _launcher_commands(services: dict[str, Any]) -> dict[str, Command]:
    """The launcher's commands for the compose hostnames; the rate-limit config dir is wherever compose
    mounts the launcher's default config (checked separately)."""
    mounts = _mounts(services["ratelimit"])
    inside = [c for c, h in mounts.items() if h == DEFAULT_RATELIMIT_CONFIG.resolve()]
    assert inside, f"ratelimit does not mount {DEFAULT_RATELIMIT_CONFIG}; mounts: {mounts}"
    compose_topology = topology.documented_topology(host=envoy_config.compose_hostname)
    return service_commands(compose_topology, bind_host="0.0.0.0", ratelimit_config_dir=inside[0])


def test_compose_has_exactly_the_launchers_components(services: dict[str, Any]) -> None:
    expected = {cmd.host for cmd in _launcher_commands(services).values()} | FIXED
    assert set(services) == expected


def test_each_service_runs_the_launchers_command(services: dict[str, Any]) -> None:
    for name, cmd in _launcher_commands(services).items():
        assert services[cmd.host]["command"] == ["python", "-m", cmd.module, *cmd.args], name


def test_each_service_gets_exactly_the_launchers_environment(services: dict[str, Any]) -> None:
    """Exactly: a compose-only USE_STATSD, STATSD_PROTOCOL, IGW_DRAIN_SECONDS or IGW_KEY_SECRET would make
    the compose bed behave differently from `igw up` while every command line still matched."""
    for name, cmd in _launcher_commands(services).items():
        assert services[cmd.host].get("environment", {}) == cmd.env, name
    for job in JOBS:
        assert services[job].get("environment", {}) == SERVICE_ENV, job
    assert SERVICE_ENV, "the launcher sets an environment; an empty one would make this check vacuous"


def _dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile line, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            yield word.upper(), rest.strip()


def test_the_image_sets_no_environment_the_launcher_does_not(services: dict[str, Any]) -> None:
    names = {pair.split("=", 1)[0] for op, rest in _dockerfile_instructions() if op == "ENV" for pair in rest.split()}
    assert names, "the Dockerfile sets no ENV: this check would be vacuous"
    assert names <= set(SERVICE_ENV) | BUILD_ONLY_ENV


def _probe(url: str) -> list[str]:
    """The one healthcheck form: urlopen raises (exit 1) on anything but 2xx, or on no answer in 1 s."""
    return ["CMD", "python", "-c", f"import urllib.request; urllib.request.urlopen('{url}', timeout=1)"]


def test_each_healthcheck_probes_the_launchers_readiness_endpoint(services: dict[str, Any]) -> None:
    """Readiness (/healthcheck, /v2/health/ready), not /livez: depends_on service_healthy must hold Envoy
    back until a service answers calls, as the launcher waits on the same URL; /livez answers while Redis is
    still unreachable. Docker does not restart an unhealthy container, so readiness costs no restarts."""
    for name, cmd in _launcher_commands(services).items():
        assert cmd.health_path != "/livez", name
        url = f"http://127.0.0.1:{cmd.health_port}{cmd.health_path}"
        assert services[cmd.host]["healthcheck"]["test"] == _probe(url), name


def _seconds(value: str) -> float:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(value))
    assert found, f"duration {value!r}"
    return float(found.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[found.group(2)]


def test_healthchecks_wait_at_least_as_long_as_the_launcher(services: dict[str, Any]) -> None:
    """The launcher gives each component READY_TIMEOUT to become ready; compose must not give up sooner."""
    checked = [name for name, svc in services.items() if "healthcheck" in svc]
    assert set(checked) >= {cmd.host for cmd in _launcher_commands(services).values()} | {"publisher", "redis"}
    for name in checked:
        check = services[name]["healthcheck"]
        assert _seconds(check["interval"]) * check["retries"] >= READY_TIMEOUT, name


def test_ratelimit_mounts_the_launchers_default_quota_policy(services: dict[str, Any]) -> None:
    mounts = _mounts(services["ratelimit"])
    assert DEFAULT_RATELIMIT_CONFIG.resolve() in mounts.values()
    assert all(path.exists() for path in mounts.values())


def test_envoy_runs_the_committed_compose_config_with_the_launchers_flags(services: dict[str, Any]) -> None:
    envoy = services["envoy"]
    mounts = _mounts(envoy)
    inside = [c for c, h in mounts.items() if h == envoy_config.COMMITTED_COMPOSE.resolve()]
    assert inside, f"envoy does not mount {envoy_config.COMMITTED_COMPOSE}; mounts: {mounts}"
    assert envoy["command"] == ["envoy", *envoy_args(inside[0], concurrency=1)]


def test_envoy_publishes_the_documented_gateway_and_admin_ports(services: dict[str, Any]) -> None:
    published = {tuple(int(p) for p in str(port).split(":")) for port in services["envoy"]["ports"]}
    assert published == {(topology.GATEWAY_PORT, topology.GATEWAY_PORT), (topology.ADMIN_PORT, topology.ADMIN_PORT)}


def test_envoy_config_names_the_compose_services_and_ports(services: dict[str, Any]) -> None:
    config = yaml.safe_load(envoy_config.COMMITTED_COMPOSE.read_text())
    sockets = [
        ep["endpoint"]["address"]["socket_address"]
        for cluster in config["static_resources"]["clusters"]
        for group in cluster["load_assignment"]["endpoints"] for ep in group["lb_endpoints"]
    ]
    addresses = {(s["address"], s["port_value"]) for s in sockets}
    launcher = _launcher_commands(services)
    compose_topology = topology.documented_topology(host=envoy_config.compose_hostname)
    grpc = {(s.grpc.host, s.grpc.port) for s in (*compose_topology.ratelimit, *compose_topology.ext_proc)}
    models = {(c.host, c.health_port) for c in launcher.values() if c.module == "igw.model_server"}
    assert addresses == grpc | models
    assert all(host in services for host, _ in addresses)


def test_redis_listens_where_the_services_look_for_it(services: dict[str, Any]) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--port") + 1] == str(topology.REDIS_PORT)
    compose_topology = topology.documented_topology(host=envoy_config.compose_hostname)
    assert compose_topology.redis_url == f"redis://redis:{topology.REDIS_PORT}/0"
    for name, cmd in _launcher_commands(services).items():
        if "--redis-url" in cmd.args:
            assert cmd.args[cmd.args.index("--redis-url") + 1] == compose_topology.redis_url, name


def test_redis_runs_with_the_launchers_redis_settings(services: dict[str, Any], tmp_path: Path) -> None:
    """Same persistence and notification settings as the launcher's RedisServer; only where it listens and
    keeps files differ (a container's network and filesystem)."""
    local = RedisServer(log_dir=tmp_path, port=topology.REDIS_PORT).args[1:]
    command = services["redis"]["command"]
    assert command[0] == "redis-server"

    def settings(args: list[str]) -> dict[str, str]:
        pairs = dict(zip(args[::2], args[1::2], strict=True))
        return {k: v for k, v in pairs.items() if k not in ("--bind", "--dir")}

    assert settings(command[1:]) == settings(local)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_job_runs_bed_jobs_for_the_launchers_models_and_redis(services: dict[str, Any], job: str) -> None:
    command = services[job]["command"]
    assert command[:3] == ["python", "compose/bed_jobs.py", {"seed": "seed", "publisher": "publish"}[job]]
    assert command[command.index("--models") + 1].split(",") == list(topology.DEFAULT_MODELS)
    compose_topology = topology.documented_topology(host=envoy_config.compose_hostname)
    assert command[command.index("--redis-url") + 1] == compose_topology.redis_url


@pytest.fixture(scope="module")
def bed_jobs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_bed_jobs", BED_JOBS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seeded(redis_url: str) -> dict[str, Any]:
    """What a seeding left in Redis, minus what differs on every run (creation times, key ids)."""
    client = store.connect(redis_url)
    try:
        return {
            "tenants": sorted((t.id, t.department, t.tier, t.models, t.max_body_bytes, t.timeout_ms, t.priority,
                               t.status) for t in store.list_tenants(client)),
            "keys": sorted((k.tenant, k.expires_at, k.revoked_at) for k in store.list_keys(client)),
            "models": sorted((m.name, m.inspect_body) for m in store.list_models(client)),
            "aliases": store.list_aliases(client),
        }
    finally:
        client.close()


@pytest.fixture
def compose_redis(log_dir: Path) -> Iterator[RedisServer]:
    """A second redis-server beside own_redis: the compose seeding's, so the two seedings cannot mix."""
    server = RedisServer(log_dir=log_dir).start()
    yield server
    server.stop()


def test_compose_seeding_leaves_what_the_launchers_seeding_leaves(
    bed_jobs: ModuleType, own_redis: RedisServer, compose_redis: RedisServer, tmp_path: Path
) -> None:
    bed = GatewayBed(BedOptions(free_ports=True, log_dir=tmp_path))
    bed.topology = dataclasses.replace(bed.topology, redis=Endpoint("127.0.0.1", own_redis.port))
    launcher_demo = bed._seed()
    compose_url = f"redis://127.0.0.1:{compose_redis.port}/0"
    printed = bed_jobs.seed(compose_url, list(bed.topology.models))
    launcher_records = _seeded(bed.topology.redis_url)
    assert len(launcher_records["tenants"]) == 3, "the launcher seeds demo, demo-half and demo-restricted"
    assert _seeded(compose_url) == launcher_records
    assert set(printed["tenants"]) == set(bed._tenants)
    assert printed["tenant"]["tenant_id"] == launcher_demo["tenant_id"]


def test_publisher_probes_every_model_endpoint_envoy_routes_to(bed_jobs: ModuleType) -> None:
    config = yaml.safe_load(envoy_config.COMMITTED_COMPOSE.read_text())
    routed = {
        (cluster["name"], f'{s["address"]}:{s["port_value"]}')
        for cluster in config["static_resources"]["clusters"] if cluster["name"].startswith("model-")
        for group in cluster["load_assignment"]["endpoints"] for ep in group["lb_endpoints"]
        for s in [ep["endpoint"]["address"]["socket_address"]]
    }
    servers = bed_jobs.publisher_servers(list(topology.DEFAULT_MODELS))
    assert {(topology.model_cluster_name(s.model), s.replica_id) for s in servers} == routed
    assert all(s.ready_url == f"http://{s.replica_id}{envoy_config.MODEL_READY_PATH}" for s in servers)
    assert bed_jobs.PUBLISH_INTERVAL == PUBLISH_INTERVAL


def test_publisher_is_healthy_once_its_first_round_is_written(services: dict[str, Any], bed_jobs: ModuleType) -> None:
    probe = " ".join(services["publisher"]["healthcheck"]["test"])
    assert f"'{bed_jobs.PUBLISHED_MARKER}'" in probe
    assert services["publisher"]["healthcheck"]["test"][:2] == ["CMD", "python"]


def _waits_for(services: dict[str, Any], name: str) -> dict[str, str]:
    """Every service `name` waits for, directly or not, with the strictest condition met on the way."""
    found: dict[str, str] = {}
    todo = [name]
    while todo:
        for dep, how in services[todo.pop()].get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if dep == name:
                pytest.fail(f"{name} depends on itself")
            if dep not in found:
                found[dep] = how["condition"]
                todo.append(dep)
    return found


def test_startup_order_is_the_launchers(services: dict[str, Any]) -> None:
    """Launcher: Redis; services and models ready; seed; publisher's first round; Envoy last."""
    launcher = _launcher_commands(services)
    envoy = _waits_for(services, "envoy")
    for cmd in launcher.values():
        assert services["envoy"]["depends_on"].get(cmd.host) == {"condition": "service_healthy"}, cmd.host
    assert envoy.get("seed") == "service_completed_successfully"
    assert services["envoy"]["depends_on"].get("publisher") == {"condition": "service_healthy"}
    models = {cmd.host for cmd in launcher.values() if cmd.module == "igw.model_server"}
    for model in models:
        assert services["publisher"]["depends_on"].get(model) == {"condition": "service_healthy"}, model
    for name in ({cmd.host for cmd in launcher.values() if "--redis-url" in cmd.args} | JOBS):
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    assert services["seed"]["restart"] == "no", "a one-shot job restarted would issue new keys every time"


def test_the_compose_envoy_config_is_the_launchers_but_for_addresses_and_log(services: dict[str, Any]) -> None:
    """The bed's Envoy (what `igw up` renders) and compose's may differ only in where things are: listener
    and cluster addresses, DNS discovery, the access log, and the spare model endpoints the bed declares for
    add_model_replica. Filters, routes, local replies, path normalisation, timeouts, retries, health checks
    and idle timeouts must be the same."""
    bed = envoy_config.bootstrap(
        topology.documented_topology(max_model_replicas=DEFAULT_MAX_MODEL_REPLICAS),
        access_log_path="/tmp/envoy-access.log", rate_limit_mode=BedOptions().rate_limit_mode)
    compose_config = yaml.safe_load(envoy_config.COMMITTED_COMPOSE.read_text())

    def hcm(config: dict[str, Any]) -> dict[str, Any]:
        typed = dict(config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"])
        typed.pop("access_log")
        return typed

    def clusters(config: dict[str, Any]) -> dict[str, Any]:
        return {c["name"]: {k: v for k, v in c.items() if k not in ("load_assignment", "type", "cluster_type")}
                for c in config["static_resources"]["clusters"]}

    assert hcm(compose_config) == hcm(bed)
    assert clusters(compose_config) == clusters(bed)
    assert hcm(bed)["normalize_path"] is True and hcm(bed)["local_reply_config"], "vacuous comparison"


def test_the_committed_compose_envoy_config_is_current() -> None:
    assert envoy_config.COMMITTED_COMPOSE.read_text() == envoy_config.committed_files()[envoy_config.COMMITTED_COMPOSE]


def test_the_services_image_is_built_from_the_one_dockerfile(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ("redis", "envoy"):
            assert "image" in service and "build" not in service, name
            continue
        assert service["build"]["dockerfile"] == "compose/Dockerfile", name
        assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["image"] == "igw-services:dev"


def test_compose_envoy_image_is_the_envoy_version_the_launcher_runs(services: dict[str, Any]) -> None:
    from igw.launcher import envoy_binary

    version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"/(\d+\.\d+\.\d+)/", version)
    assert found, version
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{found.group(1)}"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_image_copies_every_installed_package_and_the_bed_jobs() -> None:
    sources = {src for op, rest in _dockerfile_instructions() if op == "COPY" for src in rest.split()[:-1]}
    packages = {p.rstrip("*") for p in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "config", "compose/bed_jobs.py"} <= sources
    assert all((REPO_ROOT / src).exists() for src in sources), sources
    assert ("RUN", "pip install .") in set(_dockerfile_instructions())


def test_the_build_context_filter_admits_everything_the_image_copies() -> None:
    """BuildKit reads compose/Dockerfile.dockerignore: a COPY source it excludes fails the build."""
    rules = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*" and ".venv" not in {r.lstrip("!") for r in rules if r.startswith("!")}
    admitted = {r[1:] for r in rules if r.startswith("!")}
    sources = {src for op, rest in _dockerfile_instructions() if op == "COPY" for src in rest.split()[:-1]}
    assert sources <= admitted


def test_the_base_image_python_satisfies_requires_python() -> None:
    base = next(rest for op, rest in _dockerfile_instructions() if op == "FROM")
    found = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim(?:-\w+)?", base)
    assert found, base
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(f"{found.group(1)}.0")


def _dependency_closure(names: set[str]) -> set[str]:
    """The distributions `pip install .` brings in: the given ones and, recursively, their requirements
    (extras and markers that do not apply to a plain install left out)."""
    done: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return done


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over everything the image runs (lazy imports included)."""
    local = {"igw", "ratelimit_svc", "ext_proc", "bench", "compose"}
    files = [*(p for d in ("igw", "ratelimit_svc", "ext_proc") for p in (REPO_ROOT / d).rglob("*.py")), BED_JOBS]
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_the_image_installs_every_module_the_services_import() -> None:
    """Whatever the services import must come with `pip install .`: from pyproject's dependencies (not the
    dev extra, which the image does not install), directly or through them."""
    installed = _dependency_closure({Requirement(r).name for r in _pyproject()["project"]["dependencies"]})
    providers = packages_distributions()
    imports = _third_party_imports()
    assert {"redis", "grpc", "aiohttp"} <= set(imports), "the import scan found too little to be trusted"
    missing = {module: sorted(files) for module, files in imports.items()
               if not {canonicalize_name(d) for d in providers.get(module, [])} & installed}
    assert not missing, f"imported but not installed by pip install .: {missing}"


# The Compose Specification keys this file may use (checked by hand: no schema download, no Docker engine).
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets"}
SERVICE_KEYS = {"build", "image", "command", "environment", "restart", "depends_on", "healthcheck", "volumes",
                "ports", "stop_grace_period", "init"}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}


def test_compose_file_uses_only_valid_compose_structure(compose: dict[str, Any]) -> None:
    assert {k for k in compose if not k.startswith("x-")} <= TOP_LEVEL_KEYS
    for name, svc in compose["services"].items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name), name
        assert set(svc) <= SERVICE_KEYS, (name, set(svc) - SERVICE_KEYS)
        assert ("image" in svc) or ("build" in svc), name
        assert isinstance(svc.get("command", []), list) and all(isinstance(a, str) for a in svc.get("command", []))
        assert all(isinstance(v, str) for v in svc.get("environment", {}).values()), name
        assert svc.get("restart", "no") in RESTART, name
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in compose["services"] and set(how) == {"condition"} and how["condition"] in CONDITIONS, name
        if "healthcheck" in svc:
            check = svc["healthcheck"]
            assert set(check) <= HEALTHCHECK_KEYS and check["test"][0] in ("CMD", "CMD-SHELL"), name
            assert isinstance(check["retries"], int) and _seconds(check["timeout"]) <= _seconds(check["interval"])
        for volume in svc.get("volumes", []):
            assert re.fullmatch(r"[^:]+:/[^:]+(:ro|:rw)?", volume), volume
        for port in svc.get("ports", []):
            assert re.fullmatch(r"\d+:\d+", str(port)), port
        _waits_for(compose["services"], name)  # no unknown dependency, no cycle through itself
