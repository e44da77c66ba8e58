"""TLS and socket settings of the rate-limit service, as upstream names them: gRPC over TLS and mutual TLS
(GRPC_SERVER_USE_TLS, GRPC_SERVER_TLS_CERT/KEY, GRPC_CLIENT_TLS_CACERT/SAN), GRPC_UDS,
GRPC_MAX_CONNECTION_AGE(_GRACE), and Redis over TLS (REDIS_TLS*, rediss:// URLs). Throwaway CAs from
trustme; real service processes, a real TLS-only redis-server and a real Envoy."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import trustme
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.procs import RedisServer, RedisTlsFiles, free_port, port_open
from igw.redis_conn import RedisTls, parse_redis_url, with_tls
from igw.service_runtime import san_matches
from ratelimit_svc.settings import parse_settings
from tests.helpers import Service, ServiceFactory, assert_one_line_error
from tests.ratelimit.envoy_front import envoy_front, ok_backend
from tests.ratelimit.rls_client import OK, OVER, RlsClient, avoid_window_edges
from tests.ratelimit.test_adaptive import CONFIG as ADAPTIVE_CONFIG
from tests.ratelimit.test_adaptive import publish, wait_for_limit
from tests.tls_pki import Pem, Pki, make_pki

CONFIG = """
domain: tls
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: generic_key
    value: envoy
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: fast
    rate_limit: {unit: second, requests_per_unit: 2}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_flags(pki: Pki, *, client_ca: bool = False, san: str = "") -> list[str]:
    flags = ["--grpc-server-use-tls", "true", "--grpc-server-tls-cert", str(pki.server.cert),
             "--grpc-server-tls-key", str(pki.server.key)]
    if client_ca:
        flags += ["--grpc-client-tls-cacert", str(pki.ca)]
    if san:
        flags += ["--grpc-client-tls-san", san]
    return flags


class TlsRlsClient(RlsClient):
    """RlsClient over a TLS channel: trusts `ca`, presents `client` when given."""

    def __init__(self, target: str, ca: bytes, client: Pem | None = None) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=client.key.read_bytes() if client else None,
            certificate_chain=client.cert.read_bytes() if client else None,
        )
        self.channel = grpc.secure_channel(target, credentials)
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)
        self.domain = "tls"


def call_code(client: RlsClient, key: str = "k", value: str = "v") -> int | grpc.StatusCode:
    """The answer's overall code, or the gRPC status code of the failed call."""
    try:
        return client.call([(key, value)], timeout=3).overall_code
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        client.close()


# --- gRPC server TLS ---------------------------------------------------------------------------------------------


@pytest.fixture
def tls_service(services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki) -> Service:
    return services.ratelimit(config_dir, redis_url, *tls_flags(pki))


@pytest.fixture
def mtls_service(services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki) -> Service:
    return services.ratelimit(config_dir, redis_url, *tls_flags(pki, client_ca=True))


def test_a_tls_service_answers_a_client_that_trusts_its_ca(tls_service: Service, pki: Pki) -> None:
    assert call_code(TlsRlsClient(tls_service.grpc_target, pki.ca_pem)) == OK


def test_a_tls_service_refuses_a_plain_text_client(tls_service: Service) -> None:
    assert call_code(RlsClient(tls_service.grpc_target, domain="tls")) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_certificate_gets_no_answer(tls_service: Service, pki: Pki) -> None:
    rogue = TlsRlsClient(tls_service.grpc_target, pki.rogue_ca.read_bytes())
    assert call_code(rogue) == grpc.StatusCode.UNAVAILABLE


def test_with_a_client_ca_a_client_without_a_certificate_is_refused(mtls_service: Service, pki: Pki) -> None:
    assert call_code(TlsRlsClient(mtls_service.grpc_target, pki.ca_pem)) == grpc.StatusCode.UNAVAILABLE


def test_with_a_client_ca_a_client_certificate_that_ca_signed_is_served(mtls_service: Service, pki: Pki) -> None:
    assert call_code(TlsRlsClient(mtls_service.grpc_target, pki.ca_pem, pki.client)) == OK


