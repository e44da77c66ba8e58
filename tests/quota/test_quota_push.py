"""Quota push through the real Envoy: token buckets assigned over RLQS, enforced without a call per
request, following the same adaptive budgets as the per-request rate-limit service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Service, ServiceFactory
from tests.quota.gateway import QuotaGateway, admitted_per_bin, offer_load, start_gateway, statuses
from tests.ratelimit.test_adaptive import publish

CONFIG = """
domain: igw
descriptors:
  - key: tenant
    value: acme
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 10, min: 10}
"""
HEADERS = {"x-igw-tenant": "acme", "x-igw-model": "resnet"}


@pytest.fixture
def rlqs(services: ServiceFactory, tmp_path: Path, redis_url: str) -> Service:
    directory = tmp_path / "cfg"
    directory.mkdir()
    (directory / "igw.yaml").write_text(CONFIG)
    publish(redis_url, "resnet", 4, ttl=300)  # budget 40/s; no heartbeat in these tests, so a long TTL
    return services.ratelimit(directory, redis_url, "--replica-max-age", "300s")


@pytest.fixture
def gateways(rlqs: Service, tmp_path: Path, log_dir: Path) -> Iterator[list[QuotaGateway]]:
    started: list[QuotaGateway] = []

    def start(name: str) -> QuotaGateway:
        gw = start_gateway(name, rlqs.grpc_port, tmp_path, log_dir)
        started.append(gw)
        return gw

    yield started, start  # type: ignore[misc]
    for gw in started:
        gw.stop()


def warm(gw: QuotaGateway) -> None:
    """The first request creates the bucket and triggers Envoy's immediate report."""
    offer_load([(gw.url, HEADERS)], rate=20, seconds=0.5)
    time.sleep(0.5)


def within(actual: float, expected: float, tolerance: float = 0.10) -> bool:
    return abs(actual - expected) <= tolerance * expected


def test_one_gateway_admits_the_budget_per_second_under_overload(gateways) -> None:  # type: ignore[no-untyped-def]
    _, start = gateways
    gw = start("gw-a")
    warm(gw)
    bins = offer_load([(gw.url, HEADERS)], rate=120, seconds=11)[0]
    per_second = admitted_per_bin(bins)
    steady = [per_second.get(s, 0) for s in range(1, 11)]  # second 0 may hold the bucket's initial burst
    rate = sum(steady) / len(steady)
    print(f"admitted per second: {steady} (budget 40)")
    assert within(rate, 40), f"mean admitted {rate:.1f}/s, budget 40/s"
    assert set(statuses(bins)) <= {200, 429}


def test_two_gateways_share_one_budget(gateways) -> None:  # type: ignore[no-untyped-def]
    _, start = gateways
    a, b = start("gw-a"), start("gw-b")
    warm(a)
    warm(b)
    time.sleep(1.5)  # the server's 1 s sweep has seen both streams
    results = offer_load([(a.url, HEADERS), (b.url, HEADERS)], rate=80, seconds=11)
    per_gw = [admitted_per_bin(bins) for bins in results]
    together = [per_gw[0].get(s, 0) + per_gw[1].get(s, 0) for s in range(1, 11)]
    rate = sum(together) / len(together)
    print(f"admitted per second by both gateways: {together} (budget 40); "
          f"a: {[per_gw[0].get(s, 0) for s in range(11)]}, b: {[per_gw[1].get(s, 0) for s in range(11)]}")
    assert within(rate, 40), f"two gateways together admitted {rate:.1f}/s, budget 40/s"


def test_replica_change_changes_the_admitted_rate_within_two_seconds(gateways, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    _, start = gateways
    gw = start("gw-a")
    warm(gw)
    import threading

    def scale_down() -> None:
        time.sleep(4)
        publish(redis_url, "resnet", 2, ttl=300)  # budget 40/s -> 20/s

    threading.Thread(target=scale_down, daemon=True).start()
    per_half = admitted_per_bin(offer_load([(gw.url, HEADERS)], rate=120, seconds=10, bin_s=0.5)[0])
    after = [per_half.get(b, 0) * 2 for b in range(12, 20)]  # from 2 s after the change: 6 s .. 10 s
    print(f"admitted/s per 0.5 s bin: {[per_half.get(b, 0) * 2 for b in range(20)]}")
    assert within(sum(after) / len(after), 20, 0.15)


def test_killed_server_leaves_last_assignments_enforced_and_restart_resumes(
    gateways, rlqs: Service, services: ServiceFactory, tmp_path: Path, redis_url: str  # type: ignore[no-untyped-def]
) -> None:
    _, start = gateways
    gw = start("gw-a")
    warm(gw)
    rlqs.proc.kill()
    bins = offer_load([(gw.url, HEADERS)], rate=120, seconds=6)[0]
    per_second = admitted_per_bin(bins)
    steady = [per_second.get(s, 0) for s in range(1, 6)]
    assert within(sum(steady) / len(steady), 40), f"with the server down: {steady}"
    restarted = services.ratelimit(tmp_path / "cfg", redis_url, "--replica-max-age", "300s", grpc_port=rlqs.grpc_port)
    deadline = time.time() + 12
    while "rlqs_reports_total 0.0" in _metrics(restarted) or "rlqs_reports_total" not in _metrics(restarted):
        offer_load([(gw.url, HEADERS)], rate=10, seconds=0.5)
        assert time.time() < deadline, "Envoy did not resume reporting to the restarted server"


def _metrics(service: Service) -> str:
    import urllib.request

    return urllib.request.urlopen(f"{service.http_base}/metrics", timeout=5).read().decode()


def test_a_denied_request_gets_429_with_the_json_error_and_the_ratelimited_header_of_per_request_mode(
        gateways) -> None:  # type: ignore[no-untyped-def]
    """Clients and dashboards tell a rate-limit 429 by `x-envoy-ratelimited: true` in per-request mode (Envoy's
    ratelimit filter sets it); switching to quota push must not change that, nor the body's shape."""
    import json
    import urllib.error
    import urllib.request

    _, start = gateways
    gw = start("gw-a")
    warm(gw)
    deadline = time.time() + 10
    while True:  # 40 tokens a second: one after the other, the bucket runs dry within a second
        assert time.time() < deadline, "no request was denied"
        try:
            urllib.request.urlopen(urllib.request.Request(gw.url, headers=HEADERS), timeout=5).read()
        except urllib.error.HTTPError as denied:
            body, headers, status = denied.read(), denied.headers, denied.code
            break
    assert status == 429
    assert json.loads(body) == {"error": {"code": "rate_limited", "message": "rate limit exceeded"}}
    assert headers["content-type"] == "application/json"
    assert headers["x-envoy-ratelimited"] == "true"
