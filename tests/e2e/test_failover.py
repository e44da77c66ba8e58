"""Replica failover under steady load: with two replicas of ext_proc and of the rate-limit service,
SIGKILL one of each while a client keeps sending; after the health-check window no client request fails,
and the killed replicas rejoin (healthy in Envoy's /clusters, and serving traffic) once restarted.

Health-check window: Envoy probes every 1 s (0.5 s timeout) and marks a host unhealthy after 2 failed
probes; outlier detection ejects it after 2 consecutive local-origin (connect) failures, whichever comes
first. So a dead replica is out of rotation within 2.5 s; the test allows WINDOW_S = 3 s. Requests that
were on the killed ext_proc's stream at the moment of the kill (or sent to it before Envoy noticed) fail
with 503 (ext_proc fails closed); the rate-limit service fails open, so its death costs no request."""

from __future__ import annotations

import time
from collections.abc import Callable

from igw.launcher import GatewayBed
from tests.e2e.observe import metric
from tests.helpers import SteadyLoad

WINDOW_S = 3.0


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killing_one_replica_of_each_service_fails_no_request_after_the_health_check_window_and_it_rejoins(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    state = bed.state
    url = f"{state['gateway_url']}/v2/models/demo-linear/infer"
    ext_proc_1 = f"127.0.0.1:{state['services']['ext_proc'][1]['grpc_port']}"
    ratelimit_1 = f"127.0.0.1:{state['services']['ratelimit'][1]['grpc_port']}"
    envoy_pid = bed.procs["envoy"].pid
    with SteadyLoad(url, key_for("e2e")).running() as load:
        # Counts, not fixed pauses: a loaded machine sends fewer than the ~100 requests/s of an idle one.
        _wait(lambda: load.count(0) > 20, 15, "the steady load to get going")
        assert load.failures(0) == [], load.failures(0)
        killed_at = time.time()
        bed.kill("ext_proc-1")
        bed.kill("ratelimit-1")
        _wait(lambda: time.time() > killed_at + WINDOW_S + 2.0 and load.count(killed_at + WINDOW_S) > 50, 30,
              "50 requests sent after the health-check window")
        in_window = load.failures(killed_at, killed_at + WINDOW_S)
        after_window = load.failures(killed_at + WINDOW_S)
        served_after = load.count(killed_at + WINDOW_S)

        restarted_at = time.time()
        bed.restart("ext_proc-1")
        bed.restart("ratelimit-1")
        health = bed.envoy_host_health
        _wait(lambda: health()["ext_proc"][ext_proc_1] == "healthy" and health()["ratelimit"][ratelimit_1] == "healthy",
              10, "Envoy to see both restarted replicas healthy")
        rejoined_at = time.time()
        ext_proc_port = bed.state["services"]["ext_proc"][1]["http_port"]
        ratelimit_port = bed.state["services"]["ratelimit"][1]["http_port"]
        _wait(lambda: metric(ext_proc_port, "igw_ext_proc_requests_total") > 0
              and metric(ratelimit_port, "ratelimit_total_hits_total") > 0, 10,
              "traffic to reach both restarted replicas")
        time.sleep(0.5)
        while_rejoining = load.failures(restarted_at)
    print(f"\nkill -9 ext_proc-1 + ratelimit-1 under load: {len(in_window)} failed requests in the first "
          f"{WINDOW_S:g} s ({sorted({s for _, s in in_window})}), {len(after_window)} of {served_after} after it; "
          f"back in rotation {rejoined_at - restarted_at:.1f} s after the restart began")
    assert served_after > 50
    assert after_window == [], after_window
    assert while_rejoining == [], while_rejoining
    assert bed.procs["envoy"].pid == envoy_pid
