"""ext_proc's gRPC port over TLS and mutual TLS (GRPC_SERVER_USE_TLS, GRPC_SERVER_TLS_CERT/KEY,
GRPC_CLIENT_TLS_CACERT/SAN, the rate-limit service's names): real ext_proc processes, gRPC clients with
throwaway trustme CAs, certificate rotation without a restart, --workers, Envoy 1.40 reaching ext_proc through
an UpstreamTlsContext, and the one-line startup errors."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
import trustme
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.envoy_config import UpstreamTls, service_cluster
from igw.grpclib_server import GrpclibBackend
from igw.procs import VENV_BIN, ManagedProcess, free_port, http_ok
from igw.service_runtime import san_matches
from igw.tls import ServerFiles
from igw.topology import Endpoint
from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import ExtProcClient, allowed_headers, request_headers
from tests.ext_proc.test_envoy import _Echo, envoy_config
from tests.helpers import Service, ServiceFactory, assert_one_line_error
from tests.tls_pki import CLIENT_SAN, Pem, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_flags(cert: Path, key: Path, client_ca: Path | None = None, san: str = "") -> list[str]:
    flags = ["--grpc-server-use-tls", "true", "--grpc-server-tls-cert", str(cert), "--grpc-server-tls-key", str(key)]
    if client_ca is not None:
        flags += ["--grpc-client-tls-cacert", str(client_ca)]
    if san:
        flags += ["--grpc-client-tls-san", san]
    return flags


def start(services: ServiceFactory, world: World, *flags: str) -> Service:
    return services.start_module("ext_proc", "--redis-url", world.redis_url, *flags)


class TlsExtProcClient(ExtProcClient):
    """ExtProcClient over TLS: trusts `ca`, presents `client` when given."""

    def __init__(self, target: str, ca: Path, client: Pem | None = None) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=client.key.read_bytes() if client else None,
            certificate_chain=client.cert.read_bytes() if client else None)
        self.channel = grpc.secure_channel(target, credentials)
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)


def authenticate(client: ExtProcClient, world: World) -> str | grpc.StatusCode:
    """The tenant ext_proc sets for acme's key, or the status the call failed with. One new channel per
    call, so each call is a new connection and a new handshake."""
    try:
        response = client.one(request_headers(key=world.acme_key))
        return allowed_headers(response).set["x-igw-tenant"]
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        client.close()


def wait_for_log(service: Service, needle: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in service.proc.tail(200):
        assert time.monotonic() < deadline, service.proc.tail()
        time.sleep(0.05)


# --- TLS and mutual TLS ------------------------------------------------------------------------------------------


@pytest.fixture
def tls_ext_proc(services: ServiceFactory, world: World, pki: Pki) -> Service:
    return start(services, world, *tls_flags(pki.server.cert, pki.server.key))


@pytest.fixture
def mtls_ext_proc(services: ServiceFactory, world: World, pki: Pki) -> Service:
    return start(services, world, *tls_flags(pki.server.cert, pki.server.key, pki.ca))


def test_a_tls_ext_proc_answers_a_client_that_trusts_its_ca(tls_ext_proc: Service, world: World, pki: Pki) -> None:
    assert authenticate(TlsExtProcClient(tls_ext_proc.grpc_target, pki.ca), world) == "acme"


def test_a_tls_ext_proc_refuses_a_plain_text_client(tls_ext_proc: Service, world: World) -> None:
    assert authenticate(ExtProcClient(tls_ext_proc.grpc_target), world) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_certificate_gets_no_answer(
        tls_ext_proc: Service, world: World, pki: Pki) -> None:
    assert authenticate(TlsExtProcClient(tls_ext_proc.grpc_target, pki.rogue_ca), world) == grpc.StatusCode.UNAVAILABLE


def test_the_ready_line_says_the_grpc_port_serves_tls(tls_ext_proc: Service) -> None:
    wait_for_log(tls_ext_proc, f"grpc={tls_ext_proc.grpc_target} (TLS)")


def test_with_a_client_ca_a_client_without_a_certificate_is_refused(
        mtls_ext_proc: Service, world: World, pki: Pki) -> None:
    assert authenticate(TlsExtProcClient(mtls_ext_proc.grpc_target, pki.ca), world) == grpc.StatusCode.UNAVAILABLE


def test_with_a_client_ca_a_client_certificate_that_ca_signed_is_served(
        mtls_ext_proc: Service, world: World, pki: Pki) -> None:
    assert authenticate(TlsExtProcClient(mtls_ext_proc.grpc_target, pki.ca, pki.client), world) == "acme"


def test_with_a_client_ca_a_client_certificate_of_another_ca_is_refused(
        mtls_ext_proc: Service, world: World, pki: Pki) -> None:
    client = TlsExtProcClient(mtls_ext_proc.grpc_target, pki.ca, pki.rogue_client)
    assert authenticate(client, world) == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_without_the_required_san_is_refused(
        services: ServiceFactory, world: World, pki: Pki) -> None:
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, pki.ca, san="envoy.example.com"))
    client = TlsExtProcClient(svc.grpc_target, pki.ca, pki.client)
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.one(request_headers(key=world.acme_key))
    finally:
        client.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "envoy.example.com" in (info.value.details() or "")
    wait_for_log(svc, "do not include envoy.example.com")


def test_a_client_certificate_with_the_required_san_is_served(
        services: ServiceFactory, world: World, pki: Pki) -> None:
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, pki.ca, san=CLIENT_SAN))
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca, pki.client), world) == "acme"


def test_the_san_check_covers_the_health_service_too(services: ServiceFactory, world: World, pki: Pki) -> None:
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, pki.ca, san="envoy.example.com"))
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client.key.read_bytes(),
                                               pki.client.cert.read_bytes())
    with grpc.secure_channel(svc.grpc_target, credentials) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_dns_wildcard_certificate_does_not_pass_for_a_required_ip_san(
        services: ServiceFactory, world: World, pki: Pki, tmp_path: Path) -> None:
    clients = trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients.crt"))
    wildcard = Pem(tmp_path / "wildcard.crt", tmp_path / "wildcard.key")
    leaf = clients.issue_cert("*.0.0.1")  # a DNS name, which the old matcher let stand for 10.0.0.1
    leaf.cert_chain_pems[0].write_to_path(str(wildcard.cert))
    leaf.private_key_pem.write_to_path(str(wildcard.key))
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, tmp_path / "clients.crt", "10.0.0.1"))
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca, wildcard), world) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("wanted", "kind", "value", "matches"), [
    ("10.0.0.1", "IP Address", "10.0.0.1", True),
    ("10.0.0.1", "DNS", "10.0.0.1", False),  # a DNS name spelled like the address is not the address
    ("spiffe://cluster.local/ns/igw/sa/gw", "URI", "spiffe://cluster.local/ns/igw/sa/gw", True),
    ("spiffe://cluster.local/ns/igw/sa/gw", "DNS", "spiffe://cluster.local/ns/igw/sa/gw", False),
    ("envoy.example.com", "DNS", "*.example.com", True),
    ("envoy.example.com", "URI", "envoy.example.com", False),
])
def test_ext_proc_matches_a_san_only_by_an_entry_of_the_same_kind(
        wanted: str, kind: str, value: str, matches: bool) -> None:
    """Python's ssl tells ext_proc each SAN's kind (grpc does not tell the rate-limit service)."""
    assert san_matches(wanted, value, kind) is matches


def test_a_san_check_without_verified_client_certificates_is_refused_by_the_server_builder(pki: Pki) -> None:
    context = ServerFiles(str(pki.server.cert), str(pki.server.key)).h2_context()
    with pytest.raises(ValueError, match="verified client certificates"):
        GrpclibBackend([], ssl_context=context, client_san=CLIENT_SAN)


def test_each_of_several_workers_serves_tls(services: ServiceFactory, world: World, pki: Pki) -> None:
    svc = start(services, world, "--workers", "2", *tls_flags(pki.server.cert, pki.server.key, pki.ca))
    for _ in range(8):  # new connections, spread over the workers by the kernel
        assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca, pki.client), world) == "acme"
    ready = re.findall(r"ext_proc ready: grpc=\S+ \(mutual TLS\) .* pid=(\d+)", svc.proc.tail(200))
    assert len(set(ready)) == 2, svc.proc.tail()


# --- rotation ----------------------------------------------------------------------------------------------------


def _swap(path: Path, blob: trustme.Blob | bytes) -> None:
    """What a Kubernetes secret update or cert-manager does: the new file appears at once, whole."""
    temporary = path.with_suffix(".tmp")
    if isinstance(blob, bytes):
        temporary.write_bytes(blob)
    else:
        blob.write_to_path(str(temporary))
    os.replace(temporary, path)


@pytest.fixture
def rotating(tmp_path: Path, pki: Pki) -> Pem:
    """A copy of the server's certificate and key that a test may replace."""
    pem = Pem(tmp_path / "tls.crt", tmp_path / "tls.key")
    pem.cert.write_bytes(pki.server.cert.read_bytes())
    pem.key.write_bytes(pki.server.key.read_bytes())
    return pem


