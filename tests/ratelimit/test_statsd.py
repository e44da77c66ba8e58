"""Upstream's stats over statsd (USE_STATSD, USE_DOG_STATSD): the lines envoyproxy/ratelimit's gostats store
sends every STATS_FLUSH_INTERVAL, received by a real UDP socket standing in for a statsd_exporter sidecar
(STATSD_PROTOCOL=tcp: test_statsd_tcp.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from tests.helpers import Service, ServiceFactory, assert_one_line_error
from tests.ratelimit.rls_client import OK, OVER, RlsClient, descriptor

CONFIG = """
domain: test-domain
descriptors:
  - key: one
    value: v
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: many
    rate_limit: {unit: minute, requests_per_unit: 1000}
"""
STAT = "ratelimit.service.rate_limit.test-domain"
TIMER = "ratelimit_server.ShouldRateLimit.response_time"
STATSD_ENV_NAMES = ("USE_STATSD", "USE_DOG_STATSD", "USE_DOG_STATSD_MOGRIFIERS", "STATSD_HOST", "STATSD_PORT",
                    "STATS_FLUSH_INTERVAL", "EXTRA_TAGS", "DISABLE_STATS", "USE_PROMETHEUS", "STATSD_PROTOCOL")


class StatsdServer:
    """A UDP socket that keeps every datagram it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a flush of many keys queues up
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []

    def receive(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.datagrams.append(self.sock.recv(65536))

    def lines(self) -> list[str]:
        return [line for datagram in self.datagrams for line in datagram.decode().split("\n") if line]

    def wait_for(self, done: Callable[[list[str]], bool], timeout: float = 5) -> list[str]:
        deadline = time.monotonic() + timeout
        while not done(self.lines()):
            assert time.monotonic() < deadline, self.lines()
            self.receive(0.1)
        return self.lines()

    def clear(self) -> None:
        self.datagrams.clear()


@pytest.fixture
def statsd() -> Iterator[StatsdServer]:
    server = StatsdServer()
    yield server
    server.sock.close()


def start(services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer,
          env: dict[str, str] | None = None, *args: str) -> Service:
    return services.ratelimit(config_dir, redis_url, *args, env={
        "STATSD_HOST": "127.0.0.1", "STATSD_PORT": str(statsd.port), "STATS_FLUSH_INTERVAL": "200ms", **(env or {})})


def counts(lines: list[str], kind: str = "c") -> dict[str, int]:
    """Sum of the values sent per name (statsd's view of the counters)."""
    total: dict[str, int] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        value, _, rest = rest.partition("|")
        if rest.split("|")[0] == kind:
            total[name] = total.get(name, 0) + int(value)
    return total


def test_counters_and_response_times_are_sent_as_upstreams_statsd_lines(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd)
    client = RlsClient(svc.grpc_target)
    assert client.codes([("one", "v")], 3) == [OK, OK, OVER]
    client.close()
    lines = statsd.wait_for(lambda lines: counts(lines).get(f"{STAT}.one_v.total_hits") == 3
                            and len([line for line in lines if line.startswith(TIMER)]) == 3)
    assert_two_within_one_over(lines)


def assert_two_within_one_over(lines: list[str]) -> None:
    """The lines of three calls on `one_v` (limit 2): what upstream's statsd store sends for them."""
    sent = counts(lines)
    assert sent[f"{STAT}.one_v.over_limit"] == 1
    assert sent[f"{STAT}.one_v.within_limit"] == 2
    assert sent["ratelimit_server.ShouldRateLimit.total_requests"] == 3
    assert sent["ratelimit.service.config_load_success"] == 1
    assert sent[f"{STAT}.one_v.near_limit"] == 1
    assert f"{STAT}.one_v.shadow_mode" not in sent  # never moved, so never sent
    timers = [line for line in lines if line.startswith(TIMER)]
    assert all(re.fullmatch(rf"{re.escape(TIMER)}:\d+\|ms", line) for line in timers), timers


def test_only_what_moved_since_the_last_flush_is_sent(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd)
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    statsd.wait_for(lambda lines: f"{STAT}.one_v.total_hits:1|c" in lines)
    statsd.receive(0.5)  # later flushes, with nothing new
    statsd.clear()
    statsd.receive(0.6)
    assert statsd.lines() == []
    client.call([("many", "x")])
    client.close()
    lines = statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    statsd.receive(0.5)
    lines = statsd.lines()
    assert sorted(line for line in lines if not line.startswith(TIMER)) == [
        f"{STAT}.many.total_hits:1|c", f"{STAT}.many.within_limit:1|c",
        "ratelimit_server.ShouldRateLimit.total_requests:1|c"]


def test_plain_statsd_carries_extra_tags_in_the_name_as_gostats_writes_them(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd, {"EXTRA_TAGS": "zone:eu.west,env:prod"})
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    client.close()
    lines = statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert f"{STAT}.one_v.total_hits.__env=prod.__zone=eu_west:1|c" in lines
    assert next(line for line in lines if line.startswith(TIMER)).startswith(f"{TIMER}.__env=prod.__zone=eu_west:")


def test_dogstatsd_carries_extra_tags_after_the_type(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd,
                {"USE_DOG_STATSD": "true", "EXTRA_TAGS": "zone:eu.west,env:prod"})  # USE_STATSD unset: off
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    client.close()
    lines = statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert f"{STAT}.one_v.total_hits:1|c|#env:prod,zone:eu_west" in lines
    assert next(line for line in lines if line.startswith(TIMER)).endswith("|ms|#env:prod,zone:eu_west")


def test_a_dogstatsd_mogrifier_renames_and_tags_the_stats_it_matches(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd, {
        "USE_DOG_STATSD": "true", "USE_STATSD": "false", "EXTRA_TAGS": "env:prod",
        "USE_DOG_STATSD_MOGRIFIERS": "LIMITS",
        "DOG_STATSD_MOGRIFIER_LIMITS_PATTERN": r"^ratelimit\.service\.rate_limit\.([^.]+)\.(.*)\.([^.]+)$",
        "DOG_STATSD_MOGRIFIER_LIMITS_NAME": "ratelimit.service.rate_limit.$3",
        "DOG_STATSD_MOGRIFIER_LIMITS_TAGS": "domain:$1,descriptor:$2"})
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    client.close()
    lines = statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert "ratelimit.service.rate_limit.total_hits:1|c|#env:prod,domain:test-domain,descriptor:one_v" in lines
    assert "ratelimit_server.ShouldRateLimit.total_requests:1|c|#env:prod" in lines  # not matched: unchanged


def test_datagrams_stay_within_1432_bytes(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd, {"STATS_FLUSH_INTERVAL": "2s"})
    client = RlsClient(svc.grpc_target)
    for _ in range(200):  # one timer line per call: far more than one datagram holds
        client.call([("many", "x")])
    client.close()
    statsd.wait_for(lambda lines: len([line for line in lines if line.startswith(TIMER)]) == 200)
    assert len(statsd.datagrams) > 1
    assert max(len(datagram) for datagram in statsd.datagrams) <= 1432


@pytest.mark.parametrize("env", [{"USE_STATSD": "false"}, {"DISABLE_STATS": "true"}, {"USE_PROMETHEUS": "true"}],
                         ids=["use_statsd_false", "disable_stats", "use_prometheus_alone"])
def test_nothing_is_sent_when_statsd_is_off(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer, env: dict[str, str]
) -> None:
    if "USE_PROMETHEUS" in env:
        from igw.procs import free_port

        env = {**env, "PROMETHEUS_ADDR": f"127.0.0.1:{free_port()}"}
    svc = start(services, config_dir, redis_url, statsd, env)
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    client.close()
    statsd.receive(1.0)
    assert statsd.datagrams == []


def test_disable_stats_keeps_the_metrics_endpoint(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd, {"DISABLE_STATS": "true"})
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    client.close()
    with urllib.request.urlopen(f"{svc.http_base}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'ratelimit_total_hits_total{domain="test-domain",key="one_v"} 1.0' in text


@pytest.mark.parametrize(("env", "needles"), [
    ({"STATSD_PORT": "70000"}, ("STATSD_PORT", "70000", "1 to 65535")),
    ({"STATSD_PORT": "statsd"}, ("STATSD_PORT", "statsd")),
    ({"STATSD_PROTOCOL": "quic"}, ("STATSD_PROTOCOL", "'quic'", "udp, udp4, udp6, tcp, tcp4, tcp6")),
    ({"STATSD_PROTOCOL": "quic", "USE_STATSD": "false"}, ("STATSD_PROTOCOL", "'quic'")),
    ({"STATS_FLUSH_INTERVAL": "0s"}, ("STATS_FLUSH_INTERVAL", "greater than zero")),
    ({"STATS_FLUSH_INTERVAL": "-1s"}, ("STATS_FLUSH_INTERVAL", "-1s")),
    ({"EXTRA_TAGS": "env=prod"}, ("EXTRA_TAGS", "'env=prod' is not key:value")),
    ({"USE_DOG_STATSD": "true", "USE_STATSD": "true"}, ("USE_DOG_STATSD", "USE_STATSD=false")),
    ({"USE_DOG_STATSD": "true", "USE_STATSD": "false", "USE_DOG_STATSD_MOGRIFIERS": "M",
      "DOG_STATSD_MOGRIFIER_M_NAME": "x"}, ("USE_DOG_STATSD_MOGRIFIERS", "DOG_STATSD_MOGRIFIER_M_PATTERN")),
    ({"USE_DOG_STATSD": "true", "USE_STATSD": "false", "USE_DOG_STATSD_MOGRIFIERS": "M",
      "DOG_STATSD_MOGRIFIER_M_PATTERN": "^(a)", "DOG_STATSD_MOGRIFIER_M_NAME": "$2"}, ("'M'", "$2", "1 group")),
], ids=["port_out_of_range", "port_not_a_number", "protocol_unknown", "protocol_unknown_with_statsd_off",
        "interval_zero", "interval_negative", "tag_not_a_pair",
        "two_statsd_forms", "mogrifier_without_pattern", "mogrifier_group_missing"])
def test_a_bad_statsd_setting_stops_the_service_with_one_line(
    config_dir: Path, env: dict[str, str], needles: tuple[str, ...]
) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in STATSD_ENV_NAMES}
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir)],
                          capture_output=True, text=True, timeout=30, env={**clean, **env})
    assert_one_line_error(proc.returncode, proc.stderr, *needles)


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
@pytest.mark.parametrize("host", ["statsd.invalid", "127.0.0.1"], ids=["unresolvable", "nothing_listening"])
def test_a_statsd_that_cannot_be_reached_never_fails_a_call(
    services: ServiceFactory, config_dir: Path, redis_url: str, host: str, protocol: str
) -> None:
    from igw.procs import free_port

    svc = services.ratelimit(config_dir, redis_url, env={
        "STATSD_HOST": host, "STATSD_PORT": str(free_port()), "STATS_FLUSH_INTERVAL": "100ms",
        "STATSD_PROTOCOL": protocol})
    client = RlsClient(svc.grpc_target)
    deadline = time.monotonic() + 1.0
    calls = 0
    while time.monotonic() < deadline:  # across several flushes
        assert client.call([("many", "x")]).overall_code == OK
        calls += 1
        time.sleep(0.01)
    client.close()
    assert svc.proc.alive()
    log = svc.proc.log_path.read_text()
    if host == "statsd.invalid":
        assert len(re.findall(r"statsd: cannot resolve STATSD_HOST 'statsd.invalid'", log)) == 1, log
    elif protocol == "tcp":  # a refused connection is known at once; a datagram's loss is not
        assert len(re.findall(r"statsd: cannot connect to 127\.0\.0\.1:\d+ over TCP", log)) == 1, log


