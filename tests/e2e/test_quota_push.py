"""Quota push in the bed (rate_limit_mode "rlqs"): ext_proc authenticates, Envoy's rate_limit_quota
filter enforces the token bucket the rate-limit service assigns over RLQS, the model answers. Tenant
`quota` has 20/s on demo-linear in tests/e2e/ratelimit; under 5x overload it gets 20/s ± 10 %.

The first second of a bucket is skipped: until the first assignment arrives (one report round trip)
Envoy admits (no_assignment_behavior ALLOW_ALL), and a fresh bucket may start full."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from igw.gateway_client import admitted_per_second, offer, send, v2_infer
from igw.launcher import BedOptions, GatewayBed
from tests.e2e.conftest import E2E_QUOTAS, issue_key

BUDGET = 20


@pytest.fixture(scope="module")
def rlqs_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayBed]:
    options = BedOptions(rate_limit_mode="rlqs", model_replicas=2, rate_limit_config=E2E_QUOTAS,
                         log_dir=tmp_path_factory.mktemp("e2e-rlqs-bed"))
    with GatewayBed(options, on_death=lambda _death: None) as running:
        yield running


def test_rlqs_bed_routes_through_the_quota_filter(rlqs_bed: GatewayBed) -> None:
    clusters = rlqs_bed.envoy_host_health()
    assert "rlqs" in clusters and "ratelimit" not in clusters
    assert set(clusters["rlqs"].values()) == {"healthy"}


def test_a_tenant_on_a_model_gets_its_pushed_budget_per_second_under_overload(rlqs_bed: GatewayBed) -> None:
    key = issue_key(rlqs_bed.state["redis_url"], "quota")
    request = v2_infer(rlqs_bed.state["gateway_url"], "demo-linear", key)
    assert send([request], concurrency=1)[0].status == 200  # creates the bucket: Envoy reports it at once
    time.sleep(0.5)
    start = time.time()
    results = offer(request, rate=5 * BUDGET, seconds=7)
    per_second = admitted_per_second(results, start)
    steady = per_second[1:7]
    statuses = {r.status for r in results}
    rate = sum(steady) / len(steady)
    print(f"\nquota push in the bed: admitted per second {per_second} (budget {BUDGET}/s, offered {5 * BUDGET}/s)")
    assert statuses <= {200, 429}, statuses
    assert abs(rate - BUDGET) <= 0.1 * BUDGET, f"mean admitted {rate:.1f}/s over {steady}, budget {BUDGET}/s"
    denied = next(r for r in results if r.status == 429)
    assert denied.json() == {"error": {"code": "rate_limited", "message": "rate limit exceeded"}}
    admitted = next(r for r in results if r.status == 200)
    assert admitted.headers["x-igw-replica"] in {r["name"] for r in rlqs_bed.state["models"]["demo-linear"]}
