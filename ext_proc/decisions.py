"""Every outcome a request can get, with its HTTP status and the message the client sees.

Pure: no I/O. One place maps a refusal to status, machine code and wording, so the stream handler,
metrics and logs all agree. Messages name what is wrong but never internal detail (no Redis errors,
no key digests, no tenant data the caller does not already know).
"""

from __future__ import annotations

from dataclasses import dataclass

from ext_proc.apikeys import MAX_KEY_LENGTH

ALLOWED = "allowed"


@dataclass(frozen=True, slots=True)
class Denial:
    """A refusal sent to the client as an ImmediateResponse with a JSON error body."""

    status: int
    code: str
    message: str
    reason: str  # for logs and metrics only: finer than `code` (e.g. revoked vs expired)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def decision(self) -> str:
        """The metrics label: the HTTP status as text."""
        return str(self.status)


_BEARER = ("www-authenticate", 'Bearer realm="igw"')
_BEARER_INVALID = ("www-authenticate", 'Bearer realm="igw", error="invalid_token"')

MISSING_KEY = Denial(
    401, "missing_api_key",
    "an API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
    "missing_key", (_BEARER,),
)
MALFORMED_AUTHORIZATION = Denial(
    401, "invalid_authorization", "the Authorization header must have the form 'Bearer <key>'",
    "malformed_authorization", (_BEARER,),
)
MALFORMED_API_KEY = Denial(
    401, "invalid_authorization",
    f"the x-api-key header must hold the API key alone: no spaces, at most {MAX_KEY_LENGTH} characters",
    "malformed_api_key", (_BEARER,),
)
UNKNOWN_KEY = Denial(401, "invalid_api_key", "the API key is not valid", "unknown_key", (_BEARER_INVALID,))
REVOKED_KEY = Denial(401, "invalid_api_key", "the API key has been revoked", "revoked_key", (_BEARER_INVALID,))
EXPIRED_KEY = Denial(401, "invalid_api_key", "the API key has expired", "expired_key", (_BEARER_INVALID,))
ORPHAN_KEY = Denial(401, "invalid_api_key", "the API key is not valid", "tenant_missing", (_BEARER_INVALID,))
TENANT_SUSPENDED = Denial(403, "tenant_suspended", "the tenant of this API key is suspended", "tenant_suspended")
NO_API_AT_PATH = Denial(404, "not_found", "no inference API at this path", "unknown_path")
METHOD_NOT_ALLOWED = Denial(
    405, "method_not_allowed", "inference calls must use POST", "method", (("allow", "POST"),)
)
INVALID_CONTENT_LENGTH = Denial(400, "bad_request", "the content-length header is not a valid number",
                                "content_length")
BODY_REQUIRED = Denial(400, "bad_request", "this call needs a JSON request body", "empty_body")
INVALID_JSON = Denial(400, "invalid_json", "the request body is not well-formed JSON", "invalid_json")
MISSING_MODEL = Denial(
    400, "missing_model", "the JSON body must name the model in a non-empty 'model' string field", "missing_model"
)
REPEATED_MODEL = Denial(
    400, "repeated_model", "the JSON body names 'model' more than once: send a single 'model' field",
    "repeated_model",
)
INVALID_PATH = Denial(
    400, "invalid_path",
    "the request path must not contain empty, '.' or '..' segments (also when percent-encoded)",
    "path_not_normalized",
)
INVALID_MODEL_NAME = Denial(400, "invalid_model", "the model name contains characters that are not allowed",
                            "invalid_model_name")
# Envoy ignores mode_override in FULL_DUPLEX_STREAMED, so a request whose body must be read first cannot be
# served with that filter setting: refused, with the reason in logs and metrics (not for the client).
FULL_DUPLEX_BODY = Denial(
    500, "gateway_misconfigured", "the gateway cannot read this request's body; contact the operator",
    "full_duplex_body_mode",
)
BACKEND_UNAVAILABLE = Denial(
    503, "unavailable", "the gateway cannot verify credentials right now; retry shortly",
    "redis_unavailable", (("retry-after", "1"),),
)


def repeated_credential(header: str) -> Denial:
    """Two keys in one request: picking either would be a guess about which tenant is calling."""
    return Denial(401, "invalid_authorization", f"the {header} header appears more than once: send one API key",
                  "repeated_credential", (_BEARER,))


def model_not_found(model: str) -> Denial:
    return Denial(404, "model_not_found", f"model {model[:128]!r} does not exist", "unknown_model")


def model_not_allowed(model: str) -> Denial:
    return Denial(403, "model_not_allowed", f"this API key may not use model {model[:128]!r}", "model_not_allowed")


def body_too_large(limit_bytes: int) -> Denial:
    return Denial(413, "request_too_large", f"the request body exceeds the limit of {limit_bytes} bytes",
                  "body_too_large")


def body_too_large_to_inspect(limit_bytes: int) -> Denial:
    return Denial(
        413, "request_too_large",
        f"the request body exceeds the {limit_bytes} bytes the gateway reads to find the model",
        "body_too_large_to_inspect",
    )


def unsupported_media_type(allowed: tuple[str, ...]) -> Denial:
    return Denial(415, "unsupported_media_type", f"content-type must be one of: {', '.join(allowed)}",
                  "content_type")


def unsupported_content_encoding(codings: str) -> Denial:
    """The gateway reads this body as JSON and decompresses nothing: parsing compressed bytes would only
    produce a misleading 'invalid JSON'."""
    return Denial(
        415, "unsupported_content_encoding",
        f"the gateway reads this request's JSON body and cannot decode content-encoding {codings[:64]!r}: "
        "send the JSON body uncompressed (no content-encoding, or 'identity')",
        "content_encoding",
    )