def test_a_rotated_server_certificate_is_used_for_new_connections_without_a_restart(
        services: ServiceFactory, world: World, pki: Pki, rotating: Pem, tmp_path: Path) -> None:
    svc = start(services, world, *tls_flags(rotating.cert, rotating.key))
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca), world) == "acme"
    new_ca = trustme.CA()
    new_ca.cert_pem.write_to_path(str(tmp_path / "new-ca.crt"))
    renewed = new_ca.issue_cert("127.0.0.1")
    _swap(rotating.key, renewed.private_key_pem)
    _swap(rotating.cert, renewed.cert_chain_pems[0])
    assert authenticate(TlsExtProcClient(svc.grpc_target, tmp_path / "new-ca.crt"), world) == "acme"
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca), world) == grpc.StatusCode.UNAVAILABLE
    wait_for_log(svc, "TLS files reloaded")


def test_a_connection_open_before_a_rotation_keeps_working(
        services: ServiceFactory, world: World, pki: Pki, rotating: Pem) -> None:
    svc = start(services, world, *tls_flags(rotating.cert, rotating.key))
    client = TlsExtProcClient(svc.grpc_target, pki.ca)
    try:
        assert allowed_headers(client.one(request_headers(key=world.acme_key))).set["x-igw-tenant"] == "acme"
        renewed = trustme.CA().issue_cert("127.0.0.1")
        _swap(rotating.key, renewed.private_key_pem)
        _swap(rotating.cert, renewed.cert_chain_pems[0])
        assert allowed_headers(client.one(request_headers(key=world.acme_key))).set["x-igw-tenant"] == "acme"
    finally:
        client.close()