def test_each_worker_sends_its_own_deltas_which_statsd_sums(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd, None, "--workers", "2")
    calls = 40
    for _ in range(calls):  # a new connection each: the kernel spreads them over the workers
        client = RlsClient(svc.grpc_target)
        client.call([("many", "x")])
        client.close()
    lines = statsd.wait_for(lambda lines: counts(lines).get(f"{STAT}.many.total_hits") == calls)
    assert counts(lines)["ratelimit_server.ShouldRateLimit.total_requests"] == calls
    assert counts(lines)["ratelimit.service.config_load_success"] == 2  # one config load per worker


def override(key: str, value: str) -> ratelimit_pb2.RateLimitDescriptor:
    """A descriptor with Envoy's limit override: counted under `<key>_<value>` with no config flag needed."""
    built = descriptor([(key, value)])
    built.limit.requests_per_unit, built.limit.unit = 1000, rls_pb2.RateLimitResponse.RateLimit.MINUTE
    return built


# A forged line after a newline, a forged value after `:`/`|`, and for dogstatsd a forged tag after `,`.
EVIL = "x:1000000|c\nratelimit.service.rate_limit.test-domain.forged.over_limit:7|c|#team:evil,env:x@0.5\r"


@pytest.mark.parametrize(("env", "expected"), [
    ({}, f"{STAT}.user_x_1000000_c_ratelimit.service.rate_limit.test-domain.forged.over_limit_7_c_#team_evil,"
         "env_x@0.5_.total_hits:1|c"),
    ({"USE_DOG_STATSD": "true", "EXTRA_TAGS": "env:prod"},
     f"{STAT}.user_x_1000000_c_ratelimit.service.rate_limit.test-domain.forged.over_limit_7_c__team_evil_"
     "env_x_0.5_.total_hits:1|c|#env:prod"),
], ids=["statsd", "dogstatsd"])
def test_a_request_value_cannot_forge_statsd_lines_values_or_tags(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer, env: dict[str, str],
    expected: str
) -> None:
    svc = start(services, config_dir, redis_url, statsd, env)
    client = RlsClient(svc.grpc_target)
    client.call(override("user", EVIL))
    client.close()
    lines = statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert expected in lines
    name = expected.partition(".total_hits")[0]  # the one stats key, whichever stat
    assert not [line for line in lines if "forged" in line and not line.startswith(f"{name}.")], lines
    tags = [line.partition("|#")[2] for line in lines]
    assert set(tags) == ({"env:prod"} if env else {""}), lines


