"""USE_PROMETHEUS: upstream's Prometheus metrics on PROMETHEUS_ADDR at PROMETHEUS_PATH, under the names and
labels envoyproxy/ratelimit's default statsd_exporter mapping gives its stats, for dashboards written
against upstream."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from envoy.service.ratelimit.v3 import rls_pb2

from igw.procs import free_port
from tests.helpers import Service, ServiceFactory, assert_one_line_error
from tests.ratelimit.rls_client import OK, OVER, RlsClient, descriptor

CONFIG = """
domain: test-domain
descriptors:
  - key: one
    value: v
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: a
    descriptors:
      - key: b
        rate_limit: {unit: minute, requests_per_unit: 100}
"""


def start(services: ServiceFactory, config_dir: Path, redis_url: str, *args: str,
          env: dict[str, str] | None = None) -> tuple[Service, str]:
    """The service with USE_PROMETHEUS on (spelled as Go's ParseBool also reads it) and the endpoint's URL."""
    port = free_port()
    svc = services.ratelimit(config_dir, redis_url, *args, env={
        "USE_PROMETHEUS": "T", "PROMETHEUS_ADDR": f"127.0.0.1:{port}", "PROMETHEUS_PATH": "/upstream", **(env or {})})
    return svc, f"http://127.0.0.1:{port}/upstream"


def scrape(url: str) -> tuple[dict[str, str], dict[str, float]]:
    """(# TYPE of each family, value of each series as written) of one scrape."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    types: dict[str, str] = {}
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return types, series


def test_limit_stats_carry_upstreams_names_and_labels_for_one_and_two_entry_descriptors(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc, url = start(services, config_dir, redis_url)
    client = RlsClient(svc.grpc_target)
    assert client.codes([("one", "v")], 3) == [OK, OK, OVER]
    client.call([("a", "x"), ("b", "y")])
    client.call([("a", "z"), ("b", "y")])
    client.close()
    types, series = scrape(url)
    assert series['ratelimit_service_rate_limit_total_hits{domain="test-domain",key1="one_v"}'] == 3
    assert series['ratelimit_service_rate_limit_over_limit{domain="test-domain",key1="one_v"}'] == 1
    assert series['ratelimit_service_rate_limit_total_hits{domain="test-domain",key1="a",key2="b"}'] == 2
    assert series['ratelimit_service_rate_limit_within_limit{domain="test-domain",key1="a",key2="b"}'] == 2
    for stat in ("total_hits", "over_limit", "within_limit", "near_limit"):
        assert types[f"ratelimit_service_rate_limit_{stat}"] == "counter"  # and no `_total`, as Go's client
    assert not [name for name in series if name.split("{")[0].endswith("_total")]


def test_each_call_is_counted_with_its_response_time(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc, url = start(services, config_dir, redis_url)
    client = RlsClient(svc.grpc_target)
    for _ in range(4):
        client.call([("a", "x"), ("b", "y")])
    client.close()
    types, series = scrape(url)
    assert types["ratelimit_service_total_requests"] == "counter"
    assert series['ratelimit_service_total_requests{grpc_method="ShouldRateLimit"}'] == 4
    assert types["ratelimit_service_response_time_seconds"] == "histogram"
    assert series['ratelimit_service_response_time_seconds_count{grpc_method="ShouldRateLimit"}'] == 4
    assert series['ratelimit_service_response_time_seconds_bucket{grpc_method="ShouldRateLimit",le="+Inf"}'] == 4
    assert 0 < series['ratelimit_service_response_time_seconds_sum{grpc_method="ShouldRateLimit"}'] < 4


def test_config_loads_are_counted_as_upstream_names_them(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    _, url = start(services, config_dir, redis_url, "--config-poll-interval", "100ms")
    types, series = scrape(url)
    assert series["ratelimit_service_config_load_success"] == 1
    assert "ratelimit_service_config_load_error" not in series  # a counter shows once it is non-zero, as upstream
    (config_dir / "bad.yaml").write_text("domain: x\ndescriptors:\n  - value: no-key\n")
    deadline = time.monotonic() + 10
    while "ratelimit_service_config_load_error" not in series and time.monotonic() < deadline:
        time.sleep(0.1)
        types, series = scrape(url)
    assert series["ratelimit_service_config_load_error"] == 1
    assert types["ratelimit_service_config_load_error"] == types["ratelimit_service_config_load_success"] == "counter"


def test_calls_refused_as_invalid_count_as_service_errors(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    import grpc

    svc, url = start(services, config_dir, redis_url)
    client = RlsClient(svc.grpc_target)
    with pytest.raises(grpc.RpcError):
        client.call([("one", "v")], domain="")
    client.close()
    _, series = scrape(url)
    assert series['ratelimit_service_should_rate_limit_error{err_type="service_error"}'] == 1
    assert series['ratelimit_service_total_requests{grpc_method="ShouldRateLimit"}'] == 1


def test_the_endpoint_is_off_by_default(services: ServiceFactory, config_dir: Path, redis_url: str) -> None:
    port = free_port()
    svc = services.ratelimit(config_dir, redis_url, env={"PROMETHEUS_ADDR": f"127.0.0.1:{port}"})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "PROMETHEUS_ADDR=127.0.0.1:" in svc.proc.log_path.read_text()  # named as ignored without USE_PROMETHEUS


def test_other_paths_of_the_endpoint_are_not_found(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    _, url = start(services, config_dir, redis_url)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url.replace("/upstream", "/metrics"), timeout=5)
    assert caught.value.code == 404


def run(config_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **env})


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("PROMETHEUS_ADDR", "9090", "not host:port"),
    ("PROMETHEUS_ADDR", "127.0.0.1:70000", "not a number from 1 to 65535"),
    ("PROMETHEUS_ADDR", "127.0.0.1:http", "not a number from 1 to 65535"),
    ("PROMETHEUS_ADDR", "::1:9090", "not host:port"),
    ("PROMETHEUS_PATH", "metrics", "must start with /"),
])
def test_a_bad_endpoint_setting_is_refused_naming_it(config_dir: Path, name: str, value: str, needle: str) -> None:
    proc = run(config_dir, {"USE_PROMETHEUS": "true", name: value})
    assert_one_line_error(proc.returncode, proc.stderr, name, repr(value), needle)


def test_a_custom_mapper_file_is_refused(config_dir: Path, tmp_path: Path) -> None:
    mapper = tmp_path / "mapper.yaml"
    mapper.write_text("mappings: []\n")
    proc = run(config_dir, {"USE_PROMETHEUS": "true", "PROMETHEUS_MAPPER_YAML": str(mapper)})
    assert_one_line_error(proc.returncode, proc.stderr, "PROMETHEUS_MAPPER_YAML", str(mapper), "not supported")


def _count_on_both_workers(svc: Service) -> int:
    """Calls, each on a new connection, until both workers have counted some (the kernel picks a worker per
    connection, so the sums below are not one worker's); returns how many were made."""
    calls = 0
    per_worker: list[str] = []
    while len(per_worker) < 2:
        assert calls < 100, "100 connections all went to one worker"
        client = RlsClient(svc.grpc_target)
        client.call([("a", "x"), ("b", "y")])
        client.close()
        calls += 1
        with urllib.request.urlopen(f"{svc.http_base}/metrics", timeout=5) as response:
            ours = response.read().decode()
        per_worker = [line for line in ours.splitlines()
                      if line.startswith('ratelimit_total_hits_total{domain="test-domain",key="a.b"')]
    return calls


def test_workers_are_summed_into_one_upstream_view(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc, url = start(services, config_dir, redis_url, "--workers", "2")
    calls = _count_on_both_workers(svc)
    for _ in range(3):
        _, series = scrape(url)
        assert series['ratelimit_service_rate_limit_total_hits{domain="test-domain",key1="a",key2="b"}'] == calls
        assert series['ratelimit_service_total_requests{grpc_method="ShouldRateLimit"}'] == calls
        assert series["ratelimit_service_config_load_success"] == 2  # one load per worker, as two processes


def test_a_worker_that_misses_a_scrape_does_not_make_the_sums_drop(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc, url = start(services, config_dir, redis_url, "--workers", "2")
    calls = _count_on_both_workers(svc)
    scrape(url)  # the supervisor has heard from both
    supervisor = svc.proc.pid
    worker = int(Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()[0])
    os.kill(worker, signal.SIGSTOP)  # it cannot answer the next scrape
    try:
        _, series = scrape(url)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert series['ratelimit_service_rate_limit_total_hits{domain="test-domain",key1="a",key2="b"}'] == calls


def test_a_taken_endpoint_port_stops_the_service(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = services.ratelimit(config_dir, redis_url, wait_healthy=False,
                                 env={"USE_PROMETHEUS": "1", "PROMETHEUS_ADDR": f"127.0.0.1:{port}"})
        assert svc.proc.proc is not None and svc.proc.proc.wait(20) == 1
    assert f"cannot bind PROMETHEUS_ADDR 127.0.0.1:{port}" in svc.proc.log_path.read_text()


def test_a_stats_key_holding_an_ipv4_address_keeps_it_in_one_label_as_upstream(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc, url = start(services, config_dir, redis_url)
    client = RlsClient(svc.grpc_target)
    limited = descriptor([("remote_address", "10.1.2.3")])
    limited.limit.requests_per_unit, limited.limit.unit = 10, rls_pb2.RateLimitResponse.RateLimit.MINUTE
    client.call(limited)  # Envoy's limit override: the request value is in the stats key with no config flag
    client.close()
    _, series = scrape(url)
    assert series['ratelimit_service_rate_limit_total_hits{domain="test-domain",key1="remote_address_10_1_2_3"}'] == 1
