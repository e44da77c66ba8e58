"""docker-compose runs the topology of `igw up`: checked statically (no Docker engine on our machines).

The launcher's side comes from its own code (service_commands, envoy_args, the topology and config
constants), rendered for the compose hostnames, never from a copy of the compose file.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from igw import envoy_config, topology
from igw.launcher import DEFAULT_RATELIMIT_CONFIG, SERVICE_ENV, Command, envoy_args, service_commands
from igw.procs import REPO_ROOT
from igw.testbed_seed import DEMO_TENANT  # noqa: F401 - the seed module must import without ext_proc running

COMPOSE_DIR = REPO_ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
FIXED = {"redis", "seed", "envoy"}


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


def test_each_service_gets_the_launchers_environment(services: dict[str, Any]) -> None:
    for name, cmd in _launcher_commands(services).items():
        env = services[cmd.host].get("environment", {})
        assert {k: env.get(k) for k in cmd.env} == cmd.env, name
    assert SERVICE_ENV, "the launcher sets an environment; an empty one would make this check vacuous"


def test_each_healthcheck_probes_the_launchers_readiness_port_and_path(services: dict[str, Any]) -> None:
    for name, cmd in _launcher_commands(services).items():
        probe = " ".join(services[cmd.host]["healthcheck"]["test"])
        assert f"127.0.0.1:{cmd.health_port}{cmd.health_path}" in probe, name


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


def test_seed_creates_the_demo_models_in_the_same_redis(services: dict[str, Any]) -> None:
    command = services["seed"]["command"]
    assert command[:3] == ["python", "-m", "igw.testbed_seed"]
    assert command[command.index("--models") + 1].split(",") == list(topology.DEFAULT_MODELS)
    assert command[command.index("--redis-url") + 1] == "redis://redis:16379/0"


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
