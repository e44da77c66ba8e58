"""The rate-limit service over gRPC, with a real redis-server, as Envoy uses it."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.type.v3 import ratelimit_unit_pb2

from igw.procs import RedisServer
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor

CONFIG = """
domain: test-domain
descriptors:
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: parent
    value: p1
    descriptors:
      - key: child
        rate_limit: {unit: minute, requests_per_unit: 2}
      - key: child
        value: special
        rate_limit: {unit: minute, requests_per_unit: 4}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true}
  - key: wild
    value: gpu-*
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: shared
    value: team-*
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: broad
    rate_limit: {unit: minute, requests_per_unit: 1, name: broad}
  - key: narrow
    rate_limit:
      unit: minute
      requests_per_unit: 10
      replaces: [{name: broad}]
  - key: quota_a
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: quota_b
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2}
"""


@pytest.fixture
def service(services: ServiceFactory, config_dir: Path, redis_url: str) -> Service:
    return services.ratelimit(config_dir, redis_url, "--config-poll-interval", "100ms")


@pytest.fixture
def client(service: Service) -> Iterator[RlsClient]:
    c = RlsClient(service.grpc_target)
    # Most tests here make a few calls against per-minute limits: start them clear of a minute boundary,
    # where the later calls would be counted in a fresh window (per-second tests align themselves).
    avoid_window_edges(margin_s=0, minute_margin_s=2)
    yield c
    c.close()


def metric(service: Service, name: str, key: str) -> float:
    text = urllib.request.urlopen(f"{service.http_base}/metrics", timeout=5).read().decode()
    prefix = f'{name}_total{{domain="test-domain",key="{key}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def wait_for_second_start() -> None:
    """Start a burst early in a second so a 1 s window does not roll over in the middle of it."""
    while time.time() % 1 > 0.3:
        time.sleep(0.02)


def test_limit_admits_exactly_requests_per_unit(client: RlsClient) -> None:
    assert client.codes([("minute", "a")], 7) == [OK] * 5 + [OVER] * 2


def test_status_reports_limit_remaining_and_reset(client: RlsClient) -> None:
    status = client.call([("minute", "x")]).statuses[0]
    assert status.current_limit.requests_per_unit == 5
    assert status.current_limit.unit == 2  # MINUTE
    assert status.limit_remaining == 4
    assert 0 < status.duration_until_reset.seconds <= 60


def test_each_value_of_a_key_only_default_has_its_own_counter(client: RlsClient) -> None:
    assert client.codes([("minute", "a")], 5) == [OK] * 5
    assert client.call([("minute", "b")]).overall_code == OK


def test_window_rolls_over(client: RlsClient) -> None:
    wait_for_second_start()
    assert client.codes([("per_second", "x")], 4) == [OK, OK, OK, OVER]
    time.sleep(1.05 - time.time() % 1)
    assert client.call([("per_second", "x")]).overall_code == OK


def test_request_hits_addend_counts_that_many_hits(client: RlsClient) -> None:
    assert client.call([("minute", "h")], hits_addend=4).statuses[0].limit_remaining == 1
    assert client.call([("minute", "h")], hits_addend=2).overall_code == OVER


def test_descriptor_hits_addend_overrides_request_hits(client: RlsClient) -> None:
    response = client.call(descriptor([("minute", "d")], hits=5), [("minute", "e")], hits_addend=2)
    assert [s.limit_remaining for s in response.statuses] == [0, 3]


def test_zero_descriptor_hits_addend_checks_without_counting(client: RlsClient) -> None:
    client.call([("minute", "z")], hits_addend=5)
    response = client.call(descriptor([("minute", "z")], hits=0))
    assert response.overall_code == OK and response.statuses[0].limit_remaining == 0


def test_nested_descriptor_uses_most_specific_limit(client: RlsClient) -> None:
    assert client.codes([("parent", "p1"), ("child", "any")], 3) == [OK, OK, OVER]
    assert client.codes([("parent", "p1"), ("child", "special")], 5) == [OK] * 4 + [OVER]


def test_unknown_descriptor_is_ok_without_limit(client: RlsClient) -> None:
    response = client.call([("nope", "x")], [("parent", "other"), ("child", "c")])
    assert response.overall_code == OK
    assert all(not s.HasField("current_limit") for s in response.statuses)


def test_unknown_domain_is_ok(client: RlsClient) -> None:
    assert client.call([("minute", "x")], domain="other").overall_code == OK


def test_unlimited_descriptor_is_always_ok_with_max_remaining(client: RlsClient) -> None:
    responses = [client.call([("free", "x")]) for _ in range(5)]
    assert all(r.overall_code == OK for r in responses)
    assert responses[-1].statuses[0].limit_remaining == 2**32 - 1


def test_shadow_mode_never_denies_but_counts(client: RlsClient, service: Service) -> None:
    responses = [client.call([("shadow", "s")]) for _ in range(3)]
    assert [r.overall_code for r in responses] == [OK, OK, OK]
    assert [r.statuses[0].code for r in responses] == [OK, OK, OK]
    assert metric(service, "ratelimit_over_limit", "shadow") == 2
    assert metric(service, "ratelimit_shadow_mode", "shadow") == 2


def test_wildcard_value_matches_prefix_with_one_counter_per_value(client: RlsClient) -> None:
    assert client.codes([("wild", "gpu-a")], 3) == [OK, OK, OVER]
    assert client.call([("wild", "gpu-b")]).overall_code == OK
    assert client.call([("wild", "cpu-a")]).statuses[0].HasField("current_limit") is False


def test_share_threshold_values_share_one_counter(client: RlsClient) -> None:
    codes = [client.call([("shared", f"team-{i}")]).overall_code for i in range(4)]
    assert codes == [OK, OK, OK, OVER]


def test_replaces_drops_the_replaced_limit(client: RlsClient) -> None:
    # Alone, "broad" allows one hit per minute.
    assert client.codes([("broad", "x")], 2) == [OK, OVER]
    # With "narrow" in the same request, "broad" is replaced and not counted.
    response = client.call([("broad", "y")], [("narrow", "y")])
    response = client.call([("broad", "y")], [("narrow", "y")])
    assert response.overall_code == OK
    assert not response.statuses[0].HasField("current_limit")
    assert response.statuses[1].limit_remaining == 8


def test_quota_mode_denies_only_when_every_quota_descriptor_is_over(client: RlsClient) -> None:
    pair = ([("quota_a", "x")], [("quota_b", "x")])
    assert client.call(*pair).overall_code == OK  # a: 1/1, b: 1/2
    assert client.call(*pair).overall_code == OK  # a over, b 2/2
    assert client.call(*pair).overall_code == OVER  # both over


def test_any_over_limit_descriptor_makes_the_overall_code_over(client: RlsClient) -> None:
    client.call([("minute", "m")], hits_addend=5)
    response = client.call([("free", "x")], [("minute", "m")])
    assert response.overall_code == OVER
    assert [s.code for s in response.statuses] == [OK, OVER]


def test_request_level_limit_override_is_used(client: RlsClient) -> None:
    d = descriptor([("anything", "v")])
    d.limit.CopyFrom(ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(
        requests_per_unit=1, unit=ratelimit_unit_pb2.MINUTE))
    assert client.call(d).overall_code == OK
    assert client.call(d).overall_code == OVER


def test_near_limit_and_within_limit_metrics(client: RlsClient, service: Service) -> None:
    client.codes([("minute", "metrics")], 6)
    assert metric(service, "ratelimit_total_hits", "minute") == 6
    assert metric(service, "ratelimit_within_limit", "minute") == 5
    assert metric(service, "ratelimit_near_limit", "minute") == 1  # the 5th hit crossed 4 (0.8 x 5)
    assert metric(service, "ratelimit_over_limit", "minute") == 1


def test_empty_domain_is_invalid_argument(client: RlsClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.call([("minute", "x")], domain="")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_empty_descriptor_list_is_invalid_argument(client: RlsClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_descriptor_without_entries_is_invalid_argument(client: RlsClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.call([])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no entries" in info.value.details()


def test_counter_keys_expire_with_their_window(client: RlsClient, redis_url: str) -> None:
    import redis

    client.call([("minute", "ttl")])
    r = redis.Redis.from_url(redis_url)
    keys = [k for k in r.keys("test-domain_minute_ttl_*")]
    assert len(keys) == 1
    window_start = int(keys[0].decode().rsplit("_", 1)[1])
    assert window_start % 60 == 0
    assert 0 < r.ttl(keys[0]) <= 60 + 300  # window plus expiration jitter
    r.close()


def test_hot_reload_applies_a_changed_file(client: RlsClient, config_dir: Path) -> None:
    assert client.call([("minute", "r")]).statuses[0].current_limit.requests_per_unit == 5
    (config_dir / "test.yaml").write_text(CONFIG.replace("requests_per_unit: 5", "requests_per_unit: 50"))
    deadline = time.time() + 5
    while time.time() < deadline:
        if client.call([("minute", "r2")]).statuses[0].current_limit.requests_per_unit == 50:
            return
        time.sleep(0.1)
    pytest.fail("new config not applied within 5 s")


def test_hot_reload_of_a_new_file_adds_its_domain(client: RlsClient, config_dir: Path) -> None:
    (config_dir / "other.yaml").write_text(
        "domain: other\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1}\n"
    )
    deadline = time.time() + 5
    while client.call([("k", "v")], domain="other").statuses[0].HasField("current_limit") is False:
        assert time.time() < deadline, "new file not loaded"
        time.sleep(0.1)


def test_bad_reload_keeps_last_good_config_and_counts_error(
    client: RlsClient, config_dir: Path, service: Service
) -> None:
    broken = CONFIG.replace("unit: minute, requests_per_unit: 5", "unit: fortnight, requests_per_unit: 5")
    (config_dir / "test.yaml").write_text(broken)
    deadline = time.time() + 5
    while "ratelimit_config_load_error_total 1.0" not in _metrics(service):
        assert time.time() < deadline, "bad config not noticed"
        time.sleep(0.1)
    assert client.call([("minute", "after-bad")]).statuses[0].current_limit.requests_per_unit == 5
    assert "invalid rate limit unit 'fortnight'" in service.proc.tail(50)
    assert "test.yaml" in service.proc.tail(50)


def test_a_reload_with_unloadable_metadata_keeps_the_last_good_config_and_the_watcher(
    client: RlsClient, config_dir: Path, service: Service
) -> None:
    (config_dir / "test.yaml").write_text(CONFIG.replace("    rate_limit: {unit: minute, requests_per_unit: 5}",
                                                         "    rate_limit: {unit: minute, requests_per_unit: 5}\n"
                                                         "    metadata: {owner: !team ml}"))
    deadline = time.time() + 5
    while "ratelimit_config_load_error_total 1.0" not in _metrics(service):
        assert time.time() < deadline, "bad file not noticed"
        time.sleep(0.1)
    assert client.call([("minute", "kept")]).statuses[0].current_limit.requests_per_unit == 5
    (config_dir / "test.yaml").write_text(CONFIG.replace("requests_per_unit: 5", "requests_per_unit: 7"))
    while client.call([("minute", "fixed")]).statuses[0].current_limit.requests_per_unit != 7:
        assert time.time() < deadline + 5, "watcher stopped after the bad file"
        time.sleep(0.1)


def _metrics(service: Service) -> str:
    return urllib.request.urlopen(f"{service.http_base}/metrics", timeout=5).read().decode()


def test_healthcheck_is_ok_with_config_and_redis(service: Service) -> None:
    assert urllib.request.urlopen(f"{service.http_base}/healthcheck", timeout=5).status == 200


def test_grpc_health_service_reports_serving(service: Service) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service="envoy.service.ratelimit.v3.RateLimitService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_response_headers_when_enabled(services: ServiceFactory, config_dir: Path, redis_url: str) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--response-headers", "true")
    c = RlsClient(svc.grpc_target)
    response = c.call([("minute", "hdr")], [("parent", "p1"), ("child", "x")])
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert headers["RateLimit-Limit"] == "2"  # the descriptor with the least remaining
    assert headers["RateLimit-Remaining"] == "1"
    assert 0 < int(headers["RateLimit-Reset"]) <= 60
    c.close()


def test_response_headers_name_the_limit_that_refused_the_request(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--response-headers", "true")
    c = RlsClient(svc.grpc_target)
    avoid_window_edges()
    c.call([("minute", "full")], hits_addend=5)  # the 5/minute limit is used up
    response = c.call([("parent", "p1"), ("child", "y")], [("minute", "full")], hits_addend=2)
    assert [s.code for s in response.statuses] == [OK, OVER]  # the 2/minute one is exactly at its limit
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == ("5", "0")
    c.close()


def test_response_headers_are_off_by_default(client: RlsClient) -> None:
    assert len(client.call([("minute", "nohdr")]).response_headers_to_add) == 0


# --- Redis failures ----------------------------------------------------------------------------


def test_redis_down_fails_fast_then_recovers_by_itself(
    services: ServiceFactory, config_dir: Path, own_redis: RedisServer, log_dir: Path
) -> None:
    svc = services.ratelimit(config_dir, own_redis.url, "--redis-timeout", "200ms")
    c = RlsClient(svc.grpc_target)
    assert c.call([("minute", "r")]).overall_code == OK
    own_redis.kill()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        c.call([("minute", "r")])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.0
    assert svc.proc.alive()
    # Health reflects the outage.
    deadline = time.time() + 5
    while _health_status(svc) != 503:
        assert time.time() < deadline
        time.sleep(0.1)
    # Restart Redis on the same port: the service reconnects without a restart.
    restarted = RedisServer(log_dir=log_dir, port=own_redis.port).start()
    try:
        deadline = time.time() + 5
        while True:
            try:
                if c.call([("minute", "r")]).overall_code == OK:
                    break
            except grpc.RpcError:
                pass
            assert time.time() < deadline, "service did not reconnect to Redis"
            time.sleep(0.1)
        assert svc.proc.alive()
    finally:
        restarted.stop()
        c.close()


def _health_status(svc: Service) -> int:
    try:
        return urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=2).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_fail_open_answers_ok_when_redis_is_down(
    services: ServiceFactory, config_dir: Path, own_redis: RedisServer
) -> None:
    svc = services.ratelimit(config_dir, own_redis.url, "--redis-timeout", "200ms", "--fail-open", "true")
    c = RlsClient(svc.grpc_target)
    own_redis.kill()
    assert c.call([("minute", "r")]).overall_code == OK
    c.close()


def test_no_config_loaded_is_unavailable_and_unhealthy(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    empty = tmp_path / "broken"
    empty.mkdir()
    (empty / "bad.yaml").write_text("domain: x\ndescriptors:\n  - value: no-key\n")
    svc = services.ratelimit(empty, redis_url, wait_healthy=False)
    svc.proc.wait_ready(lambda: _health_status(svc) == 503, 20, "answering")
    with pytest.raises(grpc.RpcError) as info:
        RlsClient(svc.grpc_target).call([("k", "v")], domain="x")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# --- process interface ------------------------------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr


def test_unreadable_config_dir_exits_with_clear_message(tmp_path: Path) -> None:
    code, err = _run("--config-dir", str(tmp_path / "missing"))
    assert code == 2
    assert "missing" in err and "does not exist" in err


def test_bad_flag_value_exits_with_clear_message(config_dir: Path) -> None:
    code, err = _run("--config-dir", str(config_dir), "--grpc-port", "99999")
    assert code == 2 and "port 99999 out of range" in err


def test_bad_environment_value_exits_with_clear_message(config_dir: Path) -> None:
    code, err = _run("--config-dir", str(config_dir), env={"NEAR_LIMIT_RATIO": "lots"})
    assert code == 2 and "NEAR_LIMIT_RATIO" in err


def test_runtime_environment_variables_locate_the_config(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    app = tmp_path / "root" / "ratelimit" / "config"
    app.mkdir(parents=True)
    (app / "test.yaml").write_text(CONFIG)
    svc = services.start_module(
        "ratelimit_svc", "--redis-url", redis_url,
        env={"RUNTIME_ROOT": str(tmp_path / "root"), "RUNTIME_SUBDIRECTORY": "ratelimit"},
    )
    assert RlsClient(svc.grpc_target).call([("minute", "x")]).statuses[0].current_limit.requests_per_unit == 5


def test_workers_share_the_port_and_the_counters(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--workers", "2")
    avoid_window_edges(minute_margin_s=3)  # seven new connections take a while on a loaded machine
    codes = []
    for _ in range(7):  # new channel each time so connections spread over the workers
        c = RlsClient(svc.grpc_target)
        codes.append(c.call([("minute", "w")]).overall_code)
        c.close()
    assert codes == [OK] * 5 + [OVER] * 2
    svc.proc.stop()
    assert not svc.proc.alive()


def test_workers_are_scraped_and_health_checked_together_on_the_admin_port(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--workers", "2")
    for _ in range(7):  # new channel each time so connections spread over the workers
        c = RlsClient(svc.grpc_target)
        c.call([("minute", "w")])
        c.close()
    for _ in range(3):  # every scrape sees every worker, so the total never jumps
        with urllib.request.urlopen(f"{svc.http_base}/metrics", timeout=5) as response:
            text = response.read().decode()
        hits = [line for line in text.splitlines()
                if line.startswith('ratelimit_total_hits_total{domain="test-domain",key="minute"')]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in hits) == 7
        assert 'igw_worker_up{worker="0"} 1.0' in text and 'igw_worker_up{worker="1"} 1.0' in text
    with urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=5) as response:
        assert response.status == 200
        assert response.read().decode().splitlines() == ["worker 0: OK", "worker 1: OK"]


def test_config_dir_copy_of_shared_example_serves(
    services: ServiceFactory, tmp_path: Path, redis_url: str, shared_dir: Path
) -> None:
    directory = tmp_path / "example"
    directory.mkdir()
    shutil.copy(shared_dir / "compat/envoyproxy-ratelimit/examples/example.yaml", directory)
    svc = services.ratelimit(directory, redis_url)
    c = RlsClient(svc.grpc_target, domain="rl")
    assert c.codes([("foo", "x"), ("bar", "bkthomps")], 2) == [OK, OVER]
