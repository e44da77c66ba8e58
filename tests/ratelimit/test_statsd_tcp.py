"""Upstream's stats over statsd on TCP (STATSD_PROTOCOL=tcp, gostats' default): the same lines as over UDP,
newline-terminated on one connection, received by a real TCP listener standing in for a statsd_exporter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from igw.procs import free_port
from ratelimit_svc import upstream_prometheus
from ratelimit_svc.settings import StatsdTarget, parse_settings
from ratelimit_svc.statsd import StatsdFlusher
from tests.helpers import Service, ServiceFactory
from tests.ratelimit.rls_client import OK, OVER, RlsClient
from tests.ratelimit.test_statsd import CONFIG, STAT, TIMER, assert_two_within_one_over, counts, override

__all__ = ["CONFIG"]  # the config_dir fixture reads this module's CONFIG


class TcpStatsdServer:
    """A TCP listener on a fixed port that keeps every line it receives, on every connection it accepts.
    With read=False it accepts and never reads, as a statsd that hangs. restart() drops every connection and
    listens again on the same port, as a statsd_exporter that restarts."""

    def __init__(self, port: int | None = None, read: bool = True) -> None:
        self.port = port or free_port()
        self.read = read
        self.received = bytearray()
        self.accepted = 0
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.running = False

    def start(self) -> TcpStatsdServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not self.read:  # a small window, so that what it does not read backs up into the sender soon
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.settimeout(0.05)
        self.listener, self.running = listener, True
        self._thread(self._accept)
        return self

    def _thread(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        assert self.listener is not None
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.05)
            with self.lock:
                self.connections.append(conn)
                self.accepted += 1
            if self.read:
                self._thread(self._receive, conn)

    def _receive(self, conn: socket.socket) -> None:
        while self.running:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.received += data

    def lines(self) -> list[str]:
        """Whole lines only: a line still on its way has no newline yet."""
        with self.lock:
            text = self.received.decode()
        return text.split("\n")[:-1]

    def wait_for(self, done: Callable[[list[str]], bool], timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while not done(self.lines()):
            assert time.monotonic() < deadline, self.lines()[-20:]
            time.sleep(0.02)
        return self.lines()

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join()
        self.threads.clear()
        with self.lock:
            for conn in self.connections:
                conn.close()
            self.connections.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def restart(self) -> None:
        self.stop()
        with self.lock:
            self.received.clear()
        self.start()


@pytest.fixture
def tcp_statsd() -> Iterator[TcpStatsdServer]:
    server = TcpStatsdServer().start()
    yield server
    server.stop()


def start(services: ServiceFactory, config_dir: Path, redis_url: str, port: int,
          env: dict[str, str] | None = None) -> Service:
    return services.ratelimit(config_dir, redis_url, env={
        "STATSD_HOST": "127.0.0.1", "STATSD_PORT": str(port), "STATSD_PROTOCOL": "tcp",
        "STATS_FLUSH_INTERVAL": "200ms", **(env or {})})


def test_counters_and_response_times_arrive_over_tcp_as_over_udp(
    services: ServiceFactory, config_dir: Path, redis_url: str, tcp_statsd: TcpStatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, tcp_statsd.port)
    client = RlsClient(svc.grpc_target)
    assert client.codes([("one", "v")], 3) == [OK, OK, OVER]
    client.close()
    lines = tcp_statsd.wait_for(lambda lines: counts(lines).get(f"{STAT}.one_v.total_hits") == 3
                                and len([line for line in lines if line.startswith(TIMER)]) == 3)
    assert_two_within_one_over(lines)
    assert tcp_statsd.accepted == 1  # one connection for every flush


@pytest.mark.parametrize(("env", "expected", "timer_tail"), [
    ({"EXTRA_TAGS": "zone:eu.west,env:prod"}, f"{STAT}.one_v.total_hits.__env=prod.__zone=eu_west:1|c", None),
    ({"USE_DOG_STATSD": "true", "EXTRA_TAGS": "zone:eu.west,env:prod"},
     f"{STAT}.one_v.total_hits:1|c|#env:prod,zone:eu_west", "|ms|#env:prod,zone:eu_west"),
], ids=["statsd", "dogstatsd"])
def test_tags_are_written_over_tcp_as_over_udp_each_line_ending_with_a_newline(
    services: ServiceFactory, config_dir: Path, redis_url: str, tcp_statsd: TcpStatsdServer,
    env: dict[str, str], expected: str, timer_tail: str | None
) -> None:
    svc = start(services, config_dir, redis_url, tcp_statsd.port, env)
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    client.close()
    lines = tcp_statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert expected in lines
    timer = next(line for line in lines if line.startswith(TIMER))
    assert timer.endswith(timer_tail) if timer_tail else timer.startswith(f"{TIMER}.__env=prod.__zone=eu_west:")


def test_after_the_listener_restarts_later_flushes_arrive_on_a_new_connection(
    services: ServiceFactory, config_dir: Path, redis_url: str, tcp_statsd: TcpStatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, tcp_statsd.port)
    client = RlsClient(svc.grpc_target)
    client.call([("one", "v")])
    tcp_statsd.wait_for(lambda lines: f"{STAT}.one_v.total_hits:1|c" in lines)
    tcp_statsd.restart()  # the service's connection is closed under it
    client.call([("many", "x")])
    lines = tcp_statsd.wait_for(lambda lines: f"{STAT}.many.total_hits:1|c" in lines)
    client.close()
    assert tcp_statsd.accepted == 2
    assert f"{STAT}.one_v.total_hits:1|c" not in lines  # sent once, before the restart


def test_what_the_last_calls_counted_is_sent_over_tcp_when_the_service_stops(
    services: ServiceFactory, config_dir: Path, redis_url: str, tcp_statsd: TcpStatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, tcp_statsd.port, {"STATS_FLUSH_INTERVAL": "1h"})
    client = RlsClient(svc.grpc_target)
    assert client.codes([("one", "v")], 3) == [OK, OK, OVER]
    client.close()
    assert tcp_statsd.lines() == []  # no flush before the hour is up
    assert svc.proc.stop() == 0
    lines = tcp_statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert counts(lines)[f"{STAT}.one_v.total_hits"] == 3


def test_a_flush_stuck_at_shutdown_is_given_up_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    # A listener whose accept queue is full drops the next SYN: connecting hangs (up to CONNECT_TIMEOUT). At
    # shutdown the service waits for the flush under way only so long, then exits without its stats.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    for client in queued:
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(("127.0.0.1", port))

    async def shut_down_while_connecting() -> None:
        flusher = StatsdFlusher(StatsdTarget("127.0.0.1", port, 0.01, False, protocol="tcp"), logging.getLogger("t"))
        stop = asyncio.Event()
        flusher.start(stop)  # it connects first
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(flusher.finish(timeout=0.2), 30)

    try:
        with caplog.at_level(logging.WARNING):
            asyncio.run(shut_down_while_connecting())
    finally:
        for sock in (*queued, listener):
            sock.close()
        upstream_prometheus.CALLS.samples = None  # as before any flusher: this process times no call
    assert "statsd: the flush in progress did not end within 0.2s at shutdown" in caplog.text


def test_a_statsd_that_comes_up_later_gets_the_later_flushes_after_one_warning(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    port = free_port()
    svc = start(services, config_dir, redis_url, port, {"STATS_FLUSH_INTERVAL": "100ms"})
    client = RlsClient(svc.grpc_target)
    assert client.call([("one", "v")]).overall_code == OK
    log_path = svc.proc.log_path
    deadline = time.monotonic() + 10
    while "statsd: cannot connect to 127.0.0.1" not in log_path.read_text():  # its flush was dropped
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    server = TcpStatsdServer(port).start()
    try:
        client.call([("many", "x")])
        server.wait_for(lambda lines: f"{STAT}.many.total_hits:1|c" in lines)
        deadline = time.monotonic() + 10
        while "statsd: sending to 127.0.0.1" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        client.close()
        server.stop()
    log = log_path.read_text()
    assert len(re.findall(r"statsd: cannot connect to 127\.0\.0\.1:\d+ over TCP", log)) == 1, log


def test_a_statsd_that_never_reads_stalls_no_request_and_its_backlog_stays_bounded(
    services: ServiceFactory, config_dir: Path, redis_url: str
) -> None:
    server = TcpStatsdServer(read=False).start()
    try:
        svc = start(services, config_dir, redis_url, server.port, {"STATS_FLUSH_INTERVAL": "100ms"})
        client = RlsClient(svc.grpc_target)
        # ~40 KB of lines per call (two stats of a 20 KB key): far past the 4 MiB the service keeps for the peer
        # plus what the kernel buffers on either side.
        for i in range(400):
            assert client.call(override("user", f"{i:04d}" + "x" * 20_000)).overall_code == OK
        client.close()
        log_path = svc.proc.log_path
        deadline = time.monotonic() + 20
        while "is not reading" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.1)
        assert svc.proc.alive()
        assert server.accepted == 1  # the one connection stays: what is buffered goes once it reads again
        log = log_path.read_text()
        assert len(re.findall(r"statsd: 127\.0\.0\.1:\d+ is not reading", log)) == 1, log
    finally:
        server.stop()


def test_a_statsd_that_reads_gets_every_line_of_a_heavy_load_once(
    services: ServiceFactory, config_dir: Path, redis_url: str, tcp_statsd: TcpStatsdServer
) -> None:
    # The counterpart of the one above: megabytes of lines over several flushes stay under the cap when the peer
    # reads, so the cap drops nothing then.
    svc = start(services, config_dir, redis_url, tcp_statsd.port, {"STATS_FLUSH_INTERVAL": "100ms"})
    client = RlsClient(svc.grpc_target)
    users = [f"{i:04d}" + "y" * 10_000 for i in range(200)]
    for user in users:
        assert client.call(override("user", user)).overall_code == OK
    client.close()
    names = [f"{STAT}.user_{user}.total_hits" for user in users]
    lines = tcp_statsd.wait_for(lambda lines: all(name in counts(lines) for name in names), timeout=20)
    sent = counts(lines)
    assert [sent[name] for name in names] == [1] * len(names)
    assert "is not reading" not in svc.proc.log_path.read_text()


def test_a_line_too_long_for_a_datagram_goes_whole_over_tcp(
    services: ServiceFactory, config_dir: Path, redis_url: str, tcp_statsd: TcpStatsdServer
) -> None:
    svc = start(services, config_dir, redis_url, tcp_statsd.port)
    client = RlsClient(svc.grpc_target)
    client.call(override("user", "A" * 70_000))  # over the 65507 bytes a UDP datagram carries
    client.close()
    lines = tcp_statsd.wait_for(lambda lines: any(line.startswith(TIMER) for line in lines))
    assert f"{STAT}.user_{'A' * 70_000}.total_hits:1|c" in lines


@pytest.mark.parametrize(("value", "protocol"), [("tcp", "tcp"), (" TCP6 ", "tcp6"), ("udp4", "udp4")])
def test_statsd_protocol_is_read_in_any_case(config_dir: Path, monkeypatch: pytest.MonkeyPatch, value: str,
                                             protocol: str) -> None:
    monkeypatch.setenv("STATSD_PROTOCOL", value)
    settings = parse_settings(["--config-dir", str(config_dir), "--use-statsd", "true"])
    assert settings.statsd is not None and settings.statsd.protocol == protocol


def test_statsd_is_sent_over_udp_unless_statsd_protocol_says_otherwise(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upstream's gostats defaults to tcp; this service sent UDP before it read STATSD_PROTOCOL, and deployments
    # (a Datadog agent listens on UDP only) rely on it.
    monkeypatch.delenv("STATSD_PROTOCOL", raising=False)
    settings = parse_settings(["--config-dir", str(config_dir), "--use-statsd", "true"])
    assert settings.statsd is not None and settings.statsd.protocol == "udp"
