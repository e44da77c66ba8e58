"""The rate-limit config a policy renders: loadable by the service, with the policy's quota arithmetic."""

from __future__ import annotations

import pytest

from igw.envoy_config import route_rate_limits
from igw.policy import ratelimit
from igw.policy.load import load_policy
from ratelimit_svc.adaptive import AdaptiveLimits
from ratelimit_svc.config import RateLimitConfig, parse_config
from ratelimit_svc.lookup import find_limit
from tests.policy.helpers import BASE, load, many_models


def config_of(text: str) -> RateLimitConfig:
    return parse_config([(ratelimit.FILE_NAME, ratelimit.render_file(load(text)))])


def limits(config: RateLimitConfig) -> dict[str, str]:
    return dict(config.describe())


def effective(config: RateLimitConfig, entries: list[tuple[str, str]], ready: dict[str, int]) -> int:
    """The limit the running service would apply to one descriptor, given ready replicas per model."""
    from igw.replicas import ReplicaState

    engine = AdaptiveLimits("redis://unused")
    engine.states = {m: ReplicaState(m, n, updated=1000.0) for m, n in ready.items()}
    match = find_limit(config, "igw", tuple(entries))
    assert match is not None, f"no limit for {entries}"
    if match.limit.adaptive is None:
        return match.limit.requests_per_unit
    return engine.effective_limit("igw", match, 1000.0, config)


def test_descriptor_keys_are_the_ones_envoy_sends() -> None:
    keys = {tuple(a["request_headers"]["descriptor_key"] for a in rl["actions"]) for rl in route_rate_limits()}
    assert keys == {("tenant",), ("tenant", "model"), ("model",)}
    config = config_of(BASE)
    assert {k.split(".")[1].split("_")[0] for k in limits(config)} == {"tenant", "model"}
    assert "igw.tenant_acme.model_resnet" in limits(config)


def test_tenants_split_a_models_replica_capacity_by_share() -> None:
    config = config_of(BASE)  # acme share 2, beta share 1; resnet 10 per replica
    assert effective(config, [("tenant", "acme"), ("model", "resnet")], {"resnet": 3}) == 20
    assert effective(config, [("tenant", "beta"), ("model", "resnet")], {"resnet": 3}) == 10
    assert effective(config, [("model", "resnet")], {"resnet": 3}) == 30


def test_without_replica_data_the_min_is_split_too() -> None:
    config = config_of(BASE)  # min 3 for the model
    assert effective(config, [("model", "resnet")], {}) == 3
    assert effective(config, [("tenant", "acme"), ("model", "resnet")], {}) == 2


def test_a_fixed_model_limit_is_split_by_share() -> None:
    config = config_of(BASE)  # bert: limit 30
    assert effective(config, [("tenant", "acme"), ("model", "bert")], {}) == 20
    assert effective(config, [("tenant", "beta"), ("model", "bert")], {}) == 10
    assert effective(config, [("model", "bert")], {}) == 30


def test_an_override_limit_replaces_the_share_and_leaves_the_others_the_rest() -> None:
    text = BASE.replace("    share: 2\n", "    share: 2\n    overrides: {resnet: {limit: 7}}\n")
    config = config_of(text)
    assert effective(config, [("tenant", "acme"), ("model", "resnet")], {"resnet": 3}) == 7
    assert effective(config, [("tenant", "beta"), ("model", "resnet")], {"resnet": 3}) == 30


def test_fractional_shares_keep_their_ratio() -> None:
    config = config_of(BASE.replace("share: 2", "share: 0.5"))
    assert effective(config, [("tenant", "acme"), ("model", "resnet")], {"resnet": 6}) == 20
    assert effective(config, [("tenant", "beta"), ("model", "resnet")], {"resnet": 6}) == 40


def test_share_zero_denies_that_tenant_only() -> None:
    config = config_of(BASE.replace("tier: free", "tier: free\n    share: 0"))
    assert effective(config, [("tenant", "beta"), ("model", "resnet")], {"resnet": 3}) == 0
    assert effective(config, [("tenant", "acme"), ("model", "resnet")], {"resnet": 3}) == 30


def test_unlimited_override() -> None:
    config = config_of(BASE.replace("    share: 2\n", "    share: 2\n    overrides: {bert: {unlimited: true}}\n"))
    assert limits(config)["igw.tenant_acme.model_bert"] == "unlimited"


@pytest.mark.parametrize(("where", "shadowed", "enforced"), [
    ("defaults", {"igw.tenant_acme", "igw.tenant_acme.model_resnet", "igw.model_resnet", "igw.tenant_beta"}, set()),
    ("tenant", {"igw.tenant_acme", "igw.tenant_acme.model_resnet", "igw.tenant_acme.model_bert"},
     {"igw.tenant_beta", "igw.model_resnet", "igw.tenant_beta.model_resnet"}),
    ("model", {"igw.model_resnet", "igw.tenant_acme.model_resnet", "igw.tenant_beta.model_resnet"},
     {"igw.tenant_acme", "igw.tenant_beta", "igw.tenant_acme.model_bert"}),
], ids=["the policy switch shadows every limit", "a tenant switch shadows its limits only",
        "a model switch shadows its limits only"])
def test_shadow_mode_switches(where: str, shadowed: set[str], enforced: set[str]) -> None:
    text = BASE.replace("tier: premium", "tier: premium\n    limit: 9")
    text = text.replace("tier: free", "tier: free\n    limit: 9")
    if where == "defaults":
        text += "defaults: {shadow_mode: true}\n"
    elif where == "tenant":
        text = text.replace("tier: premium", "tier: premium\n    shadow_mode: true")
    else:
        text = text.replace("    min: 3\n", "    min: 3\n    shadow_mode: true\n")
    described = limits(config_of(text))
    shadow = {k for k, v in described.items() if v.endswith("shadow")}
    assert shadowed <= shadow
    assert not enforced & shadow
    assert enforced <= set(described)


def test_defaults_cover_tenants_created_outside_the_policy() -> None:
    config = config_of(BASE + "defaults: {tenant_limit: 40, tenant_model_limit: 8}\n")
    assert effective(config, [("tenant", "stranger")], {}) == 40
    assert effective(config, [("tenant", "stranger"), ("model", "resnet")], {}) == 8
    assert effective(config, [("tenant", "beta")], {}) == 40  # a listed tenant without its own limit


def test_gcra_default_applies_to_every_counted_limit() -> None:
    config = config_of(BASE + "defaults: {algorithm: gcra, tenant_limit: 5}\n")
    match = find_limit(config, "igw", (("tenant", "x"),))
    assert match is not None
    assert match.limit.algorithm == "gcra"


def test_shards_hold_the_same_limits_as_the_single_file_and_each_stays_small() -> None:
    policy = load_policy("p.yaml", many_models(200))
    whole = parse_config([(ratelimit.FILE_NAME, ratelimit.render_file(policy))])
    shards = ratelimit.render_shards(policy, limit_bytes=64 * 1024)
    assert len(shards) > 1
    assert all(len(text.encode()) <= 64 * 1024 for text in shards.values())
    merged = parse_config(sorted(shards.items()), merge_domains=True)
    assert merged.describe() == whole.describe()


def test_a_small_policy_is_one_shard() -> None:
    assert list(ratelimit.render_shards(load(BASE))) == [ratelimit.FILE_NAME]
