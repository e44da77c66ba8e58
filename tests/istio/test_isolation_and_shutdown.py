"""Who may reach the pods the gateways front (NetworkPolicies, pod security), how replicas are spread, and how
model replicas and dedicated gateways stop without cutting requests (preStop, grace periods, drain, budgets)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ext_proc.records import TIERS
from igw.policy import istio
from igw.policy.kube_schema import validate_object, validate_objects
from igw.policy.load import load_policy, load_policy_file
from igw.procs import REPO_ROOT

DEMO = REPO_ROOT / "config" / "policy" / "demo.yaml"
SHARED_GATEWAY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}},
                  "podSelector": {"matchLabels": {"istio": "ingressgateway"}}}
DEDICATED_GATEWAY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-secure"}},
                     "podSelector": {"matchLabels": {"istio": "secure-gw"}}}
Files = dict[str, list[dict]]


@pytest.fixture(scope="module")
def demo() -> Files:
    return istio.render(load_policy_file(DEMO))


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector's meaning, for the operators the renderer uses."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] != "Exists":
            raise AssertionError(f"operator {expr['operator']} not modelled here")
        if expr["key"] not in labels:
            return False
    return True


def render_demo(old: str, new: str) -> Files:
    text = DEMO.read_text()
    assert old in text
    return istio.render(load_policy("demo.yaml", text.replace(old, new)))


def test_model_pods_accept_connections_only_from_the_gateways_on_their_serving_ports(demo: Files) -> None:
    (policy,) = of_kind(demo["30-models.yaml"], "NetworkPolicy").values()
    assert policy["metadata"]["namespace"] == "models"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [SHARED_GATEWAY, DEDICATED_GATEWAY],
                                          "ports": [{"protocol": "TCP", "port": 8080}]}]


def test_every_rendered_model_pod_is_isolated_by_the_models_network_policy(demo: Files) -> None:
    policies = of_kind(demo["30-models.yaml"], "NetworkPolicy").values()
    deployments = of_kind(demo["30-models.yaml"], "Deployment").values()
    assert deployments
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(p["metadata"]["namespace"] == deployment["metadata"]["namespace"]
                   and selects(p["spec"]["podSelector"], labels) for p in policies), deployment["metadata"]["name"]


def test_a_model_deployed_elsewhere_restricts_its_callers_but_not_its_ports() -> None:
    # demo-logistic in a namespace of its own and without a deployment: its pods are someone else's,
    # listening on whatever port its Service points at.
    text = DEMO.read_text().replace("  demo-logistic:\n    namespace: models\n",
                                    "  demo-logistic:\n    namespace: serving\n")
    deployment = ("    deployment:\n      image: igw-services:dev\n      args: [python, -m, igw.model_server, --model, "
                  "demo-logistic, --host, 0.0.0.0, --port, \"8080\"]\n      replicas: 2\n")
    assert deployment in text
    files = istio.render(load_policy("demo.yaml", text.replace(deployment, "")))
    policies = {p["metadata"]["namespace"]: p["spec"]["ingress"] for p in files["30-models.yaml"]
                if p["kind"] == "NetworkPolicy"}
    assert policies == {
        "serving": [{"from": [SHARED_GATEWAY, DEDICATED_GATEWAY]}],
        "models": [{"from": [SHARED_GATEWAY, DEDICATED_GATEWAY], "ports": [{"protocol": "TCP", "port": 8080}]}],
    }


@pytest.mark.parametrize(("name", "grpc", "admin"), [("ext-proc", 9002, 9003), ("ratelimit", 8081, 8080)])
def test_service_grpc_ports_accept_only_the_gateways_and_admin_ports_anyone(demo: Files, name: str, grpc: int,
                                                                            admin: int) -> None:
    policy = of_kind(demo["10-services.yaml"], "NetworkPolicy")[name]
    deployment = of_kind(demo["10-services.yaml"], "Deployment")[name]
    assert selects(policy["spec"]["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert policy["spec"]["ingress"] == [
        {"from": [SHARED_GATEWAY, DEDICATED_GATEWAY], "ports": [{"protocol": "TCP", "port": grpc}]},
        {"ports": [{"protocol": "TCP", "port": admin}]},  # probes and /metrics
    ]
    ports = {p["name"]: p["containerPort"] for p in pod_spec(deployment)["containers"][0]["ports"]}
    assert ports == {"grpc": grpc, "http-admin": admin}


def test_network_policies_validate_and_a_misspelled_field_does_not(demo: Files, shared_dir: Path) -> None:
    policies = [o for objs in demo.values() for o in objs if o["kind"] == "NetworkPolicy"]
    assert len(policies) == 3
    assert validate_objects(policies) == []
    broken = copy.deepcopy(policies[0])
    broken["spec"]["ingress"][0]["froms"] = broken["spec"]["ingress"][0].pop("from")
    assert any("froms" in p.message for p in validate_object(broken))


def test_model_pods_keep_serving_until_the_gateways_stop_sending_then_finish_the_longest_request(
        demo: Files) -> None:
    longest_tier_s = max(t.timeout_ms for t in TIERS.values()) // 1000
    for deployment in of_kind(demo["30-models.yaml"], "Deployment").values():
        spec = pod_spec(deployment)
        sleep = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep >= 5  # istiod's EDS push to the gateways, debounced
        assert spec["terminationGracePeriodSeconds"] > sleep + longest_tier_s


def test_a_tenant_timeout_longer_than_any_tier_lengthens_the_model_grace_period() -> None:
    files = render_demo("    tier: premium\n", "    tier: premium\n    timeout_ms: 600000\n")
    for deployment in of_kind(files["30-models.yaml"], "Deployment").values():
        spec = pod_spec(deployment)
        assert spec["terminationGracePeriodSeconds"] > spec["containers"][0]["lifecycle"]["preStop"]["sleep"][
            "seconds"] + 600


def test_model_pods_mount_no_service_account_token(demo: Files) -> None:
    for deployment in of_kind(demo["30-models.yaml"], "Deployment").values():
        assert pod_spec(deployment)["automountServiceAccountToken"] is False


def test_each_model_deployment_has_a_disruption_budget_of_one_replica(demo: Files) -> None:
    budgets = of_kind(demo["30-models.yaml"], "PodDisruptionBudget")
    for name, deployment in of_kind(demo["30-models.yaml"], "Deployment").items():
        assert budgets[name]["spec"]["maxUnavailable"] == 1
        assert selects(budgets[name]["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


def test_a_dedicated_gateway_drains_for_the_longest_request_before_it_exits(demo: Files) -> None:
    deployment = of_kind(demo["40-dedicated-secure-gw.yaml"], "Deployment")["secure-gw"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    longest_tier_s = max(t.timeout_ms for t in TIERS.values()) // 1000
    assert annotations["proxy.istio.io/config"] == f"terminationDrainDuration: {longest_tier_s}s"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > longest_tier_s


def test_every_rendered_container_meets_the_restricted_pod_security_level(demo: Files) -> None:
    deployments = [o for name in ("10-services.yaml", "30-models.yaml") for o in demo[name]
                   if o["kind"] == "Deployment"]
    assert len(deployments) == 5
    for deployment in deployments:
        context = pod_spec(deployment)["containers"][0]["securityContext"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, deployment["metadata"]["name"]
        assert context["allowPrivilegeEscalation"] is False and context["runAsNonRoot"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}


def test_replicas_spread_across_zones_and_then_nodes(demo: Files) -> None:
    deployments = [o for objs in demo.values() for o in objs if o["kind"] == "Deployment"]
    for deployment in deployments:
        constraints = pod_spec(deployment)["topologySpreadConstraints"]
        assert [c["topologyKey"] for c in constraints] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(selects(c["labelSelector"], labels) and c["whenUnsatisfiable"] == "ScheduleAnyway"
                   for c in constraints)
