"""The Redis schema of tenants, API keys, models and aliases, and the operator functions that write it.

Plain synchronous functions over a redis-py client, for the `igw` CLI, the local test-bed launcher
and tests; the request path only reads (see cache.py) with the pipelined client. Every write also
publishes an invalidation message so running processors drop their cached copy at once.

Keys (all under `igw:`):
  igw:tenant:<id>          hash   department tier models max_body_bytes timeout_ms priority status created_at
  igw:tenants              set    tenant ids
  igw:apikey:<digest>      hash   key_id tenant digest created_at expires_at revoked_at
                                  (<digest> = hex HMAC-SHA256(secret, key); the key itself is never stored)
  igw:apikey_id:<key_id>   string <digest>
  igw:tenant_keys:<id>     set    key ids of the tenant
  igw:model:<name>         hash   inspect_body created_at
  igw:models               set    model names
  igw:alias:<alias>        string canonical model name
  igw:aliases              set    alias names
Channel igw:ext_proc:invalidate carries "key:<digest>", "tenant:<id>", "model:<name>" or "all".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ext_proc.apikeys import DEFAULT_KEY_SECRET, generate_key, key_digest, key_id_of
from ext_proc.records import (
    TIERS,
    ApiKey,
    Model,
    RecordError,
    Tenant,
    api_key_from_hash,
    api_key_to_hash,
    check_label,
    check_model_name,
    check_tenant_id,
    model_from_hash,
    model_to_hash,
    parse_model_globs,
    tenant_from_hash,
    tenant_to_hash,
)

if TYPE_CHECKING:
    import redis

INVALIDATION_CHANNEL = "igw:ext_proc:invalidate"
TENANTS = "igw:tenants"
MODELS = "igw:models"
ALIASES = "igw:aliases"


def tenant_key(tenant_id: str) -> str:
    return f"igw:tenant:{tenant_id}"


def tenant_keys_key(tenant_id: str) -> str:
    return f"igw:tenant_keys:{tenant_id}"


def api_key_key(digest: str) -> str:
    return f"igw:apikey:{digest}"


def api_key_id_key(key_id: str) -> str:
    return f"igw:apikey_id:{key_id}"


def model_key(name: str) -> str:
    return f"igw:model:{name}"


def alias_key(alias: str) -> str:
    return f"igw:alias:{alias}"


class StoreError(Exception):
    """An operator request that cannot be done: NotFound, AlreadyExists, or a RecordError (bad value)."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


def connect(redis_url: str) -> redis.Redis:
    import redis as redis_lib

    return redis_lib.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5)


def _secret(secret: bytes | str | None) -> bytes:
    if secret is None:
        return DEFAULT_KEY_SECRET.encode()
    return secret.encode() if isinstance(secret, str) else secret


# --- tenants ---------------------------------------------------------------------------------------------

def create_tenant(
    client: redis.Redis,
    tenant_id: str,
    *,
    department: str,
    tier: str,
    models: str,
    max_body_bytes: int | None = None,
    timeout_ms: int | None = None,
    priority: int | None = None,
) -> Tenant:
    """Create an active tenant. Values not given come from the tier (records.TIERS)."""
    check_tenant_id(tenant_id)
    check_label("department", department)
    check_label("tier", tier)
    globs = parse_model_globs(models)
    defaults = TIERS.get(tier)
    if defaults is None and None in (max_body_bytes, timeout_ms, priority):
        raise RecordError(
            f"unknown tier {tier!r}: use one of {', '.join(TIERS)} or give max body bytes, timeout and priority"
        )
    tenant = Tenant(
        id=tenant_id,
        department=department,
        tier=tier,
        models=globs,
        max_body_bytes=max_body_bytes if max_body_bytes is not None else defaults.max_body_bytes,  # type: ignore[union-attr]
        timeout_ms=timeout_ms if timeout_ms is not None else defaults.timeout_ms,  # type: ignore[union-attr]
        priority=priority if priority is not None else defaults.priority,  # type: ignore[union-attr]
        status="active",
        created_at=time.time(),
    )
    if tenant.max_body_bytes < 1 or tenant.timeout_ms < 1:
        raise RecordError("max body bytes and timeout must be positive")
    if not client.sadd(TENANTS, tenant_id):
        raise AlreadyExists(f"tenant {tenant_id!r} already exists")
    pipe = client.pipeline()
    pipe.hset(tenant_key(tenant_id), mapping=tenant_to_hash(tenant))
    pipe.publish(INVALIDATION_CHANNEL, f"tenant:{tenant_id}")
    pipe.execute()
    return tenant


def get_tenant(client: redis.Redis, tenant_id: str) -> Tenant:
    tenant = tenant_from_hash(tenant_id, client.hgetall(tenant_key(tenant_id)))
    if tenant is None:
        raise NotFound(f"tenant {tenant_id!r} does not exist")
    return tenant


