"""Where a user coming from envoyproxy/ratelimit would notice a difference: config forms upstream accepts,
request shapes Envoy can send, and flags in upstream's format. Each test runs the real service on a real
redis-server unless it is about parsing alone."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2

from igw.procs import RedisServer
from ratelimit_svc.config import ConfigError, parse_config
from ratelimit_svc.lookup import find_limit
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor

CONFIG = """
domain: d
descriptors:
  - key: vip
    rate_limit: {unlimited: true, replaces: [{name: per_user}]}
  - key: user
    rate_limit: {name: per_user, unit: minute, requests_per_unit: 1}
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: smooth
    rate_limit: {unit: year, requests_per_unit: 1, algorithm: gcra}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "d.yaml").write_text(CONFIG)
    return directory


@pytest.fixture
def service(services: ServiceFactory, config_dir: Path, redis_url: str) -> Service:
    return services.ratelimit(config_dir, redis_url)


@pytest.fixture
def client(service: Service) -> Iterator[RlsClient]:
    c = RlsClient(service.grpc_target, domain="d")
    yield c
    c.close()


def _metrics(service: Service) -> str:
    return urllib.request.urlopen(f"{service.http_base}/metrics", timeout=5).read().decode()


# --- replaces ------------------------------------------------------------------------------------


def test_an_unlimited_limit_with_replaces_drops_the_replaced_limit(client: RlsClient) -> None:
    """Upstream collects `replaces` before it sets unlimited limits aside: "VIPs are unlimited and
    not subject to the per-user limit" is one config entry."""
    avoid_window_edges()
    responses = [client.call([("vip", "a")], [("user", "u")]) for _ in range(3)]
    assert [r.overall_code for r in responses] == [OK, OK, OK]
    assert not responses[-1].statuses[1].HasField("current_limit")
    assert client.call([("user", "u")]).overall_code == OK  # the replaced limit was never counted


# --- hits_addend ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hits", [2**63, 2**64 - 1, 10**17])
def test_a_huge_descriptor_hits_addend_is_over_the_limit_not_a_backend_failure(
    client: RlsClient, service: Service, hits: int
) -> None:
    """No uint32 limit admits it, so the answer is OVER_LIMIT; it must not look like a Redis outage
    (which --fail-open would turn into OK)."""
    response = client.call(descriptor([("minute", f"h{hits}")], hits=hits))
    assert response.overall_code == OVER
    assert response.statuses[0].limit_remaining == 0
    assert "ratelimit_redis_errors_total 0.0" in _metrics(service)


def test_a_huge_hits_addend_is_over_under_fail_open_too(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--fail-open", "true")
    c = RlsClient(svc.grpc_target, domain="d")
    assert c.call(descriptor([("minute", "fo")], hits=2**64 - 1)).overall_code == OVER
    c.close()


def test_a_huge_hits_addend_on_a_gcra_limit_reports_a_sane_wait(client: RlsClient) -> None:
    response = client.call(descriptor([("smooth", "x")], hits=2**64 - 1))
    assert response.overall_code == OVER
    assert response.statuses[0].duration_until_reset.seconds >= 0


def test_a_huge_hits_addend_leaves_other_counters_of_the_request_counted_once(
    client: RlsClient, redis_url: str
) -> None:
    avoid_window_edges()
    client.call(descriptor([("minute", "big")], hits=2**64 - 1), [("minute", "small")])
    assert client.call([("minute", "small")]).statuses[0].limit_remaining == 3


# --- request-level limit override ----------------------------------------------------------------


@pytest.mark.parametrize("unit", [0, 42])
def test_a_limit_override_with_an_unknown_unit_is_invalid_argument(client: RlsClient, unit: int) -> None:
    d = descriptor([("anything", "v")])
    d.limit.CopyFrom(ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=1, unit=unit))
    with pytest.raises(grpc.RpcError) as info:
        client.call(d)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unit" in info.value.details() and str(unit) in info.value.details()


# --- config forms upstream accepts or rejects ----------------------------------------------------

MERGE_CONFIG = """
domain: d
descriptors:
  - key: a
    rate_limit: &std {unit: minute, requests_per_unit: 5}
  - key: b
    rate_limit:
      <<: *std
      requests_per_unit: 7
  - key: c
    rate_limit: *std
"""


def test_yaml_merge_keys_are_expanded_as_upstreams_yaml_library_does() -> None:
    config = parse_config([("m.yaml", MERGE_CONFIG)])
    b = find_limit(config, "d", (("b", "x"),)).limit
    assert (b.requests_per_unit, b.unit) == (7, 2)
    assert find_limit(config, "d", (("c", "x"),)).limit.requests_per_unit == 5


def test_a_merge_key_brings_its_keys_under_validation() -> None:
    text = "base: &b {unit: minute, requestsperunit: 5}\n" + MERGE_CONFIG.replace("<<: *std", "<<: *b")
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        parse_config([("m.yaml", text)])
    text = MERGE_CONFIG.replace("rate_limit: &std {unit: minute, requests_per_unit: 5}",
                                "rate_limit: &std {unit: minute, requestsperunit: 5}")
    with pytest.raises(ConfigError, match="unknown key 'requestsperunit'"):
        parse_config([("m.yaml", text)])


def test_a_merge_key_that_is_not_a_map_is_a_config_error_naming_its_line() -> None:
    text = "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      <<: 5\n      unit: minute\n"
    with pytest.raises(ConfigError) as info:
        parse_config([("m.yaml", text)])
    assert info.value.line is not None and "merge" in info.value.reason


