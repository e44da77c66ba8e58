"""REDIS_TYPE=sentinel: the counters live on the master that Redis Sentinel names (a real master, its replica
and a sentinel), and the service follows a failover to the new master, where the window counts continue."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from igw.procs import RedisServer, free_port
from igw.redis_sentinel import SentinelRedis, SentinelTarget, state_redis_client
from tests.helpers import Service, ServiceFactory, assert_one_line_error
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges, descriptor
from tests.ratelimit.sentinel import MASTER_NAME, SentinelProcs, StaleSentinel

CONFIG = """
domain: test-domain
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: big
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: per_second
    rate_limit: {unit: second, requests_per_unit: 100}
  - key: tenant_model
    value: acme
    descriptors:
      - key: model
        rate_limit: {unit: second, requests_per_unit_per_replica: 10, min: 3}
"""

SENTINEL = ("--redis-type", "sentinel", "--redis-timeout", "0.2")


@pytest.fixture(scope="module")
def deployment(log_dir: Path) -> Iterator[SentinelProcs]:
    """Shared by the tests that only count: none of them fails the master over."""
    procs = SentinelProcs(log_dir).start()
    yield procs
    procs.stop()


@pytest.fixture
def clean(deployment: SentinelProcs) -> SentinelProcs:
    deployment.flush()
    return deployment


@pytest.fixture
def doomed(log_dir: Path) -> Iterator[SentinelProcs]:
    """A deployment of this test alone, for a test that fails its master over or kills it."""
    procs = SentinelProcs(log_dir).start()
    yield procs
    procs.stop()


def start(services: ServiceFactory, config_dir: Path, url: str, *args: str,
          **kwargs: object) -> tuple[Service, RlsClient]:
    svc = services.ratelimit(config_dir, url, *SENTINEL, *args, **kwargs)
    return svc, RlsClient(svc.grpc_target)


def minute_key(key: str, value: str) -> str:
    return f"test-domain_{key}_{value}_{int(time.time()) // 60 * 60}"


def health(svc: Service) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def wait_health(svc: Service, status: int, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while (seen := health(svc))[0] != status:
        assert time.monotonic() < deadline, f"health stayed {seen}"
        time.sleep(0.1)
    return seen[1]


def codes_until_ok(client: RlsClient, entries: list[tuple[str, str]], timeout: float = 15) -> list[object]:
    """Calls until one is answered (UNAVAILABLE ones are recorded as their status code)."""
    seen: list[object] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen.append(client.call(entries).overall_code)
            return seen
        except grpc.RpcError as exc:
            seen.append(exc.code())
        assert time.monotonic() < deadline, f"no call answered: {seen[-5:]}"
        time.sleep(0.1)


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}, **extra}


def test_counts_land_on_the_master_the_sentinel_names(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs
) -> None:
    _, client = start(services, config_dir, clean.url)
    avoid_window_edges(minute_margin_s=3)
    assert [client.call([("tenant", "acme")]).overall_code for _ in range(6)] == [OK] * 5 + [OVER]
    client.close()
    assert clean.get(clean.master.port, minute_key("tenant", "acme")) == 6


def test_a_failover_is_followed_and_window_counts_continue_on_the_new_master(
    services: ServiceFactory, config_dir: Path, doomed: SentinelProcs
) -> None:
    svc, client = start(services, config_dir, doomed.url)
    avoid_window_edges(minute_margin_s=10)
    assert [client.call([("tenant", "acme")]).overall_code for _ in range(3)] == [OK] * 3
    doomed.failover()
    doomed.master.kill()
    assert codes_until_ok(client, [("tenant", "acme")])[-1] == OK  # the 4th hit of the window
    assert client.call([("tenant", "acme")]).overall_code == OK
    assert client.call([("tenant", "acme")]).overall_code == OVER  # the replica had the first three
    client.close()
    assert doomed.get(doomed.replica.port, minute_key("tenant", "acme")) == 6
    assert "127.0.0.1:" + str(doomed.replica.port) in svc.proc.log_path.read_text()
    wait_health(svc, 200)


def test_a_demoted_master_that_answers_readonly_sends_the_counters_to_the_new_master(
    services: ServiceFactory, config_dir: Path, doomed: SentinelProcs
) -> None:
    svc, client = start(services, config_dir, doomed.url)
    # The sentinel demotes the surviving old master at its next INFO of it, up to 10 s after the failover: both
    # hits and the check below must fall in one minute window.
    avoid_window_edges(minute_margin_s=20)
    assert client.call([("big", "b")]).overall_code == OK
    doomed.failover()  # the old master stays up, and the sentinel makes it a replica of the new one
    SentinelProcs._wait(lambda: doomed.client(doomed.master.port).execute_command("ROLE")[0] == b"slave",
                        "the old master was not demoted", 20)
    codes_until_ok(client, [("big", "b")])  # UNAVAILABLE (READONLY) at most until the new master is known
    client.close()
    assert doomed.get(doomed.replica.port, minute_key("big", "b")) == 2
    wait_health(svc, 200)


def test_a_dead_master_turns_health_503_naming_it_until_the_sentinels_promote_the_replica(
    services: ServiceFactory, config_dir: Path, doomed: SentinelProcs
) -> None:
    svc, _ = start(services, config_dir, doomed.url)
    doomed.master.kill()
    body = wait_health(svc, 503, 5)
    assert f"redis sentinel master '{MASTER_NAME}' at 127.0.0.1:{doomed.master.port}" in body, body
    wait_health(svc, 200, 20)  # down-after 1 s, then the sentinel fails over on its own


def test_a_sentinel_that_does_not_answer_is_skipped_for_the_next(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs
) -> None:
    url = f"{MASTER_NAME},127.0.0.1:{free_port()},127.0.0.1:{clean.sentinel_ports[0]}"
    _, client = start(services, config_dir, url)
    assert client.call([("big", "skipped")]).overall_code == OK
    client.close()
    assert clean.get(clean.master.port, minute_key("big", "skipped")) == 1


def test_a_sentinel_that_names_a_replica_is_skipped_for_the_next(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs
) -> None:
    # As a sentinel cut off from the others names the master of before a failover, now a replica.
    master = clean.master_port()
    replica = clean.replica.port if master == clean.master.port else clean.master.port
    stale = StaleSentinel(replica)
    try:
        svc, client = start(services, config_dir, f"{MASTER_NAME},127.0.0.1:{stale.port},127.0.0.1:"
                            f"{clean.sentinel_ports[0]}")
        avoid_window_edges(minute_margin_s=3)
        assert client.call([("big", "stale")]).overall_code == OK
        client.close()
        assert clean.get(master, minute_key("big", "stale")) == 1
        assert stale.asked
        wait_health(svc, 200)
    finally:
        stale.close()


def test_a_master_loading_its_dataset_turns_health_503_naming_loading(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs
) -> None:
    # The master answers ROLE while loading, but PING and every counter command get LOADING.
    svc, _ = start(services, config_dir, clean.url)
    port = clean.master_port()
    master = clean.client(port)
    master.execute_command("DEBUG", "POPULATE", 2000)
    master.config_set("loading-process-events-interval-bytes", 1024)
    master.config_set("key-load-delay", 1000)  # µs per key: about 2 s of LOADING
    reloader = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    reload = threading.Thread(target=reloader.execute_command, args=("DEBUG", "RELOAD"))
    reload.start()
    try:
        body = wait_health(svc, 503, 5)
        assert f"master '{MASTER_NAME}' at 127.0.0.1:{port}: LOADING" in body, body
    finally:
        reload.join()
        reloader.close()
        master.config_set("key-load-delay", 0)
    wait_health(svc, 200)


def test_a_demoted_master_is_named_a_replica_in_the_health_text(log_dir: Path) -> None:
    server = RedisServer(log_dir=log_dir).start()
    stale = StaleSentinel(server.port)
    target = SentinelTarget(MASTER_NAME, (f"redis://127.0.0.1:{stale.port}/0",), "redis://sentinel-master:6379/0")

    async def probe() -> str:
        sentinel = SentinelRedis(target)
        try:
            await sentinel.discover()
            with redis.Redis(host="127.0.0.1", port=server.port) as demote:
                demote.replicaof("127.0.0.1", free_port())
            assert not await sentinel.ping()
            return sentinel.shown()
        finally:
            sentinel.close()

    try:
        shown = asyncio.run(probe())
    finally:
        stale.close()
        server.stop()
    assert f"at 127.0.0.1:{server.port} is a replica now (failover)" in shown, shown


def test_the_state_client_follows_the_counters_to_a_new_master_while_the_old_one_still_answers(
    doomed: SentinelProcs
) -> None:
    # redis-py's pool alone moves only on a connection error or READONLY: the old master, still a master
    # for seconds after the failover, would keep replica counts and RLQS demand away from the counters.
    target = SentinelTarget(MASTER_NAME, (f"redis://127.0.0.1:{doomed.sentinel_ports[0]}/0",),
                            "redis://sentinel-master:6379/0")
    old = doomed.master_port()

    async def write_after_failover() -> int:
        counters = SentinelRedis(target, timeout=0.3, connect_timeout=0.3)
        state = state_redis_client(target, socket_timeout=1, socket_connect_timeout=1)
        try:
            await counters.discover()
            await state.set("before", 1)
            await asyncio.to_thread(doomed.failover)
            deadline = time.monotonic() + 10
            while counters.master is None or counters.master.address.port == old:
                assert time.monotonic() < deadline, "the counters did not move to the new master"
                await counters.ping()
                await asyncio.sleep(0.1)
            while True:  # a call that fails on a switching pool is retried, as the platform's loops do
                try:
                    await state.incr("state_write")
                    break
                except redis.RedisError:
                    assert time.monotonic() < deadline, "the state client did not write"
                    await asyncio.sleep(0.1)
            return counters.master.address.port
        finally:
            await state.aclose()
            counters.close()

    new = asyncio.run(write_after_failover())
    assert new != old and doomed.get(new, "state_write") == 1


def test_no_sentinel_answering_starts_the_service_unhealthy_naming_the_sentinels(
    services: ServiceFactory, config_dir: Path
) -> None:
    # As with one Redis that does not answer: the service starts, health is 503, calls are UNAVAILABLE.
    dead = [free_port(), free_port()]
    url = f"{MASTER_NAME},127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}"
    svc, client = start(services, config_dir, url, wait_healthy=False)
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 20, "answering health")
    body = wait_health(svc, 503)
    assert f"sentinels 127.0.0.1:{dead[0]}, 127.0.0.1:{dead[1]}" in body and "no sentinel named" in body, body
    with pytest.raises(grpc.RpcError) as info:
        client.call([("tenant", "acme")])
    client.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_with_fail_open_calls_pass_while_no_master_is_known(services: ServiceFactory, config_dir: Path) -> None:
    url = f"{MASTER_NAME},127.0.0.1:{free_port()}"
    svc, client = start(services, config_dir, url, "--fail-open", "true", wait_healthy=False)
    svc.proc.wait_ready(lambda: health(svc)[0] == 503, 20, "answering health")
    assert [client.call([("tenant", "acme")]).overall_code for _ in range(7)] == [OK] * 7
    client.close()


def test_sentinel_auth_goes_to_the_sentinels_and_redis_auth_to_the_master(
    services: ServiceFactory, config_dir: Path, log_dir: Path
) -> None:
    procs = SentinelProcs(log_dir, password="master-secret", sentinel_password="sentinel-secret").start()
    try:
        env = {"REDIS_AUTH": "master-secret", "REDIS_SENTINEL_AUTH": "sentinel-secret"}
        svc, client = start(services, config_dir, procs.url, env=env)
        assert client.call([("big", "authed")]).overall_code == OK
        client.close()
        assert procs.get(procs.master.port, minute_key("big", "authed")) == 1
        assert "secret" not in svc.proc.log_path.read_text()
    finally:
        procs.stop()


def test_a_wrong_sentinel_auth_is_named_in_the_health_check(
    services: ServiceFactory, config_dir: Path, log_dir: Path
) -> None:
    procs = SentinelProcs(log_dir, sentinel_password="sentinel-secret").start()
    try:
        svc, _ = start(services, config_dir, procs.url, env={"REDIS_SENTINEL_AUTH": "wrong"}, wait_healthy=False)
        svc.proc.wait_ready(lambda: health(svc)[0] == 503, 20, "answering health")
        body = wait_health(svc, 503)
        assert f"127.0.0.1:{procs.sentinel_ports[0]}" in body and "WRONGPASS" in body and "wrong" not in \
            body.replace("WRONGPASS", ""), body
    finally:
        procs.stop()


@pytest.mark.parametrize(("url", "problem"), [
    ("127.0.0.1:26379", "expected <master name>,<sentinel host:port>"),
    ("mymaster", "expected <master name>,<sentinel host:port>"),
    ("127.0.0.1:26379,127.0.0.1:26380", "must be the name of the master"),
    ("mymaster,127.0.0.1", "sentinel '127.0.0.1' is not host:port"),
    ("mymaster,127.0.0.1:99999", "is not host:port"),
    ("mymaster,127.0.0.1:26379,127.0.0.1:26379", "sentinel listed more than once"),
    ("mymaster,,127.0.0.1:26379", "expected <master name>,<sentinel host:port>"),
])
def test_a_bad_sentinel_url_stops_the_service_naming_the_problem(config_dir: Path, url: str, problem: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30,
                          env=clean_env(REDIS_TYPE="SENTINEL", REDIS_URL=url))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "REDIS_URL" in line and problem in line, line


def test_sentinel_without_a_redis_url_stops_the_service_with_one_line(config_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30, env=clean_env(REDIS_TYPE="sentinel"))
    assert_one_line_error(proc.returncode, proc.stderr, "REDIS_TYPE=sentinel", "needs REDIS_URL", "mymaster,")


def test_redis_shards_with_sentinel_stop_the_service_with_one_line(config_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir),
                           "--redis-url", "mymaster,127.0.0.1:26379", "--redis-shards", "redis://127.0.0.1:7001",
                           "--redis-type", "sentinel"], capture_output=True, text=True, timeout=30, env=clean_env())
    assert_one_line_error(proc.returncode, proc.stderr, "REDIS_SHARDS", "REDIS_TYPE=sentinel")


def test_replica_counts_are_read_from_the_sentinel_managed_master(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs
) -> None:
    from tests.ratelimit.test_adaptive import publish

    svc, client = start(services, config_dir, clean.url)
    publish(f"redis://127.0.0.1:{clean.master.port}/0", "m", 2)
    deadline = time.monotonic() + 3
    while client.call(descriptor([("tenant_model", "acme"), ("model", "m")], hits=0)).statuses[0] \
            .current_limit.requests_per_unit != 20:
        assert time.monotonic() < deadline, "the limit did not follow the replica count"
        time.sleep(0.05)
    client.close()
    assert not [line for line in svc.proc.log_path.read_text().splitlines() if "IGW_STATE_REDIS_URL" in line]


def test_per_second_counters_go_to_a_sentinel_managed_per_second_redis(
    services: ServiceFactory, config_dir: Path, clean: SentinelProcs, redis_url: str
) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--redis-persecond", "true", "--redis-persecond-url", clean.url,
                             env={"REDIS_PERSECOND_TYPE": "sentinel"})
    client = RlsClient(svc.grpc_target)
    avoid_window_edges()
    assert client.call([("per_second", "p")], [("big", "b")]).overall_code == OK
    client.close()
    keys = [key.decode() for key in clean.client(clean.master.port).keys("test-domain_*")]
    assert keys == [f"test-domain_per_second_p_{int(time.time())}"]
