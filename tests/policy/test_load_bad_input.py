"""Hostile or odd YAML and numbers: each is a PolicyError naming file, line and problem, never a crash or a hang."""

from __future__ import annotations

import time

import pytest

from igw.policy import ratelimit
from igw.policy.load import PolicyError
from ratelimit_svc.config import parse_config
from tests.policy.helpers import BASE, load, policy_text


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(text)
    return str(info.value).splitlines()


def test_a_recursive_yaml_alias_is_an_error_not_a_recursion_crash() -> None:
    text = "version: 1\ntenants: &t\n  a: *t\nmodels: {}\n"
    assert errors(text) == ["policy.yaml:3: tenants.a: recursive YAML alias (a value that contains itself)"]


def test_an_alias_expansion_bomb_is_refused_quickly() -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    # CPU time, not wall time: an expansion does the work whatever the load, a busy machine only delays it
    # (1.3 s of work took 4.7 s of wall time in a loaded run).
    started = time.process_time()
    found = errors("\n".join(lines) + "\n")
    assert time.process_time() - started < 10
    assert len(found) == 1 and "YAML aliases expand to more than" in found[0]


def test_plain_anchors_and_aliases_still_work() -> None:
    policy = load(policy_text("aliases:\n  x: &a rn\n  y: *a\n"))
    assert policy.aliases["y"] == "resnet"


def test_a_merge_key_is_named_as_unsupported() -> None:
    text = BASE.replace("  bert:\n    namespace: models\n    limit: 30\n",
                        "  bert: &b\n    namespace: models\n    limit: 30\n  bert2:\n    <<: *b\n")
    assert errors(text) == ["policy.yaml:20: models.bert2: YAML merge keys ('<<') are not supported: write the fields "
                            "out (anchors and aliases are fine)"]


@pytest.mark.parametrize("tag", ["!!python/object:os.system x", "!custom 3"])
def test_an_unknown_yaml_tag_is_an_error_with_its_line(tag: str) -> None:
    (line,) = errors(BASE.replace("per_replica: 10", f"per_replica: {tag}"))
    assert line.startswith("policy.yaml:13: models.resnet.per_replica: unsupported YAML tag")


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_a_non_finite_share_is_an_error(value: str) -> None:
    (line,) = errors(BASE.replace("share: 2", f"share: {value}"))
    assert line.startswith("policy.yaml:6: tenants.acme.share: ") and "finite" in line


def test_a_share_beyond_the_maximum_is_an_error_not_an_overflow() -> None:
    text = BASE.replace("share: 2", "share: 1.0e+308").replace("tier: free", "tier: free\n    share: 1.0e+308")
    found = errors(text)
    assert len(found) == 2 and all("tenants." in f and "at most" in f for f in found)


def test_a_float_where_an_integer_is_required_is_an_error() -> None:
    assert errors(BASE.replace("per_replica: 10", "per_replica: 10.0")) == [
        "policy.yaml:13: models.resnet.per_replica: 10.0 is not of type 'integer'"]


def test_a_number_yaml_reads_as_text_gets_a_hint() -> None:
    (line,) = errors(BASE.replace("share: 2", "share: 1e3"))
    assert line.startswith("policy.yaml:6: tenants.acme.share: '1e3' is not of type 'number'")
    assert "1.0e+3" in line


def test_every_accepted_share_renders_a_config_the_service_loads() -> None:
    policy = load(BASE.replace("share: 2", "share: 1000000"))
    parse_config([(ratelimit.FILE_NAME, ratelimit.render_file(policy))])


def test_a_model_service_name_must_start_with_a_letter() -> None:
    (line,) = errors(BASE.replace("  bert:", "  7b-chat:"))
    assert line.startswith("policy.yaml:16: models.7b-chat: Service name '7b-chat' must start with a letter")


def test_an_explicit_service_name_must_start_with_a_letter() -> None:
    (line,) = errors(BASE.replace("    limit: 30\n", "    limit: 30\n    service: 0bert\n"))
    assert line.startswith("policy.yaml:16: models.bert: Service name '0bert' must start with a letter")


@pytest.mark.parametrize("name", ["org/resnet", "a" * 64])
def test_a_per_replica_model_needs_a_name_usable_as_its_replica_label(name: str) -> None:
    (line,) = errors(BASE.replace("  resnet:\n", f"  {name}:\n    service: resnet\n"))
    assert line.startswith(f"policy.yaml:11: models.{name}: ") and "igw.ai/model" in line


def test_a_fixed_limit_model_may_have_any_valid_name() -> None:
    policy = load(BASE.replace("  bert:", "  org/bert@v2:\n    service: bert"))
    assert "org/bert@v2" in policy.models


def test_a_fixed_limit_override_lets_its_tenant_call_a_model_whose_other_tenants_have_share_0() -> None:
    text = BASE.replace("share: 2", "share: 1\n    overrides: {resnet: {limit: 5}}").replace(
        "tier: free", "tier: free\n    overrides: {resnet: {share: 0}}")
    assert load(text).tenants["acme"].overrides["resnet"].limit == 5


def test_share_0_everywhere_is_fine_when_an_override_gives_a_tenant_a_limit() -> None:
    text = BASE.replace("share: 2", "share: 0\n    overrides: {resnet: {unlimited: true}, bert: {limit: 5}}").replace(
        "tier: free", "tier: free\n    share: 0")
    assert load(text).tenants["beta"].share == 0


