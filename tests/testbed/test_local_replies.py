"""Replies Envoy makes itself arrive as the processor's JSON error, through the real Envoy 1.40 running the bed's
bootstrap (igw/envoy_config.bootstrap, its local_reply_config included): status unchanged, content-type
application/json, a code naming what happened and the request's x-request-id. Replies whose body we wrote (the
processor's refusals, the route config's JSON 404) and a model server's own error pass byte for byte.

The gateway runs the real processor and rate-limit service against a Redis of this module, in front of one
model server (`alpha`, whose answer a request header picks: slow, its own 503, or 200) and one model whose only
replica is never up (`beta`). `gamma` is registered with the processor but has no route in Envoy, so it gets the
route config's JSON 404. Active health checks run every 30 s instead of every second, so a processor frozen by a
test is still taken as healthy while its request waits: the timeout it meets is the processor's, never "no
healthy upstream". A second Envoy whose processor address has nothing listening answers the unreachable case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from ext_proc import decisions, store
from ext_proc.responses import error_body
from igw import envoy_config
from igw.launcher import _envoy_hosts_healthy, envoy_args, envoy_binary
from igw.procs import ManagedProcess, RedisServer, free_port, http_ok
from igw.topology import (
    EXT_PROC_CLUSTER,
    RATELIMIT_CLUSTER,
    Endpoint,
    ServiceEndpoint,
    Topology,
    free_topology,
    model_cluster_name,
)
from tests.helpers import Service, ServiceFactory

MODELS = ("alpha", "beta")
UNROUTED_MODEL = "gamma"
REPLY_HEADER = "x-test-reply"  # which answer the model server gives: "slow", "own-503", or 200
OWN_503_BODY = b'{"model":"overloaded","retry_in":"soon"}'
OWN_503_TYPE = "application/vnd.model-server+json"
TENANT_TIMEOUT_MS = 1000  # the processor sets it as the upstream timeout
TENANT_MAX_BODY = 4096
RATE_LIMITS = """domain: igw
descriptors:
  - key: tenant
    value: limited
    rate_limit: {unit: second, requests_per_unit: 0}
