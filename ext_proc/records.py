"""Tenants, API keys and models as plain values, and their Redis hash encoding.

Pure: no I/O. `store.py` writes these hashes and `cache.py` reads them; both go through the
encode/decode functions here so the schema has one definition. Validation lives here too, so the CLI,
the launcher and the request path reject the same bad values with the same words.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal

TenantStatus = Literal["active", "suspended"]

# \Z, not $: $ also matches before a final newline, and these names become header values, where
# Envoy refuses a newline (the client would get a bare 503 instead of a clear 400).
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}\Z")
MODEL_GLOB = re.compile(r"^[A-Za-z0-9*?\[\]!._:/@-]{1,128}\Z")

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TierDefaults:
    timeout_ms: int
    priority: int
    max_body_bytes: int


# What a tenant gets from its tier unless created with explicit values. Priority: higher is served first.
TIERS: dict[str, TierDefaults] = {
    "free": TierDefaults(timeout_ms=30_000, priority=0, max_body_bytes=1 * MIB),
    "standard": TierDefaults(timeout_ms=60_000, priority=1, max_body_bytes=4 * MIB),
    "premium": TierDefaults(timeout_ms=120_000, priority=2, max_body_bytes=16 * MIB),
}


class RecordError(ValueError):
    """A tenant, key or model value is invalid; the message names the field and what is expected."""


def check_tenant_id(value: str) -> str:
    if not TENANT_ID.match(value):
        raise RecordError(
            f"invalid tenant id {value!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_label(what: str, value: str) -> str:
    """Department and tier names travel in headers and metric labels, so they get the tenant-id rules."""
    if not TENANT_ID.match(value):
        raise RecordError(f"invalid {what} {value!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'")
    return value


def check_model_name(value: str) -> str:
    if not MODEL_NAME.match(value):
        raise RecordError(
            f"invalid model name {value!r}: use up to 128 letters, digits or . _ : / @ -, starting with a "
            "letter or digit"
        )
    return value


def parse_model_globs(text: str) -> tuple[str, ...]:
    globs = tuple(part.strip() for part in text.split(",") if part.strip())
    if not globs:
        raise RecordError("--models needs at least one model name or glob (e.g. 'llama-*,mistral-7b')")
    for glob in globs:
        if not MODEL_GLOB.match(glob):
            raise RecordError(f"invalid model glob {glob!r}: letters, digits, . _ : / @ - and * ? [ ] only")
    return globs


def _globs_regex(globs: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    department: str
    tier: str
    models: tuple[str, ...]
    max_body_bytes: int
    timeout_ms: int
    priority: int
    status: TenantStatus = "active"
    created_at: float = 0.0
    _models_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_models_re", _globs_regex(self.models))

    def allows_model(self, model: str) -> bool:
        """Globs match the canonical model name, case-sensitively, as fnmatch.fnmatchcase would."""
        return self._models_re.match(model) is not None

    @property
    def active(self) -> bool:
        return self.status == "active"


def tenant_to_hash(tenant: Tenant) -> dict[str, str]:
    return {
        "department": tenant.department,
        "tier": tenant.tier,
        "models": ",".join(tenant.models),
        "max_body_bytes": str(tenant.max_body_bytes),
        "timeout_ms": str(tenant.timeout_ms),
        "priority": str(tenant.priority),
        "status": tenant.status,
        "created_at": f"{tenant.created_at:.3f}",
    }


def hash_from_reply(reply: object) -> dict[str, str]:
    """HGETALL as the pipelined client returns it (a flat list of bytes) to a dict of text."""
    if not isinstance(reply, list):
        return {}
    items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in reply]
    return dict(zip(items[0::2], items[1::2], strict=True))


def _text(data: dict[str, str], name: str) -> str | None:
    return data.get(name)


def tenant_from_hash(tenant_id: str, data: dict[str, str]) -> Tenant | None:
    """None for a missing hash; RecordError when a stored field is corrupt (names the field)."""
    if not data:
        return None
    try:
        status = _text(data, "status") or "active"
        if status not in ("active", "suspended"):
            raise RecordError(f"status {status!r}")
        return Tenant(
            id=tenant_id,
            department=_text(data, "department") or "",
            tier=_text(data, "tier") or "",
            models=tuple(g for g in (_text(data, "models") or "").split(",") if g),
            max_body_bytes=int(_text(data, "max_body_bytes") or 0),
            timeout_ms=int(_text(data, "timeout_ms") or 0),
            priority=int(_text(data, "priority") or 0),
            status=status,  # type: ignore[arg-type]
            created_at=float(_text(data, "created_at") or 0),
        )
    except (ValueError, re.error) as exc:
        raise RecordError(f"tenant {tenant_id!r} has a corrupt record in Redis: {exc}") from None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What is stored for one API key: never the key itself, only its keyed digest (the Redis key name)."""

    key_id: str
    tenant: str
    created_at: float
    expires_at: float  # 0: never
    revoked_at: float  # 0: not revoked
    digest: str = ""  # hex HMAC of the key, also the Redis key name; compared in constant time on use

    def expired(self, now: float) -> bool:
        return 0 < self.expires_at <= now


def api_key_to_hash(key: ApiKey) -> dict[str, str]:
    return {
        "key_id": key.key_id,
        "tenant": key.tenant,
        "created_at": f"{key.created_at:.3f}",
        "expires_at": f"{key.expires_at:.3f}",
        "revoked_at": f"{key.revoked_at:.3f}",
        "digest": key.digest,
    }


def api_key_from_hash(data: dict[str, str]) -> ApiKey | None:
    if not data:
        return None
    try:
        return ApiKey(
            key_id=_text(data, "key_id") or "",
            tenant=_text(data, "tenant") or "",
            created_at=float(_text(data, "created_at") or 0),
            expires_at=float(_text(data, "expires_at") or 0),
            revoked_at=float(_text(data, "revoked_at") or 0),
            digest=_text(data, "digest") or "",
        )
    except ValueError as exc:
        raise RecordError(f"corrupt API key record in Redis: {exc}") from None


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    inspect_body: bool = False
    created_at: float = 0.0


def model_to_hash(model: Model) -> dict[str, str]:
    return {"inspect_body": "1" if model.inspect_body else "0", "created_at": f"{model.created_at:.3f}"}


def model_from_hash(name: str, data: dict[str, str]) -> Model | None:
    if not data:
        return None
    try:
        return Model(name, (_text(data, "inspect_body") or "0") == "1", float(_text(data, "created_at") or 0))
    except ValueError as exc:
        raise RecordError(f"model {name!r} has a corrupt record in Redis: {exc}") from None


MODEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
