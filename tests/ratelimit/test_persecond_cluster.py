"""REDIS_PERSECOND_TYPE=cluster: with REDIS_PERSECOND=true, REDIS_PERSECOND_URL lists the seed nodes of a
Redis Cluster of its own, and the counters of limits whose unit is second live there, whatever holds the
others (one Redis, shards, a sentinel-managed master or another cluster). Real clusters of three masters."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from igw.procs import RedisServer, RedisTlsFiles
from igw.redis_cluster import RedisCluster, key_slot
from igw.redis_conn import PipelinedRedis
from ratelimit_svc.counters import SCRIPTS, Hit, Increment, RedisCounters
from tests.helpers import Service, ServiceFactory, assert_one_line_error
from tests.ratelimit.cluster import RedisClusterProcs, redis_tls_missing
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges
from tests.ratelimit.sentinel import SentinelProcs
from tests.ratelimit.test_local_cache import metric
from tests.ratelimit.test_redis_cluster import health
from tests.tls_pki import Pki, make_pki

# The GCRA bucket's key lives one emission interval (1 s at one request a second): long enough to be listed.
CONFIG = """
domain: test-domain
descriptors:
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 100}
  - key: tight
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: minute
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: bucket
    rate_limit: {unit: second, requests_per_unit: 1, algorithm: gcra}
"""


@pytest.fixture(scope="module")
def persecond_cluster(log_dir: Path) -> Iterator[RedisClusterProcs]:
    procs = RedisClusterProcs(log_dir).start()
    yield procs
    procs.stop()


@pytest.fixture
def persecond(persecond_cluster: RedisClusterProcs) -> RedisClusterProcs:
    """The shared per-second cluster, emptied."""
    persecond_cluster.flush()
    return persecond_cluster


@pytest.fixture(scope="module")
def main_cluster(log_dir: Path) -> Iterator[RedisClusterProcs]:
    procs = RedisClusterProcs(log_dir).start()
    yield procs
    procs.stop()


@pytest.fixture
def doomed_persecond(log_dir: Path) -> Iterator[RedisClusterProcs]:
    """A per-second cluster of this test alone, for a test that kills one of its masters."""
    procs = RedisClusterProcs(log_dir, require_full_coverage=False).start()
    yield procs
    procs.stop()


def persecond_env(cluster: RedisClusterProcs, **more: str) -> dict[str, str]:
    """Upstream's environment for a per-second cluster: the seeds as bare host:port."""
    return {"REDIS_PERSECOND": "true", "REDIS_PERSECOND_TYPE": "cluster", "REDIS_PERSECOND_URL": cluster.seeds,
            **more}


def cluster_keys(cluster: RedisClusterProcs) -> list[str]:
    """Every counter key of the cluster, each checked to sit on the master that owns its slot."""
    found = []
    for port in cluster.ports:
        for key in cluster.keys_on(port, "test-domain_*"):
            assert cluster.owner_of(key_slot(key)) == port, key
            found.append(key)
    return sorted(found)