def test_a_broken_new_certificate_is_logged_and_the_current_one_kept(
        services: ServiceFactory, world: World, pki: Pki, rotating: Pem) -> None:
    svc = start(services, world, *tls_flags(rotating.cert, rotating.key))
    _swap(rotating.cert, b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca), world) == "acme"
    wait_for_log(svc, f"keeping the current ones: GRPC_SERVER_TLS_CERT (--grpc-server-tls-cert) {rotating.cert}")


def test_a_key_that_does_not_match_the_new_certificate_is_logged_and_the_current_pair_kept(
        services: ServiceFactory, world: World, pki: Pki, rotating: Pem) -> None:
    svc = start(services, world, *tls_flags(rotating.cert, rotating.key))
    _swap(rotating.cert, trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0])  # its key not written yet
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca), world) == "acme"
    wait_for_log(svc, "does not match")


def test_a_rotated_client_ca_replaces_the_old_one(
        services: ServiceFactory, world: World, pki: Pki, tmp_path: Path) -> None:
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(pki.ca.read_bytes())
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, client_ca))
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca, pki.client), world) == "acme"
    _swap(client_ca, pki.rogue_ca.read_bytes())
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca, pki.rogue_client), world) == "acme"
    assert authenticate(TlsExtProcClient(svc.grpc_target, pki.ca, pki.client), world) == grpc.StatusCode.UNAVAILABLE


def _tls12_handshake(target: str, context: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLSession:
    """A bare TLS 1.2 handshake (what a BoringSSL client such as Envoy's may resume by session ID); its
    session, after checking whether the given one was resumed."""
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host, session=session) as tls:
        assert tls.session_reused is (session is not None), "resumption did not go as expected"
        assert tls.recv(9)  # the server's HTTP/2 SETTINGS: the handshake is done on its side too
        session = tls.session
        assert session is not None
        with contextlib.suppress(ssl.SSLError):  # the server's frames may still arrive after our close_notify
            tls.unwrap()  # a clean close: OpenSSL drops the sessions of connections cut short from its cache
        return session


@pytest.mark.parametrize(("cipher", "served"), [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
    ("ECDHE-ECDSA-AES128-SHA256", False),  # CBC: on HTTP/2's blocklist (RFC 9113 9.2.2), and not in grpc's own list
])
def test_tls12_is_served_with_aead_ciphers_only(tls_ext_proc: Service, pki: Pki, cipher: str, served: bool) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    context.set_alpn_protocols(["h2"])
    if served:
        session = _tls12_handshake(tls_ext_proc.grpc_target, context, None)
        assert session is not None
    else:
        with pytest.raises(ssl.SSLError):
            _tls12_handshake(tls_ext_proc.grpc_target, context, None)


