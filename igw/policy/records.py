"""The ext_proc records a policy asks for (tenants, models, aliases), compared with Redis and applied.

The schema is ext_proc/store.py's: its key functions, sets and invalidation channel, and the hash
encoders of ext_proc/records.py. Writing goes through one MULTI/EXEC transaction instead of store's
one-record functions, so a policy is applied whole or not at all, and every changed record publishes
its invalidation message inside that transaction.

What a policy manages: a tenant's department, tier, model globs, body limit, timeout and priority (not
its status, nor its API keys); a model's inspect_body flag; aliases. Records in Redis the policy does
not mention are reported and left alone, except that `prune` removes models and aliases (never
tenants, whose keys would be orphaned). A name the policy makes a model stops being an alias, and
the other way round, always.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ext_proc import store
from ext_proc.records import Model, Tenant, model_to_hash, tenant_to_hash
from igw.policy import spec

if TYPE_CHECKING:
    import redis

MANAGED_TENANT_FIELDS = ("department", "tier", "models", "max_body_bytes", "timeout_ms", "priority")


@dataclass(frozen=True)
class Records:
    tenants: dict[str, dict[str, str]]  # id -> managed hash fields
    models: dict[str, bool]  # name -> inspect_body
    aliases: dict[str, str]  # alias -> canonical model


@dataclass(frozen=True)
class Change:
    kind: str  # tenant, model, alias
    name: str
    action: str  # add, change, remove, extra (in Redis, not in the policy, left alone)
    detail: str = ""

    def render(self) -> str:
        sign = {"add": "+", "change": "~", "remove": "-", "extra": "?"}[self.action]
        text = f"{sign} {self.kind} {self.name}"
        return f"{text}: {self.detail}" if self.detail else text


def _tenant_fields(tenant: Tenant) -> dict[str, str]:
    encoded = tenant_to_hash(tenant)
    return {k: encoded[k] for k in MANAGED_TENANT_FIELDS}


def desired(policy: spec.Policy) -> Records:
    tenants = {
        t.id: _tenant_fields(Tenant(id=t.id, department=t.department, tier=t.tier, models=t.models,
                                    max_body_bytes=t.max_body_bytes, timeout_ms=t.timeout_ms, priority=t.priority))
        for t in policy.tenants.values()
    }
    return Records(tenants, {m.name: m.inspect_body for m in policy.models.values()}, dict(policy.aliases))


def live(client: redis.Redis) -> Records:
    return Records(
        {t.id: _tenant_fields(t) for t in store.list_tenants(client)},
        {m.name: m.inspect_body for m in store.list_models(client)},
        store.list_aliases(client),
    )


def _fields_diff(old: dict[str, str], new: dict[str, str]) -> str:
    return ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])


def diff(want: Records, have: Records, *, prune: bool = False) -> list[Change]:
    changes: list[Change] = []
    for tid, fields in want.tenants.items():
        if tid not in have.tenants:
            changes.append(Change("tenant", tid, "add", ", ".join(f"{k}={v}" for k, v in fields.items())))
        elif have.tenants[tid] != fields:
            changes.append(Change("tenant", tid, "change", _fields_diff(have.tenants[tid], fields)))
    changes += [Change("tenant", tid, "extra", "not in the policy; left as is") for tid in have.tenants
                if tid not in want.tenants]
    for name, inspect in want.models.items():
        if name in have.aliases:
            changes.append(Change("alias", name, "remove", "the policy makes it a model"))
        if name not in have.models:
            changes.append(Change("model", name, "add", f"inspect_body={str(inspect).lower()}"))
        elif have.models[name] != inspect:
            changes.append(Change("model", name, "change",
                                  f"inspect_body {str(have.models[name]).lower()} -> {str(inspect).lower()}"))
    for alias, target in want.aliases.items():
        if alias in have.models:
            changes.append(Change("model", alias, "remove", "the policy makes it an alias"))
        if have.aliases.get(alias) != target:
            action = "add" if alias not in have.aliases else "change"
            old = f"{have.aliases[alias]} -> " if alias in have.aliases else ""
            changes.append(Change("alias", alias, action, f"{old}{target}"))
    for name in have.models:
        if name not in want.models and name not in want.aliases:
            changes.append(Change("model", name, "remove" if prune else "extra",
                                  "not in the policy" + ("" if prune else "; --prune removes it")))
    for alias in have.aliases:
        if alias not in want.aliases and alias not in want.models:
            changes.append(Change("alias", alias, "remove" if prune else "extra",
                                  "not in the policy" + ("" if prune else "; --prune removes it")))
    return changes


def queue(pipe: redis.client.Pipeline, want: Records, have: Records, *, prune: bool = False) -> list[Change]:
    """Queue every change on `pipe`, a transaction the caller executes (apply.py runs it under WATCH, with
    its own bookkeeping in the same MULTI); returns the changes (the same list `diff` gives)."""
    changes = diff(want, have, prune=prune)
    now = time.time()
    for change in changes:
        if change.action == "extra":
            continue
        if change.kind == "tenant":
            fields = want.tenants[change.name]
            if change.action == "add":
                fields = {**fields, "status": "active", "created_at": f"{now:.3f}"}
                pipe.sadd(store.TENANTS, change.name)
            pipe.hset(store.tenant_key(change.name), mapping=fields)
            pipe.publish(store.INVALIDATION_CHANNEL, f"tenant:{change.name}")
        elif change.kind == "model":
            if change.action == "remove":
                pipe.delete(store.model_key(change.name))
                pipe.srem(store.MODELS, change.name)
            else:
                encoded = model_to_hash(Model(change.name, want.models[change.name], now))
                if change.action == "change":
                    encoded.pop("created_at")
                pipe.hset(store.model_key(change.name), mapping=encoded)
                pipe.sadd(store.MODELS, change.name)
            pipe.publish(store.INVALIDATION_CHANNEL, f"model:{change.name}")
        elif change.kind == "alias":
            if change.action == "remove":
                pipe.delete(store.alias_key(change.name))
                pipe.srem(store.ALIASES, change.name)
            else:
                pipe.set(store.alias_key(change.name), want.aliases[change.name])
                pipe.sadd(store.ALIASES, change.name)
            pipe.publish(store.INVALIDATION_CHANNEL, f"model:{change.name}")
    return changes
