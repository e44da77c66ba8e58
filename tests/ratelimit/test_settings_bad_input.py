"""Settings values the rate-limit service cannot use: each stops the start with exit 2 and one line naming the
setting, rather than a traceback, a bind failure after the config load, or a service that starts and then
fails every call."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from igw.procs import free_port
from igw.redis_conn import PipelinedRedis, RedisError
from ratelimit_svc.counters import Hit, Increment, RedisCounters
from ratelimit_svc.settings import GO_MAX_DURATION_S, MAX_EXPIRATION_JITTER_S, parse_settings
from tests.helpers import ServiceFactory, assert_one_line_error
from tests.ratelimit.rls_client import OK, RlsClient

CONFIG = """
domain: test-domain
descriptors:
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 5}
"""

ENDLESS = "9" * 400  # float() makes it infinity
PAST_GO = "2562048h"  # one hour past Go's longest duration


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The service started with nothing but PATH and `env` from the environment: a value this test does not
    set cannot decide the outcome."""
    return subprocess.run([sys.executable, "-m", "ratelimit_svc", *args], capture_output=True, text=True,
                          timeout=30, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})


# -- durations ---------------------------------------------------------------------------------------------------

DURATIONS = ["GRPC_MAX_CONNECTION_AGE", "GRPC_MAX_CONNECTION_AGE_GRACE", "STATS_FLUSH_INTERVAL", "REDIS_TIMEOUT",
             "REDIS_PERSECOND_TIMEOUT", "CONFIG_POLL_INTERVAL", "REPLICA_MAX_AGE"]


@pytest.mark.parametrize("name", DURATIONS)
def test_a_duration_of_hundreds_of_digits_stops_the_start_naming_the_setting(config_dir: Path, name: str) -> None:
    proc = run("--config-dir", str(config_dir), env={name: ENDLESS})
    assert_one_line_error(proc.returncode, proc.stderr, name, "too large")


@pytest.mark.parametrize("name", DURATIONS)
def test_a_duration_longer_than_go_can_hold_stops_the_start_naming_the_setting(config_dir: Path, name: str) -> None:
    proc = run("--config-dir", str(config_dir), env={name: PAST_GO})
    assert_one_line_error(proc.returncode, proc.stderr, name, "too large", "2562047h47m16.854775807s")


