"""Upstream environment variables that this service does not implement: one that would change behaviour stops
it with one line naming the setting; an observability/ops one is named in one warning at startup; upstream's
defaults say nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ratelimit_svc.settings import UPSTREAM_SETTINGS, build_parser, upstream_settings_in
from tests.helpers import ServiceFactory

CONFIG = """
domain: test-domain
descriptors:
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 5}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "test.yaml").write_text(CONFIG)
    return tmp_path


def run(config_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {s.name for s in UPSTREAM_SETTINGS}}
    return subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30, env={**clean, **env})


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("REDIS_TYPE", "ring", "not a redis type: single"),
    ("CONFIG_TYPE", "GRPC_XDS_SOTW", "xDS config server is not supported"),
    ("BACKEND_TYPE", "memcache", "memcached is not supported"),
])
def test_a_setting_that_would_change_behaviour_stops_the_service_with_one_line(
    config_dir: Path, name: str, value: str, reason: str
) -> None:
    proc = run(config_dir, {name: value})
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"python -m ratelimit_svc: error: {name}={value}: ")
    assert reason in line


def test_a_per_second_redis_of_an_unknown_type_stops_the_service_with_one_line(config_dir: Path) -> None:
    proc = run(config_dir, {"REDIS_PERSECOND_TYPE": "RING", "REDIS_PERSECOND": "true",
                            "REDIS_PERSECOND_URL": "127.0.0.1:1"})
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("python -m ratelimit_svc: error: REDIS_PERSECOND_TYPE=RING: ")
    assert "not a redis type for the per-second Redis: single" in line and "cluster (" in line


