"""The Istio manifests: committed = fresh render, every object valid against the CRD and Kubernetes schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from igw import envoy_config
from igw.commands.policy import RENDER_MARK
from igw.policy import istio
from igw.policy.kube_schema import MAX_OBJECT_BYTES, validate_object, validate_objects
from igw.policy.load import load_policy, load_policy_file
from igw.procs import REPO_ROOT
from tests.policy.helpers import many_models

DEMO = REPO_ROOT / "config" / "policy" / "demo.yaml"
ISTIO_DIR = REPO_ROOT / "istio"


@pytest.fixture(scope="module")
def demo() -> dict[str, list[dict]]:
    return istio.render(load_policy_file(DEMO))


def all_objects(files: dict[str, list[dict]]) -> list[dict]:
    return [o for objs in files.values() for o in objs]


def test_committed_manifests_equal_a_fresh_render() -> None:
    # As the CLI renders it: the policy named by its path relative to the repository.
    fresh = istio.render_text(load_policy("config/policy/demo.yaml", DEMO.read_text()))
    committed = {p.name: p.read_text() for p in ISTIO_DIR.glob("*.yaml") if p.read_text().startswith(RENDER_MARK)}
    assert committed == fresh, "istio/ is stale: run igw render istio --policy config/policy/demo.yaml --out istio"


def test_every_committed_manifest_validates(shared_dir: Path) -> None:
    for path in sorted(ISTIO_DIR.glob("*.yaml")):
        objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
        assert objects, path
        assert validate_objects(objects) == [], path


def test_every_rendered_object_validates(demo: dict[str, list[dict]], shared_dir: Path) -> None:
    problems = validate_objects(all_objects(demo))
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize(("kind", "path", "field"), [
    ("DestinationRule", ("spec", "trafficPolicy", "outlierDetection"), "consecutiveErrorz"),
    ("VirtualService", ("spec",), "gateway"),
    ("EnvoyFilter", ("spec",), "configPatch"),
    ("Gateway", ("spec", "servers", 0), "tls_mode"),
    ("Deployment", ("spec", "template", "spec", "containers", 0), "readynessProbe"),
    ("HorizontalPodAutoscaler", ("spec",), "minReplica"),
    ("PodDisruptionBudget", ("spec",), "maxUnavailible"),
    ("ConfigMap", (), "date"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_an_unknown_field_fails_validation(demo: dict[str, list[dict]], kind: str, path: tuple, field: str) -> None:
    import copy

    obj = copy.deepcopy(next(o for o in all_objects(demo) if o["kind"] == kind))
    target = obj
    for part in path:
        target = target[part]
    target[field] = 1
    problems = validate_object(obj)
    assert any(field in p.message for p in problems), problems


def test_a_wrong_enum_fails_validation(demo: dict[str, list[dict]]) -> None:
    import copy

    dr = copy.deepcopy(next(o for o in all_objects(demo) if o["kind"] == "DestinationRule"))
    dr["spec"]["trafficPolicy"]["loadBalancer"]["simple"] = "FASTEST"
    assert validate_object(dr) != []


def test_model_namespaces_and_the_services_namespace_get_no_sidecars(demo: dict[str, list[dict]]) -> None:
    namespaces = {o["metadata"]["name"]: o["metadata"]["labels"] for o in demo["00-namespaces.yaml"]}
    assert set(namespaces) == {"igw-system", "models"}
    assert all(labels["istio-injection"] == "disabled" for labels in namespaces.values())


def test_each_model_gets_a_least_request_destination_rule_with_outlier_detection(demo) -> None:
    rules = {o["spec"]["host"]: o["spec"]["trafficPolicy"] for o in demo["30-models.yaml"]
             if o["kind"] == "DestinationRule"}
    assert set(rules) == {"demo-linear.models.svc.cluster.local", "demo-logistic.models.svc.cluster.local"}
    logistic = rules["demo-logistic.models.svc.cluster.local"]
    assert logistic["loadBalancer"] == {"simple": "LEAST_REQUEST"}
    assert logistic["connectionPool"]["tcp"]["maxConnections"] == 256
    assert logistic["connectionPool"]["http"]["http2MaxRequests"] == 512
    assert logistic["outlierDetection"]["consecutiveGatewayErrors"] == 3
    assert logistic["outlierDetection"]["minHealthPercent"] == 0


def test_model_destination_rules_close_idle_connections_as_the_bed_does(demo) -> None:
    bed = envoy_config.DEFAULT_TIMEOUTS.upstream_idle
    rules = [o for f in ("30-models.yaml", "40-dedicated-secure-gw.yaml") for o in demo.get(f, [])
             if o["kind"] == "DestinationRule"]
    assert rules
    assert {r["spec"]["trafficPolicy"]["connectionPool"]["http"]["idleTimeout"] for r in rules} == {
        envoy_config.duration(bed)}


def test_model_routes_retry_resets_only_before_the_request_was_sent(demo) -> None:
    routes = [r for o in all_objects(demo) if o["kind"] == "VirtualService" for r in o["spec"]["http"]]
    assert routes
    assert {r["retries"]["retryOn"] for r in routes} == {"connect-failure,refused-stream,reset-before-request"}


def test_routes_match_the_model_header_and_keep_dedicated_tenants_off_the_shared_gateway(demo) -> None:
    (vs,) = demo["21-virtual-services.yaml"]
    routes = {r["name"]: r for r in vs["spec"]["http"]}
    linear = routes["model-demo-linear"]
    assert linear["match"] == [{"headers": {"x-igw-model": {"exact": "demo-linear"}},
                                "withoutHeaders": {"x-igw-tenant": {"regex": "^(secure)$"}}}]
    assert linear["route"] == [{"destination": {"host": "demo-linear.models.svc.cluster.local",
                                                "port": {"number": 8080}}}]
    dedicated = next(o for o in demo["40-dedicated-secure-gw.yaml"] if o["kind"] == "VirtualService")
    assert [r["name"] for r in dedicated["spec"]["http"]] == ["model-demo-logistic"]
    assert dedicated["spec"]["http"][0]["match"][0]["headers"]["x-igw-tenant"] == {"regex": "^(secure)$"}
    assert dedicated["spec"]["gateways"] == ["team-secure/secure-gw"]


@pytest.mark.parametrize("file", ["20-gateway.yaml", "40-dedicated-secure-gw.yaml"])
def test_ext_proc_on_every_gateway_clears_the_route_cache_so_routes_see_its_model_header(demo, file: str) -> None:
    # Istio's gateway picks the route before ext_proc runs; only a cleared cache makes the router match the
    # VirtualService's x-igw-model header on the canonical name ext_proc set (an alias would find no route).
    (ef,) = [o for o in demo[file] if o["kind"] == "EnvoyFilter" and "access-log" not in o["metadata"]["name"]]
    (ext_proc,) = [p["patch"]["value"] for p in ef["spec"]["configPatches"]
                   if p["applyTo"] == "HTTP_FILTER" and p["patch"]["value"]["name"] == "envoy.filters.http.ext_proc"]
    assert ext_proc["typed_config"]["route_cache_action"] == "CLEAR"
    first = next(p["patch"]["value"]["name"] for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER")
    assert first == "envoy.filters.http.ext_proc"  # before the rate-limit filter, which reads x-igw-tenant


def test_dedicated_gateway_has_its_own_workload_and_filters(demo) -> None:
    objects = demo["40-dedicated-secure-gw.yaml"]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds.count("EnvoyFilter") == 2
    assert {"Deployment", "Service", "Gateway", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    assert all(o["metadata"].get("namespace", "team-secure") == "team-secure" for o in objects)
    for ef in (o for o in objects if o["kind"] == "EnvoyFilter"):
        assert ef["spec"]["workloadSelector"]["labels"] == {"istio": "secure-gw"}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["template"]["metadata"]["annotations"]["inject.istio.io/templates"] == "gateway"


def test_services_have_deployments_services_and_disruption_budgets(demo) -> None:
    objects = demo["10-services.yaml"]
    for app in ("ext-proc", "ratelimit", "replica-watcher"):
        assert {o["kind"] for o in objects if o["metadata"]["name"] == app} >= {
            "Deployment", "Service", "PodDisruptionBudget"}
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "HorizontalPodAutoscaler"} == {
        "ext-proc", "ratelimit"}
    grpc = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Service"}
    assert grpc["ext-proc"]["clusterIP"] == "None"  # Envoy's STRICT_DNS cluster sees every pod
    assert grpc["ratelimit"]["clusterIP"] == "None"


def test_redis_shards_of_the_policy_reach_the_rate_limit_service_only() -> None:
    text = DEMO.read_text().replace(
        "  redis_url: redis://redis.igw-system.svc.cluster.local:6379/0\n",
        "  redis_url: redis://redis.igw-system.svc.cluster.local:6379/0\n"
        "  redis_shards: [redis://counters-0.igw-system:6379/0, redis://counters-1.igw-system:6379/0]\n")
    objects = istio.render(load_policy(str(DEMO), text))["10-services.yaml"]
    env = {o["metadata"]["name"]: {e["name"]: e.get("value") for e in
                                   o["spec"]["template"]["spec"]["containers"][0].get("env", [])}
           for o in objects if o["kind"] == "Deployment"}
    assert env["ratelimit"]["REDIS_SHARDS"] == "redis://counters-0.igw-system:6379/0,redis://counters-1.igw-system:6379/0"
    assert "REDIS_SHARDS" not in env["ext-proc"]
    assert validate_objects(objects) == []


def test_the_rate_limit_config_map_is_mounted_where_the_service_watches(demo) -> None:
    (cm,) = demo["11-ratelimit-config.yaml"]
    rl = next(o for o in demo["10-services.yaml"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "ratelimit")
    pod = rl["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"][container["args"].index("--config-dir") + 1] == mount
    assert pod["volumes"][0]["projected"]["sources"] == [{"configMap": {"name": cm["metadata"]["name"]}}]
    from ratelimit_svc.config import parse_config

    assert parse_config(sorted(cm["data"].items())).limit_count() > 0


def test_model_deployments_use_the_pre_warm_hook_for_startup(demo) -> None:
    deployment = next(o for o in demo["30-models.yaml"] if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"  # the default prewarm_path
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    service = next(o for o in demo["30-models.yaml"] if o["kind"] == "Service")
    assert service["metadata"]["labels"]["igw.ai/model"] == "demo-linear"  # the replica watcher's selector


def test_a_prewarm_path_moves_the_startup_probe() -> None:
    text = DEMO.read_text().replace("      replicas: 2\n  demo-logistic:",
                                    "      replicas: 2\n      prewarm_path: /warm\n  demo-logistic:")
    files = istio.render(load_policy("demo.yaml", text))
    deployment = next(o for o in files["30-models.yaml"] if o["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["httpGet"]["path"] == "/warm"


def test_two_hundred_models_render_valid_objects_under_the_size_limit(shared_dir: Path) -> None:
    files = istio.render(load_policy("p.yaml", many_models(200)))
    objects = all_objects(files)
    assert len([o for o in objects if o["kind"] == "DestinationRule"]) == 200
    assert validate_objects(objects) == []
    assert max(len(json.dumps(o)) for o in objects) < MAX_OBJECT_BYTES


def test_routes_are_split_across_virtual_services_past_the_size_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(istio, "ROUTES_BYTES", 8 * 1024)
    files = istio.render(load_policy("p.yaml", many_models(200)))
    services = files["21-virtual-services.yaml"]
    assert len(services) > 1
    names = [r["name"] for vs in services for r in vs["spec"]["http"]]
    assert len(names) == len(set(names)) == 200
    assert len({tuple(vs["spec"]["hosts"]) for vs in services}) == 1  # merged by Istio on the same host


@pytest.mark.parametrize("name", ["ext-proc", "ratelimit", "replica-watcher"])
def test_service_pods_leave_rotation_on_a_dependency_outage_and_restart_only_when_wedged(demo, name: str) -> None:
    deployment = next(o for o in demo["10-services.yaml"]
                      if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"  # 503 while Redis or the API is out
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"  # 200 while the process answers
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"


def _service_pod(demo: dict[str, list[dict]], name: str) -> dict:
    return next(o for o in demo["10-services.yaml"]
                if o["kind"] == "Deployment" and o["metadata"]["name"] == name)["spec"]["template"]["spec"]


def _drain_seconds(pod: dict) -> float:
    args = pod["containers"][0]["args"]
    return float(args[args.index("--drain-seconds") + 1])


def _gateway_detection_seconds() -> float:
    """How long after a service turns NOT_SERVING a gateway may still send it new calls: the health checks of
    the gRPC clusters every gateway gets, interval x unhealthy threshold, plus a probe's timeout."""
    (check,) = envoy_config.service_cluster("x", [envoy_config.Endpoint("x", 1)], discovery="STRICT_DNS")[
        "health_checks"]
    return float(check["interval"][:-1]) * check["unhealthy_threshold"] + float(check["timeout"][:-1])


@pytest.mark.parametrize("name", ["ext-proc", "ratelimit"])
def test_grpc_service_pods_drain_until_the_gateways_health_checks_have_taken_them_out(demo, name: str) -> None:
    assert _drain_seconds(_service_pod(demo, name)) > _gateway_detection_seconds()


@pytest.mark.parametrize("name", ["ext-proc", "ratelimit"])
def test_grpc_service_pods_are_given_the_drain_and_the_longest_call_before_being_killed(demo, name: str) -> None:
    pod = _service_pod(demo, name)
    timeouts = envoy_config.DEFAULT_TIMEOUTS
    longest_call = max(timeouts.ext_proc_max_message, timeouts.ratelimit)
    assert pod["terminationGracePeriodSeconds"] > _drain_seconds(pod) + longest_call
