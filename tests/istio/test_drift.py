"""What the EnvoyFilters inject is what the local test bed runs, and the real Envoy accepts it on a gateway.

The test bed's bootstrap (igw/envoy_config.bootstrap, what `igw up` starts) and the rendered
EnvoyFilters are compared field by field; only the names of the gRPC clusters (and the endpoints and
DNS discovery that come with living in a cluster) may differ. Any change to a filter, a timeout, a
failure mode, a rate-limit action, a cluster option or the access log on one side fails here.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest

from igw import envoy_config
from igw.launcher import envoy_binary
from igw.policy import gateway_check, istio
from igw.policy.load import load_policy_file
from igw.procs import REPO_ROOT
from igw.topology import EXT_PROC_CLUSTER, RATELIMIT_CLUSTER, free_topology

DEMO = REPO_ROOT / "config" / "policy" / "demo.yaml"


@pytest.fixture(scope="module")
def policy():
    return load_policy_file(DEMO)


@pytest.fixture(scope="module")
def shared_filters(policy) -> list[dict[str, Any]]:
    return [o for o in istio.render(policy)["20-gateway.yaml"] if o["kind"] == "EnvoyFilter"]


@pytest.fixture(scope="module")
def testbed() -> dict[str, Any]:
    return envoy_config.bootstrap(free_topology())


def hcm_of(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def renamed(value: Any, names: dict[str, str]) -> Any:
    """The value with in-cluster cluster names replaced by the test bed's."""
    if isinstance(value, dict):
        return {k: renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def cluster_names(policy) -> dict[str, str]:
    names = istio.ServiceNames(policy.services.namespace)
    return {names.ext_proc_cluster: EXT_PROC_CLUSTER, names.ratelimit_cluster: RATELIMIT_CLUSTER}


def validate(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = copy.deepcopy(config)
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    path = tmp_path / "gateway.yaml"
    path.write_text(envoy_config.render_yaml(config, "gateway check"))
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
                          capture_output=True, text=True, timeout=60)


def test_envoy_accepts_the_gateway_with_our_filters_applied(policy, shared_filters, tmp_path: Path) -> None:
    config = gateway_check.gateway_bootstrap(policy, shared_filters, policy.gateway.hosts, policy.gateway.port)
    result = validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_the_dedicated_gateway_with_its_filters_applied(policy, tmp_path: Path) -> None:
    gw = policy.dedicated_gateways["secure-gw"]
    filters = [o for o in istio.render(policy)["40-dedicated-secure-gw.yaml"] if o["kind"] == "EnvoyFilter"]
    result = validate(gateway_check.gateway_bootstrap(policy, filters, gw.hosts, gw.port), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_rejects_a_broken_patch_value(policy, shared_filters, tmp_path: Path) -> None:
    """The check above can fail: a misspelled field in a patch value is refused by the same binary."""
    broken = copy.deepcopy(shared_filters)
    broken[0]["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["failure_mode_alow"] = True
    config = gateway_check.gateway_bootstrap(policy, broken, policy.gateway.hosts, policy.gateway.port)
    result = validate(config, tmp_path)
    assert result.returncode != 0
    assert "failure_mode_alow" in result.stdout + result.stderr


def test_a_patch_that_matches_nothing_is_an_error(policy, shared_filters) -> None:
    broken = copy.deepcopy(shared_filters)
    broken[0]["spec"]["configPatches"][-1]["match"]["routeConfiguration"]["vhost"]["name"] = "nope:80"
    with pytest.raises(gateway_check.PatchError, match="matched nothing"):
        gateway_check.gateway_bootstrap(policy, broken, policy.gateway.hosts, policy.gateway.port)


def test_the_gateway_runs_the_test_beds_http_filters_in_the_same_order(policy, shared_filters, testbed) -> None:
    gateway = gateway_check.gateway_bootstrap(policy, shared_filters, policy.gateway.hosts, policy.gateway.port)
    assert renamed(hcm_of(gateway)["http_filters"], cluster_names(policy)) == hcm_of(testbed)["http_filters"]


def test_the_gateway_sends_the_test_beds_rate_limit_descriptors(policy, shared_filters, testbed) -> None:
    gateway = gateway_check.gateway_bootstrap(policy, shared_filters, policy.gateway.hosts, policy.gateway.port)
    bed_routes = envoy_config.routes_of(hcm_of(testbed)["route_config"]["virtual_hosts"][0])
    bed_actions = [r["route"]["rate_limits"] for r in bed_routes if "route" in r]
    assert bed_actions and all(a == bed_actions[0] for a in bed_actions)
    for vhost in hcm_of(gateway)["route_config"]["virtual_hosts"]:
        assert vhost["rate_limits"] == bed_actions[0]


def test_the_gateway_writes_the_test_beds_access_log(policy, shared_filters, testbed) -> None:
    gateway = gateway_check.gateway_bootstrap(policy, shared_filters, policy.gateway.hosts, policy.gateway.port)
    assert hcm_of(gateway)["access_log"][0]["typed_config"]["log_format"] == \
        hcm_of(testbed)["access_log"][0]["typed_config"]["log_format"]


def test_grpc_service_clusters_differ_from_the_test_beds_only_in_name_address_and_discovery(
        policy, shared_filters, testbed) -> None:
    added = [p["patch"]["value"] for f in shared_filters for p in f["spec"]["configPatches"]
             if p["applyTo"] == "CLUSTER"]
    bed = {c["name"]: c for c in testbed["static_resources"]["clusters"]}
    names = cluster_names(policy)
    assert sorted(names[c["name"]] for c in added) == sorted([EXT_PROC_CLUSTER, RATELIMIT_CLUSTER])

    def comparable(cluster: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cluster.items()
                if k not in ("name", "load_assignment", "type", "cluster_type")}

    for cluster in added:
        dns = cluster["cluster_type"]["typed_config"]
        assert dns["@type"].endswith("DnsCluster") and dns["all_addresses_in_single_endpoint"] is False  # STRICT_DNS
        assert comparable(cluster) == comparable(bed[names[cluster["name"]]])


def test_routes_keep_the_test_beds_timeout_and_retries(policy) -> None:
    model = policy.models["demo-linear"]
    route = istio.model_http_route(model)
    local = envoy_config.model_route(model.name)["route"]
    assert route["timeout"] == local["timeout"]
    assert (route["retries"]["attempts"], route["retries"]["retryOn"]) == (
        local["retry_policy"]["num_retries"], local["retry_policy"]["retry_on"])
    assert local["retry_policy"]["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert route["retries"]["retryIgnorePreviousHosts"] is True


def test_destination_rules_keep_the_test_beds_outlier_detection(policy) -> None:
    model = policy.models["demo-linear"]
    od = istio.destination_rule(model)["spec"]["trafficPolicy"]["outlierDetection"]
    local = envoy_config.model_cluster(model.name, [envoy_config.Endpoint("127.0.0.1", 1)])["outlier_detection"]
    assert (od["consecutiveGatewayErrors"], od["consecutive5xxErrors"], od["consecutiveLocalOriginFailures"],
            od["interval"], od["baseEjectionTime"], od["maxEjectionPercent"]) == (
        local["consecutive_gateway_failure"], local["consecutive_5xx"], local["consecutive_local_origin_failure"],
        local["interval"], local["base_ejection_time"], local["max_ejection_percent"])



@pytest.mark.parametrize(("manifest", "dedicated"), [("20-gateway.yaml", None), ("40-dedicated-secure-gw.yaml",
                                                                                 "secure-gw")])
def test_the_gateway_answers_its_own_replies_with_the_test_beds_local_reply_config(
        policy, testbed, manifest: str, dedicated: str | None) -> None:
    gw = policy.dedicated_gateways[dedicated] if dedicated else policy.gateway
    filters = [o for o in istio.render(policy)[manifest] if o["kind"] == "EnvoyFilter"]
    gateway = gateway_check.gateway_bootstrap(policy, filters, gw.hosts, gw.port)
    assert hcm_of(gateway)["local_reply_config"] == hcm_of(testbed)["local_reply_config"]