def test_the_per_second_redis_type_without_a_per_second_redis_is_only_named_in_a_warning(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    # Upstream reads REDIS_PERSECOND_TYPE only with REDIS_PERSECOND=true: a deployment that sets it (a chart
    # exporting every variable) and keeps per-second counters with the others starts there, so it must here.
    svc = services.ratelimit(config_dir, redis_url, env={"REDIS_PERSECOND_TYPE": "ring"})
    warnings = [line for line in svc.proc.log_path.read_text().splitlines() if " WARNING " in line]
    assert [w for w in warnings if "REDIS_PERSECOND_TYPE=ring is ignored: " in w and "REDIS_PERSECOND" in w]


def test_every_refused_setting_gets_its_own_line(config_dir: Path) -> None:
    proc = run(config_dir, {"REDIS_TYPE": "ring", "CONFIG_TYPE": "GRPC_XDS_SOTW"})
    assert proc.returncode == 2
    assert [line.split(": ")[2].split("=")[0] for line in proc.stderr.splitlines()] == ["REDIS_TYPE", "CONFIG_TYPE"]


def test_upstream_defaults_are_accepted_without_a_word(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    defaults = {"USE_STATSD": "true", "STATSD_HOST": "localhost", "STATSD_PORT": "8125", "REDIS_TYPE": "SINGLE",
                "CONFIG_TYPE": "FILE", "BACKEND_TYPE": "redis", "REDIS_POOL_SIZE": "10", "REDIS_PIPELINE_WINDOW": "0",
                "USE_PROMETHEUS": "false", "TRACING_ENABLED": "false", "DEBUG_PORT": "6070", "EXTRA_TAGS": ""}
    svc = services.ratelimit(config_dir, redis_url, env=defaults)
    warnings = [line for line in svc.proc.log_path.read_text().splitlines() if " WARNING " in line]
    assert [w for w in warnings if any(name in w for name in defaults)] == []


def test_an_ops_setting_is_named_in_one_warning_at_startup(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    env = {"DEBUG_PORT": "6071", "REDIS_POOL_SIZE": "50", "REDIS_PIPELINE_LIMIT": "8", "TRACING_ENABLED": "true"}
    svc = services.ratelimit(config_dir, redis_url, env=env)
    warnings = [line for line in svc.proc.log_path.read_text().splitlines() if " WARNING " in line]
    assert len(warnings) == len(env)
    for name, value in env.items():
        assert len([w for w in warnings if f"{name}={value} is ignored: " in w]) == 1, name
    (pool,) = [w for w in warnings if "REDIS_POOL_SIZE" in w]
    assert pool.endswith("REDIS_POOL_SIZE=50 is ignored: each Redis gets one connection that pipelines every "
                         "concurrent call: there is no pool to size")


@pytest.mark.parametrize("value", ["tcp", "tcp6"])
def test_statsd_protocol_is_a_setting_we_implement_so_it_is_never_called_ignored(
    services: ServiceFactory, config_dir: Path, redis_url: str, value: str
) -> None:
    # It was warned about while statsd went over UDP only; it now picks the transport (test_statsd_tcp.py).
    svc = services.ratelimit(config_dir, redis_url, env={"STATSD_PROTOCOL": value, "USE_STATSD": "false"})
    assert "STATSD_PROTOCOL" not in svc.proc.log_path.read_text()


def test_the_table_reports_only_values_that_differ_from_upstreams_default() -> None:
    refusals, warnings = upstream_settings_in({"REDIS_TYPE": " Single ", "REDIS_POOL_SIZE": "10", "HOST": "::",
                                               "REDIS_PIPELINE_WINDOW": "150us", "MEMCACHE_HOST_PORT": ""})
    assert refusals == []
    assert warnings == ["REDIS_PIPELINE_WINDOW=150us is ignored: calls are always pipelined: what is ready is "
                        "written at once, there is no window or limit"]


def test_no_setting_in_the_table_is_also_one_we_implement() -> None:
    """A name here and in a flag would refuse or warn about something the service does. BACKEND_TYPE and
    REDIS_TYPE are the exceptions: the flags implement redis and memory, single, cluster and sentinel; the table
    refuses upstream's memcache, and names the redis types in its refusal of any other."""
    parser, _ = build_parser()
    implemented = {name for action in parser._actions for name in re.findall(r"\(env ([A-Z0-9_]+)", action.help or "")}
    assert {s.name for s in UPSTREAM_SETTINGS} & implemented == {"BACKEND_TYPE", "REDIS_TYPE"}


def test_redis_type_sentinel_is_accepted_by_the_table() -> None:
    refusals, _ = upstream_settings_in({"REDIS_TYPE": "SENTINEL"})
    assert refusals == []
    refusals, _ = upstream_settings_in({"REDIS_PERSECOND_TYPE": "sentinel"}, persecond=True)
    assert refusals == []


@pytest.mark.parametrize("value", ["cluster", "CLUSTER", "single", "sentinel"])
def test_every_per_second_redis_type_upstream_has_is_accepted_by_the_table(value: str) -> None:
    assert upstream_settings_in({"REDIS_PERSECOND_TYPE": value}, persecond=True) == ([], [])


def test_a_sentinel_auth_without_sentinel_is_named_in_one_warning(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc = services.ratelimit(config_dir, redis_url, env={"REDIS_SENTINEL_AUTH": "secret"})
    warnings = [line for line in svc.proc.log_path.read_text().splitlines() if " WARNING " in line]
    assert [w for w in warnings if "REDIS_SENTINEL_AUTH is ignored: " in w and "REDIS_TYPE=sentinel" in w]
    assert not [w for w in warnings if "secret" in w]


def test_a_misspelled_redis_socket_type_is_named_instead_of_meaning_tcp(config_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "REDIS_URL": "/tmp/redis.sock", "REDIS_SOCKET_TYPE": "uinx"})
    assert proc.returncode == 2
    assert "REDIS_SOCKET_TYPE='uinx' is neither tcp nor unix" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("text", "value"), [("t", True), ("T", True), ("F", False), ("TRUE", True), ("False", False)])
def test_go_boolean_spellings_of_upstream_settings_are_accepted(text: str, value: bool) -> None:
    from igw.runtime import parse_bool

    assert parse_bool(text) is value
