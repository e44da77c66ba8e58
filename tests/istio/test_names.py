"""Names the API server would refuse, and objects that would overwrite each other, are caught before a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from igw.policy import istio
from igw.policy.kube_schema import duplicate_objects, validate_object, validate_objects
from igw.policy.load import PolicyError, load_policy
from tests.policy.helpers import BASE

DEDICATED = (BASE.replace("tier: free", "tier: free\n    gateway: gw")
             + "dedicated_gateways:\n  gw:\n    namespace: {ns}\n")


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy("policy.yaml", text)
    return str(info.value).splitlines()


def test_a_service_named_with_a_leading_digit_fails_validation() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "7b-chat", "namespace": "models"},
               "spec": {"ports": [{"port": 80}]}}
    assert any(p.path == "metadata.name" for p in validate_object(service))


def test_a_dedicated_gateway_name_must_start_with_a_letter() -> None:
    text = (BASE.replace("tier: free", "tier: free\n    gateway: 1gw")
            + "dedicated_gateways:\n  1gw:\n    namespace: p\n")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:21: dedicated_gateways.1gw: ") and "start with a letter" in line


@pytest.mark.parametrize(("namespace", "whose"), [("models", "model"), ("igw-system", "services")])
def test_a_dedicated_gateway_cannot_share_a_namespace_without_sidecars(namespace: str, whose: str) -> None:
    (line,) = errors(DEDICATED.format(ns=namespace))
    assert line.startswith("policy.yaml:22: dedicated_gateways.gw.namespace: ") and whose in line


def test_two_dedicated_gateways_need_their_own_namespaces() -> None:
    text = DEDICATED.format(ns="private") + "  gw2:\n    namespace: private\n"
    (line,) = errors(text)
    assert line.startswith("policy.yaml:24: dedicated_gateways.gw2.namespace: ")


def test_a_model_cannot_take_the_name_of_one_of_our_services() -> None:
    text = BASE.replace("  bert:\n    namespace: models", "  ratelimit:\n    namespace: igw-system")
    (line,) = errors(text)
    assert line.startswith("policy.yaml:16: models.ratelimit: ") and "igw-system/ratelimit" in line


def test_objects_of_the_same_kind_namespace_and_name_are_reported() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "n"}}
    assert [str(p) for p in duplicate_objects([cm, dict(cm), {**cm, "kind": "Secret"}])] == [
        "ConfigMap/a: n/a is rendered twice (the second would overwrite the first)"]


def test_extreme_names_the_policy_accepts_render_valid_objects(shared_dir: Path) -> None:
    long_model = "m" + "x" * 127
    text = (BASE.replace("  bert:", f"  {long_model}:\n    service: {'s' * 63}")
            .replace("namespace: models", f"namespace: {'n' * 63}")
            .replace("  beta:", f"  {'b' * 30}.{'_' * 10}-{'c' * 21}:")
            .replace("tier: free", f"tier: free\n    gateway: {'g' * 63}")
            + f"dedicated_gateways:\n  {'g' * 63}:\n    namespace: {'p' * 63}\n"
            + f"aliases:\n  {'a' * 128}: {long_model}\n")
    objects = [o for objs in istio.render(load_policy("p.yaml", text)).values() for o in objs]
    assert validate_objects(objects) == []
    assert duplicate_objects(objects) == []