def test_with_a_client_ca_a_client_certificate_of_another_ca_is_refused(mtls_service: Service, pki: Pki) -> None:
    rogue = TlsRlsClient(mtls_service.grpc_target, pki.ca_pem, pki.rogue_client)
    assert call_code(rogue) == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_without_the_required_san_is_refused(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki) -> None:
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki, client_ca=True, san="envoy.example.com"))
    client = TlsRlsClient(svc.grpc_target, pki.ca_pem, pki.client)
    assert call_code(client) == grpc.StatusCode.UNAUTHENTICATED
    deadline = time.monotonic() + 5
    while "do not include envoy.example.com" not in svc.proc.tail(50):
        assert time.monotonic() < deadline, svc.proc.tail()
        time.sleep(0.05)


def test_a_client_certificate_with_the_required_san_is_served(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki) -> None:
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki, client_ca=True, san="client.example.com"))
    assert call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem, pki.client)) == OK


def test_the_san_check_covers_the_health_service_too(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki) -> None:
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki, client_ca=True, san="envoy.example.com"))
    credentials = grpc.ssl_channel_credentials(pki.ca_pem, pki.client.key.read_bytes(), pki.client.cert.read_bytes())
    with grpc.secure_channel(svc.grpc_target, credentials) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("wanted", "san", "matches"), [
    ("client.example.com", "client.example.com", True),
    ("client.example.com", "Client.Example.COM", True),
    ("client.example.com", "*.example.com", True),
    ("a.b.example.com", "*.example.com", False),  # a wildcard covers one label
    ("example.com", "*.example.com", False),
    ("client.example.com", "other.example.com", False),
    ("10.0.0.1", "10.0.0.1", True),
    ("::1", "0:0:0:0:0:0:0:1", True),
    ("spiffe://cluster.local/ns/istio-system/sa/gw", "spiffe://cluster.local/ns/istio-system/sa/gw", True),
    ("spiffe://cluster.local/ns/a/sa/gw", "spiffe://cluster.local/ns/b/sa/gw", False),
    ("spiffe://cluster.local/ns/a/sa/gw", "spiffe://cluster.local/ns/A/sa/gw", False),  # URI paths keep case
    ("spiffe://cluster.local/ns/a/sa/gw", "spiffe://cluster.local/ns/a/sa/gw.", False),
    ("spiffe://gw.cluster.local", "*.cluster.local", False),  # a DNS wildcard never stands for a URI
    ("10.0.0.1", "*.0.0.1", False),  # nor for an IP address
    ("10.0.0.1", "10.0.0.1.example.com", False),
    ("client.example.com", "client.example.com.", True),
    ("example.com", "*.com", False),  # a wildcard over a whole top-level domain
    ("client.example.com", "*", False),
    ("*.example.com", "client.example.com", False),
])
def test_san_matching_follows_certificate_name_rules(wanted: str, san: str, matches: bool) -> None:
    assert san_matches(wanted, san) is matches


def test_each_of_several_workers_serves_mutual_tls_and_checks_the_san(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki) -> None:
    svc = services.ratelimit(config_dir, redis_url, "--workers", "2",
                             *tls_flags(pki, client_ca=True, san="client.example.com"))
    # new connections spread over the workers (SO_REUSEPORT): enough of them reach both
    assert {call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem, pki.client), value=f"w{i}") for i in range(8)} == {OK}
    assert {call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem, pki.rogue_client)) for _ in range(8)} == {
        grpc.StatusCode.UNAVAILABLE}
    assert {call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem)) for _ in range(8)} == {grpc.StatusCode.UNAVAILABLE}


