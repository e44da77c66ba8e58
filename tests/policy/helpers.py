"""Small policies for tests, written as text so errors carry real line numbers."""

from __future__ import annotations

from igw.policy import spec
from igw.policy.load import load_policy

BASE = """\
version: 1
tenants:
  acme:
    department: research
    tier: premium
    share: 2
  beta:
    department: ops
    tier: free
models:
  resnet:
    namespace: models
    per_replica: 10
    min: 3
    aliases: [rn]
  bert:
    namespace: models
    limit: 30
"""


def policy_text(extra: str = "", base: str = BASE) -> str:
    return base + extra


def load(text: str, file: str = "policy.yaml") -> spec.Policy:
    return load_policy(file, text)


def many_models(n: int, tenants: int = 20) -> str:
    """A large policy: n models in 10 namespaces, tenants allowed overlapping quarters of them."""
    lines = ["version: 1", "defaults: {tenant_limit: 100, tenant_model_limit: 20}", "tenants:"]
    for t in range(tenants):
        quarter = t % 4
        lines += [f"  t{t:03d}:", "    department: d", "    tier: standard", f"    share: {1 + t % 3}",
                  f"    models: ['m{quarter}-*', 'shared-*']"]
    lines.append("models:")
    for i in range(n):
        name = f"shared-{i:05d}" if i % 10 == 0 else f"m{i % 4}-{i:05d}"
        lines += [f"  {name}:", f"    namespace: models-{i % 10}", "    per_replica: 20", "    min: 4",
                  "    max: 400", f"    aliases: [{name}-alias]"]
    return "\n".join(lines) + "\n"
