"""Adaptive quotas end to end: the launcher publishes the ready model servers, the rate-limit service
turns them into per-tenant limits (15/s per replica, shared 2:1 between `adapt` and `adapt-half`), and
Envoy enforces them. Scaling demo-linear 2 -> 4 -> 2 moves the threshold with it.

Switch time: from the moment the replica change happened (new servers ready, or old ones stopped;
ScaleEvent.changed_at) to the first request whose x-ratelimit-limit carries the new limit."""

from __future__ import annotations

import time
from collections.abc import Callable

from igw.gateway_client import send_in_one_window, v2_infer, wait_for_limit
from igw.launcher import GatewayBed

MODEL = "demo-linear"
PER_REPLICA = 15


def thresholds(bed: GatewayBed, key: str, half_key: str) -> tuple[int, int]:
    """Admitted in one window for both tenants, each offered 3x its 2-replica limit."""
    gateway = bed.state["gateway_url"]
    burst = [v2_infer(gateway, MODEL, key)] * 60 + [v2_infer(gateway, MODEL, half_key)] * 30
    results = send_in_one_window(burst, concurrency=24)
    statuses = [r.status for r in results]
    assert set(statuses) <= {200, 429}, statuses
    return statuses[:60].count(200), statuses[60:].count(200)


def test_adaptive_limits_follow_the_ready_replicas_and_split_by_share(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    key, half_key = key_for("adapt"), key_for("adapt-half")
    probe = v2_infer(bed.state["gateway_url"], MODEL, key)
    assert len(bed.state["models"][MODEL]) == 2
    wait_for_limit(probe, 2 * PER_REPLICA * 2 // 3, since=time.time())  # the publisher's counts are in
    before = thresholds(bed, key, half_key)

    bed.add_model_replica(MODEL, 2, wait_routable=False)  # measure at once; routing needs no wait here
    up = bed.scale_events[-1]
    assert up.replicas == 4 and up.published_at is not None
    switch_up = wait_for_limit(probe, 4 * PER_REPLICA * 2 // 3, since=up.changed_at, timeout=3)
    scaled = thresholds(bed, key, half_key)

    bed.remove_model_replica(MODEL, 2)
    down = bed.scale_events[-1]
    assert down.replicas == 2
    switch_down = wait_for_limit(probe, 2 * PER_REPLICA * 2 // 3, since=down.changed_at, timeout=3)
    after = thresholds(bed, key, half_key)

    print(f"\nadaptive thresholds per 1 s window (adapt, adapt-half): 2 replicas {before}, 4 replicas {scaled}, "
          f"back to 2 {after}; switch time up {switch_up * 1000:.0f} ms, down {switch_down * 1000:.0f} ms "
          f"(replica change -> first request with the new limit)")
    assert before == (20, 10)   # 15 x 2 replicas x 2/3 and x 1/3
    assert scaled == (40, 20)   # 15 x 4 replicas
    assert after == (20, 10)
    assert switch_up < 1.0 and switch_down < 1.0


def test_a_replica_turning_unready_on_its_own_lowers_the_limit_by_the_publishers_next_round(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    """No launcher shortcut here: the replica fails its readiness probe and the 1 s publisher loop finds it."""
    probe = v2_infer(bed.state["gateway_url"], MODEL, key_for("adapt"))
    replica = bed.state["models"][MODEL][-1]["name"]
    wait_for_limit(probe, 2 * PER_REPLICA * 2 // 3, since=time.time())
    changed_at = time.time()
    bed.set_model_ready(replica, False)
    try:
        switch = wait_for_limit(probe, 1 * PER_REPLICA * 2 // 3, since=changed_at, timeout=5)
    finally:
        bed.set_model_ready(replica, True)
    wait_for_limit(probe, 2 * PER_REPLICA * 2 // 3, since=time.time())
    print(f"\nunready replica -> limit 20 -> 10 after {switch * 1000:.0f} ms (publisher probes every 1 s)")
    assert switch < 2.0  # one publisher interval (1 s) plus a probe and a request
