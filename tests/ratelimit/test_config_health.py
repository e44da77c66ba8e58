"""Health and the config, as upstream's HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED and
FORCE_START_WITHOUT_INITIAL_CONFIG define them, seen through /healthcheck and the gRPC health service.

Upstream: with HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED the service is unhealthy until a config with at least
one domain is loaded, and again whenever a reload leaves no domain; a reload that fails changes nothing.
Without FORCE_START_WITHOUT_INITIAL_CONFIG it opens its ports only after the first config load."""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.procs import port_open
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.rls_client import OK, RlsClient

CONFIG = """
domain: test-domain
descriptors:
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 5}
"""
NEED_A_DOMAIN = ("--healthy-with-at-least-one-config-loaded", "true")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(svc: Service) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=2) as resp:
            return resp.status, resp.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()
    except OSError:  # not listening (yet)
        return 0, ""


def grpc_health(svc: Service) -> int:
    with grpc.insecure_channel(svc.grpc_target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="envoy.service.ratelimit.v3.RateLimitService"), timeout=2)
        except grpc.RpcError:
            return -1
    return reply.status


def wait_for(svc: Service, status: int, grpc_status: int, timeout: float = 10) -> str:
    """The HTTP body once both health checks report the expected state (gRPC's follows within a probe)."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = health(svc)
        if code == status and grpc_health(svc) == grpc_status:
            return body
        assert time.monotonic() < deadline, f"health stayed {code} {body!r}"
        time.sleep(0.1)


def test_with_the_setting_a_config_without_domains_is_unhealthy_until_one_is_added(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    svc = services.ratelimit(tmp_path, redis_url, *NEED_A_DOMAIN, wait_healthy=False)
    body = wait_for(svc, 503, NOT_SERVING)
    assert "no domain" in body and "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED" in body
    (tmp_path / "test.yaml").write_text(CONFIG)
    assert wait_for(svc, 200, SERVING) == "OK"


def test_with_the_setting_a_reload_that_removes_every_domain_turns_the_service_unhealthy_again(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    (tmp_path / "test.yaml").write_text(CONFIG)
    svc = services.ratelimit(tmp_path, redis_url, *NEED_A_DOMAIN)
    assert wait_for(svc, 200, SERVING) == "OK"
    (tmp_path / "test.yaml").unlink()
    assert "no domain" in wait_for(svc, 503, NOT_SERVING)


def test_with_the_setting_a_failed_reload_keeps_the_service_healthy(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    (tmp_path / "test.yaml").write_text(CONFIG)
    svc = services.ratelimit(tmp_path, redis_url, *NEED_A_DOMAIN)
    (tmp_path / "test.yaml").write_text("domain: test-domain\ndescriptors:\n  - value: no-key\n")
    time.sleep(1.5)  # a few polls of the directory
    assert health(svc) == (200, "OK") and grpc_health(svc) == SERVING


def test_without_the_setting_a_loaded_config_without_domains_is_healthy(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    svc = services.ratelimit(tmp_path, redis_url)
    assert health(svc) == (200, "OK") and grpc_health(svc) == SERVING


def test_upstream_environment_variable_turns_the_domain_check_on(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    svc = services.ratelimit(tmp_path, redis_url, wait_healthy=False,
                             env={"HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED": "true"})
    assert "no domain" in wait_for(svc, 503, NOT_SERVING)


# --- FORCE_START_WITHOUT_INITIAL_CONFIG ----------------------------------------------------------------------
# The config file is a FIFO: reading it blocks until the test writes the YAML into it, so the first load
# takes as long as the test wants. A poll interval of an hour keeps the watcher from reading it again.


@pytest.fixture
def blocking_config(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    os.mkfifo(directory / "test.yaml")
    return directory


def feed(directory: Path) -> None:
    """Write the YAML into the FIFO (the open blocks until the service reads it, hence a thread)."""
    def write() -> None:
        (directory / "test.yaml").write_text(CONFIG)

    threading.Thread(target=write, daemon=True).start()


SLOW_POLL = ("--config-poll-interval", "1h")


def test_force_start_opens_the_ports_before_the_first_config_load_and_is_unhealthy_meanwhile(
    services: ServiceFactory, blocking_config: Path, redis_url: str
) -> None:
    svc = services.ratelimit(blocking_config, redis_url, *SLOW_POLL, wait_healthy=False,
                             env={"FORCE_START_WITHOUT_INITIAL_CONFIG": "true"})
    body = wait_for(svc, 503, NOT_SERVING)
    assert "no config loaded" in body and "still running" in body
    with pytest.raises(grpc.RpcError) as info:
        RlsClient(svc.grpc_target).call([("minute", "x")])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    feed(blocking_config)
    assert wait_for(svc, 200, SERVING) == "OK"
    assert RlsClient(svc.grpc_target).call([("minute", "x")]).overall_code == OK


def test_without_force_start_the_ports_open_only_after_the_first_config_load(
    services: ServiceFactory, blocking_config: Path, redis_url: str
) -> None:
    svc = services.ratelimit(blocking_config, redis_url, *SLOW_POLL, wait_healthy=False)
    time.sleep(1.5)  # long enough for an interpreter to start and bind
    assert svc.proc.alive()
    assert not port_open("127.0.0.1", svc.http_port) and not port_open("127.0.0.1", svc.grpc_port)
    feed(blocking_config)
    assert wait_for(svc, 200, SERVING, timeout=20) == "OK"


def livez(svc: Service) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{svc.http_base}/livez", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one-process", "two-workers"])
def test_livez_answers_while_the_service_is_not_ready(
    services: ServiceFactory, blocking_config: Path, redis_url: str, workers: tuple[str, ...]
) -> None:
    svc = services.ratelimit(blocking_config, redis_url, *SLOW_POLL, *workers, wait_healthy=False,
                             env={"FORCE_START_WITHOUT_INITIAL_CONFIG": "true"})
    deadline = time.monotonic() + 20
    while (answer := livez(svc))[0] != 200:  # every worker up (the supervisor asks each of them)
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    assert answer[1].count("alive") == (2 if workers else 1)
    assert health(svc)[0] == 503  # still no config: not ready, yet alive
    feed(blocking_config)  # the loader's read returns, so the service stops at once instead of being killed
