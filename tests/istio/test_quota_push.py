"""gateway.enforcement / dedicated_gateways.<name>.enforcement: quota_push renders Envoy's rate_limit_quota filter.

Rendered from the demo policy with an enforcement line added, checked against the CRD and Kubernetes schemas
and by the real Envoy (`--mode validate`) on the gateway-like bootstrap with our EnvoyFilters applied, and
compared with what the test bed runs in quota-push mode (envoy_config.bootstrap(rate_limit_mode="rlqs")).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from igw import envoy_config
from igw.envoy_quota import QUOTA_FILTER_TYPE, rate_limit_quota_filter
from igw.policy import gateway_check, istio
from igw.policy.kube_schema import validate_objects
from igw.policy.load import PolicyError, load_policy
from igw.procs import REPO_ROOT
from igw.topology import free_topology
from tests.istio.test_drift import hcm_of, validate

DEMO_TEXT = (REPO_ROOT / "config" / "policy" / "demo.yaml").read_text()
SHARED_PORT = "  port: 80\n\ndedicated_gateways:\n"
DEDICATED_REPLICAS = "  secure-gw:\n    namespace: team-secure\n    hosts: [\"*\"]\n    replicas: 2\n"
SHARED = "20-gateway.yaml"
DEDICATED = "40-dedicated-secure-gw.yaml"
QUOTA = "envoy.filters.http.rate_limit_quota"
RATELIMIT = "envoy.filters.http.ratelimit"
EXT_PROC = "envoy.filters.http.ext_proc"


def with_enforcement(shared: str | None = None, dedicated: str | None = None) -> str:
    """The demo policy with the shared and/or the secure-gw gateway's enforcement set."""
    assert SHARED_PORT in DEMO_TEXT and DEDICATED_REPLICAS in DEMO_TEXT
    text = DEMO_TEXT
    if shared is not None:
        text = text.replace(SHARED_PORT, f"  port: 80\n  enforcement: {shared}\n\ndedicated_gateways:\n")
    if dedicated is not None:
        text = text.replace(DEDICATED_REPLICAS, DEDICATED_REPLICAS + f"    enforcement: {dedicated}\n")
    return text


def render(text: str) -> dict[str, list[dict[str, Any]]]:
    return istio.render(load_policy("policy.yaml", text))


def gateway_filter(files: dict[str, list[dict[str, Any]]], file: str) -> dict[str, Any]:
    return next(o for o in files[file] if o["kind"] == "EnvoyFilter" and not o["metadata"]["name"].endswith("-log"))


def inserted_filters(files: dict[str, list[dict[str, Any]]], file: str) -> list[dict[str, Any]]:
    return [p["patch"]["value"] for p in gateway_filter(files, file)["spec"]["configPatches"]
            if p["applyTo"] == "HTTP_FILTER"]


def gateway_config(text: str, file: str) -> dict[str, Any]:
    policy = load_policy("policy.yaml", text)
    gw = policy.gateway if file == SHARED else policy.dedicated_gateways["secure-gw"]
    filters = [o for o in istio.render(policy)[file] if o["kind"] == "EnvoyFilter"]
    return gateway_check.gateway_bootstrap(policy, filters, gw.hosts, gw.port)


def bucket_gateway_names(quota_filter: dict[str, Any]) -> set[str]:
    matchers = quota_filter["typed_config"]["bucket_matchers"]
    actions = [m["on_match"]["action"] for m in matchers["matcher_list"]["matchers"]]
    actions.append(matchers["on_no_match"]["action"])
    return {a["typed_config"]["bucket_id_builder"]["bucket_id_builder"]["gw"]["string_value"] for a in actions}


QUOTA_PUSH = with_enforcement(shared="quota_push")


@pytest.mark.parametrize(("file", "gateway"), [(SHARED, "igw"), (DEDICATED, "secure-gw")])
def test_quota_push_inserts_the_quota_filter_after_ext_proc_instead_of_ratelimit(file: str, gateway: str) -> None:
    files = render(QUOTA_PUSH)
    names = istio.ServiceNames("igw-system")
    filters = inserted_filters(files, file)
    assert [f["name"] for f in filters] == [EXT_PROC, QUOTA]
    assert filters[1] == rate_limit_quota_filter(gateway, names.ratelimit_cluster, envoy_config.RATELIMIT_DOMAIN)
    assert filters[1]["typed_config"]["@type"] == QUOTA_FILTER_TYPE
    assert bucket_gateway_names(filters[1]) == {gateway}


@pytest.mark.parametrize("file", [SHARED, DEDICATED])
def test_quota_push_lands_before_the_router_in_the_patched_gateway(file: str) -> None:
    names = [f["name"] for f in hcm_of(gateway_config(QUOTA_PUSH, file))["http_filters"]]
    assert names == [EXT_PROC, QUOTA, istio.ROUTER_FILTER]


@pytest.mark.parametrize("file", [SHARED, DEDICATED])
def test_quota_push_adds_no_virtual_host_rate_limit_actions(file: str) -> None:
    patches = gateway_filter(render(QUOTA_PUSH), file)["spec"]["configPatches"]
    assert not [p for p in patches if p["applyTo"] == "VIRTUAL_HOST"]
    for vhost in hcm_of(gateway_config(QUOTA_PUSH, file))["route_config"]["virtual_hosts"]:
        assert "rate_limits" not in vhost


