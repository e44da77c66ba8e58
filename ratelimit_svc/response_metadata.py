"""The dynamic metadata a ShouldRateLimit answer carries with RESPONSE_DYNAMIC_METADATA=true, as upstream builds it.

Envoy stores it under `envoy.filters.http.ratelimit`, where access logs (`%DYNAMIC_METADATA(...)%`) and later
filters read it, so its shape is what operators' log pipelines parse: it must be upstream's, not ours.

    domain        the request's domain
    descriptors   one per request descriptor, in order: `entries` ("key=value" strings), and `limit`
                  (the request-level override, as Go prints the message) / `hitsAddend` when the descriptor has them
    hitsAddend    the request's hits_addend, when not 0
    metadata      the `metadata` of the config limits of descriptors that were not over their limit, merged
                  (nested maps merged key by key; on any other clash the first descriptor's value stays)

Pure: no I/O, used by service.py once per answer when the setting is on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2

from ratelimit_svc.lookup import Match

_OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_UNIT_NAMES = {value.number: name for name, value in RateLimitDescriptor.RateLimitOverride.DESCRIPTOR
               .fields_by_name["unit"].enum_type.values_by_name.items()}


def response_metadata(request: rls_pb2.RateLimitRequest, matches: Sequence[Match | None],
                      statuses: Sequence[rls_pb2.RateLimitResponse.DescriptorStatus]) -> dict[str, Any]:
    """`matches[i]` is the limit counted for descriptor i (None: no limit, unlimited, or replaced)."""
    fields: dict[str, Any] = {"domain": request.domain,
                              "descriptors": [_descriptor(d) for d in request.descriptors]}
    if request.hits_addend:
        fields["hitsAddend"] = request.hits_addend
    merged: dict[str, Any] = {}
    for match, status in zip(matches, statuses, strict=True):
        if match is not None and match.limit.metadata and status.code != _OVER_LIMIT:
            merge_first_wins(merged, match.limit.metadata)
    if merged:
        fields["metadata"] = merged
    return fields


def _descriptor(descriptor: RateLimitDescriptor) -> dict[str, Any]:
    out: dict[str, Any] = {"entries": [f"{e.key}={e.value}" for e in descriptor.entries]}
    if descriptor.HasField("limit"):
        out["limit"] = override_text(descriptor.limit)
    if descriptor.HasField("hits_addend"):
        out["hitsAddend"] = descriptor.hits_addend.value
    return out


def override_text(limit: RateLimitDescriptor.RateLimitOverride) -> str:
    """Go's compact text form of the message (`requests_per_unit:42 unit:HOUR`), zero fields left out."""
    parts = []
    if limit.requests_per_unit:
        parts.append(f"requests_per_unit:{limit.requests_per_unit}")
    if limit.unit:
        parts.append(f"unit:{_UNIT_NAMES.get(limit.unit, limit.unit)}")
    return " ".join(parts)


def merge_first_wins(dest: dict[str, Any], src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if key not in dest:
            dest[key] = thaw(value)
        elif isinstance(dest[key], dict) and isinstance(value, Mapping):
            merge_first_wins(dest[key], value)


def thaw(value: object) -> Any:
    """Config metadata is frozen (mapping proxies and tuples) so a loaded config cannot change; a Struct wants
    plain dicts and lists."""
    if isinstance(value, MappingProxyType | Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value
