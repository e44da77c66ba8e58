"""`--workers N`: N copies of a service sharing its gRPC port, behind one admin port.

The workers bind the gRPC port with SO_REUSEPORT, so the kernel spreads Envoy's connections over them.
The admin port is different: if every worker bound it too, each scrape of /metrics would land on one
worker at random and Prometheus would see its counters jump between unrelated values (and read every
jump down as a reset). So each worker serves /metrics, /healthcheck and /livez on a loopback port of its own
(`IGW_WORKER_ADMIN_PORT`, read by igw.service_runtime), and this supervisor answers on the public admin
port for all of them:
- /metrics: every worker's samples with a `worker` label added, in one exposition, plus
  `igw_worker_up{worker}`; sum by the other labels for the service's totals.
- /healthcheck: 200 only when every worker answers 200, since the kernel sends each worker its share of
  connections whatever its state; the body has one line per worker. /livez likewise (a wedged worker
  still gets its share of connections). From the first stop signal on /healthcheck answers 503 itself: the
  workers drain (--drain-seconds), and the readiness probe must see it at once.
A service may ask for more such endpoints (`MergedEndpoint`, e.g. the rate-limit service's USE_PROMETHEUS
port): each worker serves its part on another loopback port of its own, and the supervisor merges them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

ADMIN_PORT_ENV = "IGW_WORKER_ADMIN_PORT"
WORKER_INDEX_ENV = "IGW_WORKER_INDEX"
WORKER_TIMEOUT = 1.0  # seconds one worker has to answer a scrape or a health check
STOP_GRACE_S = 15.0  # after a stop signal and the drain (--drain-seconds), workers still running are killed

log = logging.getLogger("igw.workers")


def _fetch(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a worker's admin endpoint; status 0 when it cannot be reached."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WORKER_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, f"unreachable: {exc}"


def merge_expositions(texts: list[str | None]) -> list[Metric]:
    """One family per metric name, each sample labelled with the index of the worker it came from;
    None stands for a worker that could not be scraped."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily("igw_worker_up", "1 when the worker answered this scrape", labels=["worker"])
    for index, text in enumerate(texts):
        up.add_metric([str(index)], 0 if text is None else 1)
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)
                               for s in family.samples]
    return [*families.values(), up]


class _Merged(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def health_of(statuses: list[tuple[int, str]]) -> tuple[bool, str]:
    lines = [f"worker {i}: " + (body.strip() if code == 200 else f"HTTP {code}: {body.strip()}" if code
                                else f"down ({body.strip()})")
             for i, (code, body) in enumerate(statuses)]
    return all(code == 200 for code, _ in statuses), "\n".join(lines) + "\n"


class _WorkerProxy(BaseHTTPRequestHandler):
    """An endpoint the supervisor answers from what each worker answers on its own loopback port."""

    worker_ports: list[int] = []

    def ask_workers(self, path: str) -> list[tuple[int, str]]:
        """Every worker's (status, body) for `path`, asked at once: one slow worker costs a scrape one
        timeout, not one per worker."""
        with ThreadPoolExecutor(max_workers=len(self.worker_ports)) as pool:
            return list(pool.map(lambda port: _fetch(port, path), self.worker_ports))

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _AdminHandler(_WorkerProxy):
    stopping: threading.Event  # set by the first stop signal (set per supervisor in run_workers)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthcheck" and self.stopping.is_set():
            # Not ready from the signal on, whatever a worker that has not yet started its drain still says.
            self._send(503, b"draining: stopping soon (calls still served)\n")
        elif path == "/metrics":
            texts = [body if code == 200 else None for code, body in self.ask_workers("/metrics")]
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Merged(merge_expositions(texts)))
            self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthcheck", "/livez"):
            ok, text = health_of(self.ask_workers(path))
            self._send(200 if ok else 503, text.encode())
        else:
            self._send(404, b"not found\n")


@dataclass(frozen=True)
class MergedEndpoint:
    """One more HTTP endpoint answered for all workers: each worker serves `worker_path` on a loopback port
    of its own, passed in the environment variable `port_env`; the supervisor answers GET `path` on
    host:port with `merge` of their bodies (None for a worker that did not answer), as (body, content type)."""

    name: str  # the setting that names host:port, for the bind error
    host: str  # "": every interface
    port: int
    path: str
    port_env: str
    worker_path: str
    merge: Callable[[list[str | None]], tuple[bytes, str]]


