"""REDIS_TYPE=cluster: the counters live in a real Redis Cluster (three masters), each key on its own slot,
and limits hold exactly as with one Redis, through slot migrations (MOVED, ASK) and a dead master."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import redis

from igw.redis_cluster import MAX_REDIRECTS, RedisCluster, key_slot, parse_slots_reply
from ratelimit_svc.counters import SCRIPTS, ClusterCounters, Counted, Hit, Increment, PartialCount
from tests.helpers import Service, ServiceFactory, assert_one_line_error
from tests.ratelimit.cluster import RedisClusterProcs
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor

T = TypeVar("T")

CONFIG = """
domain: test-domain
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: small
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: big
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: smooth
    rate_limit: {unit: minute, requests_per_unit: 10, algorithm: gcra, burst: 4}
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 100}
  - key: tenant_model
    value: acme
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 10, min: 3}
"""

CLUSTER = ("--redis-type", "cluster")


@pytest.fixture(scope="module")
def cluster(log_dir: Path) -> Iterator[RedisClusterProcs]:
    procs = RedisClusterProcs(log_dir).start()
    yield procs
    procs.stop()


@pytest.fixture
def clean_cluster(cluster: RedisClusterProcs) -> RedisClusterProcs:
    cluster.flush()
    return cluster


@pytest.fixture
def doomed_cluster(log_dir: Path) -> Iterator[RedisClusterProcs]:
    """A cluster of this test alone, for a test that kills one of its masters."""
    procs = RedisClusterProcs(log_dir, require_full_coverage=False).start()
    yield procs
    procs.stop()


def start(services: ServiceFactory, config_dir: Path, cluster: RedisClusterProcs, *args: str,
          **kwargs: object) -> tuple[Service, RlsClient]:
    svc = services.ratelimit(config_dir, cluster.seeds, *CLUSTER, *args, **kwargs)
    return svc, RlsClient(svc.grpc_target)


def minute_key(key: str, value: str) -> str:
    return f"test-domain_{key}_{value}_{int(time.time()) // 60 * 60}"


def value_on(cluster: RedisClusterProcs, port: int, key: str, owners: list[int] | None = None) -> str:
    """A descriptor value whose counter of the current minute lives on the master at `port`."""
    owners = owners or cluster.owners()
    return next(v for v in (f"v{i}" for i in range(10_000)) if owners[key_slot(minute_key(key, v))] == port)


def count(cluster: RedisClusterProcs, key: str) -> int:
    port = cluster.owner_of(cluster.slot_of(key))
    value = cluster.client(port).get(key)
    return int(value) if value is not None else 0


def health(svc: Service) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def test_the_slot_of_a_key_is_the_one_redis_computes(cluster: RedisClusterProcs) -> None:
    for key in ("test-domain_tenant_acme_1764072000", "a{tag}b", "{tag}", "x{}y", "{}{z}", "ünïcode_ключ", ""):
        assert key_slot(key) == cluster.slot_of(key), key


def test_counters_of_one_request_spread_over_the_masters_and_count_exactly(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, clean_cluster)
    avoid_window_edges(minute_margin_s=3)
    tenants = [f"t{i}" for i in range(12)]
    for _ in range(3):
        assert client.call(*([("big", t)] for t in tenants)).overall_code == OK
    client.close()
    placed = {port: clean_cluster.keys_on(port, "test-domain_*") for port in clean_cluster.ports}
    assert sum(1 for keys in placed.values() if keys) >= 2, placed
    assert sorted(k for keys in placed.values() for k in keys) == sorted(minute_key("big", t) for t in tenants)
    for port, keys in placed.items():
        for key in keys:
            assert clean_cluster.owner_of(key_slot(key)) == port
            assert int(clean_cluster.client(port).get(key)) == 3


def test_a_limit_goes_over_at_the_call_that_exceeds_it(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, clean_cluster)
    assert client.codes([("tenant", "acme")], 7) == [OK] * 5 + [OVER] * 2
    client.close()


def test_gcra_limits_hold_in_a_cluster(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, clean_cluster)
    codes = [client.call([("smooth", f"s{i}")], [("smooth", "shared")]).statuses[1].code for i in range(6)]
    client.close()
    assert codes == [OK] * 4 + [OVER] * 2  # the burst of 4, then one token every 6 s
    assert clean_cluster.client(clean_cluster.owner_of(key_slot("test-domain_smooth_shared_gcra"))).exists(
        "test-domain_smooth_shared_gcra")


def test_stop_increment_leaves_counters_on_other_masters_as_they_were(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, clean_cluster, "--stop-cache-key-increment-when-overlimit", "true")
    avoid_window_edges(minute_margin_s=5)
    owners = clean_cluster.owners()
    first, second = clean_cluster.ports[:2]
    small, big = value_on(clean_cluster, first, "small", owners), value_on(clean_cluster, second, "big", owners)
    for _ in range(2):
        assert client.call([("small", small)], [("big", big)]).overall_code == OK
    response = client.call([("small", small)], [("big", big)])
    client.close()
    assert [s.code for s in response.statuses] == [OVER, OK]
    assert count(clean_cluster, minute_key("small", small)) == 3  # the counter that went over gets the hit
    assert count(clean_cluster, minute_key("big", big)) == 2


def test_a_slot_moved_to_another_master_while_serving_keeps_counting(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, clean_cluster)
    avoid_window_edges(minute_margin_s=10)
    tenant = "moving"
    key = minute_key("tenant", tenant)
    codes = [client.call([("tenant", tenant)]).overall_code for _ in range(3)]
    slot = key_slot(key)
    source = clean_cluster.owner_of(slot)
    target = next(port for port in clean_cluster.ports if port != source)
    clean_cluster.migrate_slot(slot, target)  # the service still maps the slot to `source`: it gets MOVED
    codes += [client.call([("tenant", tenant)]).overall_code for _ in range(4)]
    client.close()
    assert codes == [OK] * 5 + [OVER] * 2
    assert clean_cluster.keys_on(target, key) == [key] and clean_cluster.keys_on(source, key) == []
    assert int(clean_cluster.client(target).get(key)) == 7


def test_a_key_already_moved_during_a_migration_is_counted_on_its_new_master(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, clean_cluster)
    avoid_window_edges(minute_margin_s=10)
    tenant = "migrating"
    key = minute_key("tenant", tenant)
    codes = [client.call([("tenant", tenant)]).overall_code for _ in range(3)]
    slot = key_slot(key)
    source = clean_cluster.owner_of(slot)
    target = next(port for port in clean_cluster.ports if port != source)
    # Half migrated: the key is on `target`, the slot still `source`'s, which answers ASK for it.
    clean_cluster.migrate_slot(slot, target, finish=False)
    try:
        codes += [client.call([("tenant", tenant)]).overall_code for _ in range(4)]
        assert clean_cluster.owner_of(slot) == source  # the migration is not over: ASK, not MOVED
        pipe = clean_cluster.client(target).pipeline(transaction=False)
        pipe.execute_command("ASKING").get(key)  # an importing master serves the key only right after ASKING
        assert int(pipe.execute()[1]) == 7
    finally:
        clean_cluster.finish_migration(slot, target)
    client.close()
    assert codes == [OK] * 5 + [OVER] * 2


def test_with_fail_open_a_dead_master_lets_its_counters_pass_and_the_others_still_enforce(
    services: ServiceFactory, config_dir: Path, doomed_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, doomed_cluster, "--fail-open", "true", "--redis-timeout", "0.2")
    avoid_window_edges(minute_margin_s=5)
    owners = doomed_cluster.owners()
    dead, alive = doomed_cluster.servers[0], doomed_cluster.servers[1]
    on_dead, on_alive = value_on(doomed_cluster, dead.port, "small", owners), value_on(
        doomed_cluster, alive.port, "small", owners)
    dead.kill()
    responses = [client.call([("small", on_dead)], [("small", on_alive)]) for _ in range(4)]
    client.close()
    assert [[s.code for s in r.statuses] for r in responses] == [[OK, OK]] * 2 + [[OK, OVER]] * 2


def test_without_fail_open_a_dead_master_fails_the_calls_that_count_on_it_with_unavailable(
    services: ServiceFactory, config_dir: Path, doomed_cluster: RedisClusterProcs
) -> None:
    _, client = start(services, config_dir, doomed_cluster, "--redis-timeout", "0.2")
    avoid_window_edges(minute_margin_s=5)
    owners = doomed_cluster.owners()
    dead, alive = doomed_cluster.servers[0], doomed_cluster.servers[1]
    on_dead, on_alive = value_on(doomed_cluster, dead.port, "small", owners), value_on(
        doomed_cluster, alive.port, "small", owners)
    dead.kill()
    with pytest.raises(grpc.RpcError) as info:
        client.call([("small", on_dead)], [("small", on_alive)])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert client.call([("small", on_alive)]).overall_code == OK  # the other masters still count
    client.close()


def test_health_is_503_naming_a_master_that_does_not_answer(
    services: ServiceFactory, config_dir: Path, doomed_cluster: RedisClusterProcs
) -> None:
    svc, _ = start(services, config_dir, doomed_cluster, "--redis-timeout", "0.2")
    assert health(svc)[0] == 200
    dead = doomed_cluster.servers[2]
    dead.kill()
    deadline = time.monotonic() + 5
    while (status := health(svc))[0] == 200:
        assert time.monotonic() < deadline, "health stayed OK with a master down"
        time.sleep(0.2)
    assert status[0] == 503 and f"127.0.0.1:{dead.port}" in status[1], status


def test_seeds_none_of_which_answer_start_the_service_unhealthy_naming_them(
    services: ServiceFactory, config_dir: Path
) -> None:
    # As with one Redis that does not answer: the service starts, health is 503, calls are UNAVAILABLE.
    svc = services.ratelimit(config_dir, "127.0.0.1:1,127.0.0.1:2", *CLUSTER, wait_healthy=False)
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 20, "answering health")
    status, body = health(svc)
    assert status == 503
    assert "redis cluster (seeds 127.0.0.1:1, 127.0.0.1:2)" in body and "CLUSTER SLOTS" in body, body
    client = RlsClient(svc.grpc_target)
    with pytest.raises(grpc.RpcError) as info:
        client.call([("tenant", "acme")])
    client.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_cluster_that_comes_up_after_the_service_is_found_by_the_health_probe(
    services: ServiceFactory, config_dir: Path, log_dir: Path
) -> None:
    procs = RedisClusterProcs(log_dir)
    svc = services.ratelimit(config_dir, procs.seeds, *CLUSTER, wait_healthy=False)
    try:
        procs.start()
        svc.proc.wait_ready(lambda: health(svc)[0] == 200, 20, "healthy")
        client = RlsClient(svc.grpc_target)
        assert client.call([("tenant", "late")]).overall_code == OK
        client.close()
    finally:
        procs.stop()


def test_redis_shards_with_a_cluster_stop_the_service_with_one_line(config_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir),
                           "--redis-url", "127.0.0.1:7000", "--redis-shards", "redis://127.0.0.1:7001",
                           "--redis-type", "cluster"], capture_output=True, text=True, timeout=30)
    assert_one_line_error(proc.returncode, proc.stderr, "REDIS_SHARDS", "REDIS_TYPE=cluster")


@pytest.mark.parametrize(("url", "problem"), [
    ("127.0.0.1:7000,127.0.0.1:7000", "cluster seed listed more than once"),
    ("redis://127.0.0.1:7000/2", "a Redis Cluster has database 0 only"),
    ("/tmp/redis.sock", "not a unix socket"),
    ("redis://:a@127.0.0.1:7000,redis://:b@127.0.0.1:7001", "differ in credentials"),
])
def test_a_bad_seed_list_stops_the_service_naming_the_problem(config_dir: Path, url: str, problem: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30,
                          env={**_clean_env(), "REDIS_TYPE": "Cluster", "REDIS_URL": url})
    assert proc.returncode == 2 and problem in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_without_a_state_redis_adaptive_limits_stay_at_their_min_after_one_warning(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    svc, client = start(services, config_dir, clean_cluster)
    response = client.call(descriptor([("tenant_model", "acme"), ("model", "m")], hits=0))
    client.close()
    assert response.statuses[0].current_limit.requests_per_unit == 3
    warnings = [line for line in svc.proc.log_path.read_text().splitlines() if "IGW_STATE_REDIS_URL" in line]
    assert len(warnings) == 1 and "adaptive limits stay at their min" in warnings[0], warnings


def test_per_second_counters_go_to_the_per_second_redis_and_the_others_to_the_cluster(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs, redis_url: str, store: redis.Redis
) -> None:
    _, client = start(services, config_dir, clean_cluster, "--redis-persecond", "true",
                      "--redis-persecond-url", redis_url)
    avoid_window_edges()
    assert client.call([("per_second", "p")], [("big", "b")]).overall_code == OK
    client.close()
    assert [k.decode() for k in store.keys("test-domain_*")] == [f"test-domain_per_second_p_{int(time.time())}"]
    assert count(clean_cluster, minute_key("big", "b")) == 1


def test_a_state_redis_url_carries_replica_counts_beside_the_cluster(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs, redis_url: str
) -> None:
    from tests.ratelimit.test_adaptive import publish

    svc, client = start(services, config_dir, clean_cluster, "--state-redis-url", redis_url)
    publish(redis_url, "m", 2)
    deadline = time.monotonic() + 2
    while client.call(descriptor([("tenant_model", "acme"), ("model", "m")], hits=0)).statuses[0] \
            .current_limit.requests_per_unit != 20:
        assert time.monotonic() < deadline, "the limit did not follow the replica count"
        time.sleep(0.05)
    client.close()
    assert not [line for line in svc.proc.log_path.read_text().splitlines() if "IGW_STATE_REDIS_URL" in line]


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}


# -- the cluster client in-process: what the service's calls go through -------------------------------------

def fixed_hits(*keys: str) -> list[Hit]:
    return [Hit(key, 1, "fixed_window", ttl=60, limit=100) for key in keys]


async def counted_twice(cluster: RedisCluster, keys: list[str], between: Callable[[], None]) -> list[Counted]:
    counters = ClusterCounters(cluster)
    await counters.apply(fixed_hits(*keys))
    between()
    return await counters.apply(fixed_hits(*keys))


def on_cluster(procs: RedisClusterProcs, work: Callable[[RedisCluster], Awaitable[T]]) -> tuple[T, RedisCluster]:
    """`work` with a cluster client whose map is read first, as the service's is; the client is closed after
    and returned too, for its map."""
    client = RedisCluster([f"redis://127.0.0.1:{procs.ports[0]}"], scripts=SCRIPTS)

    async def run() -> T:
        await client.refresh()
        try:
            return await work(client)
        finally:
            client.close()

    return asyncio.run(run()), client


def test_a_moved_reply_updates_the_map_and_the_hit_is_counted_on_the_new_owner(
    clean_cluster: RedisClusterProcs
) -> None:
    key = "moved-key"
    slot = key_slot(key)
    source = clean_cluster.owner_of(slot)
    target = next(port for port in clean_cluster.ports if port != source)
    counted, client = on_cluster(
        clean_cluster, lambda c: counted_twice(c, [key], lambda: clean_cluster.migrate_slot(slot, target)))
    assert counted == [2]
    assert client.node_of(slot) == f"127.0.0.1:{target}"


def test_an_ask_reply_counts_on_the_importing_master_and_leaves_the_map_alone(
    clean_cluster: RedisClusterProcs
) -> None:
    key = "asked-key"
    slot = key_slot(key)
    source = clean_cluster.owner_of(slot)
    target = next(port for port in clean_cluster.ports if port != source)
    try:
        counted, client = on_cluster(clean_cluster, lambda c: counted_twice(
            c, [key], lambda: clean_cluster.migrate_slot(slot, target, finish=False)))
        assert counted == [2]
        assert client.node_of(slot) == f"127.0.0.1:{source}"
    finally:
        clean_cluster.finish_migration(slot, target)


def test_masters_that_lost_their_scripts_get_them_again(clean_cluster: RedisClusterProcs) -> None:
    keys = [f"script-{i}" for i in range(12)]

    def flush_scripts() -> None:
        for port in clean_cluster.ports:
            clean_cluster.client(port).script_flush()

    counted, _ = on_cluster(clean_cluster, lambda c: counted_twice(c, keys, flush_scripts))
    assert counted == [2] * len(keys)


def test_a_slots_reply_entry_without_a_host_names_the_node_that_answered() -> None:
    for announced in (None, b"", b"?"):
        owners, masters = parse_slots_reply([[0, 16383, [announced, 7000, b"id"]]], "10.0.0.5")
        assert masters == ["10.0.0.5:7000"] and owners[0] == owners[16383] == "10.0.0.5:7000", announced


@pytest.fixture(scope="module")
def hostless_cluster(log_dir: Path) -> Iterator[RedisClusterProcs]:
    """A cluster whose nodes announce no endpoint: CLUSTER SLOTS gives a null host, redirections `:port`."""
    procs = RedisClusterProcs(log_dir, extra_args=("--cluster-preferred-endpoint-type", "unknown-endpoint")).start()
    yield procs
    procs.stop()


def test_a_cluster_announcing_no_endpoint_is_mapped_on_the_seed_host_and_counts(
    hostless_cluster: RedisClusterProcs
) -> None:
    hostless_cluster.flush()
    keys = [f"hostless-{i}" for i in range(12)]
    counted, client = on_cluster(hostless_cluster, lambda c: ClusterCounters(c).apply(fixed_hits(*keys)))
    assert counted == [1] * len(keys)
    assert sorted(client.masters) == sorted(f"127.0.0.1:{port}" for port in hostless_cluster.ports)
    assert all(count(hostless_cluster, key) == 1 for key in keys)


@pytest.mark.parametrize("finish", [True, False], ids=["moved", "ask"])
def test_a_redirection_without_a_host_goes_to_the_host_of_the_node_that_sent_it(
    hostless_cluster: RedisClusterProcs, finish: bool
) -> None:
    hostless_cluster.flush()
    key = f"hostless-redirected-{finish}"
    slot = key_slot(key)
    source = hostless_cluster.owner_of(slot)
    target = next(port for port in hostless_cluster.ports if port != source)
    try:
        counted, client = on_cluster(hostless_cluster, lambda c: counted_twice(
            c, [key], lambda: hostless_cluster.migrate_slot(slot, target, finish=finish)))
        assert counted == [2]
        assert hostless_cluster.get_asking(target, key) == 2
        assert client.node_of(slot) == f"127.0.0.1:{target if finish else source}"
    finally:
        hostless_cluster.finish_migration(slot, target)


def test_keys_of_one_slot_share_one_script_outside_a_migration(clean_cluster: RedisClusterProcs) -> None:
    keys = ["{one-slot}a", "{one-slot}b", "{one-slot}c"]
    port = clean_cluster.owner_of(key_slot(keys[0]))

    async def twice(client: RedisCluster) -> list[Counted]:
        await ClusterCounters(client).apply(fixed_hits(*keys))  # loads the scripts if the master lacks them
        clean_cluster.client(port).config_resetstat()
        return await ClusterCounters(client).apply(fixed_hits(*keys))

    assert on_cluster(clean_cluster, twice)[0] == [2, 2, 2]
    assert clean_cluster.client(port).info("commandstats")["cmdstat_evalsha"]["calls"] == 1


OLD, OTHER, NEW, NEWER = (f"{{migrating-slot}}{name}" for name in ("old", "other", "new", "newer"))


@pytest.mark.parametrize(("moved", "request_keys", "expected", "on_target"), [
    # The source has some of the keys: it answers TRYAGAIN.
    ([OLD], [OLD, OTHER, NEW], [2, 2, 1], [NEW, OLD]),
    # The source has none of them: it answers ASK, and the importing master, which has none either, TRYAGAIN.
    ([], [NEW, NEWER], [1, 1], [NEW, NEWER]),
], ids=["source-has-some-keys", "source-has-none"])
def test_counters_sharing_a_migrating_slot_are_counted_one_key_at_a_time(
    clean_cluster: RedisClusterProcs, moved: list[str], request_keys: list[str], expected: list[int],
    on_target: list[str]
) -> None:
    slot = key_slot(OLD)
    source = clean_cluster.owner_of(slot)
    target = next(port for port in clean_cluster.ports if port != source)

    async def across_the_migration(client: RedisCluster) -> list[Counted]:
        counters = ClusterCounters(client)
        await counters.apply(fixed_hits(OLD, OTHER))
        clean_cluster.begin_migration(slot, target)
        if moved:
            clean_cluster.migrate_keys(source, target, moved)
        return await counters.apply(fixed_hits(*request_keys))

    try:
        assert on_cluster(clean_cluster, across_the_migration)[0] == expected
        assert clean_cluster.keys_on(target, "{migrating-slot}*") == on_target
        assert [clean_cluster.get_asking(target, key) for key in on_target] == [
            expected[request_keys.index(key)] for key in on_target]
    finally:
        clean_cluster.migrate_slot(slot, target)


def test_stop_increment_on_a_migrating_slot_reads_then_increments_only_the_counters_going_over(
    clean_cluster: RedisClusterProcs
) -> None:
    small, big = "{stopping-slot}small", "{stopping-slot}big"
    slot = key_slot(small)
    source = clean_cluster.owner_of(slot)
    target = next(port for port in clean_cluster.ports if port != source)
    hits = [Hit(small, 1, "fixed_window", ttl=60, limit=2), Hit(big, 1, "fixed_window", ttl=60, limit=100)]

    async def across_the_migration(client: RedisCluster) -> list[list[Counted]]:
        counters = ClusterCounters(client)
        for _ in range(2):
            await counters.apply(hits, Increment.ONLY_OVER)
        clean_cluster.begin_migration(slot, target)
        clean_cluster.migrate_keys(source, target, [small])  # `big` is still on the source: TRYAGAIN
        return [await counters.apply(hits, Increment.ONLY_OVER), await counters.apply(hits, Increment.NONE)]

    try:
        assert on_cluster(clean_cluster, across_the_migration)[0] == [[3, 2], [3, 2]]
        assert clean_cluster.get_asking(target, small) == 3 and int(clean_cluster.client(source).get(big)) == 2
    finally:
        clean_cluster.migrate_slot(slot, target)


def test_a_request_whose_counters_share_a_migrating_slot_is_still_limited(
    services: ServiceFactory, config_dir: Path, clean_cluster: RedisClusterProcs
) -> None:
    # Descriptor values come from the client: a `{tag}` in them puts several counters on one slot.
    _, client = start(services, config_dir, clean_cluster)
    avoid_window_edges(minute_margin_s=10)
    first, second = "{shared}1", "{shared}2"
    slot = key_slot(minute_key("small", first))
    source = clean_cluster.owner_of(slot)
    target = next(port for port in clean_cluster.ports if port != source)
    codes = [client.call([("small", first)], [("small", second)]).overall_code]
    clean_cluster.begin_migration(slot, target)
    try:
        clean_cluster.migrate_keys(source, target, [minute_key("small", first)])
        codes += [client.call([("small", first)], [("small", second)]).overall_code for _ in range(2)]
    finally:
        clean_cluster.migrate_slot(slot, target)
    client.close()
    assert codes == [OK, OK, OVER]
    assert [count(clean_cluster, minute_key("small", value)) for value in (first, second)] == [3, 3]


def test_moved_then_ask_is_followed_to_the_master_importing_the_key(clean_cluster: RedisClusterProcs) -> None:
    # The map still names the first owner; the slot moved on, and its new owner is migrating it again.
    key = "moved-then-asked"
    slot = key_slot(key)
    first = clean_cluster.owner_of(slot)
    second, third = (port for port in clean_cluster.ports if port != first)

    def move_twice() -> None:
        clean_cluster.migrate_slot(slot, second)
        clean_cluster.migrate_slot(slot, third, finish=False)

    try:
        assert on_cluster(clean_cluster, lambda c: counted_twice(c, [key], move_twice))[0] == [2]
        assert clean_cluster.get_asking(third, key) == 2
    finally:
        clean_cluster.finish_migration(slot, third)


def test_a_command_sent_back_and_forth_fails_after_a_bounded_number_of_redirections(
    clean_cluster: RedisClusterProcs
) -> None:
    # The owner says ASK, but the node it names is not importing the slot and answers MOVED back.
    key = "ping-pong"
    slot = key_slot(key)
    owner = clean_cluster.owner_of(slot)
    other = next(port for port in clean_cluster.ports if port != owner)
    clean_cluster.client(owner).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", clean_cluster.node_id(other))
    try:
        with pytest.raises(PartialCount, match=f"still redirected after {MAX_REDIRECTS} redirections"):
            on_cluster(clean_cluster, lambda c: ClusterCounters(c).apply(fixed_hits(key)))
    finally:
        clean_cluster.client(owner).execute_command("CLUSTER", "SETSLOT", slot, "STABLE")


def test_ask_to_a_master_that_answers_moved_ends_on_the_master_serving_the_slot_and_counts_once(
    clean_cluster: RedisClusterProcs
) -> None:
    # A real cluster is in this state only between two of its own steps: the owner answers ASK for a key of
    # a slot it is migrating, and by the time the importing master runs the command, that migration has
    # finished and the slot has moved on to a third master. The importing master is held in between with
    # CLIENT PAUSE WRITE: it has taken the ASKING and the script, and decides where they belong again when
    # unpaused (the admin commands that move the slot are not writes, so they still run).
    key = "asked-then-moved"
    slot = key_slot(key)
    first = clean_cluster.owner_of(slot)
    second, third = (port for port in clean_cluster.ports if port != first)
    for port in clean_cluster.ports:
        clean_cluster.client(port).config_resetstat()

    def blocked_on_second() -> bool:
        return clean_cluster.client(second).info("clients")["blocked_clients"] == 1

    def move_on() -> None:
        clean_cluster.finish_migration(slot, second)
        clean_cluster.wait_agreed(slot, second)
        clean_cluster.begin_migration(slot, third)
        clean_cluster.finish_migration(slot, third)
        clean_cluster.wait_agreed(slot, third)

    async def across_the_moves() -> tuple[list[Counted], str | None]:
        client = RedisCluster([f"redis://127.0.0.1:{first}"], scripts=SCRIPTS, timeout=10)
        try:
            await client.refresh()
            clean_cluster.begin_migration(slot, second)  # the key is not on `first`: ASK
            clean_cluster.client(second).execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            counting = asyncio.create_task(ClusterCounters(client).apply(
                [Hit(key, 3, "fixed_window", ttl=60, limit=100)]))
            deadline = time.monotonic() + 5
            while not await asyncio.to_thread(blocked_on_second):
                assert time.monotonic() < deadline, "the ASKING command did not reach the importing master"
                await asyncio.sleep(0.01)
            await asyncio.to_thread(move_on)
            clean_cluster.client(second).execute_command("CLIENT", "UNPAUSE")
            return await counting, client.node_of(slot)
        finally:
            client.close()

    try:
        counted, mapped = asyncio.run(across_the_moves())
    finally:
        clean_cluster.client(second).execute_command("CLIENT", "UNPAUSE")
        for port in clean_cluster.ports:  # whatever step failed: a stable slot for the next tests
            clean_cluster.client(port).execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    assert counted == [3]
    assert [clean_cluster.keys_on(port, key) for port in (first, second, third)] == [[], [], [key]]
    assert int(clean_cluster.client(third).get(key)) == 3
    assert mapped == f"127.0.0.1:{third}"
    errors = {port: clean_cluster.client(port).info("errorstats") for port in (first, second)}
    assert errors[first]["errorstat_ASK"]["count"] == 1 and errors[second]["errorstat_MOVED"]["count"] == 1, errors