def redis_keys(url: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return sorted(client.scan_iter("test-domain_*"))
    finally:
        client.close()


def stems(keys: list[str]) -> list[str]:
    """Keys without their window (fixed window) or `_gcra` suffix."""
    return sorted(key.rsplit("_", 1)[0] for key in keys)


def call_all(svc: Service) -> None:
    client = RlsClient(svc.grpc_target)
    avoid_window_edges()
    assert client.call([("per_second", "p")], [("minute", "m")], [("bucket", "b")]).overall_code == OK
    client.close()


def metrics(svc: Service) -> str:
    return urllib.request.urlopen(f"{svc.http_base}/metrics", timeout=5).read().decode()


PER_SECOND_STEMS = ["test-domain_bucket_b", "test-domain_per_second_p"]


def test_per_second_counters_land_in_the_per_second_cluster_and_minute_counters_in_the_main_redis(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisClusterProcs
) -> None:
    svc = services.ratelimit(config_dir, redis_url, env=persecond_env(persecond))
    call_all(svc)
    assert stems(cluster_keys(persecond)) == PER_SECOND_STEMS
    assert stems(redis_keys(redis_url)) == ["test-domain_minute_m"]


def test_with_a_main_cluster_each_counter_lands_in_its_own_cluster(
    services: ServiceFactory, config_dir: Path, persecond: RedisClusterProcs, main_cluster: RedisClusterProcs
) -> None:
    main_cluster.flush()
    svc = services.ratelimit(config_dir, main_cluster.seeds, "--redis-type", "cluster", env=persecond_env(persecond))
    call_all(svc)
    assert stems(cluster_keys(persecond)) == PER_SECOND_STEMS
    assert stems(cluster_keys(main_cluster)) == ["test-domain_minute_m"]


def test_with_redis_shards_the_minute_counters_are_spread_and_the_per_second_ones_stay_in_their_cluster(
    services: ServiceFactory, config_dir: Path, redis_url: str, own_redis: RedisServer, persecond: RedisClusterProcs
) -> None:
    shards = [redis_url, own_redis.url]
    svc = services.ratelimit(config_dir, redis_url, "--redis-shards", ",".join(shards), env=persecond_env(persecond))
    client = RlsClient(svc.grpc_target)
    avoid_window_edges(margin_s=0.5)
    for i in range(8):
        assert client.call([("per_second", f"p{i}")], [("minute", f"m{i}")]).overall_code == OK
    client.close()
    assert stems(cluster_keys(persecond)) == [f"test-domain_per_second_p{i}" for i in range(8)]
    assert stems(redis_keys(redis_url) + redis_keys(own_redis.url)) == [f"test-domain_minute_m{i}" for i in range(8)]
    assert redis_keys(redis_url) and redis_keys(own_redis.url)


def test_with_a_sentinel_managed_main_redis_the_per_second_counters_go_to_their_cluster(
    services: ServiceFactory, config_dir: Path, log_dir: Path, persecond: RedisClusterProcs
) -> None:
    deployment = SentinelProcs(log_dir).start()
    try:
        svc = services.ratelimit(config_dir, deployment.url, "--redis-type", "sentinel",
                                 env=persecond_env(persecond))
        call_all(svc)
        assert stems(cluster_keys(persecond)) == PER_SECOND_STEMS  # first: the GCRA key lives one second
        master = deployment.client(deployment.master.port)
        assert stems([key.decode() for key in master.keys("test-domain_*")]) == ["test-domain_minute_m"]
    finally:
        deployment.stop()


def test_a_per_second_limit_in_the_cluster_goes_over_at_the_call_that_exceeds_it(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisClusterProcs
) -> None:
    svc = services.ratelimit(config_dir, redis_url, env=persecond_env(persecond))
    client = RlsClient(svc.grpc_target)
    assert client.codes([("tight", "t")], 4) == [OK, OK, OVER, OVER]
    client.close()


def test_stop_increment_reads_counters_in_both_places_and_increments_only_the_one_going_over(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisClusterProcs
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--stop-cache-key-increment-when-overlimit", "true",
                             env=persecond_env(persecond))
    client = RlsClient(svc.grpc_target)
    avoid_window_edges(margin_s=0.6, minute_margin_s=3)
    for _ in range(2):
        assert client.call([("tight", "t")], [("minute", "m")]).overall_code == OK
    response = client.call([("tight", "t")], [("minute", "m")])
    client.close()
    assert [s.code for s in response.statuses] == [OVER, OK]
    (tight,) = cluster_keys(persecond)
    assert int(persecond.client(persecond.owner_of(key_slot(tight))).get(tight)) == 3
    main = redis.Redis.from_url(redis_url)
    (minute,) = main.keys("test-domain_minute_*")
    assert int(main.get(minute)) == 2
    main.close()


def test_a_per_second_key_over_its_limit_is_answered_from_the_local_cache_without_counting(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisClusterProcs
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--local-cache-size-in-bytes", "1000000",
                             env=persecond_env(persecond))
    client = RlsClient(svc.grpc_target)
    assert client.codes([("tight", "hot")], 5) == [OK, OK, OVER, OVER, OVER]
    client.close()
    (key,) = cluster_keys(persecond)
    # The third call went over and entered the cache: the next two never reached the cluster.
    assert int(persecond.client(persecond.owner_of(key_slot(key))).get(key)) == 3
    assert metric(svc, "ratelimit_over_limit_with_local_cache", "tight") == 2


def test_a_per_second_master_that_does_not_answer_turns_health_503_naming_it(
    services: ServiceFactory, config_dir: Path, redis_url: str, doomed_persecond: RedisClusterProcs
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-persecond-timeout", "200ms",
                             env=persecond_env(doomed_persecond))
    assert "ratelimit_redis_persecond_up 1.0" in metrics(svc)
    dead = doomed_persecond.servers[1]
    dead.kill()
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 10, "unhealthy")
    status, body = health(svc)
    assert (status, body.strip()) == (503, f"redis unreachable: per-second redis cluster node(s) "
                                           f"redis://127.0.0.1:{dead.port}/0")
    assert "ratelimit_redis_persecond_up 0.0" in metrics(svc)
    assert "ratelimit_redis_up 1.0" in metrics(svc)
    client = RlsClient(svc.grpc_target)
    assert client.call([("minute", "m")]).overall_code == OK  # limits of other units still answer
    client.close()