def test_yaml_merge_keys_work_through_the_service(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    directory = tmp_path / "merge"
    directory.mkdir()
    (directory / "d.yaml").write_text(MERGE_CONFIG)
    svc = services.ratelimit(directory, redis_url)
    c = RlsClient(svc.grpc_target, domain="d")
    assert c.call([("b", "x")]).statuses[0].current_limit.requests_per_unit == 7
    c.close()


@pytest.mark.parametrize("placement", [
    "domain: d\nalgorithm: gcra\ndescriptors: []\n",
    "domain: d\ndescriptors:\n  - key: a\n    algorithm: gcra\n    rate_limit: {unit: second, requests_per_unit: 5}\n",
    "domain: d\ndescriptors:\n  - key: a\n    model: m\n    rate_limit: {unit: second, requests_per_unit: 5}\n",
])
def test_our_extension_keys_outside_rate_limit_are_unknown_keys(placement: str) -> None:
    """Outside `rate_limit` they would be silently ignored (a limit meant to be GCRA staying a fixed
    window); upstream's strict key check calls them unknown keys there."""
    with pytest.raises(ConfigError, match=r"unknown key '(algorithm|model)'"):
        parse_config([("x.yaml", placement)])


def test_the_limit_count_counts_a_wildcard_limit_once(shared_dir: Path) -> None:
    text = (shared_dir / "compat/envoyproxy-ratelimit/test-config/wildcard.yaml").read_text()
    config = parse_config([("wildcard.yaml", text)])
    assert config.limit_count() == len(config.describe()) == 6


def test_the_config_limits_gauge_counts_each_limit_once(
    services: ServiceFactory, tmp_path: Path, redis_url: str, shared_dir: Path
) -> None:
    directory = tmp_path / "wild"
    directory.mkdir()
    wildcard = shared_dir / "compat/envoyproxy-ratelimit/test-config/wildcard.yaml"
    (directory / "w.yaml").write_text(wildcard.read_text())
    svc = services.ratelimit(directory, redis_url)
    assert "ratelimit_config_limits 6.0" in _metrics(svc)


# --- upstream's environment ----------------------------------------------------------------------


def test_upstreams_host_port_redis_url_is_accepted(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    """Upstream's REDIS_URL is `host:port` (REDIS_SOCKET_TYPE tcp) or a socket path (unix)."""
    host_port = redis_url.removeprefix("redis://").split("/")[0]
    svc = services.start_module("ratelimit_svc", "--config-dir", str(config_dir),
                                env={"REDIS_URL": host_port, "REDIS_SOCKET_TYPE": "tcp"})
    c = RlsClient(svc.grpc_target, domain="d")
    assert c.call([("minute", "env")]).statuses[0].limit_remaining == 4
    c.close()
    keys = redis.Redis.from_url(redis_url).keys("d_minute_env_*")
    assert len(keys) == 1


def test_upstreams_redis_auth_supplies_the_password(
    services: ServiceFactory, config_dir: Path, own_redis: RedisServer
) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    svc = services.start_module("ratelimit_svc", "--config-dir", str(config_dir),
                                env={"REDIS_URL": f"127.0.0.1:{own_redis.port}", "REDIS_AUTH": "s3cret"})
    c = RlsClient(svc.grpc_target, domain="d")
    assert c.call([("minute", "auth")]).statuses[0].limit_remaining == 4
    c.close()


def test_redis_auth_supplies_the_password_of_a_redis_url_without_one(
    services: ServiceFactory, config_dir: Path, own_redis: RedisServer
) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    svc = services.start_module("ratelimit_svc", "--config-dir", str(config_dir),
                                env={"REDIS_URL": f"redis://127.0.0.1:{own_redis.port}/0", "REDIS_AUTH": "s3cret"})
    c = RlsClient(svc.grpc_target, domain="d")
    assert c.call([("minute", "auth-url")]).statuses[0].limit_remaining == 4
    c.close()


def _refused_start(config_dir: Path, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_redis_auth_beside_a_url_with_credentials_is_refused_without_showing_them(config_dir: Path) -> None:
    err = _refused_start(config_dir, REDIS_URL="redis://:inurl@127.0.0.1:6379/0", REDIS_AUTH="inenv")
    assert "REDIS_AUTH is set and the URL carries other credentials" in err
    assert "inurl" not in err and "inenv" not in err


def test_a_misspelled_socket_type_is_refused_beside_a_redis_url_too(config_dir: Path) -> None:
    err = _refused_start(config_dir, REDIS_URL="redis://127.0.0.1:6379/0", REDIS_SOCKET_TYPE="udp")
    assert "REDIS_SOCKET_TYPE='udp' is neither tcp nor unix" in err


def test_a_socket_type_that_contradicts_the_url_scheme_is_refused(config_dir: Path) -> None:
    err = _refused_start(config_dir, REDIS_URL="redis://127.0.0.1:6379/0", REDIS_SOCKET_TYPE="unix")
    assert "REDIS_SOCKET_TYPE=unix contradicts the redis:// URL" in err


def test_the_startup_log_never_shows_the_redis_password(
    services: ServiceFactory, config_dir: Path, own_redis: RedisServer
) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    svc = services.ratelimit(config_dir, f"redis://:s3cret@127.0.0.1:{own_redis.port}/0")
    log = svc.proc.log_path.read_text()
    assert "ratelimit_svc ready" in log and "redis=redis://:***@127.0.0.1" in log
    assert "s3cret" not in log
