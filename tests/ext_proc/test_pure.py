"""The pure pieces on their own: path resolution, globs, credentials, the streamed-JSON scanner."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from ext_proc.apikeys import KeyHasher, MalformedAuthorization, credential_from, generate_key, key_digest, key_id_of
from ext_proc.jsonscan import JsonStructureError, JsonStructureScanner
from ext_proc.records import RecordError, Tenant, parse_model_globs
from ext_proc.routes import content_type_allowed, resolve_path


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/v1/models/m:predict", ("kserve-v1", "m", None, True, False)),
    ("POST", "/v1/models/m:explain", ("kserve-v1", "m", None, True, False)),
    ("GET", "/v1/models/m", ("kserve-v1", "m", None, False, False)),
    ("POST", "/v2/models/m/infer", ("kserve-v2", "m", None, True, False)),
    ("POST", "/v2/models/m/versions/7/infer", ("kserve-v2", "m", "7", True, False)),
    ("GET", "/v2/models/m/versions/7/ready", ("kserve-v2", "m", "7", False, False)),
    ("GET", "/v2/health/ready", ("kserve-v2", None, None, False, False)),
    ("POST", "/v1/chat/completions", ("openai", None, None, True, True)),
    ("GET", "/v1/models", ("openai", None, None, False, False)),
    ("POST", "/v2/models/m/infer?timeout=5&x=%2F", ("kserve-v2", "m", None, True, False)),
    ("POST", "/v1/models/m%2Dx:predict?a=b", ("kserve-v1", "m-x", None, True, False)),
    ("POST", "/v2/models/m/unknown-verb", None),
    ("GET", "/healthz", None),
], ids=lambda v: str(v))
def test_paths_resolve_to_api_model_and_version(method: str, path: str, expected: tuple | None) -> None:
    route = resolve_path(method, path)
    got = None if route is None else (route.api, route.model, route.version, route.inference, route.model_in_body)
    assert got == expected


@pytest.mark.parametrize(("globs", "model", "allowed"), [
    ("llama-*", "llama-3-8b", True),
    ("llama-*", "mistral-7b", False),
    ("llama-*,mistral-7b", "mistral-7b", True),
    ("llama-?", "llama-3", True),
    ("Llama-*", "llama-3", False),
    ("*", "anything/at-all", True),
], ids=["glob matches", "glob misses", "list of names", "single-char glob", "case-sensitive", "star"])
def test_tenant_model_globs(globs: str, model: str, allowed: bool) -> None:
    tenant = Tenant("t", "d", "free", parse_model_globs(globs), 1, 1, 0)
    assert tenant.allows_model(model) is allowed


def test_empty_model_globs_are_rejected() -> None:
    with pytest.raises(RecordError, match="at least one"):
        parse_model_globs(" , ")


@pytest.mark.parametrize(("authorization", "x_api_key", "expected"), [
    ("Bearer k1", None, "k1"), ("bearer   k1 ", None, "k1"), (None, "k2", "k2"), ("Bearer k1", "k2", "k1"),
    (None, None, None), ("", "  ", None),
], ids=["bearer", "scheme any case", "x-api-key", "authorization wins", "none", "blank"])
def test_credentials_are_read_from_either_header(authorization: str | None, x_api_key: str | None,
                                                 expected: str | None) -> None:
    assert credential_from(authorization, x_api_key) == expected


@pytest.mark.parametrize("authorization", ["Basic abc", "Bearer", "Bearer a b", "Bearer " + "x" * 300])
def test_malformed_authorization_is_refused(authorization: str) -> None:
    with pytest.raises(MalformedAuthorization):
        credential_from(authorization, None)


def test_generated_keys_embed_their_public_id() -> None:
    key, key_id = generate_key()
    assert key_id_of(key) == key_id and len(key) > 50


def test_content_types() -> None:
    assert content_type_allowed("application/json; charset=utf-8", ("application/json",))
    assert content_type_allowed("application/vnd.kserve+json", ("application/json",))
    assert not content_type_allowed("text/plain", ("application/json",))
    assert not content_type_allowed(None, ("application/json",))


def scan(*chunks: bytes) -> bool:
    scanner = JsonStructureScanner()
    try:
        for chunk in chunks:
            scanner.feed(chunk)
        scanner.finish()
    except JsonStructureError:
        return False
    return True


@pytest.mark.parametrize(("chunks", "ok"), [
    ((b'{"a": [1, 2', b', 3], "s": "x\\', b'"}"}  '), True),
    ((b"  ", b"[", b"]"), True),
    ((b'{"a": 1',), False),
    ((b"{}x",), False),
    ((b"1",), False),
    ((b"[1]}",), False),
    ((b'{"a": "]"}',), True),
    ((b"\xef\xbb\xbf{}",), True),
    ((b"\xef", b"\xbb", b"\xbf[1]"), True),
    ((b" \xef\xbb\xbf{}",), False),
    ((b"\xef\xbb",), False),
], ids=["split across chunks with an escaped quote", "leading whitespace", "unterminated", "trailing garbage",
        "scalar document", "unbalanced", "brackets inside strings", "byte order mark", "byte order mark split up",
        "byte order mark after whitespace", "only part of a byte order mark"])
def test_streamed_json_structure_scanner(chunks: tuple[bytes, ...], ok: bool) -> None:
    assert scan(*chunks) is ok


@pytest.mark.parametrize("secret_length", [0, 1, 32, 63, 64, 65, 200])
def test_key_digests_are_hmac_sha256_of_the_key(secret_length: int) -> None:
    secret = bytes(range(256))[:secret_length]
    for key in ("igw_0123456789ab_" + "x" * 43, "", "clé-\udcff"):
        expected = hmac.new(secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        assert KeyHasher(secret).digest(key) == expected
        assert key_digest(secret, key) == expected