def test_dots_of_an_ipv4_address_in_a_value_become_underscores_as_upstream_names_them(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd)
    client = RlsClient(svc.grpc_target)
    client.call(override("remote_address", "10.1.2.3"))
    client.call(override("version", "1.2.3"))  # not an address: its dots stay
    client.close()
    lines = statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert f"{STAT}.remote_address_10_1_2_3.total_hits:1|c" in lines
    assert f"{STAT}.version_1.2.3.total_hits:1|c" in lines


def test_a_flush_walks_only_the_stats_keys_counted_since_the_last_one() -> None:
    # What a flush costs follows what it walks: with many keys and nothing moved it used to walk them all
    # (~0.4 s of event loop per flush at 100k keys). Checked on the mechanism, not on a clock.
    from ratelimit_svc import metrics

    metrics.forget_changes()
    for i in range(1000):
        metrics.limit_stats(f"walk.user_{i}").total_hits += 1
    assert len(metrics.take_changed()) >= 1000  # a new flusher's first flush: every key
    assert metrics.take_changed() == []  # nothing counted since
    metrics.limit_stats("walk.user_7").total_hits += 1
    assert [key for key, _ in metrics.take_changed()] == ["walk.user_7"]
    metrics.forget_changes()


def test_a_line_too_long_for_a_datagram_is_dropped_alone(
    services: ServiceFactory, config_dir: Path, redis_url: str, statsd: StatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, statsd, {"STATS_FLUSH_INTERVAL": "1s"})
    client = RlsClient(svc.grpc_target)
    client.call(override("user", "A" * 70_000))  # a direct client: Envoy's header limit keeps keys shorter
    client.call([("many", "x")])  # counted after it, in the same flush
    client.close()
    lines = statsd.wait_for(lambda lines: len([line for line in lines if line.startswith(TIMER)]) == 2)
    sent = counts(lines)
    assert sent[f"{STAT}.many.total_hits"] == 1
    assert sent["ratelimit_server.ShouldRateLimit.total_requests"] == 2
    assert not [line for line in lines if "AAAA" in line]
    log = svc.proc.log_path.read_text()
    assert len(re.findall(r"statsd: a line of \d+ bytes is dropped, over the 65507", log)) == 1, log


