"""REDIS_TYPE=sentinel with REDIS_TLS=true: sentinels, master and replica all listen on TLS alone (plain port
0, tls-replication), each verifying our client certificate. The service asks the sentinels over TLS, reaches
the master they name over TLS, verified against REDIS_TLS_CACERT, and follows a failover over TLS too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from igw.procs import RedisTlsFiles
from igw.redis_conn import RedisTls, with_tls
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.cluster import redis_tls_missing
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor
from tests.ratelimit.sentinel import SentinelProcs
from tests.ratelimit.test_redis_sentinel import codes_until_ok, health, minute_key, wait_health
from tests.tls_pki import Pki, make_pki

TLS_MISSING = redis_tls_missing()
pytestmark = pytest.mark.skipif(TLS_MISSING is not None, reason=TLS_MISSING or "")

CONFIG = """
domain: test-domain
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: tenant_model
    value: acme
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 10, min: 3}
"""

MASTER_AUTH, SENTINEL_AUTH = "master-secret", "sentinel-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_deployment(log_dir: Path, pki: Pki) -> SentinelProcs:
    """Sentinels and master with passwords of their own (REDIS_SENTINEL_AUTH, REDIS_AUTH), over TLS alone."""
    files = RedisTlsFiles(pki.server.cert, pki.server.key, pki.ca, auth_clients=True)
    return SentinelProcs(log_dir, password=MASTER_AUTH, sentinel_password=SENTINEL_AUTH, tls=files).start()


@pytest.fixture(scope="module")
def deployment(log_dir: Path, pki: Pki) -> Iterator[SentinelProcs]:
    """Shared by the tests that only count: none of them fails the master over."""
    procs = tls_deployment(log_dir, pki)
    yield procs
    procs.stop()


@pytest.fixture
def clean(deployment: SentinelProcs) -> SentinelProcs:
    deployment.flush()
    return deployment


@pytest.fixture
def doomed(log_dir: Path, pki: Pki) -> Iterator[SentinelProcs]:
    """A deployment of this test alone, for the test that fails its master over."""
    procs = tls_deployment(log_dir, pki)
    yield procs
    procs.stop()


def tls_env(pki: Pki, ca: Path | None = None) -> dict[str, str]:
    """Upstream's environment for a sentinel deployment over TLS with a client certificate."""
    return {"REDIS_TYPE": "sentinel", "REDIS_TLS": "true", "REDIS_TLS_CACERT": str(ca or pki.ca),
            "REDIS_TLS_CLIENT_CERT": str(pki.client.cert), "REDIS_TLS_CLIENT_KEY": str(pki.client.key),
            "REDIS_AUTH": MASTER_AUTH, "REDIS_SENTINEL_AUTH": SENTINEL_AUTH, "REDIS_TIMEOUT": "0.5s"}


def start(services: ServiceFactory, config_dir: Path, procs: SentinelProcs, pki: Pki, *,
          ca: Path | None = None, wait_healthy: bool = True) -> tuple[Service, RlsClient]:
    svc = services.ratelimit(config_dir, procs.url, env=tls_env(pki, ca), wait_healthy=wait_healthy)
    return svc, RlsClient(svc.grpc_target)


def test_the_master_is_found_through_tls_sentinels_and_counts_over_tls(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs, pki: Pki
) -> None:
    svc, client = start(services, config_dir, clean, pki)
    avoid_window_edges(minute_margin_s=3)
    assert [client.call([("tenant", "acme")]).overall_code for _ in range(6)] == [OK] * 5 + [OVER]
    client.close()
    assert clean.get(clean.master.port, minute_key("tenant", "acme")) == 6
    log = svc.proc.log_path.read_text()
    assert f"master 'mymaster' is at 127.0.0.1:{clean.master.port}" in log and "secret" not in log


def test_sentinels_whose_certificate_the_redis_ca_did_not_sign_leave_the_service_unhealthy_naming_it(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs, pki: Pki
) -> None:
    svc, _ = start(services, config_dir, clean, pki, ca=pki.rogue_ca, wait_healthy=False)
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 20, "answering health")
    body = wait_health(svc, 503)
    assert f"127.0.0.1:{clean.sentinel_ports[0]}" in body and "CERTIFICATE_VERIFY_FAILED" in body, body


def test_replica_counts_are_read_over_tls_from_the_sentinel_managed_master(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs, pki: Pki
) -> None:
    from tests.ratelimit.test_adaptive import publish

    _, client = start(services, config_dir, clean, pki)
    master = with_tls(f"redis://:{MASTER_AUTH}@127.0.0.1:{clean.master.port}/0",
                      RedisTls(str(pki.ca), str(pki.client.cert), str(pki.client.key)))
    publish(master, "m", 2)
    deadline = time.monotonic() + 5
    while client.call(descriptor([("tenant_model", "acme"), ("model", "m")], hits=0)).statuses[0] \
            .current_limit.requests_per_unit != 20:
        assert time.monotonic() < deadline, "the limit did not follow the replica count"
        time.sleep(0.05)
    client.close()


def test_a_failover_over_tls_moves_the_counters_to_the_new_master(
    services: ServiceFactory, config_dir: Path, doomed: SentinelProcs, pki: Pki
) -> None:
    svc, client = start(services, config_dir, doomed, pki)
    avoid_window_edges(minute_margin_s=10)
    assert [client.call([("tenant", "acme")]).overall_code for _ in range(3)] == [OK] * 3
    doomed.failover()
    doomed.master.kill()
    assert codes_until_ok(client, [("tenant", "acme")])[-1] == OK  # the 4th hit of the window
    assert client.call([("tenant", "acme")]).overall_code == OK
    assert client.call([("tenant", "acme")]).overall_code == OVER  # the replica had the first three
    client.close()
    assert doomed.get(doomed.replica.port, minute_key("tenant", "acme")) == 6
    assert f"master 'mymaster' is at 127.0.0.1:{doomed.replica.port}" in svc.proc.log_path.read_text()
    wait_health(svc, 200)
