"""REDIS_TYPE=cluster with REDIS_TLS=true: a real Redis Cluster whose nodes listen on TLS alone (plain port 0,
tls-cluster, tls-replication) and verify our client certificate. The service reaches every master over TLS,
verified against REDIS_TLS_CACERT, including the masters it only learns of from CLUSTER SLOTS or a MOVED
reply, which name them by IP: the certificate is checked against that IP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from igw.procs import RedisTlsFiles
from igw.redis_cluster import RedisCluster, key_slot
from igw.redis_conn import RedisError, RedisTls, with_tls
from ratelimit_svc.counters import SCRIPTS, ClusterCounters, Counted
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.cluster import RedisClusterProcs, redis_tls_missing
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges
from tests.ratelimit.test_redis_cluster import fixed_hits, health, minute_key
from tests.tls_pki import Pki, make_pki

TLS_MISSING = redis_tls_missing()
pytestmark = pytest.mark.skipif(TLS_MISSING is not None, reason=TLS_MISSING or "")

CONFIG = """
domain: test-domain
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 5}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_cluster(log_dir: Path, pki: Pki) -> Iterator[RedisClusterProcs]:
    """Three masters on TLS alone; their certificate names 127.0.0.1 and localhost."""
    procs = RedisClusterProcs(log_dir, tls=RedisTlsFiles(pki.server.cert, pki.server.key, pki.ca,
                                                         auth_clients=True)).start()
    yield procs
    procs.stop()


@pytest.fixture
def clean_tls_cluster(tls_cluster: RedisClusterProcs) -> RedisClusterProcs:
    tls_cluster.flush()
    return tls_cluster


def client_tls(pki: Pki, *, ca: Path | None = None, check_hostname: bool = True) -> RedisTls:
    return RedisTls(str(ca or pki.ca), str(pki.client.cert), str(pki.client.key), check_hostname=check_hostname)


def by_name(procs: RedisClusterProcs) -> str:
    """The seeds as REDIS_URL, by host name: the masters the cluster names are then IPs the seeds were not."""
    return ",".join(f"localhost:{port}" for port in procs.ports)


def start(services: ServiceFactory, config_dir: Path, procs: RedisClusterProcs, pki: Pki, *,
          ca: Path | None = None, wait_healthy: bool = True) -> tuple[Service, RlsClient]:
    env = {"REDIS_TYPE": "cluster", "REDIS_TLS": "true", "REDIS_URL": by_name(procs),
           "REDIS_TLS_CACERT": str(ca or pki.ca), "REDIS_TLS_CLIENT_CERT": str(pki.client.cert),
           "REDIS_TLS_CLIENT_KEY": str(pki.client.key)}
    svc = services.start_module("ratelimit_svc", "--config-dir", str(config_dir), env=env, wait_healthy=wait_healthy)
    return svc, RlsClient(svc.grpc_target)


def test_a_tls_cluster_counts_and_a_slot_moved_while_serving_is_followed_over_tls(
    services: ServiceFactory, config_dir: Path, clean_tls_cluster: RedisClusterProcs, pki: Pki
) -> None:
    cluster = clean_tls_cluster
    _, client = start(services, config_dir, cluster, pki)
    avoid_window_edges(minute_margin_s=10)
    key = minute_key("tenant", "moving")
    codes = [client.call([("tenant", "moving")]).overall_code for _ in range(3)]
    slot = key_slot(key)
    source = cluster.owner_of(slot)
    target = next(port for port in cluster.ports if port != source)
    cluster.migrate_slot(slot, target)  # the service still maps the slot to `source`: it gets MOVED
    codes += [client.call([("tenant", "moving")]).overall_code for _ in range(4)]
    client.close()
    assert codes == [OK] * 5 + [OVER] * 2
    assert cluster.keys_on(target, key) == [key] and cluster.keys_on(source, key) == []
    assert int(cluster.client(target).get(key)) == 7


