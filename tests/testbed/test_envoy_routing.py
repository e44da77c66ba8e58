"""Model routing through the real Envoy: the bed's route config (x-igw-model looked up by the virtual host's
matcher) sends each model to its own cluster, whatever the path, and anything else to the JSON 404.

Envoy runs the bed's bootstrap with only the router filter (the header is sent by the test instead of
ext_proc) in front of two small HTTP servers, one per model, that name themselves in x-igw-replica.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from igw import envoy_config
from igw.launcher import _envoy_hosts_healthy, envoy_args, envoy_binary
from igw.procs import ManagedProcess, http_ok
from igw.topology import Endpoint, free_topology, model_cluster_name

MODELS = ("alpha", "beta")


def _server(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # health checks and test requests alike
            self.send_response(200)
            self.send_header("x-igw-replica", name)
            self.send_header("x-seen-path", self.path)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    servers = {m: _server(f"{m}-0") for m in MODELS}
    work = tmp_path_factory.mktemp("routing")
    topology = dataclasses.replace(
        free_topology(MODELS), models={m: (Endpoint("127.0.0.1", s.server_address[1]),) for m, s in servers.items()})
    config = envoy_config.bootstrap(topology, access_log_path=str(work / "access.log"))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [envoy_config.router_filter()]
    path = Path(work / "envoy.yaml")
    path.write_text(envoy_config.render_yaml(config, "routing test"))
    envoy = ManagedProcess("envoy-routing", [envoy_binary(), *envoy_args(str(path), base_id=topology.admin.port)],
                           log_dir=work)
    try:
        envoy.start()
        envoy.wait_ready(lambda: http_ok(f"{topology.admin_url}/ready"), 20, "ready")
        expected = {model_cluster_name(m): {e.address for e in topology.models[m]} for m in MODELS}
        envoy.wait_ready(lambda: _envoy_hosts_healthy(topology.admin_url, expected), 20, "model hosts healthy")
        yield topology.gateway_url
    finally:
        envoy.stop()
        for server in servers.values():
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("path", ["/v2/models/alpha/infer", "/v1/chat/completions", "/"])
def test_the_model_header_picks_that_models_cluster_whatever_the_path(gateway: str, path: str) -> None:
    with httpx.Client(timeout=5) as client:
        replicas = {m: client.get(gateway + path, headers={"x-igw-model": m}).headers.get("x-igw-replica")
                    for m in MODELS}
    assert replicas == {"alpha": "alpha-0", "beta": "beta-0"}


@pytest.mark.parametrize("headers", [{"x-igw-model": "gamma"}, {"x-igw-model": ""}, {}, {"x-igw-model": "ALPHA"}],
                         ids=["unknown", "empty", "missing", "other-case"])
def test_an_unknown_or_missing_model_gets_the_json_404(gateway: str, headers: dict[str, str]) -> None:
    response = httpx.get(gateway + "/v2/models/gamma/infer", headers=headers, timeout=5)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert "x-igw-replica" not in response.headers
    assert response.json()["error"]["code"] == "no_route"


def _raw_get(gateway: str, path: str) -> tuple[int, str | None]:
    """(status, the path the model server saw), over a plain socket: httpx resolves dot segments itself
    before sending, and the path must reach Envoy as written."""
    host, port = gateway.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: gw\r\nx-igw-model: alpha\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers.get("x-seen-path")


@pytest.mark.parametrize(("sent", "seen"), [
    ("/v1/models/beta:predict/../../models/alpha:predict", "/v1/models/alpha:predict"),
    ("/v2/models/./alpha/infer", "/v2/models/alpha/infer"),
    ("/v2//models///alpha/infer", "/v2/models/alpha/infer"),
    ("/v1/chat/%2e%2e/models/alpha:predict", "/v1/models/alpha:predict"),
], ids=["dot-dot", "dot", "repeated slashes", "percent-encoded dots"])
def test_paths_are_normalised_before_the_filters_see_them(gateway: str, sent: str, seen: str) -> None:
    # ext_proc authorises the model a path names: the model server must get that same path.
    assert _raw_get(gateway, sent) == (200, seen)


def test_a_percent_encoded_slash_in_a_model_name_reaches_the_model_server_as_sent(gateway: str) -> None:
    assert _raw_get(gateway, "/v2/models/meta%2Fllama/infer") == (200, "/v2/models/meta%2Fllama/infer")