def list_tenants(client: redis.Redis) -> list[Tenant]:
    ids = sorted(client.smembers(TENANTS))
    pipe = client.pipeline()
    for tenant_id in ids:
        pipe.hgetall(tenant_key(tenant_id))
    out = []
    for tenant_id, data in zip(ids, pipe.execute(), strict=True):
        tenant = tenant_from_hash(tenant_id, data)
        if tenant is not None:
            out.append(tenant)
    return out


def set_tenant_status(client: redis.Redis, tenant_id: str, status: str) -> Tenant:
    if status not in ("active", "suspended"):
        raise RecordError(f"invalid status {status!r}: active or suspended")
    get_tenant(client, tenant_id)
    pipe = client.pipeline()
    pipe.hset(tenant_key(tenant_id), "status", status)
    pipe.publish(INVALIDATION_CHANNEL, f"tenant:{tenant_id}")
    pipe.execute()
    return get_tenant(client, tenant_id)


def update_tenant(
    client: redis.Redis,
    tenant_id: str,
    *,
    department: str | None = None,
    tier: str | None = None,
    models: str | None = None,
    max_body_bytes: int | None = None,
    timeout_ms: int | None = None,
    priority: int | None = None,
) -> Tenant:
    """Change the given fields of an existing tenant (others, status included, stay as they are).

    Only the changed fields are written, so an update racing with a suspension cannot undo it; changing
    the tier does not reset the limits (give them explicitly)."""
    changes: dict[str, str] = {}
    if department is not None:
        check_label("department", department)
        changes["department"] = department
    if tier is not None:
        check_label("tier", tier)
        changes["tier"] = tier
    if models is not None:
        changes["models"] = ",".join(parse_model_globs(models))
    for name, value in (("max_body_bytes", max_body_bytes), ("timeout_ms", timeout_ms)):
        if value is not None:
            if value < 1:
                raise RecordError(f"{name.replace('_', ' ')} must be positive")
            changes[name] = str(value)
    if priority is not None:
        if priority < 0:
            raise RecordError("priority must not be negative")
        changes["priority"] = str(priority)
    if not changes:
        raise RecordError("nothing to update: give at least one field")
    get_tenant(client, tenant_id)
    pipe = client.pipeline()
    pipe.hset(tenant_key(tenant_id), mapping=changes)
    pipe.publish(INVALIDATION_CHANNEL, f"tenant:{tenant_id}")
    pipe.execute()
    return get_tenant(client, tenant_id)


def suspend_tenant(client: redis.Redis, tenant_id: str) -> Tenant:
    return set_tenant_status(client, tenant_id, "suspended")


def activate_tenant(client: redis.Redis, tenant_id: str) -> Tenant:
    return set_tenant_status(client, tenant_id, "active")


# --- API keys --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown once, never stored
    key_id: str
    tenant: str
    expires_at: float  # 0: never


def issue_key(
    client: redis.Redis,
    tenant_id: str,
    *,
    secret: bytes | str | None = None,
    expires_in: float | None = None,
) -> IssuedKey:
    """A new key for the tenant. The clear key is returned here and nowhere else."""
    get_tenant(client, tenant_id)
    if expires_in is not None and expires_in <= 0:
        raise RecordError("expiry must be in the future")
    key, key_id = generate_key()
    digest = key_digest(_secret(secret), key)
    now = time.time()
    record = ApiKey(key_id, tenant_id, now, now + expires_in if expires_in else 0.0, 0.0, digest)
    pipe = client.pipeline()
    pipe.hset(api_key_key(digest), mapping=api_key_to_hash(record))
    pipe.set(api_key_id_key(key_id), digest)
    pipe.sadd(tenant_keys_key(tenant_id), key_id)
    pipe.publish(INVALIDATION_CHANNEL, f"key:{digest}")
    pipe.execute()
    return IssuedKey(key, key_id, tenant_id, record.expires_at)


def _digest_for(client: redis.Redis, key_id: str | None, key: str | None, secret: bytes | str | None) -> str:
    if key is not None:
        return key_digest(_secret(secret), key)
    if key_id is None:
        raise RecordError("give a key id or the key")
    digest = client.get(api_key_id_key(key_id))
    if digest is None:
        raise NotFound(f"API key {key_id!r} does not exist")
    return str(digest)