class _MergedHandler(_WorkerProxy):
    """Answers for a worker that does not answer in time with what it said last: the merge sums counters,
    and a worker left out of one scrape would make the sum drop, which Prometheus reads as a counter reset
    (a false spike in rate() and increase()). Workers are never restarted on their own (one that fails
    stops them all), so a worker's last answer is never ahead of its real counts."""

    endpoint: MergedEndpoint
    last_good: list[str | None] = []  # per worker, its last answer (set per endpoint in run_workers)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != self.endpoint.path:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        for index, (code, body) in enumerate(self.ask_workers(self.endpoint.worker_path)):
            if code == 200:
                self.last_good[index] = body
        self._send(200, *self.endpoint.merge(list(self.last_good)))


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _start_http(host: str, port: int, handler: type[BaseHTTPRequestHandler], what: str) -> ThreadingHTTPServer | None:
    try:
        server = (_Server6 if ":" in host else _Server)((host, port), handler)
    except OSError as exc:
        log.error("cannot bind %s %s:%d: %s", what, host, port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="igw-admin", daemon=True).start()
    return server


def run_workers(n: int, argv: list[str], admin_host: str, admin_port: int,
                endpoints: Sequence[MergedEndpoint] = ()) -> int:
    """Supervise n copies of this command (each with --workers 1) and serve their admin endpoints on
    admin_host:admin_port, and `endpoints`; return the first failure code (one worker failing stops them all)."""
    from igw.procs import free_port, set_parent_death_signal
    from igw.runtime import drain_seconds_of

    drain = drain_seconds_of(argv)  # each worker drains on the signal forwarded; the supervisor waits it out
    stopping = threading.Event()
    ports = [free_port() for _ in range(n)]
    handler = type("AdminHandler", (_AdminHandler,), {"worker_ports": ports, "stopping": stopping})
    started = [_start_http(admin_host, admin_port, handler, "HTTP port")]
    worker_env: list[dict[str, str]] = [{} for _ in range(n)]
    for endpoint in endpoints:
        endpoint_ports = [free_port() for _ in range(n)]
        for env, port in zip(worker_env, endpoint_ports, strict=True):
            env[endpoint.port_env] = str(port)
        merged = type("MergedHandler", (_MergedHandler,), {"endpoint": endpoint, "worker_ports": endpoint_ports,
                                                            "last_good": [None] * n})
        started.append(_start_http(endpoint.host, endpoint.port, merged, endpoint.name))
    servers = [server for server in started if server is not None]
    if len(servers) < len(started):
        for server in servers:
            server.shutdown()
            server.server_close()
        return 1

    children: list[subprocess.Popen[bytes]] = []
    kill_at: float | None = None  # set by the first stop signal: workers get STOP_GRACE_S, then SIGKILL

    def forward(signum: int, _frame: object) -> None:
        nonlocal kill_at
        stopping.set()
        kill_at = kill_at or time.monotonic() + drain + STOP_GRACE_S
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index, port in enumerate(ports):
        if kill_at is not None:
            break  # told to stop while starting: start no more
        env = {**os.environ, **worker_env[index], WORKER_INDEX_ENV: str(index), ADMIN_PORT_ENV: str(port)}
        # A supervisor killed outright (SIGKILL, OOM) must not leave workers holding the gRPC port.
        children.append(subprocess.Popen([sys.executable, *argv, "--workers", "1"], env=env,
                                         preexec_fn=set_parent_death_signal))
    if kill_at is not None:  # the signal may have come while the last worker was being started
        forward(signal.SIGTERM, None)
    code = 0
    while children:
        for child in list(children):
            result = child.poll()
            if result is None:
                if kill_at is not None and time.monotonic() > kill_at:
                    log.error("worker pid %d still running %.0f s after the stop signal; killing it",
                              child.pid, drain + STOP_GRACE_S)
                    child.kill()
                continue
            children.remove(child)
            if result != 0 and kill_at is None:
                log.error("worker pid %d exited with %d; stopping", child.pid, result)
                code = code or result
                forward(signal.SIGTERM, None)
        time.sleep(0.1)
    for server in servers:
        server.shutdown()
        server.server_close()
    return code
