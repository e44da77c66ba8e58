"""The documented Envoy filter settings, end to end through the real Envoy 1.40: headers-only calls are
routed on x-igw-model, OpenAI-style calls after the BUFFERED mode override, refusals arrive as JSON,
and the model server sees the trusted headers but neither forged ones nor the API key."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from igw.envoy_config import ext_proc_filter
from igw.procs import VENV_BIN, ManagedProcess, free_port, port_open
from tests.ext_proc.conftest import World
from tests.helpers import Service


class _Echo(BaseHTTPRequestHandler):
    """A model server stand-in that answers with the headers and body it received."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        payload = json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": body.decode(errors="replace")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def envoy_config(listen: int, ext_proc_port: int, upstream_port: int) -> dict:
    """The shipped ext_proc filter settings (igw.envoy_config) around a one-model route."""
    def cluster(name: str, port: int, http2: bool) -> dict:
        c: dict = {"name": name, "type": "STATIC", "connect_timeout": "0.25s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]}}
        if http2:
            c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    routes = [{"match": {"prefix": "/", "headers": [{"name": "x-igw-model", "string_match": {"exact": model}}]},
               "route": {"cluster": "model"}} for model in ("llama-3-8b", "guarded")]
    return {"static_resources": {
        "listeners": [{"name": "in", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                     "HttpConnectionManager",
            "stat_prefix": "in",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                *routes, {"match": {"prefix": "/"}, "direct_response": {"status": 418}}]}]},
            "http_filters": [
                ext_proc_filter("ext_proc"),
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
        "clusters": [cluster("ext_proc", ext_proc_port, True), cluster("model", upstream_port, False)]}}


@pytest.fixture(scope="module")
def gateway(processor: Service, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    listen = free_port()
    config = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
    config.write_text(yaml.safe_dump(envoy_config(listen, processor.grpc_port, upstream.server_address[1])))
    envoy = ManagedProcess("envoy-ext-proc", [str(VENV_BIN / "envoy"), "-c", str(config), "--concurrency", "1",
                                              "--disable-hot-restart", "-l", "warning"], log_dir=log_dir).start()
    try:
        envoy.wait_ready(lambda: port_open("127.0.0.1", listen), 20, "listening")
        yield f"http://127.0.0.1:{listen}"
    finally:
        envoy.stop()
        upstream.shutdown()


def test_headers_only_call_is_routed_on_the_model_with_trusted_headers(gateway: str, world: World) -> None:
    response = httpx.post(f"{gateway}/v2/models/llama/infer", content=b"{}", timeout=5, headers={
        "authorization": f"Bearer {world.acme_key}", "content-type": "application/json",
        "x-igw-tenant": "initech", "x-igw-department": "sales"})
    assert response.status_code == 200, response.text
    seen = response.json()["headers"]
    assert (seen["x-igw-tenant"], seen["x-igw-department"], seen["x-igw-model"]) == ("acme", "research", "llama-3-8b")
    assert "authorization" not in seen


def test_openai_call_is_routed_on_the_model_named_in_its_body(gateway: str, world: World) -> None:
    body = json.dumps({"model": "llama", "prompt": "hi"})
    response = httpx.post(f"{gateway}/v1/completions", content=body, timeout=5, headers={
        "x-api-key": world.acme_key, "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["headers"]["x-igw-model"] == "llama-3-8b"
    assert response.json()["body"] == body


def test_refusal_reaches_the_client_as_json(gateway: str) -> None:
    response = httpx.post(f"{gateway}/v2/models/llama/infer", content=b"{}", timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_refusal_is_json_and_carries_the_clients_request_id(gateway: str) -> None:
    response = httpx.post(f"{gateway}/v2/models/llama/infer", content=b"{}", timeout=5,
                          headers={"x-request-id": "client-trace-7", "content-type": "application/json"})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "client-trace-7"


def test_headers_the_processor_is_not_sent_still_reach_the_model(gateway: str, world: World) -> None:
    response = httpx.post(f"{gateway}/v2/models/llama/infer", content=b"{}", timeout=5, headers={
        "authorization": f"Bearer {world.acme_key}", "content-type": "application/json",
        "cookie": "session=abc", "user-agent": "sdk/1.0", "x-custom": "kept"})
    assert response.status_code == 200, response.text
    seen = response.json()["headers"]
    assert (seen["cookie"], seen["user-agent"], seen["x-custom"]) == ("session=abc", "sdk/1.0", "kept")


def test_forged_internal_and_envoy_headers_are_stripped_whatever_their_case(gateway: str, world: World) -> None:
    response = httpx.post(f"{gateway}/v2/models/llama/infer", content=b"{}", timeout=5, headers={
        "x-api-key": world.acme_key, "content-type": "application/json",
        "X-IGW-Priority": "100", "X-Igw-Anything": "forged", "X-Envoy-Max-Retries": "9"})
    assert response.status_code == 200, response.text
    seen = response.json()["headers"]
    assert "x-igw-anything" not in seen and "x-envoy-max-retries" not in seen and "x-api-key" not in seen
    assert seen["x-igw-priority"] == "2"  # acme's, not the forged 100


def h2_post(url: str, path: str, headers: list[tuple[str, str]], body: bytes, trailers: list[tuple[str, str]]) -> int:
    """One HTTP/2 (prior knowledge) POST whose body is followed by trailers; httpx cannot send trailers."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    host, port = url.removeprefix("http://").split(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "gw"),
                              *headers])
        conn.send_data(1, body)
        conn.send_headers(1, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status = 0
        while True:
            data = sock.recv(65536)
            assert data, "connection closed before the response ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status
            sock.sendall(conn.data_to_send())


def test_a_streamed_body_ending_in_trailers_is_still_checked_to_its_end(gateway: str, world: World) -> None:
    headers = [("authorization", f"Bearer {world.acme_key}"), ("content-type", "application/json")]
    trailers = [("x-checksum", "abc")]
    # No content-length: STREAMED; the model is registered with body inspection (structural JSON check).
    assert h2_post(gateway, "/v2/models/guarded/infer", headers, b'{"inputs": [1, 2', trailers) == 400
    assert h2_post(gateway, "/v2/models/guarded/infer", headers, b'{"inputs": [1, 2]}', trailers) == 200


def test_a_body_with_a_content_length_and_trailers_is_routed_on_the_model_it_names(gateway: str,
                                                                                   world: World) -> None:
    # BUFFERED (content-length known): Envoy sends the body when the trailers arrive, without end_of_stream.
    headers = [("x-api-key", world.acme_key), ("content-type", "application/json")]
    good, bad = json.dumps({"model": "llama"}).encode(), json.dumps({"model": "mistral-7b"}).encode()
    assert h2_post(gateway, "/v1/completions", [*headers, ("content-length", str(len(good)))], good,
                   [("x-checksum", "abc")]) == 200
    assert h2_post(gateway, "/v1/completions", [*headers, ("content-length", str(len(bad)))], bad,
                   [("x-checksum", "abc")]) == 403
