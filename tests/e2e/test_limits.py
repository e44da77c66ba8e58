"""Global rate limits through the real Envoy: 429 exactly at the configured threshold of a window, per
tenant and per tenant-on-model, with draft-03 rate-limit headers; shadow-mode limits never deny.

Bursts are sent one request after the other inside one fixed 1 s window (send_in_one_window), so the
position of the first 429 is exact."""

from __future__ import annotations

from collections.abc import Callable

from igw.gateway_client import send_in_one_window, v2_infer
from igw.launcher import GatewayBed
from tests.e2e.observe import ratelimit_metric

RATE_LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def test_a_tenant_gets_429_from_the_request_after_its_limit_with_rate_limit_headers(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    burst = [v2_infer(bed.state["gateway_url"], "demo-linear", key_for("burst-b"))] * 10
    results = send_in_one_window(burst, concurrency=1)
    assert [r.status for r in results] == [200] * 7 + [429] * 3  # burst-b: 7 per second
    for result in results:
        assert all(h in result.headers for h in RATE_LIMIT_HEADERS), result.headers
    assert [int(r.headers["x-ratelimit-remaining"]) for r in results[:7]] == [6, 5, 4, 3, 2, 1, 0]
    assert results[0].headers["x-ratelimit-limit"].startswith("7, 7;w=1")
    assert results[-1].headers.get("x-envoy-ratelimited") == "true"


def test_a_tenant_on_one_model_is_limited_apart_from_its_other_models_and_from_other_tenants(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    gateway, key, other = bed.state["gateway_url"], key_for("burst"), key_for("burst-b")
    logistic = [v2_infer(gateway, "demo-logistic", key)] * 8   # [burst, demo-logistic]: 5/s
    linear = [v2_infer(gateway, "demo-linear", key)] * 14      # [burst]: 20/s, whatever the model
    neighbour = [v2_infer(gateway, "demo-linear", other)] * 7  # burst-b's own 7/s
    statuses = [r.status for r in send_in_one_window(logistic + linear + neighbour, concurrency=1)]
    assert statuses[:8] == [200] * 5 + [429] * 3
    # Every request counts against [burst] (8 so far): demo-linear gets the 12 left of the 20.
    assert statuses[8:22] == [200] * 12 + [429] * 2
    assert statuses[22:] == [200] * 7


def test_a_shadow_mode_limit_never_denies_but_counts_the_hits_over_it(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    before = ratelimit_metric(bed.state, "ratelimit_shadow_mode_total", key="tenant_shadow")
    burst = [v2_infer(bed.state["gateway_url"], "demo-linear", key_for("shadow"))] * 10
    results = send_in_one_window(burst, concurrency=1)
    assert [r.status for r in results] == [200] * 10  # limit 3/s in shadow mode
    assert ratelimit_metric(bed.state, "ratelimit_shadow_mode_total", key="tenant_shadow") - before == 7

