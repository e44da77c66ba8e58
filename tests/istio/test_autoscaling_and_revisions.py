"""Who owns a Deployment's replica count (its HPA, when it has one) and which Istio revision injects a dedicated
gateway: applying the manifests must not undo an HPA's scaling, and a revisioned Istio must still inject."""

from __future__ import annotations

from pathlib import Path

import pytest

from igw.policy import istio
from igw.policy.kube_schema import validate_objects
from igw.policy.load import load_policy, load_policy_file
from igw.procs import REPO_ROOT

DEMO = REPO_ROOT / "config" / "policy" / "demo.yaml"
Files = dict[str, list[dict]]
DEDICATED = "  secure-gw:\n    namespace: team-secure\n"


@pytest.fixture(scope="module")
def demo() -> Files:
    return istio.render(load_policy_file(DEMO))


def all_objects(files: Files) -> list[dict]:
    return [o for objs in files.values() for o in objs]


def render_demo(old: str, new: str) -> Files:
    text = DEMO.read_text()
    assert old in text
    return istio.render(load_policy("demo.yaml", text.replace(old, new)))


def deployments(files: Files) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in all_objects(files) if o["kind"] == "Deployment"}


def hpa_targets(files: Files) -> set[str]:
    return {o["spec"]["scaleTargetRef"]["name"] for o in all_objects(files) if o["kind"] == "HorizontalPodAutoscaler"}


def test_deployments_an_hpa_scales_leave_their_replica_count_to_it(demo: Files) -> None:
    targets = hpa_targets(demo)
    assert targets == {"ext-proc", "ratelimit", "secure-gw"}
    for name in targets:
        assert "replicas" not in deployments(demo)[name]["spec"], name


def test_the_hpa_minimum_is_the_policys_replica_count(demo: Files) -> None:
    hpas = {o["metadata"]["name"]: o["spec"] for o in all_objects(demo) if o["kind"] == "HorizontalPodAutoscaler"}
    assert (hpas["ext-proc"]["minReplicas"], hpas["ext-proc"]["maxReplicas"]) == (2, 10)
    assert hpas["secure-gw"]["minReplicas"] == 2


def test_deployments_without_an_hpa_keep_their_replica_count(demo: Files) -> None:
    found = deployments(demo)
    assert found["replica-watcher"]["spec"]["replicas"] == 2
    assert {name: found[name]["spec"]["replicas"] for name in ("demo-linear", "demo-logistic")} == {
        "demo-linear": 2, "demo-logistic": 2}


def test_without_a_revision_the_dedicated_gateway_is_injected_by_the_default_revision(demo: Files) -> None:
    labels = deployments(demo)["secure-gw"]["spec"]["template"]["metadata"]["labels"]
    assert labels["sidecar.istio.io/inject"] == "true"
    assert "istio.io/rev" not in labels


def test_a_policy_wide_revision_labels_the_dedicated_gateway_pods_for_that_revision() -> None:
    files = render_demo("  port: 80\n\ndedicated_gateways:", "  port: 80\n  istio_revision: canary\n\n"
                                                             "dedicated_gateways:")
    labels = deployments(files)["secure-gw"]["spec"]["template"]["metadata"]["labels"]
    assert labels["istio.io/rev"] == "canary"
    # The default-revision injector matches sidecar.istio.io/inject only where istio.io/rev is absent; with a
    # revision the label would mean nothing, so it is not rendered.
    assert "sidecar.istio.io/inject" not in labels


def test_a_dedicated_gateways_own_revision_wins_over_the_policy_wide_one() -> None:
    text = DEMO.read_text().replace("  port: 80\n\ndedicated_gateways:",
                                    "  port: 80\n  istio_revision: stable\n\ndedicated_gateways:")
    text = text.replace(DEDICATED, DEDICATED + "    istio_revision: canary\n")
    files = istio.render(load_policy("demo.yaml", text))
    assert deployments(files)["secure-gw"]["spec"]["template"]["metadata"]["labels"]["istio.io/rev"] == "canary"


def test_with_a_revision_the_services_and_model_namespaces_stay_uninjected() -> None:
    # Revisioned injectors select namespaces without an istio-injection label: `disabled` keeps them out too.
    files = render_demo(DEDICATED, DEDICATED + "    istio_revision: canary\n")
    for ns in files["00-namespaces.yaml"]:
        assert ns["metadata"]["labels"]["istio-injection"] == "disabled"
        assert "istio.io/rev" not in ns["metadata"]["labels"]
    # The dedicated gateway's namespace carries neither label: the pod's own istio.io/rev label decides.
    (gw_ns,) = [o for o in files["40-dedicated-secure-gw.yaml"] if o["kind"] == "Namespace"]
    assert not {"istio-injection", "istio.io/rev"} & set(gw_ns["metadata"]["labels"])


def test_revisioned_manifests_validate(shared_dir: Path) -> None:
    files = render_demo(DEDICATED, DEDICATED + "    istio_revision: canary\n")
    assert validate_objects(all_objects(files)) == []