def revoke_key(
    client: redis.Redis,
    *,
    key_id: str | None = None,
    key: str | None = None,
    secret: bytes | str | None = None,
) -> ApiKey:
    """Mark the key revoked (the record stays for audit) and tell every processor at once."""
    digest = _digest_for(client, key_id, key, secret)
    record = api_key_from_hash(client.hgetall(api_key_key(digest)))
    if record is None:
        if key is None:
            raise NotFound(f"API key {key_id!r} does not exist")
        # Never echo the key: it is a secret. The id embedded in a key of our format is not.
        embedded = key_id_of(key)
        named = f", whose id is {embedded!r}," if embedded else ""
        raise NotFound(f"no API key matches the key given{named} (or it was issued with another key secret)")
    now = time.time()
    pipe = client.pipeline()
    if not record.revoked_at:
        pipe.hset(api_key_key(digest), "revoked_at", f"{now:.3f}")
    pipe.publish(INVALIDATION_CHANNEL, f"key:{digest}")
    pipe.execute()
    return api_key_from_hash(client.hgetall(api_key_key(digest)))  # type: ignore[return-value]


def list_keys(client: redis.Redis, tenant_id: str | None = None) -> list[ApiKey]:
    tenant_ids = [tenant_id] if tenant_id else sorted(client.smembers(TENANTS))
    if tenant_id:
        get_tenant(client, tenant_id)
    out: list[ApiKey] = []
    for tid in tenant_ids:
        for key_id in sorted(client.smembers(tenant_keys_key(tid))):
            digest = client.get(api_key_id_key(key_id))
            record = api_key_from_hash(client.hgetall(api_key_key(digest))) if digest else None
            if record is not None:
                out.append(record)
    return out


# --- models and aliases ----------------------------------------------------------------------------------

def register_model(client: redis.Redis, name: str, *, inspect_body: bool = False) -> Model:
    """Create or update a model. `inspect_body`: its requests are read (JSON checked) before routing."""
    check_model_name(name)
    if client.exists(alias_key(name)):
        raise AlreadyExists(f"{name!r} is already an alias; remove the alias first")
    existing = model_from_hash(name, client.hgetall(model_key(name)))
    model = Model(name, inspect_body, existing.created_at if existing else time.time())
    pipe = client.pipeline()
    pipe.hset(model_key(name), mapping=model_to_hash(model))
    pipe.sadd(MODELS, name)
    pipe.publish(INVALIDATION_CHANNEL, f"model:{name}")
    pipe.execute()
    return model


# Check and write in one step (a script runs atomically): an alias can never point at a model removed
# at the same moment, and a model cannot be removed while an alias still points at it.
_SET_ALIAS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_model' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alias_is_model' end
redis.call('SET', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('PUBLISH', KEYS[5], 'model:' .. ARGV[2])
return 'ok'
"""
_REMOVE_MODEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_model'} end
local pointing = {}
for _, alias in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('GET', ARGV[2] .. alias) == ARGV[1] then table.insert(pointing, alias) end
end
if #pointing > 0 then table.insert(pointing, 1, 'aliased'); return pointing end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[4], 'model:' .. ARGV[1])
return {'ok'}
"""


def set_alias(client: redis.Redis, alias: str, model: str) -> None:
    check_model_name(alias)
    check_model_name(model)
    outcome = client.eval(_SET_ALIAS, 5, model_key(model), model_key(alias), alias_key(alias), ALIASES,
                          INVALIDATION_CHANNEL, model, alias)
    if outcome == "no_model":
        raise NotFound(f"model {model!r} is not registered")
    if outcome == "alias_is_model":
        raise AlreadyExists(f"{alias!r} is a registered model and cannot also be an alias")


def remove_model(client: redis.Redis, name: str) -> None:
    """Unregister a model: its requests get 404 as soon as the processors hear of it. Refused while
    aliases point at it (they would route nowhere); the error names them."""
    check_model_name(name)
    outcome = client.eval(_REMOVE_MODEL, 4, model_key(name), MODELS, ALIASES, INVALIDATION_CHANNEL,
                          name, alias_key(""))
    if outcome[0] == "no_model":
        raise NotFound(f"model {name!r} is not registered")
    if outcome[0] == "aliased":
        raise StoreError(f"model {name!r} still has aliases ({', '.join(sorted(outcome[1:]))}): "
                         "remove them first with `igw models unalias`")


def remove_alias(client: redis.Redis, alias: str) -> None:
    if not client.delete(alias_key(alias)):
        raise NotFound(f"alias {alias!r} does not exist")
    pipe = client.pipeline()
    pipe.srem(ALIASES, alias)
    pipe.publish(INVALIDATION_CHANNEL, f"model:{alias}")
    pipe.execute()


def list_models(client: redis.Redis) -> list[Model]:
    names = sorted(client.smembers(MODELS))
    pipe = client.pipeline()
    for name in names:
        pipe.hgetall(model_key(name))
    return [m for name, data in zip(names, pipe.execute(), strict=True)
            if (m := model_from_hash(name, data)) is not None]


def list_aliases(client: redis.Redis) -> dict[str, str]:
    aliases = sorted(client.smembers(ALIASES))
    pipe = client.pipeline()
    for alias in aliases:
        pipe.get(alias_key(alias))
    return {a: m for a, m in zip(aliases, pipe.execute(), strict=True) if m is not None}