def test_upstream_auth_reaches_every_per_second_node_and_the_startup_line_masks_it(
    services: ServiceFactory, config_dir: Path, redis_url: str, persecond: RedisClusterProcs
) -> None:
    for port in persecond.ports:
        persecond.client(port).config_set("requirepass", "s3cret")
    try:
        svc = services.ratelimit(config_dir, redis_url, env=persecond_env(persecond, REDIS_PERSECOND_AUTH="s3cret"))
        call_all(svc)
        log = svc.proc.log_path.read_text()
        (ready,) = [line for line in log.splitlines() if "ratelimit_svc ready" in line]
        seeds = ",".join(f"redis://:***@127.0.0.1:{port}/0" for port in persecond.ports)
        assert f"persecond=cluster:{seeds} " in ready
        assert "s3cret" not in log
        assert stems(cluster_keys(persecond)) == PER_SECOND_STEMS
    finally:
        for port in persecond.ports:
            persecond.client(port).config_set("requirepass", "")


@pytest.fixture(scope="module")
def tls_persecond(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisClusterProcs, Pki]]:
    """A per-second cluster on TLS alone that verifies our client certificate; it names 127.0.0.1."""
    if (missing := redis_tls_missing()) is not None:
        pytest.skip(missing)
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    procs = RedisClusterProcs(log_dir, tls=RedisTlsFiles(pki.server.cert, pki.server.key, pki.ca,
                                                         auth_clients=True)).start()
    yield procs, pki
    procs.stop()


def test_redis_persecond_tls_reaches_every_per_second_node_over_tls_beside_a_plain_main_redis(
    services: ServiceFactory, config_dir: Path, redis_url: str, tls_persecond: tuple[RedisClusterProcs, Pki]
) -> None:
    procs, pki = tls_persecond
    procs.flush()
    env = persecond_env(procs, REDIS_PERSECOND_TLS="true", REDIS_TLS_CACERT=str(pki.ca),
                        REDIS_TLS_CLIENT_CERT=str(pki.client.cert), REDIS_TLS_CLIENT_KEY=str(pki.client.key))
    svc = services.ratelimit(config_dir, redis_url, env=env)
    client = RlsClient(svc.grpc_target)
    avoid_window_edges()
    for i in range(6):  # each key on the master of its slot, a master the seeds may not have named
        assert client.call([("per_second", f"p{i}")], [("minute", "m")]).overall_code == OK
    client.close()
    assert stems(cluster_keys(procs)) == [f"test-domain_per_second_p{i}" for i in range(6)]
    assert stems(redis_keys(redis_url)) == ["test-domain_minute_m"]