def test_a_tls12_session_from_before_a_client_ca_rotation_cannot_be_resumed(
        services: ServiceFactory, world: World, pki: Pki, tmp_path: Path) -> None:
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(pki.ca.read_bytes())
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, client_ca))
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    session = _tls12_handshake(svc.grpc_target, context, None)
    session = _tls12_handshake(svc.grpc_target, context, session)  # resumption works while nothing changed
    _swap(client_ca, pki.rogue_ca.read_bytes())  # pki.client is no longer trusted
    with pytest.raises(ssl.SSLError):
        _tls12_handshake(svc.grpc_target, context, session)


def test_the_redis_password_is_not_in_the_log(services: ServiceFactory) -> None:
    url = f"redis://igw:n0t-in-logs@127.0.0.1:{free_port()}/0"  # nothing listens there
    svc = services.start_module("ext_proc", "--redis-url", url, wait_healthy=False)
    wait_for_log(svc, "redis=redis://igw:***@127.0.0.1")
    wait_for_log(svc, "cannot connect to redis at redis://igw:***@127.0.0.1")
    assert "n0t-in-logs" not in svc.proc.tail(500)


# --- Envoy through an UpstreamTlsContext -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def run_envoy(ext_proc: Service, model_port: int, tls: UpstreamTls, log_dir: Path, tmp_path: Path) -> ManagedProcess:
    """test_envoy.py's gateway, its ext_proc cluster swapped for the shipped builder's with TLS."""
    listen, admin = free_port(), free_port()
    config = envoy_config(listen, ext_proc.grpc_port, model_port)
    clusters = config["static_resources"]["clusters"]
    clusters[:] = [service_cluster("ext_proc", [Endpoint("127.0.0.1", ext_proc.grpc_port)], tls=tls),
                   *(c for c in clusters if c["name"] != "ext_proc")]
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    envoy = ManagedProcess("envoy-ext-proc-tls", [str(VENV_BIN / "envoy"), "-c", str(path), "--concurrency", "1",
                                                  "--disable-hot-restart", "-l", "warning"], log_dir=log_dir).start()
    envoy.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
    envoy.listen = listen  # type: ignore[attr-defined]
    return envoy


def test_envoy_authenticates_and_routes_through_a_mutual_tls_ext_proc_cluster(
        services: ServiceFactory, world: World, pki: Pki, model_server: int, log_dir: Path, tmp_path: Path) -> None:
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, pki.ca, san=CLIENT_SAN))
    tls = UpstreamTls(str(pki.ca), server_name="localhost", cert_file=str(pki.client.cert),
                      key_file=str(pki.client.key))
    envoy = run_envoy(svc, model_server, tls, log_dir, tmp_path)
    try:
        base = f"http://127.0.0.1:{envoy.listen}"  # type: ignore[attr-defined]
        routed = httpx.post(f"{base}/v2/models/llama/infer", content=b"{}", timeout=5, headers={
            "authorization": f"Bearer {world.acme_key}", "content-type": "application/json"})
        refused = httpx.post(f"{base}/v2/models/llama/infer", content=b"{}", timeout=5,
                             headers={"content-type": "application/json"})
    finally:
        envoy.stop()
    assert routed.status_code == 200, routed.text
    seen = routed.json()["headers"]
    assert (seen["x-igw-tenant"], seen["x-igw-model"]) == ("acme", "llama-3-8b") and "authorization" not in seen
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize(("server_name", "status"), [
    ("localhost", 200),
    ("127.0.0.1", 200),  # an IP address is matched against the certificate's IP SANs, not its DNS ones
    ("other.example.com", 503),  # a certificate of the right CA for another name is refused
])
def test_envoy_checks_the_server_name_in_the_ext_proc_certificate(
        services: ServiceFactory, world: World, pki: Pki, model_server: int, log_dir: Path, tmp_path: Path,
        server_name: str, status: int) -> None:
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key))
    envoy = run_envoy(svc, model_server, UpstreamTls(str(pki.ca), server_name=server_name), log_dir, tmp_path)
    try:
        response = httpx.post(f"http://127.0.0.1:{envoy.listen}/v2/models/llama/infer",  # type: ignore[attr-defined]
                              content=b"{}", timeout=5, headers={"authorization": f"Bearer {world.acme_key}",
                                                                 "content-type": "application/json"})
    finally:
        envoy.stop()
    assert response.status_code == status, response.text