def test_a_moved_reply_to_a_node_not_yet_connected_is_followed_with_a_new_tls_connection(
    clean_tls_cluster: RedisClusterProcs, pki: Pki
) -> None:
    cluster = clean_tls_cluster
    key = "tls-moved-key"
    slot = key_slot(key)
    source = cluster.owner_of(slot)
    target = next(port for port in cluster.ports if port != source)
    seed = with_tls(f"redis://localhost:{source}", client_tls(pki))

    async def counted_across_the_move() -> tuple[list[Counted], list[str]]:
        client = RedisCluster([seed], scripts=SCRIPTS)
        try:
            await client.refresh()
            counters = ClusterCounters(client)
            before = await counters.apply(fixed_hits(key))
            connected = sorted(client.nodes)  # only the master of the key's slot so far
            cluster.migrate_slot(slot, target)
            after = await counters.apply(fixed_hits(key))
            assert client.nodes[f"127.0.0.1:{target}"].address.tls == client_tls(pki)
            return [*before, *after], connected
        finally:
            client.close()

    counted, connected = asyncio.run(counted_across_the_move())
    assert connected == [f"127.0.0.1:{source}"]
    assert counted == [1, 2]
    assert int(cluster.client(target).get(key)) == 2 and cluster.keys_on(source, key) == []


def test_seeds_whose_certificate_the_redis_ca_did_not_sign_leave_the_service_unhealthy_naming_it(
    services: ServiceFactory, config_dir: Path, tls_cluster: RedisClusterProcs, pki: Pki
) -> None:
    svc, _ = start(services, config_dir, tls_cluster, pki, ca=pki.rogue_ca, wait_healthy=False)
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 20, "answering health")
    status, body = health(svc)
    assert status == 503 and "CERTIFICATE_VERIFY_FAILED" in body, body


# -- a node whose certificate names localhost only --------------------------------------------------------------

@pytest.fixture(scope="module")
def named_localhost(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisClusterProcs,
                                                                                               Path]]:
    """A one-master cluster whose certificate names `localhost` and no IP, announcing itself as 127.0.0.1 (as
    any node does once it has met another): a client that reached it as localhost is then told its IP. Yields
    the cluster and the CA that signed its certificate."""
    directory = tmp_path_factory.mktemp("localhost-only")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "node.crt"))
    leaf.private_key_pem.write_to_path(str(directory / "node.key"))
    procs = RedisClusterProcs(log_dir, masters=1, extra_args=("--cluster-announce-ip", "127.0.0.1"),
                              tls=RedisTlsFiles(directory / "node.crt", directory / "node.key",
                                                directory / "ca.crt")).start()
    yield procs, directory / "ca.crt"
    procs.stop()


def count_once(procs: RedisClusterProcs, tls: RedisTls) -> list[Counted]:
    """One hit counted through a seed reached as localhost: the map it reads names the master by IP."""
    seed = with_tls(f"redis://localhost:{procs.ports[0]}", tls)

    async def run() -> list[Counted]:
        client = RedisCluster([seed], scripts=SCRIPTS)
        try:
            await client.refresh()
            assert client.masters == [f"127.0.0.1:{procs.ports[0]}"]
            return await ClusterCounters(client).apply(fixed_hits("named-by-ip"))
        finally:
            client.close()

    return asyncio.run(run())


def test_a_master_named_by_an_ip_its_certificate_does_not_carry_is_refused(
    named_localhost: tuple[RedisClusterProcs, Path], pki: Pki
) -> None:
    procs, ca = named_localhost
    with pytest.raises(RedisError, match="IP address mismatch"):
        count_once(procs, client_tls(pki, ca=ca))
    assert procs.keys_on(procs.ports[0]) == []


def test_without_hostname_verification_the_same_master_is_counted_on(
    named_localhost: tuple[RedisClusterProcs, Path], pki: Pki
) -> None:
    # The counterpart of the test above: the chain is good, only the name stood in the way.
    procs, ca = named_localhost
    procs.flush()
    assert count_once(procs, client_tls(pki, ca=ca, check_hostname=False)) == [1]
