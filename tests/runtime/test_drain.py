"""--drain-seconds: on a stop signal a service first reports NOT_SERVING (gRPC health) and 503 (/healthcheck)
while still serving every call, new connections included, so Envoy's health checks take it out of rotation
before it stops; a second signal stops it at once. Real services, real gRPC, signals sent to the process as
Kubernetes sends them (to the main process only: a signal to the whole group would reach --workers' workers
twice, which is the "second signal"). Last, through real Envoy: a rate-limit replica stopped with the drain the
Istio manifests give it fails no call while the other replica serves (without a drain, Envoy counts failed
calls in the gap before its health checks notice: two on the machines we ran it on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_proc import store
from ext_proc.server import SERVICE_NAME as EXT_PROC_SERVICE
from igw.launcher import BedOptions, GatewayBed
from igw.policy.istio import service_drain_seconds
from tests.ext_proc.helpers import ExtProcClient, request_headers
from tests.helpers import Service, ServiceFactory, SteadyLoad, assert_one_line_error
from tests.ratelimit.rls_client import OK, RlsClient

CONFIG = """
domain: test-domain
descriptors:
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 1000}
"""
RLS_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LONG_DRAIN = "600"  # never reached: these tests end it with a second signal, or the fixture kills the process


def healthcheck(svc: Service, path: str = "/healthcheck") -> int:
    try:
        with urllib.request.urlopen(f"{svc.http_base}{path}", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def grpc_health(svc: Service, service: str) -> int:
    """A fresh connection each time, as a health checker may open one after the drain started."""
    with grpc.insecure_channel(svc.grpc_target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return -1


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def ratelimit(services: ServiceFactory, tmp_path: Path, redis_url: str, *args: str,
              env: dict[str, str] | None = None) -> Service:
    (tmp_path / "test.yaml").write_text(CONFIG)
    return services.ratelimit(tmp_path, redis_url, *args, env=env)


def stop_signal(svc: Service) -> None:
    os.kill(svc.proc.pid, signal.SIGTERM)


def exit_code(svc: Service, timeout: float = 20) -> int | None:
    assert svc.proc.proc is not None
    try:
        return svc.proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_while_draining_the_rate_limit_service_is_not_ready_but_answers_new_calls(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    svc = ratelimit(services, tmp_path, redis_url, "--drain-seconds", LONG_DRAIN)
    stop_signal(svc)
    wait_until(lambda: grpc_health(svc, RLS_SERVICE) == NOT_SERVING, "gRPC health is NOT_SERVING")
    assert healthcheck(svc) == 503
    client = RlsClient(svc.grpc_target)  # a new connection, opened after the drain started
    try:
        assert client.call([("minute", "a")]).overall_code == OK
    finally:
        client.close()
    assert svc.proc.alive()


def test_while_draining_ext_proc_is_not_ready_but_answers_new_streams(
    services: ServiceFactory, redis_url: str
) -> None:
    svc = services.start_module("ext_proc", "--redis-url", redis_url, "--drain-seconds", LONG_DRAIN)
    stop_signal(svc)
    wait_until(lambda: grpc_health(svc, EXT_PROC_SERVICE) == NOT_SERVING, "gRPC health is NOT_SERVING")
    assert healthcheck(svc) == 503
    client = ExtProcClient(svc.grpc_target)
    try:
        response = client.one(request_headers())  # no API key: a 401, answered in full, not a failed stream
    finally:
        client.close()
    assert response.HasField("immediate_response")
    assert response.immediate_response.status.code == 401


def test_liveness_stays_ok_while_draining(services: ServiceFactory, tmp_path: Path, redis_url: str) -> None:
    svc = ratelimit(services, tmp_path, redis_url, "--drain-seconds", LONG_DRAIN)
    stop_signal(svc)
    wait_until(lambda: healthcheck(svc) == 503, "/healthcheck answers 503")
    assert healthcheck(svc, "/livez") == 200


def test_the_start_of_the_drain_is_logged_in_one_line(services: ServiceFactory, tmp_path: Path, redis_url: str) -> None:
    svc = ratelimit(services, tmp_path, redis_url, "--drain-seconds", LONG_DRAIN)
    stop_signal(svc)
    wait_until(lambda: "draining for 600 s" in svc.proc.log_path.read_text(), "the drain is logged")
    assert svc.proc.log_path.read_text().count("draining for") == 1


def test_the_service_stops_on_its_own_once_the_drain_is_over(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    svc = ratelimit(services, tmp_path, redis_url, "--drain-seconds", "1")
    stop_signal(svc)
    assert exit_code(svc) == 0, svc.proc.tail()
    assert "draining for 1 s" in svc.proc.log_path.read_text()


def test_a_second_signal_ends_the_drain_at_once(services: ServiceFactory, tmp_path: Path, redis_url: str) -> None:
    svc = ratelimit(services, tmp_path, redis_url, "--drain-seconds", LONG_DRAIN)
    stop_signal(svc)
    wait_until(lambda: healthcheck(svc) == 503, "the drain started")
    stop_signal(svc)
    assert exit_code(svc) == 0, svc.proc.tail()


def test_the_drain_is_read_from_the_environment_too(services: ServiceFactory, tmp_path: Path, redis_url: str) -> None:
    svc = ratelimit(services, tmp_path, redis_url, env={"IGW_DRAIN_SECONDS": LONG_DRAIN})
    stop_signal(svc)
    wait_until(lambda: healthcheck(svc) == 503, "/healthcheck answers 503")
    assert svc.proc.alive()


def test_without_a_drain_a_stop_signal_stops_at_once(services: ServiceFactory, tmp_path: Path, redis_url: str) -> None:
    svc = ratelimit(services, tmp_path, redis_url)
    stop_signal(svc)
    assert exit_code(svc) == 0, svc.proc.tail()
    assert "draining" not in svc.proc.log_path.read_text()


def test_with_workers_the_supervisor_is_not_ready_while_the_workers_drain_and_serve(
    services: ServiceFactory, tmp_path: Path, redis_url: str
) -> None:
    svc = ratelimit(services, tmp_path, redis_url, "--workers", "2", "--drain-seconds", LONG_DRAIN)
    stop_signal(svc)
    wait_until(lambda: healthcheck(svc) == 503, "the supervisor's /healthcheck answers 503")
    wait_until(lambda: svc.proc.log_path.read_text().count("draining for") == 2, "both workers drain")
    client = RlsClient(svc.grpc_target)
    try:
        assert client.call([("minute", "a")]).overall_code == OK
    finally:
        client.close()
    assert healthcheck(svc, "/livez") == 200


@pytest.mark.parametrize("module", ["ext_proc", "ratelimit_svc"])
@pytest.mark.parametrize("value", ["-1", "abc", "inf"])
def test_a_bad_drain_from_the_environment_is_one_line_naming_it(module: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "IGW_DRAIN_SECONDS": value}
    proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=30, env=env)
    assert_one_line_error(proc.returncode, proc.stderr, f"IGW_DRAIN_SECONDS={value!r}")


@pytest.mark.parametrize("value", ["-1", "abc", "inf"])
def test_a_bad_drain_flag_is_refused_naming_it(value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", f"--drain-seconds={value}"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # argparse's usage text comes first, as for every bad flag
    assert "argument --drain-seconds:" in last and repr(value) in last, last


E2E_QUOTAS = Path(__file__).resolve().parents[1] / "e2e" / "ratelimit"  # tenant e2e: a limit no load reaches


@pytest.fixture
def draining_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayBed]:
    """Two replicas of each service behind the test bed's Envoy, all started with the Istio manifests' drain."""
    monkeypatch.setenv("IGW_DRAIN_SECONDS", str(service_drain_seconds()))
    bed = GatewayBed(BedOptions(replicas=2, model_replicas=1, rate_limit_config=E2E_QUOTAS, log_dir=tmp_path))
    with bed:
        try:
            yield bed
        finally:
            for name, proc in bed.procs.items():  # a second signal each: stop now instead of draining
                if name.startswith(("ext_proc", "ratelimit")) and proc.alive():
                    os.kill(proc.pid, signal.SIGTERM)
                    os.kill(proc.pid, signal.SIGTERM)


def _e2e_key(redis_url: str) -> str:
    client = store.connect(redis_url)
    try:
        store.create_tenant(client, "e2e", department="e2e", tier="standard", models="*")
        return store.issue_key(client, "e2e").key
    finally:
        client.close()


def _rate_limit_calls(admin_url: str) -> dict[str, int]:
    """Envoy's rate-limit filter counters (cluster.<route cluster>.ratelimit.<outcome>), summed over clusters:
    `error` counts the ShouldRateLimit calls that failed (the filter fails open, so no request shows it)."""
    with urllib.request.urlopen(f"{admin_url}/stats?filter=\\.ratelimit\\.", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    totals: dict[str, int] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        if name.startswith("cluster.") and value.strip().isdigit():
            outcome = name.rsplit(".", 1)[1]
            totals[outcome] = totals.get(outcome, 0) + int(value)
    return totals


def test_through_envoy_a_rate_limit_replica_stopped_with_a_drain_fails_no_call(draining_bed: GatewayBed) -> None:
    """Back-to-back load, so calls reach the stopping replica all through the window Envoy needs to notice."""
    state = draining_bed.state
    url = f"{state['gateway_url']}/v2/models/{state['demo_models'][0]}/infer"
    stopped = draining_bed.procs["ratelimit-1"]
    with SteadyLoad(url, _e2e_key(state["redis_url"]), pause=0.005).running() as load:
        wait_until(lambda: load.count(0) > 20, "the load to get going")
        signalled_at = time.time()
        os.kill(stopped.pid, signal.SIGTERM)
        assert stopped.proc is not None and stopped.proc.wait(60) == 0, stopped.tail()
        exited_at = time.time()
        wait_until(lambda: load.count(exited_at) > 50, "50 requests sent after the replica exited")
    calls = _rate_limit_calls(state["envoy_admin_url"])
    assert load.count(signalled_at) > 50 and calls.get("ok", 0) > 50, calls
    assert calls.get("error", 0) == 0, calls
    assert load.failures(signalled_at) == []
