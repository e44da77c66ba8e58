"""Seed the test bed's Redis with the demo tenant, its API key, the demo models and their aliases.

Everything goes through ext_proc/store.py, the same functions the operator CLI uses, so the bed holds
exactly what a real deployment would. `python -m igw.testbed_seed --redis-url U` does the same for
docker-compose (the one-shot `seed` service) and prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

DEMO_TENANT = "demo"
DEMO_DEPARTMENT = "demo"
DEMO_TIER = "standard"
# Aliases seeded when their model is served; the demo shows that aliases route to the canonical model.
DEMO_ALIASES = {"linear": "demo-linear", "logistic": "demo-logistic"}
# Tenants seeded next to `demo` by seed_bed: `demo-half` holds half of demo's adaptive share in the demo
# policy; `demo-restricted` may call the first demo model only (the demo's 403 case).
DEMO_HALF_TENANT = "demo-half"
RESTRICTED_TENANT = "demo-restricted"
# Models whose requests ext_proc reads before routing (JSON checked): exercises the body path.
INSPECT_BODY_MODELS = frozenset({"demo-logistic"})


def seed_demo(redis_url: str, models: Sequence[str], *, tenant_id: str = DEMO_TENANT) -> dict[str, Any]:
    """Create the tenant (allowed every model), issue one key, register models and aliases."""
    from ext_proc import store

    client = store.connect(redis_url)
    try:
        registered = []
        for name in models:
            store.register_model(client, name, inspect_body=name in INSPECT_BODY_MODELS)
            registered.append({"name": name, "inspect_body": name in INSPECT_BODY_MODELS})
        aliases = {alias: model for alias, model in DEMO_ALIASES.items() if model in models}
        for alias, model in aliases.items():
            store.set_alias(client, alias, model)
        tenant = store.create_tenant(client, tenant_id, department=DEMO_DEPARTMENT, tier=DEMO_TIER, models="*")
        issued = store.issue_key(client, tenant_id)
    finally:
        client.close()
    return {
        "tenant_id": tenant.id,
        "department": tenant.department,
        "tier": tenant.tier,
        "api_key": issued.key,
        "key_id": issued.key_id,
        "models": registered,
        "aliases": aliases,
    }



def seed_bed(redis_url: str, models: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """What every test bed holds (`igw up`, and compose's seed job): the demo tenant, models and aliases
    (seed_demo), then demo-half and demo-restricted with a key each. Returns (seed_demo's answer, tenant id ->
    its id, clear key, key id and allowed models)."""
    from ext_proc import store

    demo = seed_demo(redis_url, list(models))
    tenants = {demo["tenant_id"]: {"tenant_id": demo["tenant_id"], "api_key": demo["api_key"],
                                   "key_id": demo["key_id"], "models": "*"}}
    client = store.connect(redis_url)
    try:
        for tenant_id, allowed in {DEMO_HALF_TENANT: "*", RESTRICTED_TENANT: models[0]}.items():
            store.create_tenant(client, tenant_id, department=DEMO_DEPARTMENT, tier=DEMO_TIER, models=allowed)
            issued = store.issue_key(client, tenant_id)
            tenants[tenant_id] = {"tenant_id": tenant_id, "api_key": issued.key, "key_id": issued.key_id,
                                  "models": allowed}
    finally:
        client.close()
    return demo, tenants

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igw.testbed_seed",
                                     description="Create the demo tenant, key, models and aliases in Redis.")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--models", required=True, help="comma-separated model names")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    from ext_proc.store import StoreError

    try:
        print(json.dumps(seed_demo(args.redis_url, models), indent=2))
    except (StoreError, ValueError) as exc:  # ValueError: records.RecordError, a bad value
        print(f"seed failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