def test_the_rlqs_server_is_the_rate_limit_services_cluster_health_checked_as_in_the_test_bed() -> None:
    files = render(QUOTA_PUSH)
    names = istio.ServiceNames("igw-system")
    clusters = {p["patch"]["value"]["name"]: p["patch"]["value"]
                for p in gateway_filter(files, SHARED)["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"}
    assert set(clusters) == {names.ext_proc_cluster, names.ratelimit_cluster}
    quota = inserted_filters(files, SHARED)[1]
    assert quota["typed_config"]["rlqs_server"]["envoy_grpc"]["cluster_name"] == names.ratelimit_cluster
    bed = envoy_config.bootstrap(free_topology(), rate_limit_mode="rlqs")
    bed_rlqs = next(c for c in bed["static_resources"]["clusters"] if c["name"] == "rlqs")
    assert clusters[names.ratelimit_cluster]["health_checks"] == bed_rlqs["health_checks"]
    load = clusters[names.ratelimit_cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert load["endpoint"]["address"]["socket_address"]["port_value"] == istio.RATELIMIT_GRPC_PORT


def test_quota_push_carries_the_test_beds_quota_filter_settings() -> None:
    bed = envoy_config.bootstrap(free_topology(), rate_limit_mode="rlqs", gateway_name="igw")
    bed_quota = next(f for f in hcm_of(bed)["http_filters"] if f["name"] == QUOTA)
    ours = inserted_filters(render(QUOTA_PUSH), SHARED)[1]
    names = istio.ServiceNames("igw-system")
    ours["typed_config"]["rlqs_server"]["envoy_grpc"]["cluster_name"] = "rlqs"
    assert names.ratelimit_cluster != "rlqs"
    assert ours == bed_quota


@pytest.mark.parametrize("text", [QUOTA_PUSH, with_enforcement(dedicated="quota_push")],
                         ids=["shared-and-dedicated", "dedicated-only"])
def test_every_object_rendered_with_quota_push_validates(text: str, shared_dir: Path) -> None:
    objects = [o for objs in render(text).values() for o in objs]
    problems = validate_objects(objects)
    assert problems == [], "\n".join(map(str, problems))


TLS = ("  replica_watcher: {replicas: 2, cpu: 100m, memory: 128Mi}\n",
       "  replica_watcher: {replicas: 2, cpu: 100m, memory: 128Mi}\n"
       "  tls:\n    server_secret: igw-services-tls\n    gateway_secret: igw-gateway-tls\n")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("file", [SHARED, DEDICATED])
def test_envoy_accepts_the_gateway_with_the_quota_filter(file: str, tls: bool, tmp_path: Path) -> None:
    text = QUOTA_PUSH
    if tls:
        assert TLS[0] in text
        text = text.replace(*TLS)
    result = validate(gateway_config(text, file), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_with_tls_the_rlqs_cluster_carries_the_gateways_tls() -> None:
    files = render(QUOTA_PUSH.replace(*TLS))
    names = istio.ServiceNames("igw-system")
    cluster = next(p["patch"]["value"] for p in gateway_filter(files, SHARED)["spec"]["configPatches"]
                   if p["applyTo"] == "CLUSTER" and p["patch"]["value"]["name"] == names.ratelimit_cluster)
    assert "transport_socket" in cluster


def test_a_dedicated_gateway_inherits_the_shared_gateways_enforcement() -> None:
    policy = load_policy("policy.yaml", QUOTA_PUSH)
    assert policy.gateway.enforcement == "quota_push"
    assert policy.dedicated_gateways["secure-gw"].enforcement == "quota_push"


def test_a_dedicated_gateway_can_enforce_differently_from_the_shared_one() -> None:
    files = render(with_enforcement(shared="quota_push", dedicated="per_request"))
    assert [f["name"] for f in inserted_filters(files, SHARED)] == [EXT_PROC, QUOTA]
    assert [f["name"] for f in inserted_filters(files, DEDICATED)] == [EXT_PROC, RATELIMIT]
    files = render(with_enforcement(dedicated="quota_push"))
    assert [f["name"] for f in inserted_filters(files, SHARED)] == [EXT_PROC, RATELIMIT]
    assert [f["name"] for f in inserted_filters(files, DEDICATED)] == [EXT_PROC, QUOTA]


def test_per_request_spelled_out_renders_the_default_output() -> None:
    assert render(with_enforcement(shared="per_request", dedicated="per_request")) == render(DEMO_TEXT)


def test_quota_push_changes_only_the_gateway_envoy_filters() -> None:
    plain = [o for objs in render(DEMO_TEXT).values() for o in objs]
    quota = [o for objs in render(QUOTA_PUSH).values() for o in objs]
    changed = sorted((a["kind"], a["metadata"]["name"]) for a, b in zip(plain, quota, strict=True) if a != b)
    assert changed == [("EnvoyFilter", "igw-gateway"), ("EnvoyFilter", "secure-gw-igw")]


@pytest.mark.parametrize(("shared", "dedicated", "needle", "path"), [
    ("quota-push", None, "  enforcement: quota-push\n", "gateway.enforcement"),
    (None, "rlqs", "    enforcement: rlqs\n", "dedicated_gateways.secure-gw.enforcement"),
], ids=["shared", "dedicated"])
def test_an_unknown_enforcement_is_refused_with_file_line_and_path(shared: str | None, dedicated: str | None,
                                                                   needle: str, path: str) -> None:
    text = with_enforcement(shared=shared, dedicated=dedicated)
    line = text[:text.index(needle)].count("\n") + 1
    value = shared or dedicated
    with pytest.raises(PolicyError) as exc:
        load_policy("policy.yaml", text)
    assert (f"policy.yaml:{line}: {path}: unknown enforcement {value!r} (use one of: per_request, quota_push)"
            in str(exc.value))