def test_a_limit_0_override_does_not_count_as_a_way_to_call_the_model() -> None:
    text = BASE.replace("share: 2", "share: 0\n    overrides: {resnet: {limit: 0}}").replace(
        "tier: free", "tier: free\n    share: 0")
    (line,) = errors(text)
    assert "every tenant has share 0" in line


# ------------------------------------------------------------------ model deployments: resources, placement

DEPLOYMENT = "    deployment:\n      image: bert:1\n"  # bert's; resources etc. follow from line 21


def deployment_errors(block: str) -> list[str]:
    return errors(BASE + DEPLOYMENT + block)


@pytest.mark.parametrize("quantity", ["8GB", "-1Gi", "one", "1.2.3", "8 Gi"])
def test_a_bad_quantity_names_the_model_and_the_field(quantity: str) -> None:
    block = f"      resources:\n        requests:\n          memory: {quantity}\n"
    assert deployment_errors(block) == [
        f"policy.yaml:23: models.bert.deployment.resources.requests.memory: {quantity!r} is not a Kubernetes "
        "quantity (e.g. 500m, 2, 1.5, 512Mi, 8Gi, 1G)"]


def test_a_request_above_its_limit_is_an_error() -> None:
    block = "      resources:\n        requests:\n          memory: 16Gi\n        limits:\n          memory: 8Gi\n"
    assert deployment_errors(block) == [
        "policy.yaml:23: models.bert.deployment.resources.requests.memory: request 16Gi is above the limit 8Gi"]


def test_a_cpu_request_in_millicores_above_a_whole_limit_is_an_error() -> None:
    block = "      resources:\n        requests: {cpu: 2500m}\n        limits: {cpu: 2}\n"
    (line,) = deployment_errors(block)
    assert line.startswith("policy.yaml:22: models.bert.deployment.resources.requests.cpu: request 2500m is above")


def test_a_gpu_request_must_equal_its_limit() -> None:
    block = "      resources:\n        requests: {nvidia.com/gpu: 1}\n        limits: {nvidia.com/gpu: 2}\n"
    assert deployment_errors(block) == [
        "policy.yaml:22: models.bert.deployment.resources.requests.nvidia.com/gpu: request 1 differs from the "
        "limit 2: Kubernetes cannot overcommit extended resources, so requests must equal limits"]


def test_a_gpu_request_without_a_limit_is_an_error() -> None:
    block = "      resources:\n        requests: {nvidia.com/gpu: 1}\n"
    assert deployment_errors(block) == [
        "policy.yaml:22: models.bert.deployment.resources.requests.nvidia.com/gpu: extended resources need a "
        "limit equal to the request: set limits.nvidia.com/gpu: 1 (or only the limit)"]


def test_a_fraction_of_a_gpu_is_an_error() -> None:
    block = "      resources:\n        limits: {nvidia.com/gpu: 500m}\n"
    assert deployment_errors(block) == [
        "policy.yaml:22: models.bert.deployment.resources.limits.nvidia.com/gpu: '500m': extended resources are "
        "counted in whole units"]


def test_an_unqualified_resource_name_is_an_error_with_a_hint() -> None:
    block = "      resources:\n        limits: {gpu: 1}\n"
    (line,) = deployment_errors(block)
    assert line.startswith("policy.yaml:22: models.bert.deployment.resources.limits.gpu: unknown resource 'gpu'")
    assert "nvidia.com/gpu" in line


def test_a_bad_default_quantity_names_the_defaults_field() -> None:
    text = BASE.replace("version: 1\n", "version: 1\ndefaults:\n  deployment:\n    resources:\n"
                                        "      limits: {memory: 1GiB}\n")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:5: defaults.deployment.resources.limits.memory: '1GiB' is not a Kubernetes "
                           "quantity")


def test_an_exists_toleration_with_a_value_is_an_error() -> None:
    block = "      tolerations:\n        - {key: gpu, operator: Exists, value: a100}\n"
    assert deployment_errors(block) == [
        "policy.yaml:22: models.bert.deployment.tolerations[0].value: operator Exists matches any value: "
        "drop the value or use operator Equal"]


def test_toleration_seconds_need_the_no_execute_effect() -> None:
    block = "      tolerations:\n        - {key: gpu, effect: NoSchedule, toleration_seconds: 30}\n"
    assert deployment_errors(block) == [
        "policy.yaml:22: models.bert.deployment.tolerations[0].toleration_seconds: only a NoExecute "
        "toleration has toleration_seconds (effect is NoSchedule)"]


def test_a_toleration_without_a_key_must_use_exists() -> None:
    block = "      tolerations:\n        - {operator: Equal, value: x}\n"
    (line,) = deployment_errors(block)
    assert line.startswith("policy.yaml:22: models.bert.deployment.tolerations[0]: a toleration without a key "
                           "matches every taint")


def test_a_node_selector_key_that_is_no_label_key_is_an_error() -> None:
    block = "      node_selector: {'gpu type': a100}\n"
    (line,) = deployment_errors(block)
    assert line.startswith("policy.yaml:21: models.bert.deployment.node_selector.gpu type: 'gpu type' is not a "
                           "label key")


def test_an_istio_revision_must_be_a_dns_label() -> None:
    text = BASE.replace("version: 1\n", "version: 1\ngateway:\n  istio_revision: Canary_1\n")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:3: gateway.istio_revision: 'Canary_1' is not a valid Istio revision")