def test_envoy_without_the_client_certificate_fails_closed(
        services: ServiceFactory, world: World, pki: Pki, model_server: int, log_dir: Path, tmp_path: Path) -> None:
    svc = start(services, world, *tls_flags(pki.server.cert, pki.server.key, pki.ca))
    envoy = run_envoy(svc, model_server, UpstreamTls(str(pki.ca), server_name="localhost"), log_dir, tmp_path)
    try:
        response = httpx.post(f"http://127.0.0.1:{envoy.listen}/v2/models/llama/infer",  # type: ignore[attr-defined]
                              content=b"{}", timeout=5, headers={"authorization": f"Bearer {world.acme_key}",
                                                                 "content-type": "application/json"})
    finally:
        envoy.stop()
    assert response.status_code == 503  # the ext_proc filter's status_on_error: no request passes unauthenticated


# --- bad settings stop the start, in one line --------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "ext_proc", "--redis-url", "redis://127.0.0.1:1/0", *args],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr


@pytest.fixture
def bad(tmp_path: Path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    truncated = tmp_path / "truncated.pem"
    truncated.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return {"missing": tmp_path / "missing.pem", "garbage": garbage, "truncated": truncated, "directory": tmp_path}


def test_a_missing_server_certificate_file_is_named(bad: dict[str, Path], pki: Pki) -> None:
    code, err = run_cli(env={"GRPC_SERVER_USE_TLS": "true", "GRPC_SERVER_TLS_CERT": str(bad["missing"]),
                             "GRPC_SERVER_TLS_KEY": str(pki.server.key)})
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_CERT", str(bad["missing"]), "cannot read")


def test_an_unreadable_key_file_is_named(bad: dict[str, Path], pki: Pki) -> None:
    code, err = run_cli(*tls_flags(pki.server.cert, bad["directory"]))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_KEY", str(bad["directory"]), "cannot read")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_a_malformed_server_certificate_is_named(bad: dict[str, Path], pki: Pki, kind: str) -> None:
    code, err = run_cli(*tls_flags(bad[kind], pki.server.key))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_CERT", str(bad[kind]), "not a PEM certificate")


def test_a_malformed_key_is_named(bad: dict[str, Path], pki: Pki) -> None:
    code, err = run_cli(*tls_flags(pki.server.cert, bad["garbage"]))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_KEY", str(bad["garbage"]), "not a PEM private key")


def test_a_key_of_another_certificate_is_named(pki: Pki) -> None:
    code, err = run_cli(*tls_flags(pki.server.cert, pki.client.key))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_KEY", str(pki.client.key), "does not match")


def test_tls_without_a_key_is_refused(pki: Pki) -> None:
    code, err = run_cli(env={"GRPC_SERVER_USE_TLS": "true", "GRPC_SERVER_TLS_CERT": str(pki.server.cert)})
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_KEY", "is not set")


def test_a_certificate_without_tls_on_is_refused(pki: Pki) -> None:
    code, err = run_cli("--grpc-server-tls-cert", str(pki.server.cert), "--grpc-server-tls-key", str(pki.server.key))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_CERT", "GRPC_SERVER_USE_TLS", "plain text")


def test_a_client_ca_without_tls_on_is_refused(pki: Pki) -> None:
    code, err = run_cli(env={"GRPC_CLIENT_TLS_CACERT": str(pki.ca)})
    assert_one_line_error(code, err, "GRPC_CLIENT_TLS_CACERT", "GRPC_SERVER_USE_TLS")


def test_a_malformed_client_ca_is_named(bad: dict[str, Path], pki: Pki) -> None:
    code, err = run_cli(*tls_flags(pki.server.cert, pki.server.key, bad["garbage"]))
    assert_one_line_error(code, err, "GRPC_CLIENT_TLS_CACERT", str(bad["garbage"]), "not a PEM CA certificate")


def test_a_san_without_a_client_ca_is_refused(pki: Pki) -> None:
    code, err = run_cli(*tls_flags(pki.server.cert, pki.server.key, san=CLIENT_SAN))
    assert_one_line_error(code, err, "GRPC_CLIENT_TLS_SAN", "GRPC_CLIENT_TLS_CACERT")


def test_with_several_workers_a_bad_file_stops_the_start_the_same_way(bad: dict[str, Path], pki: Pki) -> None:
    code, err = run_cli("--workers", "2", *tls_flags(pki.server.cert, bad["missing"]))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_KEY", str(bad["missing"]), "cannot read")


def test_an_upstream_tls_client_certificate_without_its_key_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        UpstreamTls(str(pki.ca), server_name="localhost", cert_file=str(pki.client.cert))
