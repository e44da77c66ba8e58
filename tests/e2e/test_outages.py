"""Whole-service outages and recovery, Envoy untouched throughout (its pid never changes):

- rate-limit service down (every replica): requests pass without limits or rate-limit headers
  (failure_mode_deny false); restarted, the limits apply again.
- ext_proc down (every replica): 503 for everyone (failure_mode_allow false); restarted, 200 again.
- Redis down: keys ext_proc has cached keep working until the cache TTL (10 s), other keys get 503 with
  Retry-After; rate limits are not enforced (the rate-limit service cannot count, reports NOT_SERVING,
  and Envoy fails open). Restarted (empty, re-seeded by the launcher), new keys work and limits apply.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from igw.gateway_client import send, send_in_one_window, v2_infer
from igw.launcher import GatewayBed
from tests.e2e.observe import metric

SERVICES = ("ratelimit-0", "ratelimit-1")
EXT_PROCS = ("ext_proc-0", "ext_proc-1")


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _all_unhealthy(bed: GatewayBed, cluster: str) -> bool:
    return all(flags != "healthy" for flags in bed.envoy_host_health()[cluster].values())


def test_with_the_rate_limit_service_down_requests_pass_unlimited_and_limits_return_with_it(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    envoy_pid = bed.procs["envoy"].pid
    burst = [v2_infer(bed.state["gateway_url"], "demo-linear", key_for("burst-b"))] * 10  # 7/s
    try:
        for name in SERVICES:
            bed.kill(name)
        down = send_in_one_window(burst, concurrency=1)
    finally:
        for name in SERVICES:
            bed.restart(name)
    _wait(lambda: all(f == "healthy" for f in bed.envoy_host_health()["ratelimit"].values()), 10, "ratelimit healthy")
    # Healthy in Envoy's view; on a loaded machine the first calls to a just-started process can still
    # fail (and fail open). Recovery means: answers carry rate-limit headers again, without an Envoy restart.
    probe = v2_infer(bed.state["gateway_url"], "demo-logistic", key_for("e2e"))
    _wait(lambda: "x-ratelimit-limit" in send([probe], concurrency=1)[0].headers, 10, "rate limits answered again")
    again = send_in_one_window(burst, concurrency=1)
    assert [r.status for r in down] == [200] * 10
    assert all("x-ratelimit-limit" not in r.headers for r in down)
    assert [r.status for r in again] == [200] * 7 + [429] * 3
    assert bed.procs["envoy"].pid == envoy_pid


def test_with_ext_proc_down_every_request_gets_503_and_ext_proc_back_serves_them_again(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    envoy_pid = bed.procs["envoy"].pid
    request = v2_infer(bed.state["gateway_url"], "demo-linear", key_for("e2e"))
    try:
        for name in EXT_PROCS:
            bed.kill(name)
        down = send([request] * 5, concurrency=1)
    finally:
        for name in EXT_PROCS:
            bed.restart(name)
    _wait(lambda: all(f == "healthy" for f in bed.envoy_host_health()["ext_proc"].values()), 10, "ext_proc healthy")
    # See above: a just-started process may fail its very first calls on a loaded machine.
    _wait(lambda: send([request], concurrency=1)[0].status == 200, 10, "ext_proc answering again")
    again = send([request] * 5, concurrency=1)
    assert [r.status for r in down] == [503] * 5
    assert all("x-igw-replica" not in r.headers for r in down)  # nothing reached a model
    assert [r.status for r in again] == [200] * 5
    assert bed.procs["envoy"].pid == envoy_pid


def test_with_redis_down_cached_keys_pass_unlimited_new_keys_get_503_and_a_restarted_redis_serves_again(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    envoy_pid = bed.procs["envoy"].pid
    gateway = bed.state["gateway_url"]
    cached, uncached = key_for("burst-b"), key_for("e2e")
    burst = [v2_infer(gateway, "demo-linear", cached)] * 10  # 7/s while Redis runs
    # Every ext_proc replica looks the key up and caches it (the load balancer decides who gets what).
    replicas = [s["http_port"] for s in bed.state["services"]["ext_proc"]]
    _wait(lambda: send(burst[:1], concurrency=1)[0].status in (200, 429)
          and all(metric(port, "igw_ext_proc_requests_total", tenant="burst-b") > 0 for port in replicas),
          15, "both ext_proc replicas to have seen the key")
    try:
        bed.stop_component("redis")
        # Envoy needs two failed 1 s health checks per replica: seconds, and more on a loaded machine.
        _wait(lambda: _all_unhealthy(bed, "ratelimit"), 15, "the rate-limit replicas to report NOT_SERVING")
        down = send_in_one_window(burst, concurrency=1)
        refused = send([v2_infer(gateway, "demo-linear", uncached)], concurrency=1)[0]
    finally:
        bed.restart("redis")  # empty and re-seeded: tenants created by tests are gone
    assert [r.status for r in down] == [200] * 10, [r.body for r in down]  # cached key, no limit enforced
    assert all("x-ratelimit-limit" not in r.headers for r in down)
    assert refused.status == 503 and refused.headers.get("retry-after") == "1"

    _wait(lambda: all(f == "healthy" for f in bed.envoy_host_health()["ratelimit"].values()), 10, "ratelimit healthy")
    probe = [v2_infer(gateway, "demo-linear", key_for("e2e"))] * 6
    _wait(lambda: all("x-ratelimit-limit" in r.headers for r in send(probe, concurrency=1)), 15,
          "every rate-limit replica to count in the new Redis")
    demo = send([v2_infer(gateway, "demo-linear", bed.state["tenant"]["api_key"])], concurrency=1)[0]
    again = send_in_one_window([v2_infer(gateway, "demo-linear", key_for("burst-b"))] * 10, concurrency=1)
    assert demo.status == 200  # the re-seeded demo key
    assert [r.status for r in again] == [200] * 7 + [429] * 3, [r.headers for r in again]
    assert bed.procs["envoy"].pid == envoy_pid