def test_a_dns_wildcard_certificate_does_not_pass_for_a_required_ip_san(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki, tmp_path: Path) -> None:
    clients = trustme.CA()
    clients.cert_pem.write_to_path(str(tmp_path / "clients.crt"))
    wildcard = Pem(tmp_path / "wildcard.crt", tmp_path / "wildcard.key")
    leaf = clients.issue_cert("*.0.0.1")  # a DNS name, which the old matcher let stand for 10.0.0.1
    leaf.cert_chain_pems[0].write_to_path(str(wildcard.cert))
    leaf.private_key_pem.write_to_path(str(wildcard.key))
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki), "--grpc-client-tls-cacert",
                             str(tmp_path / "clients.crt"), "--grpc-client-tls-san", "10.0.0.1")
    assert call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem, wildcard)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_rotated_server_certificate_is_used_for_new_connections_without_a_restart(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    svc = services.ratelimit(config_dir, redis_url, "--grpc-server-use-tls", "true", "--grpc-server-tls-cert",
                             str(cert), "--grpc-server-tls-key", str(key))
    assert call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem)) == OK
    new_ca = trustme.CA()
    renewed = new_ca.issue_cert("127.0.0.1")
    for path, blob in ((key, renewed.private_key_pem), (cert, renewed.cert_chain_pems[0])):
        blob.write_to_path(str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)  # what a Kubernetes secret update does: an atomic swap
    assert call_code(TlsRlsClient(svc.grpc_target, new_ca.cert_pem.bytes())) == OK
    assert call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("cipher", "served"), [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
    ("ECDHE-ECDSA-AES128-SHA256", False),  # CBC: on HTTP/2's blocklist, as ext_proc's server refuses it too
])
def test_tls12_is_served_with_aead_ciphers_only(tls_service: Service, pki: Pki, cipher: str, served: bool) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    context.set_alpn_protocols(["h2"])
    host, port = tls_service.grpc_target.rsplit(":", 1)
    if not served:
        with pytest.raises(ssl.SSLError), socket.create_connection((host, int(port)), timeout=5) as raw:
            context.wrap_socket(raw, server_hostname=host)
        return
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.cipher()[0] == cipher


def test_a_rotated_client_ca_replaces_the_old_one(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki, tmp_path: Path) -> None:
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(pki.ca.read_bytes())
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki), "--grpc-client-tls-cacert", str(client_ca))
    assert call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem, pki.client)) == OK
    replacement = tmp_path / "client-ca.tmp"
    replacement.write_bytes(pki.rogue_ca.read_bytes())
    os.replace(replacement, client_ca)
    assert call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem, pki.rogue_client)) == OK
    assert call_code(TlsRlsClient(svc.grpc_target, pki.ca_pem, pki.client)) == grpc.StatusCode.UNAVAILABLE


def test_a_tls12_session_from_before_a_client_ca_rotation_cannot_be_resumed(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki, tmp_path: Path) -> None:
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(pki.ca.read_bytes())
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki), "--grpc-client-tls-cacert", str(client_ca))
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    host, port = svc.grpc_target.rsplit(":", 1)

    def handshake(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host, session=session) as tls:
            assert tls.recv(9)  # the server's HTTP/2 SETTINGS
            return tls.session, tls.session_reused

    session, _ = handshake(None)
    session, reused = handshake(session)
    assert reused  # grpc resumes TLS 1.2 sessions while nothing changed
    replacement = tmp_path / "client-ca.tmp"
    replacement.write_bytes(pki.rogue_ca.read_bytes())
    os.replace(replacement, client_ca)  # pki.client is no longer trusted
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(session)


# --- Envoy calling the service over mutual TLS -------------------------------------------------------------------


