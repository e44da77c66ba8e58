"""Reading the request head and deciding the headers Envoy must set or remove.

Pure: no I/O. Anti-spoofing is a rule here, not a habit of callers: every client-sent header with our
prefix (`x-igw-`) or Envoy's (`x-envoy-`) is removed, and the trusted values are set afterwards with
overwrite semantics, so a forged `x-igw-tenant` can never reach the rate-limit service or the model.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ext_proc.records import Tenant

INTERNAL_PREFIX = "x-igw-"
ENVOY_PREFIX = "x-envoy-"
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
MAX_REQUEST_ID_LENGTH = 128

H_TENANT = "x-igw-tenant"
H_DEPARTMENT = "x-igw-department"
H_TIER = "x-igw-tier"
H_MODEL = "x-igw-model"
H_MODEL_VERSION = "x-igw-model-version"
H_PRIORITY = "x-igw-priority"
H_TIMEOUT = "x-envoy-upstream-rq-timeout-ms"
H_REQUEST_ID = "x-request-id"


class HeaderLike(Protocol):
    key: str
    value: str
    raw_value: bytes


@dataclass(slots=True)
class RequestHead:
    method: str = ""
    path: str = ""
    content_type: str | None = None
    content_length: str | None = None
    content_encoding: str | None = None  # a repeated header is read whole: its values joined with ", "
    authorization: str | None = None
    x_api_key: str | None = None
    request_id: str | None = None
    repeated_credential: str | None = None  # a credential header sent more than once (its name)
    spoofable: list[str] = field(default_factory=list)  # client-sent x-igw-* / x-envoy-* names


# Headers the processor reads, by the RequestHead slot they fill.
_READ = {":path": "path", ":method": "method", "content-type": "content_type", "content-length": "content_length",
         "content-encoding": "content_encoding", "authorization": "authorization", "x-api-key": "x_api_key",
         H_REQUEST_ID: "request_id"}
# Headers Envoy commonly sends that are neither read nor ours: one dict lookup settles them (None).
_PLAIN = (":authority", ":scheme", "user-agent", "accept", "accept-encoding", "accept-language", "connection",
          "te", "cookie", "origin", "referer", "cache-control", "pragma", "x-forwarded-proto", "x-forwarded-for",
          "x-forwarded-host", "x-forwarded-port", "x-real-ip", "traceparent", "tracestate", "x-b3-traceid",
          "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-amzn-trace-id", "x-cloud-trace-context")
# Slots whose header must come once: a repeated credential is refused, not resolved by order.
_CREDENTIAL_SLOTS = {"authorization": "authorization", "x_api_key": "x-api-key"}
# Slots a repeated header needs care for (one dict test per read header, as before): the credentials above,
# and content-encoding, a list header whose repeats are one list (RFC 9110 5.3), so `gzip` then `identity`
# still says the body is compressed.
_ON_REPEAT = frozenset((*_CREDENTIAL_SLOTS, "content_encoding"))
_CLASSIFY: dict[str, str | None] = {**dict.fromkeys(_PLAIN), **_READ}
_SPOOFABLE = (INTERNAL_PREFIX, ENVOY_PREFIX)

# All the processor needs to see (Envoy's ext_proc filter forwards only these: igw/envoy_config.py): the
# headers it reads, and every header it may have to strip.
READ_HEADERS: tuple[str, ...] = tuple(_READ)
STRIPPED_PREFIXES: tuple[str, ...] = _SPOOFABLE


def read_request_head(headers: Iterable[HeaderLike]) -> RequestHead:
    """One pass over Envoy's header list, decoding only the values we use. Envoy sends lowercase names and
    values in `raw_value` (bytes); other senders may use mixed case or the `value` field."""
    head = RequestHead()
    classify = _CLASSIFY.get
    for header in headers:
        key = header.key
        slot = classify(key, "")
        if slot is None:
            continue
        if not slot:
            lowered = key.lower()
            if lowered.startswith(_SPOOFABLE):
                head.spoofable.append(key)
                continue
            if lowered == key:
                continue
            slot = _READ.get(lowered)
            if slot is None:
                continue
        raw = header.raw_value
        value = raw.decode("latin-1") if raw else header.value
        if slot in _ON_REPEAT:
            earlier = getattr(head, slot)
            if earlier is not None:
                if slot == "content_encoding":
                    value = f"{earlier}, {value}"
                else:
                    head.repeated_credential = _CREDENTIAL_SLOTS[slot]
        setattr(head, slot, value)
    if head.method:
        head.method = head.method.upper()
    if head.authorization is not None and "," in head.authorization and head.repeated_credential is None \
            and _joined_credentials(head.authorization):
        head.repeated_credential = "authorization"
    return head


def _joined_credentials(authorization: str) -> bool:
    """Envoy joins a repeated Authorization header into one value with commas ("Bearer a,Bearer b"): a
    part after a comma that holds a space is another scheme and credential, not a parameter of the first."""
    return any(" " in part.strip() for part in authorization.split(",")[1:])


def parse_content_length(text: str | None) -> int | None:
    """None when absent; ValueError when present but not a plain non-negative integer."""
    if text is None:
        return None
    stripped = text.strip()
    if not stripped.isdigit() or len(stripped) > 18:
        raise ValueError(text)
    return int(stripped)


def applied_codings(content_encoding: str) -> str:
    """The codings a content-encoding value says were applied to the body, as the client wrote them (joined
    with ", "), or "" when the body is as sent: `identity` (any case) means no coding, and so does an
    empty value or list element."""
    codings = [part.strip() for part in content_encoding.split(",")]
    return ", ".join(c for c in codings if c and c.lower() != "identity")


def usable_request_id(value: str | None) -> bool:
    return (
        value is not None
        and 0 < len(value) <= MAX_REQUEST_ID_LENGTH
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class HeaderChanges:
    set: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]


def removals(head: RequestHead, *, forward_credentials: bool) -> tuple[str, ...]:
    if forward_credentials:
        return tuple(head.spoofable)
    creds = tuple(name for name, value in zip(CREDENTIAL_HEADERS, (head.authorization, head.x_api_key),
                                               strict=True) if value is not None)
    return (*head.spoofable, *creds)


def tenant_headers(tenant: Tenant, request_id: str | None) -> list[tuple[str, str]]:
    """The trusted headers the rate-limit descriptors and routes are built from."""
    out = [
        (H_TENANT, tenant.id),
        (H_DEPARTMENT, tenant.department),
        (H_TIER, tenant.tier),
        (H_PRIORITY, str(tenant.priority)),
    ]
    if tenant.timeout_ms > 0:
        out.append((H_TIMEOUT, str(tenant.timeout_ms)))
    if request_id is not None:
        out.append((H_REQUEST_ID, request_id))
    return out


def model_headers(model: str, version: str | None) -> list[tuple[str, str]]:
    out = [(H_MODEL, model)]
    if version is not None:
        out.append((H_MODEL_VERSION, version))
    return out