def test_the_longest_go_duration_is_accepted(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_MAX_CONNECTION_AGE", "2562047h47m16s")
    settings = parse_settings(["--config-dir", str(config_dir)])
    assert settings.grpc_max_connection_age == pytest.approx(GO_MAX_DURATION_S, abs=1)


# -- integers that reach Redis, and ratios -----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["99999999999999999999999999", str(MAX_EXPIRATION_JITTER_S + 1)])
def test_an_expiration_jitter_redis_cannot_store_stops_the_start_naming_the_setting(
    config_dir: Path, value: str
) -> None:
    proc = run("--config-dir", str(config_dir), env={"EXPIRATION_JITTER_MAX_SECONDS": value})
    assert_one_line_error(proc.returncode, proc.stderr, "EXPIRATION_JITTER_MAX_SECONDS", "too large",
                          f"at most {MAX_EXPIRATION_JITTER_S}")


def test_the_largest_expiration_jitter_counts_with_keys_that_expire(
    services: ServiceFactory, config_dir: Path, redis_url: str, store: redis.Redis
) -> None:
    svc = services.ratelimit(config_dir, redis_url,
                             env={"EXPIRATION_JITTER_MAX_SECONDS": str(MAX_EXPIRATION_JITTER_S)})
    client = RlsClient(svc.grpc_target)
    assert client.call([("minute", "m")]).overall_code == OK
    client.close()
    (key,) = store.keys("*minute_m*")
    assert 0 < store.ttl(key) <= MAX_EXPIRATION_JITTER_S + 60


def test_a_local_cache_size_past_a_go_int_stops_the_start_naming_the_setting(config_dir: Path) -> None:
    proc = run("--config-dir", str(config_dir), env={"LOCAL_CACHE_SIZE_IN_BYTES": str(2**63)})
    assert_one_line_error(proc.returncode, proc.stderr, "LOCAL_CACHE_SIZE_IN_BYTES", "too large")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_near_limit_ratio_that_is_no_finite_number_stops_the_start_naming_the_setting(
    config_dir: Path, value: str
) -> None:
    proc = run("--config-dir", str(config_dir), env={"NEAR_LIMIT_RATIO": value})
    assert_one_line_error(proc.returncode, proc.stderr, "NEAR_LIMIT_RATIO", "must be in (0, 1]")


@pytest.mark.parametrize("increment", [Increment.ALL, Increment.ONLY_OVER])
def test_a_counter_whose_ttl_redis_refuses_is_not_left_behind_without_one(
    redis_url: str, store: redis.Redis, increment: Increment
) -> None:
    # Settings keep TTLs in Redis's range; should one get past them, a key that never expires must not stay.
    hits = [Hit("counter", 1, "fixed_window", ttl=10**16, limit=5)]

    async def count() -> None:
        client = PipelinedRedis(redis_url)
        try:
            await RedisCounters(client).apply(hits, increment)
        finally:
            client.close()

    with pytest.raises(RedisError, match="invalid expire time"):
        asyncio.run(count())
    assert store.exists("counter") == 0


# -- ports -------------------------------------------------------------------------------------------------------

def test_one_port_for_grpc_and_http_stops_the_start_before_binding(config_dir: Path) -> None:
    port = str(free_port())
    proc = run("--config-dir", str(config_dir), "--grpc-port", port, "--http-port", port)
    assert_one_line_error(proc.returncode, proc.stderr, "GRPC_PORT (--grpc-port) and PORT (--http-port) are both "
                                                        f"port {port}")


def test_the_prometheus_endpoint_on_the_http_port_stops_the_start_before_binding(config_dir: Path) -> None:
    grpc, http = str(free_port()), str(free_port())
    proc = run("--config-dir", str(config_dir), "--grpc-port", grpc, "--http-port", http,
               env={"USE_PROMETHEUS": "true", "PROMETHEUS_ADDR": f":{http}"})
    assert_one_line_error(proc.returncode, proc.stderr, "PORT (--http-port) and PROMETHEUS_ADDR", f"port {http}")


def test_the_prometheus_endpoint_may_share_the_http_port_on_another_address(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    http = free_port()
    svc = services.ratelimit(config_dir, redis_url, http_port=http,
                             env={"USE_PROMETHEUS": "true", "PROMETHEUS_ADDR": f"127.0.0.2:{http}"})
    with urllib.request.urlopen(f"http://127.0.0.2:{http}/metrics", timeout=10) as answer:
        assert answer.status == 200
    with urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=10) as answer:
        assert answer.status == 200


def test_grpc_on_a_unix_socket_leaves_its_port_to_http(
    services: ServiceFactory, config_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    services.ratelimit(config_dir, redis_url, grpc_port=port, http_port=port,
                       env={"GRPC_UDS": str(tmp_path / "rls.sock")})
    client = RlsClient(f"unix:{tmp_path / 'rls.sock'}")
    assert client.call([("minute", "m")]).overall_code == OK
    client.close()



@pytest.mark.parametrize(("env", "name", "problem"), [
    ({"STATSD_PORT": "²"}, "STATSD_PORT", "not a port number from 1 to 65535"),
    ({"USE_PROMETHEUS": "true", "PROMETHEUS_ADDR": ":²"}, "PROMETHEUS_ADDR", "is not a number from 1 to 65535"),
])
def test_a_port_of_digits_int_cannot_read_stops_the_start_naming_the_setting(
    config_dir: Path, env: dict[str, str], name: str, problem: str
) -> None:
    # "²" is a digit to str.isdigit() but no number to int(): it must not get through to a traceback.
    proc = run("--config-dir", str(config_dir), env=env)
    assert_one_line_error(proc.returncode, proc.stderr, name, problem)

# -- the config directory ----------------------------------------------------------------------------------------

def test_an_empty_config_dir_flag_is_refused_as_empty() -> None:
    proc = run("--config-dir", "")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].endswith("argument --config-dir: config directory must not be empty")


def test_an_empty_config_dir_variable_counts_as_unset(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    app = tmp_path / "root" / "config"
    app.mkdir(parents=True)
    (app / "test.yaml").write_text(CONFIG)
    svc = services.start_module("ratelimit_svc", "--redis-url", redis_url,
                                env={"CONFIG_DIR": "", "RUNTIME_ROOT": str(tmp_path / "root")})
    assert RlsClient(svc.grpc_target).call([("minute", "m")]).overall_code == OK


def test_a_missing_config_dir_from_the_runtime_variables_is_named_as_coming_from_them(tmp_path: Path) -> None:
    proc = run(env={"RUNTIME_ROOT": str(tmp_path / "nope")})
    assert proc.returncode == 2
    assert (f"config directory '{tmp_path / 'nope' / 'config'}' (RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/"
            "RUNTIME_APPDIRECTORY, as neither --config-dir nor CONFIG_DIR is set) does not exist") in proc.stderr


def test_an_empty_runtime_root_counts_as_unset() -> None:
    proc = run(env={"RUNTIME_ROOT": ""})
    assert proc.returncode == 2
    assert "config directory '/srv/runtime_data/current/config' (RUNTIME_ROOT/" in proc.stderr


# -- cluster seeds -----------------------------------------------------------------------------------------------

def test_a_cluster_seed_without_its_port_is_refused_as_for_the_per_second_cluster(config_dir: Path) -> None:
    # Upstream dials each seed as host:port and fails on a bare host; here it would quietly mean 6379.
    proc = run("--config-dir", str(config_dir), env={"REDIS_TYPE": "cluster", "REDIS_URL": "127.0.0.1:7000,10.0.0.1"})
    assert_one_line_error(proc.returncode, proc.stderr, "REDIS_URL", "seed '10.0.0.1' is not host:port")