def _client_tls_socket(pki: Pki) -> dict[str, Any]:
    """Envoy's side of mutual TLS to the service: the client certificate, the CA, and the server's SAN."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "localhost",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": str(pki.client.cert)},
                                  "private_key": {"filename": str(pki.client.key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(pki.ca)},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}]}}}}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return 0


def test_envoy_rate_limits_through_a_mutual_tls_rate_limit_cluster(
        services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki, tmp_path: Path, log_dir: Path) -> None:
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki, client_ca=True, san="client.example.com"))
    with ok_backend() as backend, envoy_front(
            tmp_path, log_dir, "envoy-tls", rls_port=svc.grpc_port, backend_port=backend, domain="tls",
            rate_limits=[{"actions": [{"generic_key": {"descriptor_value": "envoy"}}]}],
            rls_transport_socket=_client_tls_socket(pki)) as front:
        avoid_window_edges()
        codes = [_status(f"{front.url}/") for _ in range(3)]
    assert codes == [200, 429, 429]  # 1 a minute; failure_mode_deny would make a TLS failure a 500


# --- GRPC_UDS and connection age ---------------------------------------------------------------------------------


def test_grpc_uds_serves_on_a_unix_socket_instead_of_the_port(
        services: ServiceFactory, config_dir: Path, redis_url: str, tmp_path: Path) -> None:
    socket_path = tmp_path / "rls.sock"
    svc = services.ratelimit(config_dir, redis_url, env={"GRPC_UDS": str(socket_path)})
    assert socket_path.is_socket()
    assert not port_open("127.0.0.1", svc.grpc_port)
    assert call_code(RlsClient(f"unix:{socket_path}", domain="tls")) == OK


def test_grpc_uds_works_with_tls(
        services: ServiceFactory, config_dir: Path, redis_url: str, tmp_path: Path, pki: Pki) -> None:
    socket_path = tmp_path / "rls.sock"
    services.ratelimit(config_dir, redis_url, "--grpc-uds", str(socket_path), *tls_flags(pki))
    client = TlsRlsClient(f"unix:{socket_path}", pki.ca_pem)
    client.channel.close()  # a unix target has no host name to check: name the one the certificate carries
    credentials = grpc.ssl_channel_credentials(pki.ca_pem)
    client.channel = grpc.secure_channel(f"unix:{socket_path}", credentials,
                                         options=[("grpc.ssl_target_name_override", "localhost")])
    client.stub = rls_pb2_grpc.RateLimitServiceStub(client.channel)
    assert call_code(client) == OK


def _watch_lifetime(target: str, deadline: float) -> tuple[float, grpc.StatusCode]:
    """How long a health Watch stream stays open, and the status it ends with."""
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                           timeout=deadline)
        try:
            for _ in stream:
                pass
        except grpc.RpcError as exc:
            return time.monotonic() - started, exc.code()
    return time.monotonic() - started, grpc.StatusCode.OK


def test_connections_older_than_the_max_age_and_grace_are_closed(
        services: ServiceFactory, config_dir: Path, redis_url: str) -> None:
    svc = services.ratelimit(config_dir, redis_url, env={"GRPC_MAX_CONNECTION_AGE": "500ms",
                                                         "GRPC_MAX_CONNECTION_AGE_GRACE": "0.5s"})
    lifetime, code = _watch_lifetime(svc.grpc_target, 8)
    assert code == grpc.StatusCode.UNAVAILABLE and 0.5 < lifetime < 4, (code, lifetime)


def test_by_default_a_connection_outlives_a_few_seconds(
        services: ServiceFactory, config_dir: Path, redis_url: str) -> None:
    svc = services.ratelimit(config_dir, redis_url)
    _, code = _watch_lifetime(svc.grpc_target, 2.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


# --- Redis over TLS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, log_dir: Path) -> Iterator[RedisServer]:
    """A TLS-only redis-server that also requires a client certificate from the test CA."""
    server = RedisServer(log_dir=log_dir, tls=RedisTlsFiles(pki.server.cert, pki.server.key, pki.ca,
                                                            auth_clients=True)).start()
    yield server
    server.stop()


def redis_tls_env(pki: Pki, **extra: str) -> dict[str, str]:
    return {"REDIS_TLS_CACERT": str(pki.ca), "REDIS_TLS_CLIENT_CERT": str(pki.client.cert),
            "REDIS_TLS_CLIENT_KEY": str(pki.client.key), **extra}


def direct(server: RedisServer, pki: Pki) -> redis.Redis:
    """redis-py on the TLS server, through the same URL form the service uses."""
    return redis.Redis.from_url(with_tls(server.url, RedisTls(str(pki.ca), str(pki.client.cert),
                                                             str(pki.client.key))))


@pytest.fixture
def clean_tls_redis(tls_redis: RedisServer, pki: Pki) -> RedisServer:
    client = direct(tls_redis, pki)
    client.flushall()
    client.close()
    return tls_redis


def test_counting_works_over_tls_with_upstreams_environment(
        services: ServiceFactory, config_dir: Path, clean_tls_redis: RedisServer, pki: Pki) -> None:
    env = redis_tls_env(pki, REDIS_TLS="true", REDIS_SOCKET_TYPE="tcp", REDIS_URL=f"127.0.0.1:{clean_tls_redis.port}")
    svc = services.start_module("ratelimit_svc", "--config-dir", str(config_dir), env=env)
    client = RlsClient(svc.grpc_target, domain="tls")
    try:
        assert client.codes([("k", "upstream-env")], 3) == [OK, OK, OVER]
    finally:
        client.close()
    assert direct(clean_tls_redis, pki).keys("tls_k_upstream-env_*")


def test_a_rediss_url_talks_tls_without_redis_tls_set(
        services: ServiceFactory, config_dir: Path, clean_tls_redis: RedisServer, pki: Pki) -> None:
    svc = services.ratelimit(config_dir, clean_tls_redis.url, env=redis_tls_env(pki))
    client = RlsClient(svc.grpc_target, domain="tls")
    try:
        assert client.codes([("k", "rediss")], 3) == [OK, OK, OVER]
    finally:
        client.close()


def test_a_wrong_redis_ca_fails_health_and_calls_with_the_certificate_error(
        services: ServiceFactory, config_dir: Path, clean_tls_redis: RedisServer, pki: Pki) -> None:
    env = redis_tls_env(pki, REDIS_TLS_CACERT=str(pki.rogue_ca))
    svc = services.ratelimit(config_dir, clean_tls_redis.url, env=env, wait_healthy=False)
    svc.proc.wait_ready(lambda: _status(f"{svc.http_base}/healthcheck") == 503, 20, "answering")
    with pytest.raises(grpc.RpcError) as info:
        RlsClient(svc.grpc_target, domain="tls").call([("k", "wrong-ca")], timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in (info.value.details() or "")
    assert "certificate verify failed" in svc.proc.tail(50)  # logged once, not per retry
    assert svc.proc.tail(200).count("certificate verify failed") == 1


def test_without_a_client_certificate_a_redis_that_requires_one_is_unreachable(
        services: ServiceFactory, config_dir: Path, clean_tls_redis: RedisServer, pki: Pki) -> None:
    svc = services.ratelimit(config_dir, clean_tls_redis.url, env={"REDIS_TLS_CACERT": str(pki.ca)},
                             wait_healthy=False)
    svc.proc.wait_ready(lambda: _status(f"{svc.http_base}/healthcheck") == 503, 20, "answering")
    assert call_code(RlsClient(svc.grpc_target, domain="tls")) == grpc.StatusCode.UNAVAILABLE


def test_shards_over_tls_each_count_their_keys(
        services: ServiceFactory, config_dir: Path, clean_tls_redis: RedisServer, pki: Pki, log_dir: Path) -> None:
    second = RedisServer(log_dir=log_dir, tls=RedisTlsFiles(pki.server.cert, pki.server.key, pki.ca,
                                                            auth_clients=True)).start()
    try:
        shards = f"redis://127.0.0.1:{clean_tls_redis.port}/0,redis://127.0.0.1:{second.port}/0"
        svc = services.ratelimit(config_dir, clean_tls_redis.url, "--redis-shards", shards,
                                 env=redis_tls_env(pki, REDIS_TLS="true"))
        client = RlsClient(svc.grpc_target, domain="tls")
        try:
            avoid_window_edges()
            for value in range(12):  # spread over both shards
                assert client.call([("k", f"shard-{value}")]).overall_code == OK
        finally:
            client.close()
        counts = [len(direct(server, pki).keys("tls_k_shard-*")) for server in (clean_tls_redis, second)]
    finally:
        second.stop()
    assert sum(counts) == 12 and all(counts), counts


def test_the_per_second_redis_talks_tls_with_redis_persecond_tls(
        services: ServiceFactory, config_dir: Path, clean_tls_redis: RedisServer, pki: Pki, redis_url: str) -> None:
    env = redis_tls_env(pki, REDIS_PERSECOND="true", REDIS_PERSECOND_TLS="true",
                        REDIS_PERSECOND_URL=f"127.0.0.1:{clean_tls_redis.port}", REDIS_PERSECOND_SOCKET_TYPE="tcp")
    svc = services.ratelimit(config_dir, redis_url, env=env)
    client = RlsClient(svc.grpc_target, domain="tls")
    try:
        assert client.codes([("fast", "x")], 3) == [OK, OK, OVER]
    finally:
        client.close()
    assert direct(clean_tls_redis, pki).keys("tls_fast_x_*")


def test_replica_counts_are_read_over_tls(
        services: ServiceFactory, tmp_path: Path, clean_tls_redis: RedisServer, pki: Pki) -> None:
    directory = tmp_path / "adaptive"
    directory.mkdir()
    (directory / "igw.yaml").write_text(ADAPTIVE_CONFIG)
    svc = services.ratelimit(directory, f"redis://127.0.0.1:{clean_tls_redis.port}/0", "--replica-max-age", "3s",
                             env=redis_tls_env(pki, REDIS_TLS="true"))
    client = RlsClient(svc.grpc_target, domain="igw")
    try:
        publish(with_tls(clean_tls_redis.url, RedisTls(str(pki.ca), str(pki.client.cert), str(pki.client.key))),
                "resnet", 6)
        wait_for_limit(client, "acme", "resnet", 40, 3.0)  # 10 x 6 x 2/3: replica state came over TLS
    finally:
        client.close()


def test_ext_proc_accepts_a_rediss_url(log_dir: Path, clean_tls_redis: RedisServer, pki: Pki) -> None:
    url = with_tls(clean_tls_redis.url, RedisTls(str(pki.ca), str(pki.client.cert), str(pki.client.key)))
    factory = ServiceFactory(log_dir)
    try:
        svc = factory.start_module("ext_proc", "--redis-url", url)
        deadline = time.monotonic() + 10
        while True:  # both of its Redis clients: the pipelined one and redis-py's pub/sub
            with urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=2) as response:
                body = response.read().decode()
            if "redis up, pubsub up" in body:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
    finally:
        factory.stop_all()


def test_redis_tls_settings_become_a_rediss_url_that_keeps_its_own_options(pki: Pki) -> None:
    url = with_tls("redis://:pw@127.0.0.1:6380/2?ssl_ca_certs=" + str(pki.rogue_ca),
                   RedisTls(str(pki.ca), str(pki.client.cert), str(pki.client.key), check_hostname=False))
    address = parse_redis_url(url)
    assert address.url == "rediss://:***@127.0.0.1:6380/2"
    assert address.tls == RedisTls(str(pki.rogue_ca), str(pki.client.cert), str(pki.client.key),
                                   check_hostname=False)


def test_the_redis_password_is_in_no_log_line_error_or_health_page(
        services: ServiceFactory, config_dir: Path) -> None:
    url = f"redis://igw:n0t-in-logs@127.0.0.1:{free_port()}/0"  # nothing listens there
    svc = services.ratelimit(config_dir, url, wait_healthy=False)
    svc.proc.wait_ready(lambda: _status(f"{svc.http_base}/healthcheck") == 503, 20, "answering")
    with pytest.raises(grpc.RpcError) as info:
        RlsClient(svc.grpc_target, domain="tls").call([("k", "secret")], timeout=3)
    details = info.value.details() or ""
    with pytest.raises(urllib.error.HTTPError) as page:
        urllib.request.urlopen(f"{svc.http_base}/healthcheck", timeout=5)
    health = page.value.read().decode()
    assert "redis://igw:***@127.0.0.1" in details
    assert "redis unreachable: redis://igw:***@127.0.0.1" in health
    assert "n0t-in-logs" not in details + health + svc.proc.tail(500)


def test_tls_options_on_a_plain_redis_url_are_refused() -> None:
    with pytest.raises(ValueError, match="TLS options need a rediss:// URL"):
        parse_redis_url("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/ca.pem")


# --- bad settings stop the start, in one line --------------------------------------------------------------------


def _start(config_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "ratelimit_svc", "--config-dir", str(config_dir), *args],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr


@pytest.fixture
def files(tmp_path: Path, pki: Pki) -> dict[str, Path]:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    truncated = tmp_path / "truncated.pem"
    truncated.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return {"missing": tmp_path / "missing.pem", "garbage": garbage, "truncated": truncated,
            "directory": tmp_path}


def test_a_missing_server_certificate_file_is_named(config_dir: Path, files: dict[str, Path], pki: Pki) -> None:
    code, err = _start(config_dir, env={"GRPC_SERVER_USE_TLS": "true", "GRPC_SERVER_TLS_CERT": str(files["missing"]),
                                        "GRPC_SERVER_TLS_KEY": str(pki.server.key)})
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_CERT", str(files["missing"]), "cannot read")


def test_an_unreadable_key_file_is_named(config_dir: Path, files: dict[str, Path], pki: Pki) -> None:
    code, err = _start(config_dir, *tls_flags(pki)[:4], "--grpc-server-tls-key", str(files["directory"]))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_KEY", str(files["directory"]), "cannot read")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_a_malformed_server_certificate_is_named(config_dir: Path, files: dict[str, Path], pki: Pki,
                                                 kind: str) -> None:
    code, err = _start(config_dir, "--grpc-server-use-tls", "true", "--grpc-server-tls-cert", str(files[kind]),
                       "--grpc-server-tls-key", str(pki.server.key))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_CERT", str(files[kind]), "not a PEM certificate")


def test_a_key_of_another_certificate_is_named(config_dir: Path, pki: Pki) -> None:
    code, err = _start(config_dir, "--grpc-server-use-tls", "true", "--grpc-server-tls-cert", str(pki.server.cert),
                       "--grpc-server-tls-key", str(pki.client.key))
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_KEY", str(pki.client.key), "does not match")


def test_a_key_without_a_certificate_is_refused(config_dir: Path, pki: Pki) -> None:
    code, err = _start(config_dir, env={"GRPC_SERVER_USE_TLS": "true", "GRPC_SERVER_TLS_KEY": str(pki.server.key)})
    assert_one_line_error(code, err, "GRPC_SERVER_TLS_CERT", "is not set")


def test_a_client_ca_without_tls_on_is_refused(config_dir: Path, pki: Pki) -> None:
    code, err = _start(config_dir, env={"GRPC_CLIENT_TLS_CACERT": str(pki.ca)})
    assert_one_line_error(code, err, "GRPC_CLIENT_TLS_CACERT", "GRPC_SERVER_USE_TLS")


def test_a_malformed_client_ca_is_named(config_dir: Path, files: dict[str, Path], pki: Pki) -> None:
    code, err = _start(config_dir, *tls_flags(pki), "--grpc-client-tls-cacert", str(files["garbage"]))
    assert_one_line_error(code, err, "GRPC_CLIENT_TLS_CACERT", str(files["garbage"]), "not a PEM CA certificate")


def test_a_san_without_a_client_ca_is_refused(config_dir: Path, pki: Pki) -> None:
    code, err = _start(config_dir, *tls_flags(pki, san="envoy.example.com"))
    assert_one_line_error(code, err, "GRPC_CLIENT_TLS_SAN", "GRPC_CLIENT_TLS_CACERT")


def test_a_malformed_redis_ca_is_named(config_dir: Path, files: dict[str, Path]) -> None:
    code, err = _start(config_dir, env={"REDIS_TLS": "true", "REDIS_TLS_CACERT": str(files["truncated"])})
    assert_one_line_error(code, err, "REDIS_TLS_CACERT", str(files["truncated"]), "not a PEM CA certificate")


def test_a_missing_redis_client_certificate_is_named(config_dir: Path, files: dict[str, Path], pki: Pki) -> None:
    code, err = _start(config_dir, env={"REDIS_TLS": "true", "REDIS_TLS_CLIENT_CERT": str(files["missing"]),
                                        "REDIS_TLS_CLIENT_KEY": str(pki.client.key)})
    assert_one_line_error(code, err, "REDIS_TLS_CLIENT_CERT", str(files["missing"]), "cannot read")


def test_a_redis_client_key_without_a_certificate_is_refused(config_dir: Path, pki: Pki) -> None:
    code, err = _start(config_dir, env={"REDIS_TLS": "true", "REDIS_TLS_CLIENT_KEY": str(pki.client.key)})
    assert_one_line_error(code, err, "REDIS_TLS_CLIENT_KEY", str(pki.client.key), "REDIS_TLS_CLIENT_CERT")


def test_redis_tls_files_without_any_tls_redis_are_refused(config_dir: Path, pki: Pki) -> None:
    code, err = _start(config_dir, env={"REDIS_TLS_CACERT": str(pki.ca)})
    assert_one_line_error(code, err, "REDIS_TLS_CACERT", "REDIS_TLS=true")


def test_redis_tls_on_a_unix_socket_url_is_refused(config_dir: Path) -> None:
    code, err = _start(config_dir, env={"REDIS_TLS": "true", "REDIS_URL": "/run/redis.sock"})
    assert_one_line_error(code, err, "REDIS_TLS", "/run/redis.sock", "unix socket")


def test_a_missing_ca_in_a_rediss_url_is_named(config_dir: Path, files: dict[str, Path]) -> None:
    code, err = _start(config_dir, "--redis-url", f"rediss://127.0.0.1:1/0?ssl_ca_certs={files['missing']}")
    assert code == 2 and "ssl_ca_certs" in err and str(files["missing"]) in err and "Traceback" not in err, err


@pytest.mark.parametrize(("query", "named"), [
    ("ssl_ca_cert=/etc/ca.pem", "unknown option 'ssl_ca_cert'"),  # a typo: the CA would silently not be used
    ("ssl_ca_path=/etc/ssl/redis", "unknown option 'ssl_ca_path'"),  # redis-py would use it, our client not
    ("db=3", "unknown option 'db'"),  # redis-py would select db 3, the counters db 0
    ("ssl_check_hostname=true&ssl_check_hostname=false", "'ssl_check_hostname' given more than once"),
])
def test_an_unknown_or_repeated_rediss_url_option_is_named(config_dir: Path, query: str, named: str) -> None:
    code, err = _start(config_dir, "--redis-url", f"rediss://127.0.0.1:1/0?{query}")
    assert code == 2 and named in err and "Traceback" not in err, err


def test_a_bad_redis_url_is_named_without_its_password(config_dir: Path) -> None:
    code, err = _start(config_dir, "--redis-url", "redis://igw:n0t-in-logs@127.0.0.1:1/zero")
    assert code == 2 and "'redis://igw:***@127.0.0.1:1/zero': database must be a number" in err, err
    assert "n0t-in-logs" not in err


def test_grpc_uds_with_several_workers_is_refused(config_dir: Path, tmp_path: Path) -> None:
    code, err = _start(config_dir, "--workers", "2", env={"GRPC_UDS": str(tmp_path / "rls.sock")})
    assert_one_line_error(code, err, "GRPC_UDS", str(tmp_path / "rls.sock"), "WORKERS=2")


def test_grpc_uds_in_a_missing_directory_is_refused(config_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "rls.sock"
    code, err = _start(config_dir, env={"GRPC_UDS": str(path)})
    assert_one_line_error(code, err, "GRPC_UDS", str(path), "does not exist")


@pytest.mark.parametrize(("value", "seconds"), [("1h30m", 5400.0), ("90s", 90.0), ("250ms", 0.25), ("0", 0.0)])
def test_max_connection_age_takes_go_durations(config_dir: Path, value: str, seconds: float,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_MAX_CONNECTION_AGE", value)
    assert parse_settings(["--config-dir", str(config_dir)]).grpc_max_connection_age == seconds


@pytest.mark.parametrize("value", ["forever", "-1h", "1d"])
def test_a_bad_max_connection_age_is_named(config_dir: Path, value: str) -> None:
    code, err = _start(config_dir, env={"GRPC_MAX_CONNECTION_AGE": value})
    assert code == 2 and "GRPC_MAX_CONNECTION_AGE" in err and "invalid duration" in err, err


def _quota_stream(target: str, credentials: grpc.ChannelCredentials) -> Any:
    """The first answer of an RLQS stream that reported usage of one bucket, or the status it failed with."""
    usage = rlqs_pb2.RateLimitQuotaUsageReports.BucketQuotaUsage(
        bucket_id=rlqs_pb2.BucketId(bucket={"k": "quota"}), time_elapsed=duration_pb2.Duration(seconds=1),
        num_requests_allowed=1)
    reports = [rlqs_pb2.RateLimitQuotaUsageReports(domain="tls", bucket_quota_usages=[usage])]
    with grpc.secure_channel(target, credentials) as channel:
        stub = rlqs_pb2_grpc.RateLimitQuotaServiceStub(channel)
        try:
            return next(stub.StreamRateLimitQuotas(iter(reports), timeout=3))
        except grpc.RpcError as exc:
            return exc.code()


@pytest.mark.parametrize(("san", "served"), [("client.example.com", True), ("envoy.example.com", False)])
def test_the_san_check_covers_quota_streams(services: ServiceFactory, config_dir: Path, redis_url: str, pki: Pki,
                                            san: str, served: bool) -> None:
    svc = services.ratelimit(config_dir, redis_url, *tls_flags(pki, client_ca=True, san=san))
    credentials = grpc.ssl_channel_credentials(pki.ca_pem, pki.client.key.read_bytes(), pki.client.cert.read_bytes())
    got = _quota_stream(svc.grpc_target, credentials)
    if served:
        assert isinstance(got, rlqs_pb2.RateLimitQuotaResponse), got
    else:
        assert got == grpc.StatusCode.UNAUTHENTICATED
