"""The Redis schema for live replica state, shared by publishers (watcher, launcher, CLI) and readers.

Per model, one hash `igw:replicas:<model>` (the model name as the operator wrote it):
    ready      total ready replicas (int)
    versions   JSON object {version: ready count} ("" when the model is unversioned)
    replicas   JSON list of ready replica identities (pod name, or host:port in the test bed)
    updated    unix time of the last write (float)
    publisher  identity of the writer
The key has a TTL (default 15 s); publishers rewrite it on every change and at least every
`heartbeat` seconds, so a dead publisher's numbers expire instead of freezing a quota. Writers also
add the model to the set `igw:replica-models` and publish the model name on `igw:replicas:changed`
so readers refresh within milliseconds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

KEY_PREFIX = "igw:replicas:"
MODELS_SET = "igw:replica-models"  # outside the igw:replicas: prefix, so no model name can clash
CHANGED_CHANNEL = "igw:replicas:changed"
DEFAULT_TTL = 15


def replica_key(model: str) -> str:
    return KEY_PREFIX + model


@dataclass(frozen=True)
class ReplicaState:
    model: str
    ready: int
    versions: dict[str, int] = field(default_factory=dict)
    replicas: tuple[str, ...] = ()
    updated: float = 0.0
    publisher: str = ""

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.updated


def encode_state(state: ReplicaState) -> dict[str, str]:
    return {
        "ready": str(state.ready),
        "versions": json.dumps(state.versions, sort_keys=True),
        "replicas": json.dumps(list(state.replicas)),
        "updated": repr(state.updated),
        "publisher": state.publisher,
    }


def decode_state(model: str, raw: dict[bytes | str, bytes | str]) -> ReplicaState | None:
    """Parse a hash as read from Redis; None when it is missing or malformed."""
    if not raw:
        return None
    data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}
    try:
        versions = json.loads(data.get("versions") or "{}")
        replicas = json.loads(data.get("replicas") or "[]")
        if not isinstance(versions, dict) or not isinstance(replicas, list):
            return None  # e.g. "null" or a number: valid JSON of the wrong shape
        state = ReplicaState(
            model=model,
            ready=int(data["ready"]),
            versions={str(k): int(v) for k, v in versions.items()},
            replicas=tuple(str(r) for r in replicas),
            updated=float(data.get("updated") or 0),
            publisher=data.get("publisher", ""),
        )
    except (KeyError, ValueError, TypeError):
        return None
    # A negative count or a time of inf/nan would never look stale: the quota would follow it forever.
    if state.ready < 0 or not math.isfinite(state.updated):
        return None
    return state


def write_commands(state: ReplicaState, ttl: int = DEFAULT_TTL) -> list[tuple[str, ...]]:
    """The commands that publish one model's state atomically enough for readers (one MULTI block)."""
    key = replica_key(state.model)
    fields: list[str] = []
    for name, value in encode_state(state).items():
        fields += [name, value]
    return [
        ("MULTI",),
        ("DEL", key),
        ("HSET", key, *fields),
        ("EXPIRE", key, str(ttl)),
        ("SADD", MODELS_SET, state.model),
        ("EXEC",),
        ("PUBLISH", CHANGED_CHANNEL, state.model),
    ]
