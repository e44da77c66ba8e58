"""RESPONSE_DYNAMIC_METADATA=true: the answer carries upstream's dynamic metadata (domain, the request's
descriptors, hitsAddend, the merged `metadata` of the limits that passed), and Envoy hands it to its access log
under envoy.filters.http.ratelimit. Real service, real redis-server, real Envoy."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from google.protobuf import json_format
from google.protobuf.wrappers_pb2 import UInt64Value

from tests.helpers import Service, ServiceFactory
from tests.ratelimit.envoy_front import envoy_front, ok_backend
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor

CONFIG = """
domain: d
descriptors:
  - key: service
    metadata: {team: {name: ml, oncall: a}, tier: gold}
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: tenant
    metadata: {team: {name: other, cost_center: "42"}, plan: pro}
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: free
"""


@pytest.fixture
def service(services: ServiceFactory, tmp_path: Path, redis_url: str) -> Service:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "d.yaml").write_text(CONFIG)
    return services.ratelimit(directory, redis_url, "--response-dynamic-metadata", "true")


@pytest.fixture
def client(service: Service) -> Iterator[RlsClient]:
    c = RlsClient(service.grpc_target, domain="d")
    yield c
    c.close()


def metadata_of(response: Any) -> dict[str, Any]:
    return json_format.MessageToDict(response.dynamic_metadata)


def test_the_metadata_names_the_domain_and_every_descriptor_in_order(client: RlsClient) -> None:
    avoid_window_edges()
    got = metadata_of(client.call([("free", "x")], [("service", "chat"), ("region", "eu")]))
    assert got["domain"] == "d"
    assert got["descriptors"] == [{"entries": ["free=x"]}, {"entries": ["service=chat", "region=eu"]}]
    assert "hitsAddend" not in got


def test_hits_addend_and_per_descriptor_overrides_are_reported_as_upstream_spells_them(client: RlsClient) -> None:
    avoid_window_edges()
    override = descriptor([("free", "y")])
    override.limit.CopyFrom(ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=42, unit=3))
    override.hits_addend.CopyFrom(UInt64Value(value=2))
    got = metadata_of(client.call(override, hits_addend=3))
    assert got["hitsAddend"] == 3
    assert got["descriptors"] == [{"entries": ["free=y"], "limit": "requests_per_unit:42 unit:HOUR",
                                   "hitsAddend": 2}]


def test_metadata_of_passing_limits_is_merged_nested_maps_key_by_key_first_value_winning(client: RlsClient) -> None:
    avoid_window_edges()
    got = metadata_of(client.call([("service", "a")], [("tenant", "t1")]))
    assert got["metadata"] == {"team": {"name": "ml", "oncall": "a", "cost_center": "42"}, "tier": "gold",
                               "plan": "pro"}


def test_a_limit_that_is_over_adds_no_metadata(client: RlsClient) -> None:
    avoid_window_edges()
    assert client.call([("tenant", "t2")]).overall_code == OK
    response = client.call([("service", "b")], [("tenant", "t2")])
    assert response.overall_code == OVER
    assert metadata_of(response)["metadata"] == {"team": {"name": "ml", "oncall": "a"}, "tier": "gold"}


def test_a_descriptor_without_a_limit_still_gets_the_domain_and_descriptors_but_no_metadata_key(
        client: RlsClient) -> None:
    got = metadata_of(client.call([("free", "z")]))
    assert got == {"domain": "d", "descriptors": [{"entries": ["free=z"]}]}


def test_without_the_setting_the_answer_carries_no_metadata(
        services: ServiceFactory, tmp_path: Path, redis_url: str) -> None:
    directory = tmp_path / "plain"
    directory.mkdir()
    (directory / "d.yaml").write_text(CONFIG)
    plain = services.ratelimit(directory, redis_url)
    c = RlsClient(plain.grpc_target, domain="d")
    try:
        assert not c.call([("service", "c")]).HasField("dynamic_metadata")
    finally:
        c.close()


# --- through Envoy ---------------------------------------------------------------------------------------------


def test_envoy_puts_the_metadata_where_its_access_log_reads_it(
        service: Service, tmp_path: Path, log_dir: Path) -> None:
    access_log = tmp_path / "access.log"
    rate_limits = [{"actions": [{"generic_key": {"descriptor_value": "chat", "descriptor_key": "service"}}]},
                   {"actions": [{"request_headers": {"header_name": "x-tenant", "descriptor_key": "tenant"}}]}]
    with ok_backend() as backend, envoy_front(
            tmp_path, log_dir, "envoy-metadata", rls_port=service.grpc_port, backend_port=backend, domain="d",
            rate_limits=rate_limits, access_log=access_log,
            access_log_format="%RESPONSE_CODE% %DYNAMIC_METADATA(envoy.filters.http.ratelimit)%\n") as front:
        avoid_window_edges()
        request = urllib.request.Request(f"{front.url}/", headers={"x-tenant": "acme"})
        assert urllib.request.urlopen(request, timeout=5).status == 200
        deadline = time.monotonic() + 5
        while not access_log.exists() or not access_log.read_text().strip():
            assert time.monotonic() < deadline, "no access log line"
            time.sleep(0.05)
    code, logged = access_log.read_text().splitlines()[0].split(" ", 1)
    assert code == "200"
    assert json.loads(logged) == {
        "domain": "d",
        "descriptors": [{"entries": ["service=chat"]}, {"entries": ["tenant=acme"]}],
        "metadata": {"team": {"name": "ml", "oncall": "a", "cost_center": "42"}, "tier": "gold", "plan": "pro"},
    }
