"""Reused upstream connections through the real Envoy: which failures of a model connection are retried, and
that Envoy closes idle model connections itself before a model server's keep-alive timeout would.

Envoy runs the bed's bootstrap with only the router filter (the x-igw-model header is sent by the test instead
of ext_proc) in front of one scripted HTTP/1.1 upstream on a raw socket: it answers health checks, records
every inference request it reads (whole, or only its first bytes) and misbehaves per connection as a test
tells it to. An inference is not idempotent, so a request the upstream may have read must never be sent twice.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from igw import envoy_config
from igw.launcher import _envoy_hosts_healthy, envoy_args, envoy_binary
from igw.procs import ManagedProcess, http_ok
from igw.topology import Endpoint, free_topology, model_cluster_name

MODEL = "alpha"
INFER_PATH = f"/v2/models/{MODEL}/infer"
REQUEST_ID = "x-test-request"
WAIT = 20.0


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclasses.dataclass
class Seen:
    """One inference request as the upstream read it: `complete` once headers and body were all read."""

    connection: int
    request_id: str
    complete: bool


class ScriptedUpstream:
    """A model replica on a raw socket. `behaviour(connection_index, request_index_on_connection)` names what
    to do with an inference request: "serve", "close_on_first_bytes" (close the connection as soon as the
    request's first bytes arrive, as a server whose keep-alive timer fired just then), or "reset_after_read"
    (read the whole request, then reset the connection without answering)."""

    def __init__(self, behaviour: Callable[[int, int], str]) -> None:
        self.behaviour = behaviour
        self.seen: list[Seen] = []
        self.closed_by_peer: list[int] = []  # connections Envoy closed (EOF while waiting for a request)
        self._lock = threading.Lock()
        self._connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        self._listener.close()

    def inference(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                index = self._connections
                self._connections += 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        buffer = b""
        served = 0
        with conn:
            while True:
                try:
                    first = buffer or conn.recv(65536)
                except OSError:
                    return
                if not first:
                    with self._lock:
                        self.closed_by_peer.append(index)
                    return
                buffer = first
                if not buffer.startswith(b"GET ") and self.behaviour(index, served) == "close_on_first_bytes":
                    with self._lock:
                        self.seen.append(Seen(index, _header(buffer, REQUEST_ID), False))
                    _reset(conn)
                    return
                request, buffer = _read_request(conn, buffer)
                if request is None:
                    return
                head, _body = request
                if head.startswith(b"GET "):  # health check
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                with self._lock:
                    self.seen.append(Seen(index, _header(head, REQUEST_ID), True))
                if self.behaviour(index, served) == "reset_after_read":
                    _reset(conn)
                    return
                served += 1
                body = json.dumps({"connection": index}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a server process that drops a connection without a clean shutdown."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _header(head: bytes, name: str) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.encode():
            return value.strip().decode()
    return ""


def _read_request(conn: socket.socket, buffer: bytes) -> tuple[tuple[bytes, bytes] | None, bytes]:
    """((head, body), what follows) once a whole request with a content-length body is read; (None, b"") if the
    connection ends first."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    length = int(_header(head, "content-length") or 0)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        rest += chunk
    return (head, rest[:length]), rest[length:]


@dataclasses.dataclass
class Gateway:
    url: str
    upstream: ScriptedUpstream


def _start(tmp_path: Path, behaviour: Callable[[int, int], str],
           timeouts: envoy_config.Timeouts = envoy_config.DEFAULT_TIMEOUTS) -> Iterator[Gateway]:
    upstream = ScriptedUpstream(behaviour)
    topology = dataclasses.replace(free_topology((MODEL,)), models={MODEL: (Endpoint("127.0.0.1", upstream.port),)})
    config = envoy_config.bootstrap(topology, access_log_path=str(tmp_path / "access.log"), timeouts=timeouts)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [envoy_config.router_filter()]
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_config.render_yaml(config, "upstream connection reuse test"))
    envoy = ManagedProcess("envoy-reuse", [envoy_binary(), *envoy_args(str(path), base_id=topology.admin.port)],
                           log_dir=tmp_path)
    try:
        envoy.start()
        envoy.wait_ready(lambda: http_ok(f"{topology.admin_url}/ready"), WAIT, "ready")
        expected = {model_cluster_name(MODEL): {f"127.0.0.1:{upstream.port}"}}
        envoy.wait_ready(lambda: _envoy_hosts_healthy(topology.admin_url, expected), WAIT, "model host healthy")
        yield Gateway(topology.gateway_url, upstream)
    finally:
        envoy.stop()
        upstream.stop()


def _infer(client: httpx.Client, gateway: Gateway, request_id: str) -> httpx.Response:
    return client.post(gateway.url + INFER_PATH, headers={"x-igw-model": MODEL, REQUEST_ID: request_id},
                       json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})


@pytest.fixture
def closing_on_reuse(tmp_path: Path) -> Iterator[Gateway]:
    """Serves the first inference on each connection, closes it when the next one's first bytes arrive."""
    yield from _start(tmp_path, lambda _conn, served: "serve" if served == 0 else "close_on_first_bytes")


@pytest.fixture
def resetting_after_read(tmp_path: Path) -> Iterator[Gateway]:
    yield from _start(tmp_path, lambda _conn, _served: "reset_after_read")


@pytest.fixture
def short_idle(tmp_path: Path) -> Iterator[Gateway]:
    """Envoy's model idle timeout shortened so the test need not wait the real one out."""
    timeouts = dataclasses.replace(envoy_config.DEFAULT_TIMEOUTS, upstream_idle=0.5)
    yield from _start(tmp_path, lambda _conn, _served: "serve", timeouts)


def test_a_request_on_a_connection_the_server_closes_on_reuse_is_not_replayed(closing_on_reuse: Gateway) -> None:
    """The keep-alive race over HTTP/1.1: Envoy has written the request before it learns of the close, so the
    server may have read it; reset-before-request does not apply and the client gets the JSON 503. (The idle
    timeout is what keeps a model server from closing a connection Envoy still reuses.)"""
    with httpx.Client(timeout=10) as client:
        assert _infer(client, closing_on_reuse, "first").status_code == 200
        second = _infer(client, closing_on_reuse, "second")
    seen = [s for s in closing_on_reuse.upstream.inference() if s.request_id == "second"]
    assert second.status_code == 503, second.text
    assert second.json()["error"]["code"] == "upstream_unavailable"
    assert len(seen) == 1 and not seen[0].complete


def test_a_request_the_server_read_and_then_reset_is_not_retried(resetting_after_read: Gateway) -> None:
    with httpx.Client(timeout=10) as client:
        response = _infer(client, resetting_after_read, "only")
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert [s.complete for s in resetting_after_read.upstream.inference() if s.request_id == "only"] == [True]


def test_envoy_closes_an_idle_model_connection_itself(short_idle: Gateway) -> None:
    with httpx.Client(timeout=10) as client:
        assert _infer(client, short_idle, "first").status_code == 200
    (used,) = {s.connection for s in short_idle.upstream.inference()}
    _wait_for(lambda: used in short_idle.upstream.closed_by_peer, "Envoy to close the idle model connection")