def test_a_flush_under_way_at_shutdown_ends_before_the_last_one_so_every_count_arrives_once(
    statsd: StatsdServer
) -> None:
    # A flush takes its stats keys at its start and sends them a chunk at a time. Cancelled mid-way at shutdown
    # (as the runtime's spawned tasks are), the keys it had taken and not sent were lost: the last flush only
    # walks the keys counted since. In process, so that the shutdown lands mid-flush by construction.
    from ratelimit_svc import metrics, upstream_prometheus
    from ratelimit_svc.settings import StatsdTarget
    from ratelimit_svc.statsd import _KEYS_PER_CHUNK, StatsdFlusher

    keys = [f"shutdown-domain.user_{i}" for i in range(_KEYS_PER_CHUNK * 12)]  # a flush of 12 chunks
    received: list[bytes] = []
    stop = asyncio.Event()

    async def receive() -> None:
        loop = asyncio.get_running_loop()
        while True:
            received.append(await loop.sock_recv(statsd.sock, 65536))
            stop.set()  # SIGTERM as the periodic flush's first lines arrive: it has chunks left to send

    async def shut_down_mid_flush() -> int:
        statsd.sock.setblocking(False)
        flusher = StatsdFlusher(StatsdTarget("127.0.0.1", statsd.port, 0.01, False), logging.getLogger("test"))
        for key in keys:
            metrics.limit_stats(key).total_hits += 1
        reader = asyncio.create_task(receive())
        flusher.start(stop)
        await asyncio.wait_for(stop.wait(), 10)
        received_at_stop = len(received)
        await flusher.finish()  # what server.serve does once its gRPC server has stopped
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        with contextlib.suppress(BlockingIOError):  # what arrived after the reader's last turn
            while True:
                received.append(statsd.sock.recv(65536))
        return received_at_stop

    try:
        received_at_stop = asyncio.run(shut_down_mid_flush())
    finally:
        metrics.forget_changes()
        upstream_prometheus.CALLS.samples = None  # as before any flusher: this process times no call
    statsd.datagrams.extend(received[:received_at_stop])
    assert len(statsd.lines()) < len(keys)  # statsd did not have them all when the service was told to stop
    statsd.datagrams.extend(received[received_at_stop:])
    sent = counts(statsd.lines())
    assert {key: sent.get(f"ratelimit.service.rate_limit.{key}.total_hits") for key in keys} == dict.fromkeys(keys, 1)
