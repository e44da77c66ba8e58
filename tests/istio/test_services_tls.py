"""services.tls: the services serve gRPC over (mutual) TLS and the gateways reach them with SDS certificates.

Rendered from the demo policy plus a tls block, checked against the CRD and Kubernetes schemas and by the
real Envoy (`--mode validate`) on the gateway-like bootstrap with our EnvoyFilters applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from igw.envoy_config import UpstreamTlsSds
from igw.policy import gateway_check, istio, spec
from igw.policy.kube_schema import validate_objects
from igw.policy.load import PolicyError, load_policy
from igw.procs import REPO_ROOT
from tests.istio.test_drift import validate

DEMO_TEXT = (REPO_ROOT / "config" / "policy" / "demo.yaml").read_text()
SERVICES_END = "  replica_watcher: {replicas: 2, cpu: 100m, memory: 128Mi}\n"
TLS_DIR = "/etc/igw/tls"
SAN = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
ADS = {"ads": {}, "resource_api_version": "V3"}


def with_tls(block: str) -> str:
    """The demo policy with `block` (lines indented under services.tls) added."""
    assert SERVICES_END in DEMO_TEXT
    return DEMO_TEXT.replace(SERVICES_END, SERVICES_END + "  tls:\n" + block)


MUTUAL = with_tls(f"    server_secret: igw-services-tls\n    gateway_secret: igw-gateway-tls\n    client_san: {SAN}\n")
ONE_WAY = with_tls("    server_secret: igw-services-tls\n    gateway_secret: igw-gateway-tls\n    mutual: false\n")


def render(text: str) -> dict[str, list[dict[str, Any]]]:
    return istio.render(load_policy("policy.yaml", text))


def objects(files: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [o for objs in files.values() for o in objs]


def deployment(files: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any]:
    return next(o for o in files["10-services.yaml"] if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def env_of(dep: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0].get("env", [])}


def added_clusters(files: dict[str, list[dict[str, Any]]], file: str) -> list[dict[str, Any]]:
    return [p["patch"]["value"] for o in files[file] if o["kind"] == "EnvoyFilter"
            for p in o["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"]


def gateway_config(text: str, file: str) -> dict[str, Any]:
    policy = load_policy("policy.yaml", text)
    gw = policy.gateway if file == "20-gateway.yaml" else policy.dedicated_gateways["secure-gw"]
    filters = [o for o in istio.render(policy)[file] if o["kind"] == "EnvoyFilter"]
    return gateway_check.gateway_bootstrap(policy, filters, gw.hosts, gw.port)


@pytest.mark.parametrize("name", ["ext-proc", "ratelimit"])
def test_services_mount_the_server_secret_read_only_and_serve_grpc_over_mutual_tls(name: str) -> None:
    dep = deployment(render(MUTUAL), name)
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in pod["containers"][0]["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "igw-services-tls"
    assert [i["key"] for i in volume["secret"]["items"]] == ["tls.crt", "tls.key", "ca.crt"]
    env = env_of(dep)
    assert env["GRPC_SERVER_USE_TLS"] == "true"
    assert env["GRPC_SERVER_TLS_CERT"] == f"{TLS_DIR}/tls.crt"
    assert env["GRPC_SERVER_TLS_KEY"] == f"{TLS_DIR}/tls.key"
    assert env["GRPC_CLIENT_TLS_CACERT"] == f"{TLS_DIR}/ca.crt"
    assert env["GRPC_CLIENT_TLS_SAN"] == SAN


@pytest.mark.parametrize("name", ["ext-proc", "ratelimit"])
def test_probes_stay_on_the_plain_http_admin_port(name: str) -> None:
    plain = deployment(render(DEMO_TEXT), name)["spec"]["template"]["spec"]["containers"][0]
    tls = deployment(render(MUTUAL), name)["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tls[probe] == plain[probe]


@pytest.mark.parametrize("file", ["20-gateway.yaml", "40-dedicated-secure-gw.yaml"])
def test_gateway_clusters_get_sds_mutual_tls_to_each_services_fqdn(file: str) -> None:
    clusters = added_clusters(render(MUTUAL), file)
    assert sorted(c["name"] for c in clusters) == ["ext-proc.igw-system.svc.cluster.local",
                                                   "ratelimit.igw-system.svc.cluster.local"]
    for cluster in clusters:
        context = cluster["transport_socket"]["typed_config"]
        assert context["@type"].endswith("UpstreamTlsContext")
        assert context["sni"] == cluster["name"]
        common = context["common_tls_context"]
        assert common["alpn_protocols"] == ["h2"]
        validation = common["combined_validation_context"]
        assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": cluster["name"]}}]
        assert validation["validation_context_sds_secret_config"] == {
            "name": "kubernetes://igw-gateway-tls-cacert", "sds_config": ADS}
        assert common["tls_certificate_sds_secret_configs"] == [
            {"name": "kubernetes://igw-gateway-tls", "sds_config": ADS}]


@pytest.mark.parametrize("text", [MUTUAL, ONE_WAY], ids=["mutual", "one-way"])
def test_every_object_rendered_with_tls_validates(text: str, shared_dir: Path) -> None:
    problems = validate_objects(objects(render(text)))
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("text", [MUTUAL, ONE_WAY], ids=["mutual", "one-way"])
@pytest.mark.parametrize("file", ["20-gateway.yaml", "40-dedicated-secure-gw.yaml"])
def test_envoy_accepts_the_gateway_with_tls_clusters(text: str, file: str, tmp_path: Path) -> None:
    result = validate(gateway_config(text, file), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_rejects_a_broken_sds_config_in_a_tls_cluster(tmp_path: Path) -> None:
    """The check above can fail: the transport socket is parsed, down to its SDS config source."""
    config = gateway_config(MUTUAL, "20-gateway.yaml")
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"].startswith("ext-proc."))
    common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    common["combined_validation_context"]["validation_context_sds_secret_config"]["sds_config"] = {"adz": {}}
    result = validate(config, tmp_path)
    assert result.returncode != 0
    assert "adz" in result.stdout + result.stderr


def test_one_way_tls_leaves_out_the_client_certificate_and_the_client_ca() -> None:
    files = render(ONE_WAY)
    for name in ("ext-proc", "ratelimit"):
        dep = deployment(files, name)
        env = env_of(dep)
        assert env["GRPC_SERVER_USE_TLS"] == "true"
        assert "GRPC_CLIENT_TLS_CACERT" not in env and "GRPC_CLIENT_TLS_SAN" not in env
        volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
        assert [i["key"] for i in volume["secret"]["items"]] == ["tls.crt", "tls.key"]
    for cluster in added_clusters(files, "20-gateway.yaml"):
        common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        assert "tls_certificate_sds_secret_configs" not in common
        assert common["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == \
            "kubernetes://igw-gateway-tls-cacert"


def test_tls_changes_only_the_two_services_and_the_gateway_filters() -> None:
    plain, tls = objects(render(DEMO_TEXT)), objects(render(MUTUAL))
    assert [(o["kind"], o["metadata"]["name"]) for o in plain] == [(o["kind"], o["metadata"]["name"]) for o in tls]
    changed = sorted((a["kind"], a["metadata"]["name"]) for a, b in zip(plain, tls, strict=True) if a != b)
    assert changed == [("Deployment", "ext-proc"), ("Deployment", "ratelimit"),
                       ("EnvoyFilter", "igw-gateway"), ("EnvoyFilter", "secure-gw-igw")]


def test_without_the_block_nothing_is_served_over_tls() -> None:
    policy = load_policy("policy.yaml", DEMO_TEXT)
    assert policy.services.tls is None
    files = istio.render(policy)
    for name in ("ext-proc", "ratelimit"):
        assert not any(k.startswith("GRPC_") for k in env_of(deployment(files, name)))
    assert all("transport_socket" not in c for c in added_clusters(files, "20-gateway.yaml"))


def test_the_block_loads_with_mutual_on_by_default() -> None:
    tls = load_policy("policy.yaml", MUTUAL).services.tls
    assert tls == spec.ServicesTls(server_secret="igw-services-tls", gateway_secret="igw-gateway-tls",
                                   mutual=True, client_san=SAN)


def tls_line() -> int:
    return MUTUAL.splitlines().index("  tls:") + 1


@pytest.mark.parametrize(("block", "offset", "expected"), [
    ("    server_secret: igw-services-tls\n    gateway_secret: igw-gateway-tls\n    mutal: false\n", 3,
     "services.tls.mutal: unknown field 'mutal' (allowed: client_san, gateway_secret, mutual, server_secret)"),
    ("    server_secret: Services_TLS\n    gateway_secret: igw-gateway-tls\n", 1,
     "services.tls.server_secret: 'Services_TLS' is not a valid server_secret: use a DNS label"),
    ("    server_secret: igw-services-tls\n", 0, "services.tls: 'gateway_secret' is required"),
    ("    server_secret: igw-services-tls\n    gateway_secret: igw-gateway-tls\n    mutual: 'yes'\n", 3,
     "services.tls.mutual: 'yes' is not of type 'boolean'"),
    ("    server_secret: igw-services-tls\n    gateway_secret: igw-gateway-tls\n    mutual: false\n"
     "    client_san: gw.example\n", 4, "services.tls.client_san: client_san applies only with mutual: true"),
    ("    server_secret: igw-services-tls\n    gateway_secret: igw-gateway-tls\n    client_san: a b\n", 3,
     "services.tls.client_san: 'a b' is not a valid client_san: write one SAN"),
    ("    server_secret: igw-services-tls\n    gateway_secret: 42\n", 2,
     "services.tls.gateway_secret: 42 is not of type 'string'"),
], ids=["unknown-key", "bad-name", "missing-secret", "mutual-not-bool", "san-without-mutual", "san-with-space",
        "name-not-string"])
def test_a_bad_tls_block_is_refused_with_file_line_and_path(block: str, offset: int, expected: str) -> None:
    text = with_tls(block)
    with pytest.raises(PolicyError) as exc:
        load_policy("policy.yaml", text)
    assert f"policy.yaml:{tls_line() + offset}: {expected}" in str(exc.value)


def test_the_sds_socket_refuses_an_ip_address_as_server_name() -> None:
    with pytest.raises(ValueError, match="DNS name"):
        UpstreamTlsSds(server_name="10.0.0.1", validation_secret="kubernetes://ca-cacert")
