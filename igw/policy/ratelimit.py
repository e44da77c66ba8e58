"""Policy -> the rate-limit service's YAML (domain igw), in the format ratelimit_svc/config.py reads.

Pure. Descriptors follow igw/envoy_config.route_rate_limits(): [tenant], [tenant, model], [model].

- [model]: the model's capacity: `per_replica` × ready replicas (adaptive, clamped by min/max), or a
  fixed `limit`. These limits are alone in share group "capacity" (one per model), so each gets all of
  its model's capacity.
- [tenant, model]: each tenant allowed the model gets `share / sum of shares` of that capacity, in share
  group "tenants"; the rate-limit service sums the shares itself from this file, per model, which is
  why exactly the tenants holding a share get an entry. An override replaces the share with a fixed
  limit or `unlimited`; share 0 is a limit of 0 (that tenant's requests to the model are denied).
- [tenant]: the tenant's own `limit` (or defaults.tenant_limit).
- Key-only `tenant` (and `tenant` -> `model`) entries carry the defaults for tenants created outside
  the policy.
A limit is in shadow mode when the policy, its tenant or its model says so.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from igw.envoy_config import RATELIMIT_DOMAIN
from igw.policy import spec
from igw.policy.load import share_of

CAPACITY_GROUP = "capacity"
TENANTS_GROUP = "tenants"
# Each ConfigMap shard stays well below Kubernetes' 1 MiB object limit.
SHARD_BYTES = 700 * 1024
FILE_NAME = "igw.yaml"

try:
    _DUMPER: type = yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _DUMPER = yaml.SafeDumper

Entry = dict[str, Any]


def _limit(policy: spec.Policy, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"unit": policy.unit}
    out.update({k: v for k, v in fields.items() if v is not None})
    if policy.algorithm != "fixed_window" and not out.get("unlimited"):
        out["algorithm"] = policy.algorithm
    return out


def _entry(key: str, value: str | None, rate_limit: dict[str, Any] | None, shadow: bool,
           children: list[Entry] | None = None) -> Entry:
    entry: Entry = {"key": key}
    if value is not None:
        entry["value"] = value
    if rate_limit is not None:
        entry["rate_limit"] = rate_limit
        if shadow:
            entry["shadow_mode"] = True
    if children:
        entry["descriptors"] = children
    return entry


def share_totals(policy: spec.Policy) -> dict[str, float]:
    """Per model, the sum of shares of the tenants holding one (what the service will compute)."""
    totals: dict[str, float] = {}
    for tenant in policy.tenants.values():
        for model in policy.allowed.get(tenant.id, ()):
            share = share_of(tenant, model)
            if share:
                totals[model] = totals.get(model, 0.0) + share
    return totals


def _tenant_model(policy: spec.Policy, tenant: spec.Tenant, model: spec.Model, total: float) -> Entry | None:
    shadow = policy.shadow_mode or tenant.shadow_mode or model.shadow_mode
    override = tenant.overrides.get(model.name)
    if override is not None and override.unlimited:
        return _entry("model", model.name, {"unlimited": True}, shadow)
    if override is not None and override.limit is not None:
        return _entry("model", model.name, _limit(policy, requests_per_unit=override.limit), shadow)
    share = share_of(tenant, model.name) or 0.0
    if share == 0:
        return _entry("model", model.name, _limit(policy, requests_per_unit=0), shadow)
    fraction = share / total

    def part(value: int) -> int:
        return math.floor(value * fraction + 1e-9)

    if model.per_replica is not None:
        return _entry("model", model.name, _limit(
            policy, requests_per_unit_per_replica=model.per_replica, model=model.name,
            min=part(model.min) or None, max=None if model.max is None else part(model.max),
            share=int(share) if float(share).is_integer() else share, share_key=TENANTS_GROUP), shadow)
    if model.limit is not None:
        return _entry("model", model.name, _limit(policy, requests_per_unit=part(model.limit)), shadow)
    return None


def descriptors(policy: spec.Policy) -> list[Entry]:
    """Top-level descriptor entries, in a stable order: defaults, tenants, models."""
    out: list[Entry] = []
    def default_children(shadow: bool) -> list[Entry]:
        if policy.tenant_model_limit is None:
            return []
        return [_entry("model", None, _limit(policy, requests_per_unit=policy.tenant_model_limit), shadow)]

    if policy.tenant_limit is not None or policy.tenant_model_limit is not None:
        default_limit = None if policy.tenant_limit is None else _limit(policy, requests_per_unit=policy.tenant_limit)
        out.append(_entry("tenant", None, default_limit, policy.shadow_mode, default_children(policy.shadow_mode)))
    totals = share_totals(policy)
    for tenant in policy.tenants.values():
        children = []
        for name in policy.allowed.get(tenant.id, ()):
            child = _tenant_model(policy, tenant, policy.models[name], totals.get(name, 0.0))
            if child is not None:
                children.append(child)
        children += default_children(policy.shadow_mode or tenant.shadow_mode)
        limit = tenant.limit if tenant.limit is not None else policy.tenant_limit
        out.append(_entry("tenant", tenant.id, None if limit is None else _limit(policy, requests_per_unit=limit),
                          policy.shadow_mode or tenant.shadow_mode, children))
    for model in policy.models.values():
        shadow = policy.shadow_mode or model.shadow_mode
        if model.per_replica is not None:
            out.append(_entry("model", model.name, _limit(
                policy, requests_per_unit_per_replica=model.per_replica, model=model.name,
                min=model.min or None, max=model.max, share_key=CAPACITY_GROUP), shadow))
        elif model.limit is not None:
            out.append(_entry("model", model.name, _limit(policy, requests_per_unit=model.limit), shadow))
    return out


def _header(policy: spec.Policy, part: str = "") -> str:
    return (f"# Generated from the quota policy {policy.file}{part} by `igw policy apply` / `igw render istio`.\n"
            "# Do not edit: change the policy and apply it again.\n")


def _dump(policy: spec.Policy, entries: list[Entry], part: str = "") -> str:
    body = yaml.dump({"domain": RATELIMIT_DOMAIN, "descriptors": entries}, Dumper=_DUMPER, sort_keys=False,
                     default_flow_style=None, width=200)
    return _header(policy, part) + body


def render_file(policy: spec.Policy) -> str:
    """The whole config as one file (what `igw policy apply --rate-limit-config-dir` writes)."""
    return _dump(policy, descriptors(policy))


def render_shards(policy: spec.Policy, limit_bytes: int = SHARD_BYTES) -> dict[str, str]:
    """The same descriptors split into files of at most `limit_bytes` each, for ConfigMaps. Every file
    declares domain igw, so the service must merge them (--merge-domain-config); one shard needs none."""
    entries = descriptors(policy)
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        entry_size = len(yaml.dump([entry], Dumper=_DUMPER, sort_keys=False, default_flow_style=None, width=200))
        if groups[-1] and size + entry_size > limit_bytes - 1024:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry_size
    if len(groups) == 1:
        return {FILE_NAME: _dump(policy, groups[0])}
    return {f"igw-{i:03d}.yaml": _dump(policy, group, f" (part {i + 1} of {len(groups)})")
            for i, group in enumerate(groups)}
