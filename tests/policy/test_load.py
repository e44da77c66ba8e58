"""Loading a policy: defaults resolved, and every kind of bad input named by file, line and path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from igw.policy.load import MAX_MODELS, PolicyError, load_policy, load_policy_file, schema
from igw.procs import REPO_ROOT
from tests.policy.helpers import BASE, load, many_models, policy_text

DEMO = REPO_ROOT / "config" / "policy" / "demo.yaml"


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(text)
    return str(info.value).splitlines()


def test_demo_policy_matches_the_test_bed_seed() -> None:
    from igw.testbed_seed import DEMO_ALIASES, DEMO_DEPARTMENT, DEMO_TENANT, DEMO_TIER, INSPECT_BODY_MODELS
    from igw.topology import DEFAULT_MODELS

    policy = load_policy_file(DEMO)
    demo = policy.tenants[DEMO_TENANT]
    assert (demo.department, demo.tier, demo.models) == (DEMO_DEPARTMENT, DEMO_TIER, ("*",))
    assert tuple(policy.models) == DEFAULT_MODELS
    assert policy.aliases == DEMO_ALIASES
    assert {m.name for m in policy.models.values() if m.inspect_body} == INSPECT_BODY_MODELS


def test_defaults_are_resolved_from_the_tier_and_the_schema_defaults() -> None:
    policy = load(BASE)
    beta = policy.tenants["beta"]
    assert (beta.timeout_ms, beta.priority, beta.max_body_bytes, beta.share, beta.models) == (
        30_000, 0, 1024 * 1024, 1.0, ("*",))
    assert policy.models["resnet"].host == "resnet.models.svc.cluster.local"
    assert policy.models["resnet"].port == 8080
    assert policy.aliases == {"rn": "resnet"}
    assert policy.allowed["acme"] == ("resnet", "bert")


def test_duplicate_model_is_named_with_both_lines() -> None:
    text = policy_text("  resnet:\n    namespace: other\n")
    assert errors(text) == ["policy.yaml:19: models.resnet: duplicate model 'resnet' (first defined at line 11)"]


def test_duplicate_tenant_is_an_error() -> None:
    text = BASE.replace("models:\n", "  acme:\n    department: x\n    tier: free\nmodels:\n", 1)
    assert errors(text) == ["policy.yaml:10: tenants.acme: duplicate tenant 'acme' (first defined at line 3)"]


def test_alias_loop_through_top_level_aliases_is_named() -> None:
    text = policy_text("aliases:\n  a: b\n  b: c\n  c: a\n")
    found = errors(text)
    assert "policy.yaml:20: aliases.a: alias loop: a -> b -> c -> a" in found
    assert len(found) == 3  # each alias of the loop is reported where it is defined


def test_alias_that_is_a_model_is_a_loop() -> None:
    text = BASE.replace("aliases: [rn]", "aliases: [bert]")
    assert errors(text) == ["policy.yaml:15: models.resnet.aliases[0]: alias 'bert' of model 'resnet' is itself "
                            "a model (alias loop: resnet -> bert -> ...)"]


def test_alias_chains_resolve_to_the_canonical_model() -> None:
    policy = load(policy_text("aliases:\n  r: rn\n  rr: r\n"))
    assert policy.aliases == {"rn": "resnet", "r": "resnet", "rr": "resnet"}


def test_alias_of_nothing_is_an_error() -> None:
    assert errors(policy_text("aliases:\n  x: nope\n")) == [
        "policy.yaml:20: aliases.x: alias 'x' names 'nope', which is neither a model nor an alias"]


def test_the_same_alias_on_two_models_is_an_error() -> None:
    text = BASE.replace("    limit: 30\n", "    limit: 30\n    aliases: [rn]\n")
    assert errors(text) == ["policy.yaml:19: models.bert.aliases[0]: alias 'rn' is already an alias of 'resnet' "
                            "(models.resnet.aliases[0])"]


def test_zero_share_for_every_tenant_is_rejected() -> None:
    text = BASE.replace("share: 2", "share: 0").replace("tier: free", "tier: free\n    share: 0")
    assert errors(text) == ["policy.yaml:2: tenants: every tenant has share 0: no tenant could call any model "
                            "(give at least one tenant a share > 0)"]


def test_zero_share_for_every_tenant_of_one_model_names_the_model() -> None:
    text = BASE.replace("tier: free", "tier: free\n    models: [bert]").replace(
        "    share: 2\n", "    share: 2\n    models: [resnet]\n    overrides: {resnet: {share: 0}}\n")
    found = errors(text)
    assert len(found) == 1
    assert "models.resnet: every tenant allowed model 'resnet' has share 0 (acme)" in found[0]


def test_unknown_field_is_named_with_its_line_and_the_allowed_fields() -> None:
    text = BASE.replace("    limit: 30\n", "    limit: 30\n    replicas: 3\n")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:19: models.bert.replicas: unknown field 'replicas' (allowed: aliases,")


def test_a_tls_redis_url_is_refused_because_the_services_cannot_use_it() -> None:
    text = policy_text("services:\n  redis_url: rediss://redis:6379/0\n")
    (line,) = errors(text)
    assert "services.redis_url: 'rediss://redis:6379/0' does not match" in line


def test_a_redis_shard_listed_twice_is_refused() -> None:
    text = policy_text("services:\n  redis_shards: [redis://a:6379/0, redis://a:6379/0]\n")
    (line,) = errors(text)
    assert "services.redis_shards" in line and "non-unique" in line


def test_wrong_type_is_named_with_its_path() -> None:
    text = BASE.replace("per_replica: 10", "per_replica: ten")
    assert errors(text) == ["policy.yaml:13: models.resnet.per_replica: 'ten' is not of type 'integer'"]


def test_invalid_tenant_id_gets_the_naming_rule() -> None:
    text = BASE.replace("  beta:", "  Beta:")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:7: tenants.Beta: invalid name 'Beta': use 1-63 lowercase letters")


def test_missing_required_field() -> None:
    text = BASE.replace("    namespace: models\n    limit: 30\n", "    limit: 30\n")
    assert errors(text) == ["policy.yaml:16: models.bert: 'namespace' is required"]


def test_per_replica_and_limit_together_are_rejected() -> None:
    text = BASE.replace("    limit: 30\n", "    limit: 30\n    per_replica: 3\n")
    assert errors(text) == ["policy.yaml:16: models.bert: give either per_replica or limit, not both"]


def test_unknown_tier_without_explicit_values() -> None:
    text = BASE.replace("tier: free", "tier: gold")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:9: tenants.beta.tier: unknown tier 'gold'")


def test_unknown_tier_with_all_three_values_is_accepted() -> None:
    text = BASE.replace("tier: free", "tier: gold\n    max_body_bytes: 10\n    timeout_ms: 5\n    priority: 7")
    assert load(text).tenants["beta"].priority == 7


def test_override_of_a_model_the_tenant_may_not_call() -> None:
    text = BASE.replace("    share: 2\n", "    share: 2\n    models: [bert]\n    overrides: {resnet: {limit: 4}}\n")
    (line,) = errors(text)
    assert line == "policy.yaml:8: tenants.acme.overrides.resnet: tenant 'acme' may not call 'resnet' " \
                   "(its models: ['bert'])"


def test_override_naming_an_alias_points_to_the_model() -> None:
    text = BASE.replace("    share: 2\n", "    share: 2\n    overrides: {rn: {limit: 4}}\n")
    (line,) = errors(text)
    assert line.endswith("no model 'rn' in this policy (an alias of 'resnet': use the model name)")


def test_an_override_sets_exactly_one_thing() -> None:
    text = BASE.replace("    share: 2\n", "    share: 2\n    overrides: {resnet: {limit: 4, share: 1}}\n")
    (line,) = errors(text)
    assert line.endswith("tenants.acme.overrides.resnet: an override sets exactly one of limit, share, unlimited")


def test_model_globs_that_match_nothing() -> None:
    text = BASE.replace("tier: free", "tier: free\n    models: ['gpt-*']")
    assert errors(text) == ["policy.yaml:10: tenants.beta.models: ['gpt-*'] match no model of this policy"]


def test_unknown_dedicated_gateway() -> None:
    text = BASE.replace("tier: free", "tier: free\n    gateway: private")
    assert errors(text) == ["policy.yaml:10: tenants.beta.gateway: no dedicated gateway 'private' "
                            "(dedicated_gateways: none defined)"]


def test_model_name_that_is_no_dns_label_needs_a_service() -> None:
    text = BASE.replace("  bert:", "  BERT@v2:")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:16: models.BERT@v2: model name 'BERT@v2' is not a DNS label")


def test_two_models_on_one_service() -> None:
    text = BASE.replace("    limit: 30\n", "    limit: 30\n    service: resnet\n")
    assert errors(text) == ["policy.yaml:16: models.bert: models 'resnet' and 'bert' both use Service "
                            "models/resnet"]


def test_every_problem_is_reported_in_line_order() -> None:
    text = BASE.replace("per_replica: 10", "per_replica: -1").replace("tier: free", "tier: free\n    colour: red")
    found = errors(text)
    assert [f.split(":")[1] for f in found] == ["10", "14"]


def test_invalid_yaml_has_a_line() -> None:
    assert errors("version: 1\ntenants: {a: [}\n")[0].startswith("policy.yaml:2: not valid YAML")


def test_empty_file() -> None:
    assert errors("") == ["policy.yaml: the file is empty"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the file"):
        load_policy_file(tmp_path / "missing.yaml")


def test_too_many_models_are_rejected_quickly_with_the_count() -> None:
    text = many_models(MAX_MODELS + 1, tenants=2)
    started = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        load_policy("big.yaml", text)
    assert time.perf_counter() - started < 30  # generous: a guard against a pathological slowdown only
    assert str(info.value) == (f"big.yaml:14: models: {MAX_MODELS + 1} models; one policy holds at most "
                               f"{MAX_MODELS} (split the models across dedicated gateways and policies)")


def test_two_hundred_models_load() -> None:
    policy = load_policy("p.yaml", many_models(200))
    assert len(policy.models) == 200
    assert len(policy.aliases) == 200


def test_schema_file_is_a_valid_json_schema() -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema())
