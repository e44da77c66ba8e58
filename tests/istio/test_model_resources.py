"""Model Deployments ask for what they need: resource requests and limits (GPUs included), node selectors and
tolerations from the model's `deployment:` block or the policy's `defaults.deployment`."""

from __future__ import annotations

from pathlib import Path

from igw.policy import istio
from igw.policy.kube_schema import validate_objects
from igw.policy.load import load_policy

POLICY = """\
version: 1
{defaults}tenants:
  acme:
    department: research
    tier: premium
models:
  llama:
    namespace: models
    limit: 30
    deployment:
      image: vllm:1
{llama}  bert:
    namespace: models
    limit: 30
    deployment:
      image: bert:1
"""
GPU = """\
      resources:
        requests: {cpu: "4", memory: 32Gi, nvidia.com/gpu: 1}
        limits: {memory: 32Gi, nvidia.com/gpu: 1}
      node_selector: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}
      tolerations:
        - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
"""
DEFAULTS = """\
defaults:
  deployment:
    resources:
      requests: {cpu: 500m, memory: 1Gi}
      limits: {memory: 1Gi}
    tolerations:
      - {key: dedicated, operator: Equal, value: models, effect: NoExecute, toleration_seconds: 60}
"""


def pods(defaults: str = "", llama: str = "") -> dict[str, dict]:
    """Model name -> its Deployment's pod spec."""
    files = istio.render(load_policy("p.yaml", POLICY.format(defaults=defaults, llama=llama)))
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in files["30-models.yaml"]
            if o["kind"] == "Deployment"}


def test_a_model_without_resources_renders_a_container_without_them() -> None:
    # Absent means absent: no guessed numbers for models from a few MB to hundreds of GB (BestEffort).
    assert "resources" not in pods()["bert"]["containers"][0]


def test_requests_and_limits_including_gpus_reach_the_model_container() -> None:
    container = pods(llama=GPU)["llama"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}


def test_a_node_selector_and_tolerations_place_the_model_on_gpu_nodes() -> None:
    pod = pods(llama=GPU)["llama"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_policy_defaults_apply_to_models_without_their_own() -> None:
    bert = pods(defaults=DEFAULTS)["bert"]
    assert bert["containers"][0]["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                                  "limits": {"memory": "1Gi"}}
    assert bert["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "models",
                                    "effect": "NoExecute", "tolerationSeconds": 60}]
    assert "nodeSelector" not in bert


def test_a_models_own_resources_and_tolerations_replace_the_defaults_whole() -> None:
    llama = pods(defaults=DEFAULTS, llama=GPU)["llama"]
    assert llama["containers"][0]["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "1"}
    assert llama["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_numbers_written_as_yaml_numbers_render_as_quantity_strings() -> None:
    resources = "      resources:\n        requests: {cpu: 0.5, memory: 1073741824}\n"
    assert pods(llama=resources)["llama"]["containers"][0]["resources"] == {
        "requests": {"cpu": "0.5", "memory": "1073741824"}}


def test_models_with_resources_placement_and_defaults_render_valid_objects(shared_dir: Path) -> None:
    files = istio.render(load_policy("p.yaml", POLICY.format(defaults=DEFAULTS, llama=GPU)))
    objects = [o for objs in files.values() for o in objs]
    assert validate_objects(objects) == []
