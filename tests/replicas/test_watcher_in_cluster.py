"""The watcher configured in-cluster (`--in-cluster`: the service-account token and CA files a Pod mounts)
against the loopback Kubernetes API peer serving HTTPS and requiring the token, and a real redis-server."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis
import trustme

from tests.replicas.conftest import WatcherRunner, read_state, wait_for
from tests.replicas.k8s_fake import FakeKubeAPI
from tests.replicas.slices import model_slice


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    return context


def ready_is(client: redis.Redis, model: str, ready: int) -> bool:
    state = read_state(client, model)
    return state is not None and state.ready == ready


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory standing for /var/run/secrets/kubernetes.io/serviceaccount (token, ca.crt)."""
    from kubernetes.config import incluster_config

    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    return tmp_path


def in_cluster_api(service_account: Path, monkeypatch: pytest.MonkeyPatch, ca: trustme.CA) -> FakeKubeAPI:
    (service_account / "token").write_text("token-1")
    ca.cert_pem.write_to_path(str(service_account / "ca.crt"))
    api = FakeKubeAPI(ssl_context=server_context(ca.issue_cert("127.0.0.1")), bearer_token="token-1").serve()
    assert api.server is not None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.server.server_address[1]))
    api.load([model_slice("llama", ["a"])])
    return api


def test_in_cluster_the_watcher_sends_the_mounted_token_to_the_api_server_the_mounted_ca_signed(
        service_account: Path, monkeypatch: pytest.MonkeyPatch, watchers: WatcherRunner,
        rclient: redis.Redis) -> None:
    api = in_cluster_api(service_account, monkeypatch, trustme.CA())
    try:
        watcher = watchers.start(api.url, source={"in_cluster": True})
        wait_for(lambda: ready_is(rclient, "llama", 1), what="sync over HTTPS")
        assert {a.lower() for a in api.authorizations} == {"bearer token-1"}
        assert watcher.health()[0]
    finally:
        watchers.stop_all()
        api.close()


def test_in_cluster_a_rotated_cluster_ca_is_trusted_on_the_next_connection(
        service_account: Path, monkeypatch: pytest.MonkeyPatch, watchers: WatcherRunner,
        rclient: redis.Redis) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    api = in_cluster_api(service_account, monkeypatch, old_ca)
    try:
        watchers.start(api.url, source={"in_cluster": True})
        wait_for(lambda: ready_is(rclient, "llama", 1) and api.active_watches == 1, what="sync")
        # A CA rotation: the mounted bundle (kube-root-ca.crt) carries both CAs, then the API server switches to
        # a serving certificate the new CA signed and its connections drop.
        (service_account / "ca.crt").write_bytes(old_ca.cert_pem.bytes() + new_ca.cert_pem.bytes())
        api.ssl_context = server_context(new_ca.issue_cert("127.0.0.1"))
        api.drop_watches()
        api.apply("MODIFIED", model_slice("llama", ["a", "b"]))
        wait_for(lambda: ready_is(rclient, "llama", 2), what="a change seen through the new certificate")
    finally:
        watchers.stop_all()
        api.close()