@pytest.mark.parametrize(("seeds", "problem"), [
    ("127.0.0.1", "seed '127.0.0.1' is not host:port"),
    ("127.0.0.1:7000,127.0.0.1:notaport", "seed '127.0.0.1:notaport' is not host:port"),
    ("/tmp/redis.sock", "is not host:port"),
    ("127.0.0.1:7000,127.0.0.1:7000", "cluster seed listed more than once"),
    ("redis://127.0.0.1:7000/2", "a Redis Cluster has database 0 only"),
    ("redis://:a@127.0.0.1:7000,redis://:b@127.0.0.1:7001", "differ in credentials"),
])
def test_a_bad_per_second_seed_list_stops_the_service_with_one_line_naming_the_setting(
    config_dir: Path, seeds: str, problem: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30,
                          env={**env, "REDIS_PERSECOND": "true", "REDIS_PERSECOND_TYPE": "Cluster",
                               "REDIS_PERSECOND_URL": seeds})
    assert_one_line_error(proc.returncode, proc.stderr, "REDIS_PERSECOND_URL", problem)


# -- the counters in-process, on the real per-second cluster: what the service's calls go through ---------------

def per_second_hits(*keys: str, limit: int = 100) -> list[Hit]:
    return [Hit(key, 1, "fixed_window", ttl=60, limit=limit, per_second=True) for key in keys]


def test_a_moved_slot_of_the_per_second_cluster_is_followed_and_counted_on_its_new_master(
    redis_url: str, persecond: RedisClusterProcs
) -> None:
    key = "persecond-moved"
    slot = key_slot(key)
    source = persecond.owner_of(slot)
    target = next(port for port in persecond.ports if port != source)
    cluster = RedisCluster([f"redis://127.0.0.1:{persecond.ports[0]}"], scripts=SCRIPTS)

    async def run() -> tuple[list[object], list[object]]:
        main = PipelinedRedis(redis_url)
        counters = RedisCounters(main, per_second=cluster)
        await cluster.refresh()
        try:
            first = await counters.apply([*per_second_hits(key), Hit("main-key", 1, "fixed_window", ttl=60)])
            await asyncio.to_thread(persecond.migrate_slot, slot, target)  # the client still maps it to `source`
            second = await counters.apply([*per_second_hits(key), Hit("main-key", 1, "fixed_window", ttl=60)])
            return first, second
        finally:
            main.close()
            cluster.close()

    try:
        first, second = asyncio.run(run())
        assert (first, second) == ([1, 1], [2, 2])
        assert cluster.node_of(slot) == f"127.0.0.1:{target}"
        assert persecond.keys_on(target, key) == [key] and persecond.keys_on(source, key) == []
    finally:
        persecond.migrate_slot(slot, source)


def test_stop_increment_across_per_second_slots_increments_only_the_counter_going_over(
    redis_url: str, persecond: RedisClusterProcs
) -> None:
    keys = ["persecond-a", "persecond-b"]
    assert key_slot(keys[0]) != key_slot(keys[1])
    cluster = RedisCluster([f"redis://127.0.0.1:{persecond.ports[0]}"], scripts=SCRIPTS)

    async def run() -> list[object]:
        main = PipelinedRedis(redis_url)
        counters = RedisCounters(main, per_second=cluster)
        await cluster.refresh()
        try:
            await counters.apply([Hit(keys[0], 2, "fixed_window", ttl=60, limit=2, per_second=True),
                                  *per_second_hits(keys[1])])
            return await counters.apply([*per_second_hits(keys[0], limit=2), *per_second_hits(keys[1])],
                                        Increment.ONLY_OVER)
        finally:
            main.close()
            cluster.close()

    assert asyncio.run(run()) == [3, 1]
    values = [int(persecond.client(persecond.owner_of(key_slot(key))).get(key)) for key in keys]
    assert values == [3, 1]


def test_a_per_second_cluster_none_of_whose_seeds_answer_starts_the_service_unhealthy_naming_them(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    env = {"REDIS_PERSECOND": "true", "REDIS_PERSECOND_TYPE": "cluster", "REDIS_PERSECOND_URL": "127.0.0.1:1"}
    svc = services.ratelimit(config_dir, redis_url, env=env, wait_healthy=False)
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 20, "answering health")
    status, body = health(svc)
    assert status == 503 and body.startswith("redis unreachable: per-second redis cluster (seeds 127.0.0.1:1): "), body
    assert "per-second redis cluster: cannot read the slot map yet" in svc.proc.log_path.read_text()
    client = RlsClient(svc.grpc_target)
    assert client.call([("minute", "m")]).overall_code == OK  # the main Redis still counts the others
    client.close()