"""
TIMEOUTS = dataclasses.replace(envoy_config.DEFAULT_TIMEOUTS, health_interval=30.0)
JSON = "application/json"


@dataclass
class Bed:
    url: str
    unreachable_processor_url: str
    processor: Service
    redis: RedisServer
    key: str  # tenant acme
    limited_key: str  # tenant limited: every request over its limit
    fresh_key: str  # never used before the test that sends it, so never in the processor's cache


class _ModelServer(BaseHTTPRequestHandler):
    release = threading.Event()  # set at teardown: a slow answer waits for it, not for the clock

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        reply = self.headers.get(REPLY_HEADER)
        if reply == "slow":
            self.release.wait(30)
        status, body, kind = (503, OWN_503_BODY, OWN_503_TYPE) if reply == "own-503" else (200, b"{}", JSON)
        with contextlib.suppress(OSError):  # Envoy has given up on a slow answer
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def _seed(redis_url: str) -> tuple[str, str, str]:
    client = store.connect(redis_url)
    try:
        for model in (*MODELS, UNROUTED_MODEL):
            store.register_model(client, model)
        store.create_tenant(client, "acme", department="d", tier="standard", models="*",
                            timeout_ms=TENANT_TIMEOUT_MS, max_body_bytes=TENANT_MAX_BODY)
        store.create_tenant(client, "limited", department="d", tier="standard", models="*")
        return (store.issue_key(client, "acme").key, store.issue_key(client, "limited").key,
                store.issue_key(client, "acme").key)
    finally:
        client.close()


def _start_envoy(name: str, topology: Topology, work: Path, expected: dict[str, set[str]]) -> ManagedProcess:
    config = envoy_config.bootstrap(topology, access_log_path=str(work / f"{name}-access.log"), timeouts=TIMEOUTS)
    path = work / f"{name}.yaml"
    path.write_text(envoy_config.render_yaml(config, "local replies test"))
    envoy = ManagedProcess(name, [envoy_binary(), *envoy_args(str(path), base_id=topology.admin.port)],
                           log_dir=work).start()
    try:
        envoy.wait_ready(lambda: http_ok(f"{topology.admin_url}/ready"), 20, "ready")
        envoy.wait_ready(lambda: _envoy_hosts_healthy(topology.admin_url, expected), 20, "upstream hosts healthy")
    except BaseException:
        envoy.stop()
        raise
    return envoy


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("local-replies")
    _ModelServer.release.clear()
    redis = RedisServer(log_dir=work).start()
    services = ServiceFactory(work)
    model = ThreadingHTTPServer(("127.0.0.1", 0), _ModelServer)
    threading.Thread(target=model.serve_forever, daemon=True).start()
    envoys: list[ManagedProcess] = []
    try:
        key, limited_key, fresh_key = _seed(redis.url)
        (work / "ratelimit").mkdir()
        (work / "ratelimit" / "igw.yaml").write_text(RATE_LIMITS)
        processor = services.start_module("ext_proc", "--redis-url", redis.url)
        ratelimit = services.ratelimit(work / "ratelimit", redis.url)

        def endpoint(service: Service) -> ServiceEndpoint:
            return ServiceEndpoint(Endpoint("127.0.0.1", service.grpc_port), Endpoint("127.0.0.1", service.http_port))

        alpha = Endpoint("127.0.0.1", model.server_address[1])
        topology = dataclasses.replace(
            free_topology(MODELS), models={"alpha": (alpha,), "beta": (Endpoint("127.0.0.1", free_port()),)},
            ext_proc=(endpoint(processor),), ratelimit=(endpoint(ratelimit),))
        healthy = {model_cluster_name("alpha"): {alpha.address},
                   EXT_PROC_CLUSTER: {f"127.0.0.1:{processor.grpc_port}"},
                   RATELIMIT_CLUSTER: {f"127.0.0.1:{ratelimit.grpc_port}"}}
        envoys.append(_start_envoy("envoy-local-replies", topology, work, healthy))

        nobody = Endpoint("127.0.0.1", free_port())
        orphan = dataclasses.replace(free_topology(MODELS), models=topology.models, ratelimit=topology.ratelimit,
                                     ext_proc=(ServiceEndpoint(nobody, nobody),))
        del healthy[EXT_PROC_CLUSTER]
        envoys.append(_start_envoy("envoy-no-processor", orphan, work, healthy))
        yield Bed(topology.gateway_url, orphan.gateway_url, processor, redis, key, limited_key, fresh_key)
    finally:
        _ModelServer.release.set()
        for envoy in envoys:
            envoy.stop()
        services.stop_all()
        model.shutdown()
        model.server_close()
        redis.stop()


def _infer(bed: Bed, model: str, key: str | None, **headers: str) -> httpx.Response:
    sent = {"content-type": JSON, "x-request-id": "lr-test-1", **headers}
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    return httpx.post(f"{bed.url}/v2/models/{model}/infer", content=b"{}", headers=sent, timeout=10)


def _assert_json_error(response: httpx.Response, status: int, code: str, request_id: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == JSON
    assert response.json()["error"]["code"] == code
    assert isinstance(response.json()["error"]["message"], str) and response.json()["error"]["message"]
    assert response.headers.get("x-request-id") == request_id


def _raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a request sent as written: what httpx would refuse to send (HTTP/1.0,
    malformed requests). Envoy closes such connections after its answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


# ------------------------------------------------------------------------------ Envoy's own replies, mapped


def test_a_model_without_a_healthy_replica_gets_503_no_healthy_upstream(bed: Bed) -> None:
    _assert_json_error(_infer(bed, "beta", bed.key), 503, "no_healthy_upstream", "lr-test-1")


def test_a_model_server_slower_than_the_tenants_timeout_gets_504_upstream_timeout(bed: Bed) -> None:
    _assert_json_error(_infer(bed, "alpha", bed.key, **{REPLY_HEADER: "slow"}), 504, "upstream_timeout", "lr-test-1")


def test_an_unreachable_processor_gets_503_processor_unavailable(bed: Bed) -> None:
    response = httpx.post(f"{bed.unreachable_processor_url}/v2/models/alpha/infer", content=b"{}", timeout=10,
                          headers={"authorization": f"Bearer {bed.key}", "x-request-id": "lr-test-2"})
    _assert_json_error(response, 503, "processor_unavailable", "lr-test-2")


def test_a_processor_that_stops_answering_gets_504_processor_unavailable(bed: Bed) -> None:
    # Envoy 1.40 answers a missed message_timeout with 504, whatever status_on_error says.
    bed.processor.proc.signal(signal.SIGSTOP)
    try:
        response = _infer(bed, "alpha", bed.key)
    finally:
        bed.processor.proc.signal(signal.SIGCONT)
    _assert_json_error(response, 504, "processor_unavailable", "lr-test-1")


def test_a_rate_limited_request_gets_429_rate_limited(bed: Bed) -> None:
    _assert_json_error(_infer(bed, "alpha", bed.limited_key), 429, "rate_limited", "lr-test-1")


def test_the_rate_limited_429_keeps_the_rate_limit_filters_headers(bed: Bed) -> None:
    response = _infer(bed, "alpha", bed.limited_key)
    assert response.status_code == 429
    assert response.headers["x-envoy-ratelimited"] == "true"
    assert response.headers["x-ratelimit-remaining"] == "0"


@pytest.mark.parametrize("headers", [{f"x-filler-{i}": "v" for i in range(120)}, {"x-filler": "v" * 70_000}],
                         ids=["over 100 headers", "over 60 KiB"])
def test_too_many_or_too_large_headers_get_431_headers_too_large(bed: Bed, headers: dict[str, str]) -> None:
    response = httpx.post(f"{bed.url}/v2/models/alpha/infer", content=b"{}", headers=headers, timeout=10)
    # Refused before Envoy reads the headers: there is no request id to echo.
    _assert_json_error(response, 431, "headers_too_large", None)


def test_an_http_1_0_request_gets_426_upgrade_required(bed: Bed) -> None:
    status, headers, body = _raw(bed.url, b"POST /v2/models/alpha/infer HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}")
    assert (status, headers["content-type"], json.loads(body)["error"]["code"]) == (426, JSON, "upgrade_required")


def test_a_malformed_request_gets_400_bad_request(bed: Bed) -> None:
    status, headers, body = _raw(bed.url, b"POST /v2/models/alpha/infer HTTP/1.1\r\nhost: gw\r\nno colon here\r\n\r\n")
    assert (status, headers["content-type"], json.loads(body)["error"]["code"]) == (400, JSON, "bad_request")


# ---------------------------------------------------------------------- replies that pass byte for byte


@pytest.mark.parametrize(("path", "body", "key", "denial"), [
    ("/v2/models/alpha/infer", b"{}", False, decisions.MISSING_KEY),
    ("/v2/models/nope/infer", b"{}", True, decisions.model_not_found("nope")),  # the status of no_route
    ("/v1/chat/completions", b'{"model": ', True, decisions.INVALID_JSON),  # the status of bad_request
    ("/v2/models/alpha/infer", b"{}" + b" " * TENANT_MAX_BODY, True,
     decisions.body_too_large(TENANT_MAX_BODY)),  # the status of request_too_large
], ids=["401 missing key", "404 unknown model", "400 invalid json", "413 body over the tenant's limit"])
def test_the_processors_refusals_pass_byte_for_byte(
        bed: Bed, path: str, body: bytes, key: bool, denial: decisions.Denial) -> None:
    headers = {"content-type": JSON, "x-request-id": "lr-test-3"}
    if key:
        headers["authorization"] = f"Bearer {bed.key}"
    response = httpx.post(bed.url + path, content=body, headers=headers, timeout=10)
    assert response.status_code == denial.status
    assert response.content == error_body(denial)
    assert (response.headers["content-type"], response.headers["x-request-id"]) == (JSON, "lr-test-3")
    assert [(k, response.headers[k]) for k, _ in denial.headers] == list(denial.headers)


def test_the_processors_own_503_passes_byte_for_byte(bed: Bed) -> None:
    # Redis frozen: the processor cannot check a key it has not cached and answers 503 itself.
    os.kill(bed.redis.pid, signal.SIGSTOP)
    try:
        response = _infer(bed, "alpha", bed.fresh_key)
    finally:
        os.kill(bed.redis.pid, signal.SIGCONT)
    assert response.status_code == 503
    assert response.content == error_body(decisions.BACKEND_UNAVAILABLE)
    assert (response.headers["content-type"], response.headers["retry-after"]) == (JSON, "1")


def test_the_route_configs_json_404_passes_byte_for_byte(bed: Bed) -> None:
    # The processor accepts `gamma`; Envoy has no route for it and answers with the route config's 404.
    response = _infer(bed, UNROUTED_MODEL, bed.key)
    expected = envoy_config.unknown_model_route()["direct_response"]["body"]["inline_string"].encode()
    assert (response.status_code, response.content, response.headers["content-type"]) == (404, expected, JSON)
    assert "x-request-id" not in response.headers  # what a local-reply mapper would have added


def test_a_model_servers_own_503_passes_unchanged(bed: Bed) -> None:
    response = _infer(bed, "alpha", bed.key, **{REPLY_HEADER: "own-503"})
    assert (response.status_code, response.content, response.headers["content-type"]) == (
        503, OWN_503_BODY, OWN_503_TYPE)
    assert "x-request-id" not in response.headers


# ------------------------------------------------- Envoy's own 408 and 413, from a gateway with tighter limits

HEADERS_TIMEOUT = 1.0  # seconds; short so that waiting for the 408 stays quick
BUFFER_LIMIT = 1024  # bytes the buffer filter put in front of the bed's filters accepts
BUFFER_FILTER = {"name": "envoy.filters.http.buffer", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": BUFFER_LIMIT}}


@pytest.fixture(scope="module")
def strict_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bed's bootstrap, local_reply_config included, with a 1 s request_headers_timeout and Envoy's buffer
    filter in front of the bed's filters: the bed itself does not make these replies in a test's time (its headers
    timeout is 10 s, and its only buffering filter is ext_proc, whose over-limit body was reported in review to
    end in a 408 after stream_idle_timeout, not a 413). Both replies come before any upstream is asked, so
    nothing needs to listen behind this Envoy."""
    work = tmp_path_factory.mktemp("local-replies-strict")
    topology = free_topology(MODELS)
    timeouts = dataclasses.replace(TIMEOUTS, request_headers=HEADERS_TIMEOUT)
    config = envoy_config.bootstrap(topology, access_log_path=str(work / "access.log"), timeouts=timeouts)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [BUFFER_FILTER, *hcm["http_filters"]]
    path = work / "envoy-strict.yaml"
    path.write_text(envoy_config.render_yaml(config, "local replies test, tighter limits"))
    envoy = ManagedProcess("envoy-strict", [envoy_binary(), *envoy_args(str(path), base_id=topology.admin.port)],
                           log_dir=work).start()
    try:
        envoy.wait_ready(lambda: http_ok(f"{topology.admin_url}/ready"), 20, "ready")
        yield topology.gateway_url
    finally:
        envoy.stop()


def test_headers_not_finished_in_time_get_408_request_timeout(strict_url: str) -> None:
    # Headers begun, never ended: request_headers_timeout answers before any header is processed.
    status, headers, body = _raw(strict_url, b"POST /v2/models/alpha/infer HTTP/1.1\r\nhost: gw\r\nx-request-id: lr")
    assert (status, headers["content-type"], json.loads(body)) == (
        408, JSON, json.loads(envoy_config.local_reply_body(envoy_config.local_reply("request_timeout"))))


def test_a_body_over_envoys_buffer_limit_gets_413_request_too_large(strict_url: str) -> None:
    response = httpx.post(f"{strict_url}/v2/models/alpha/infer", content=b" " * (4 * BUFFER_LIMIT), timeout=10,
                          headers={"content-type": JSON, "x-request-id": "lr-test-4"})
    _assert_json_error(response, 413, "request_too_large", "lr-test-4")
    assert response.json() == json.loads(envoy_config.local_reply_body(envoy_config.local_reply("request_too_large")))
