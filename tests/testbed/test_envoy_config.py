"""The Envoy configs in the repo: generated from igw/envoy_config.py, accepted by the real Envoy binary."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from igw import envoy_config
from igw.launcher import envoy_binary
from igw.procs import REPO_ROOT
from igw.topology import EXT_PROC_CLUSTER, RATELIMIT_CLUSTER, free_topology


def _envoy_yaml_files() -> list[Path]:
    """Every YAML file in the repo that is an Envoy bootstrap (has static_resources or admin at top level)."""
    found = []
    for path in sorted(REPO_ROOT.rglob("*.yaml")):
        if any(part in (".venv", ".git", "node_modules") for part in path.relative_to(REPO_ROOT).parts):
            continue
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and "static_resources" in doc:
            found.append(path)
    return found


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)


def test_committed_envoy_configs_equal_the_generator_output() -> None:
    for path, text in envoy_config.committed_files().items():
        assert path.read_text() == text, f"{path} is stale: run python -m igw.envoy_config --write"


def test_the_repo_holds_every_committed_envoy_config() -> None:
    files = _envoy_yaml_files()
    assert envoy_config.COMMITTED_LOCAL in files
    assert envoy_config.COMMITTED_COMPOSE in files
    assert envoy_config.COMMITTED_RLQS in files  # so the validate test below covers quota push too


@pytest.mark.parametrize("path", _envoy_yaml_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_envoy_accepts_every_envoy_config_in_the_repo_without_deprecated_fields(path: Path) -> None:
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Deprecated field" not in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("path", [*_envoy_yaml_files(), *sorted((REPO_ROOT / "istio").glob("*.yaml"))],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_committed_configs_spell_everything_out_without_yaml_anchors(path: Path) -> None:
    """An operator reading or diffing a config sees each value where it applies, not `*id001`."""
    events = yaml.parse(path.read_text())
    assert not [e for e in events if getattr(e, "anchor", None)], f"{path} uses YAML anchors or aliases"


def test_envoy_accepts_the_bed_bootstrap_with_two_replicas_of_everything(tmp_path: Path) -> None:
    topology = free_topology(replicas=2, model_replicas=2)
    path = tmp_path / "bed.yaml"
    path.write_text(envoy_config.render_yaml(
        envoy_config.bootstrap(topology, access_log_path=str(tmp_path / "access.log")), "test"))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    clusters = {c["name"]: c for c in yaml.safe_load(path.read_text())["static_resources"]["clusters"]}
    assert len(clusters[EXT_PROC_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    assert len(clusters["model-demo-linear"]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_bed_bootstrap_declares_spare_model_endpoints_up_to_max_model_replicas(tmp_path: Path) -> None:
    topology = free_topology(model_replicas=2, max_model_replicas=5)
    config = envoy_config.bootstrap(topology, access_log_path=str(tmp_path / "access.log"))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in clusters["model-demo-linear"]["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [e.port for e in topology.model_endpoints("demo-linear")]
    assert len(ports) == len(set(ports)) == 5
    assert len(topology.models["demo-linear"]) == 2  # the running ones; the rest are spares
    assert clusters["model-demo-linear"]["common_lb_config"]["healthy_panic_threshold"]["value"] == 0.0


def test_rlqs_mode_puts_the_quota_filter_between_ext_proc_and_router_and_targets_the_ratelimit_replicas(
        tmp_path: Path) -> None:
    topology = free_topology(replicas=2)
    config = envoy_config.bootstrap(topology, access_log_path=str(tmp_path / "a.log"), rate_limit_mode="rlqs")
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.ext_proc", "envoy.filters.http.rate_limit_quota", "envoy.filters.http.router"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert RATELIMIT_CLUSTER not in clusters
    rlqs = clusters["rlqs"]
    assert rlqs["health_checks"][0]["grpc_health_check"]["service_name"] == \
        "envoy.service.rate_limit_quota.v3.RateLimitQuotaService"
    ports = {e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in rlqs["load_assignment"]["endpoints"][0]["lb_endpoints"]}
    assert ports == {s.grpc.port for s in topology.ratelimit}
    path = tmp_path / "rlqs.yaml"
    path.write_text(envoy_config.render_yaml(config, "test"))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unknown_rate_limit_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="rate-limit mode must be one of rls, rlqs, got 'local'"):
        envoy_config.bootstrap(free_topology(), rate_limit_mode="local")


def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    """The validation test above can fail: a misspelled field is refused by the same binary."""
    config = envoy_config.bootstrap(free_topology())
    config["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _validate(path)
    assert result.returncode != 0
    assert "conect_timeout" in result.stdout + result.stderr


def test_filters_run_ext_proc_then_rate_limit_then_router() -> None:
    names = [f["name"] for f in envoy_config.http_filters()]
    assert names == ["envoy.filters.http.ext_proc", "envoy.filters.http.ratelimit", "envoy.filters.http.router"]


def test_ext_proc_fails_closed_and_sends_request_headers_only() -> None:
    cfg = envoy_config.ext_proc_filter("some_cluster")["typed_config"]
    assert cfg["failure_mode_allow"] is False
    assert cfg["grpc_service"]["envoy_grpc"]["cluster_name"] == "some_cluster"
    assert cfg["processing_mode"] == {
        "request_header_mode": "SEND", "response_header_mode": "SKIP", "request_body_mode": "NONE",
        "response_body_mode": "NONE", "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
    }
    assert cfg["allow_mode_override"] is True
    assert cfg["message_timeout"] == "0.5s"
    assert cfg["request_attributes"] == []


def test_ext_proc_is_sent_only_the_headers_it_reads_and_every_header_it_strips() -> None:
    patterns = envoy_config.ext_proc_filter()["typed_config"]["forward_rules"]["allowed_headers"]["patterns"]
    assert [p["exact"] for p in patterns if "exact" in p] == [
        ":path", ":method", "content-type", "content-length", "content-encoding", "authorization", "x-api-key",
        "x-request-id"]
    assert [p for p in patterns if "prefix" in p] == [
        {"prefix": "x-igw-", "ignore_case": True}, {"prefix": "x-envoy-", "ignore_case": True}]


def test_rate_limit_fails_open_in_domain_igw_with_draft_headers() -> None:
    cfg = envoy_config.ratelimit_filter("rl", envoy_config.Timeouts(ratelimit=0.15))["typed_config"]
    assert cfg["domain"] == "igw"
    assert cfg["failure_mode_deny"] is False
    assert cfg["timeout"] == "0.15s"
    assert cfg["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    assert cfg["rate_limited_as_resource_exhausted"] is False
    assert cfg["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "rl"


def test_route_rate_limits_build_tenant_tenant_model_and_model_descriptors() -> None:
    descriptors = [
        [(a["request_headers"]["header_name"], a["request_headers"]["descriptor_key"]) for a in rl["actions"]]
        for rl in envoy_config.route_rate_limits()
    ]
    assert descriptors == [
        [("x-igw-tenant", "tenant")],
        [("x-igw-tenant", "tenant"), ("x-igw-model", "model")],
        [("x-igw-model", "model")],
    ]


def test_the_virtual_host_looks_the_model_header_up_in_an_exact_match_map_not_a_route_list() -> None:
    vhost = envoy_config.route_config(["a", "b"])["virtual_hosts"][0]
    assert "routes" not in vhost
    tree = vhost["matcher"]["matcher_tree"]
    assert tree["input"]["typed_config"]["header_name"] == "x-igw-model"
    assert set(tree["exact_match_map"]["map"]) == {"a", "b"}


def test_each_model_routes_to_its_cluster_with_the_rate_limit_actions_and_anything_else_gets_a_json_404() -> None:
    routes = envoy_config.routes_of(envoy_config.route_config(["a", "b"])["virtual_hosts"][0])
    assert [(r["name"], r["route"]["cluster"]) for r in routes[:2]] == [("model-a", "model-a"), ("model-b", "model-b")]
    assert all(r["route"]["rate_limits"] == envoy_config.route_rate_limits() for r in routes[:2])
    # The matcher already compared the header; Envoy checks a selected route's `match` again.
    assert all(r["match"] == {"prefix": "/"} for r in routes)
    fallback = routes[-1]
    assert fallback["direct_response"]["status"] == 404


def test_a_model_route_retries_refused_connections_on_another_replica_of_the_same_cluster() -> None:
    route = envoy_config.routes_of(envoy_config.route_config(["a"])["virtual_hosts"][0])[0]["route"]
    assert route["retry_policy"]["retry_on"] == "connect-failure,refused-stream,reset-before-request"
    assert route["retry_policy"]["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert route["cluster"] == "model-a"


def test_a_model_route_never_retries_a_request_the_model_server_may_have_read() -> None:
    # An inference is not idempotent: only failures before any request byte left Envoy may be retried.
    route = envoy_config.model_route("a")["route"]
    conditions = set(route["retry_policy"]["retry_on"].split(","))
    assert conditions <= {"connect-failure", "refused-stream", "reset-before-request"}
    assert "retriable_status_codes" not in route["retry_policy"]


def test_model_clusters_close_idle_connections_before_common_model_server_keep_alive_timeouts() -> None:
    for path in envoy_config.committed_files():
        clusters = yaml.safe_load(path.read_text())["static_resources"]["clusters"]
        models = [c for c in clusters if c["name"].startswith("model-")]
        assert models, path
        for cluster in models:
            options = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            assert options["common_http_protocol_options"]["idle_timeout"] == "4s", (path, cluster["name"])
            assert options["explicit_http_config"] == {"http_protocol_options": {}}  # still HTTP/1.1


@pytest.mark.parametrize("idle", [0.0, -1.0])
def test_a_model_idle_timeout_that_would_keep_connections_forever_is_refused_by_name(idle: float) -> None:
    timeouts = envoy_config.Timeouts(upstream_idle=idle)
    with pytest.raises(ValueError, match="upstream idle timeout must be above 0 s"):
        envoy_config.model_cluster("a", [envoy_config.Endpoint("127.0.0.1", 1234)], timeouts=timeouts)


def test_routes_of_reads_a_plain_route_list_too() -> None:
    routes = [envoy_config.model_route("a"), envoy_config.unknown_model_route()]
    vhost = {"name": "v", "domains": ["*"], "routes": routes}
    assert [r["name"] for r in envoy_config.routes_of(vhost)] == ["model-a", "unknown-model"]


def test_grpc_service_clusters_use_http2_grpc_health_checks_and_outlier_detection() -> None:
    ep = envoy_config.Endpoint("127.0.0.1", 1234)
    cluster = envoy_config.service_cluster(RATELIMIT_CLUSTER, [ep])
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    check = cluster["health_checks"][0]
    assert "grpc_health_check" in check
    assert check["no_traffic_interval"] == check["interval"]
    assert cluster["outlier_detection"]["enforcing_consecutive_gateway_failure"] == 100
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0.0
    assert cluster["connect_timeout"] == "0.25s"


def test_access_log_is_one_json_object_with_the_documented_fields() -> None:
    fmt = envoy_config.access_log("/tmp/x.log")[0]["typed_config"]["log_format"]["json_format"]
    assert set(fmt) >= {"time", "request_id", "tenant", "model", "method", "path", "status", "response_flags",
                        "rate_limited", "response_code_details", "upstream_host", "bytes_received", "bytes_sent",
                        "duration_ms", "upstream_service_time_ms"}


def _hcm(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_the_bed_renders_envoys_own_replies_with_local_reply_config_and_no_catch_all_body_format() -> None:
    # A top-level body_format would reformat every local reply, the processor's and the JSON 404 among them.
    config = _hcm(envoy_config.bootstrap(free_topology()))["local_reply_config"]
    assert config == envoy_config.local_reply_config()
    assert "body_format" not in config


def test_the_first_local_reply_mapper_lets_our_own_replies_through_unchanged() -> None:
    first = envoy_config.local_reply_config()["mappers"][0]
    assert set(first) == {"filter"}  # matched, nothing rewritten: later mappers are not tried
    expression = first["filter"]["extension_filter"]["typed_config"]["expression"]
    assert "startsWith('igw_')" in expression
    assert all(f"'{details}'" in expression for details in ("direct_response", "rate_limited_by_quota"))


def test_every_mapped_local_reply_is_the_processors_json_error_with_the_request_id() -> None:
    mappers = envoy_config.local_reply_config()["mappers"][1:]
    assert len(mappers) == len(envoy_config.LOCAL_REPLIES)
    for reply, mapper in zip(envoy_config.LOCAL_REPLIES, mappers, strict=True):
        body = mapper["body_format_override"]
        assert body["content_type"] == "application/json"
        assert json.loads(body["text_format_source"]["inline_string"]) == {
            "error": {"code": reply.code, "message": reply.message}}
        assert mapper["headers_to_add"][0]["header"] == {"key": "x-request-id", "value": "%REQ(X-REQUEST-ID)%"}
        assert "status_code" not in mapper  # Envoy's status is kept


def test_local_reply_codes_are_distinct_and_the_catch_all_comes_last() -> None:
    codes = [r.code for r in envoy_config.LOCAL_REPLIES]
    assert len(set(codes)) == len(codes)
    assert envoy_config.LOCAL_REPLIES[-1].status is None and not envoy_config.LOCAL_REPLIES[-1].flags


def test_a_percent_sign_in_a_local_reply_message_is_escaped_for_envoys_formatter() -> None:
    reply = envoy_config.LocalReply("odd", "100% sure", 500)
    text = envoy_config.local_reply_mapper(reply)["body_format_override"]["text_format_source"]["inline_string"]
    assert text == '{"error":{"code":"odd","message":"100%% sure"}}'  # %% is Envoy's literal %


def test_a_local_reply_with_a_status_that_is_no_error_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'ok'.*400-599.*200"):
        envoy_config.LocalReply("ok", "fine", 200)
