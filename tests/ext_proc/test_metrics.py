"""/metrics counts decisions by tenant, model and decision, and times each phase."""

from __future__ import annotations

import urllib.request

from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import ExtProcClient, request_headers
from tests.helpers import Service, ServiceFactory


def scrape(service: Service) -> str:
    with urllib.request.urlopen(f"{service.http_base}/metrics", timeout=5) as response:
        return response.read().decode()


def test_decisions_are_counted_by_tenant_model_and_decision(
    client: ExtProcClient, world: World, processor: Service
) -> None:
    client.one(request_headers("/v2/models/llama-3-70b/infer", key=world.acme_key))
    client.one(request_headers("/v2/models/mistral-7b/infer", key=world.acme_key))
    client.one(request_headers("/v2/models/whatever-a-client-types/infer", key=world.acme_key))
    text = scrape(processor)
    assert 'igw_ext_proc_requests_total{decision="allowed",model="llama-3-70b",tenant="acme"}' in text
    assert 'igw_ext_proc_requests_total{decision="403",model="mistral-7b",tenant="acme"}' in text
    assert 'igw_ext_proc_requests_total{decision="404",model="-",tenant="acme"}' in text
    assert "whatever-a-client-types" not in text, "client-chosen names must not become label values"


def test_phase_latency_histogram_is_exported(client: ExtProcClient, world: World, processor: Service) -> None:
    client.one(request_headers(key=world.acme_key))
    text = scrape(processor)
    assert 'igw_ext_proc_phase_duration_seconds_bucket{le="5e-05",phase="request_headers"}' in text


def test_healthcheck_answers_ok(processor: Service) -> None:
    with urllib.request.urlopen(f"{processor.http_base}/healthcheck", timeout=5) as response:
        assert response.status == 200


def test_workers_count_together_on_one_admin_port(world: World, services: ServiceFactory) -> None:
    service = services.start_module("ext_proc", "--redis-url", world.redis_url, "--workers", "2")
    for _ in range(6):  # a new connection each time, spread over the workers by the kernel
        c = ExtProcClient(service.grpc_target)
        c.one(request_headers("/v2/models/llama-3-70b/infer", key=world.acme_key))
        c.close()
    text = scrape(service)
    counted = [line for line in text.splitlines() if line.startswith(
        'igw_ext_proc_requests_total{decision="allowed",model="llama-3-70b",tenant="acme"')]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == 6
    assert 'igw_worker_up{worker="1"} 1.0' in text
