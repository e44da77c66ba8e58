"""One test per decision of the request-headers phase, driven over the real gRPC stream."""

from __future__ import annotations

import time

import redis

from ext_proc import store
from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import ExtProcClient, allowed_headers, denial, request_headers


def test_missing_key_is_401_with_www_authenticate(client: ExtProcClient) -> None:
    denied = denial(client.one(request_headers()))
    assert (denied.status, denied.code) == (401, "missing_api_key")
    assert denied.headers["www-authenticate"].startswith("Bearer")
    assert denied.headers["content-type"] == "application/json"


def test_authorization_that_is_not_bearer_is_401(client: ExtProcClient) -> None:
    message = request_headers(extra=[("authorization", "Basic dXNlcjpwYXNz")])
    denied = denial(client.one(message))
    assert (denied.status, denied.code) == (401, "invalid_authorization")


def test_unknown_key_is_401(client: ExtProcClient) -> None:
    denied = denial(client.one(request_headers(key="igw_000000000000_not-a-real-key")))
    assert (denied.status, denied.code) == (401, "invalid_api_key")
    assert "invalid_token" in denied.headers["www-authenticate"]


def test_bearer_key_is_accepted(client: ExtProcClient, world: World) -> None:
    allowed = allowed_headers(client.one(request_headers(key=world.acme_key)))
    assert allowed.set["x-igw-tenant"] == "acme"


def test_x_api_key_is_accepted(client: ExtProcClient, world: World) -> None:
    allowed = allowed_headers(client.one(request_headers(api_key=world.acme_key)))
    assert allowed.set["x-igw-tenant"] == "acme"


def test_revoked_key_is_401(client: ExtProcClient, world: World) -> None:
    c = store.connect(world.redis_url)
    issued = store.issue_key(c, "acme")
    store.revoke_key(c, key_id=issued.key_id)
    denied = denial(client.one(request_headers(key=issued.key)))
    assert (denied.status, denied.message) == (401, "the API key has been revoked")


def test_expired_key_is_401(client: ExtProcClient, world: World) -> None:
    issued = store.issue_key(store.connect(world.redis_url), "acme", expires_in=0.05)
    time.sleep(0.1)
    denied = denial(client.one(request_headers(key=issued.key)))
    assert (denied.status, denied.message) == (401, "the API key has expired")


def test_key_issued_with_another_secret_is_401(client: ExtProcClient, world: World) -> None:
    issued = store.issue_key(store.connect(world.redis_url), "acme", secret="some-other-secret")
    assert denial(client.one(request_headers(key=issued.key))).status == 401


def test_suspended_tenant_is_403(client: ExtProcClient, world: World) -> None:
    c = store.connect(world.redis_url)
    store.create_tenant(c, "hooli", department="ops", tier="free", models="*")
    key = store.issue_key(c, "hooli").key
    store.suspend_tenant(c, "hooli")
    denied = denial(client.one(request_headers(key=key)))
    assert (denied.status, denied.code) == (403, "tenant_suspended")


def test_model_outside_the_tenants_globs_is_403(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers("/v2/models/mistral-7b/infer", key=world.acme_key)))
    assert (denied.status, denied.code) == (403, "model_not_allowed")


def test_unknown_model_is_404(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers("/v2/models/gpt-17/infer", key=world.acme_key)))
    assert (denied.status, denied.code) == (404, "model_not_found")


def test_path_that_is_no_inference_api_is_404(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers("/admin/config", method="GET", key=world.acme_key)))
    assert (denied.status, denied.code) == (404, "not_found")


def test_model_name_with_forbidden_characters_is_400(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers("/v2/models/llama%0d%0ax-igw-tenant:evil/infer", key=world.acme_key)))
    assert (denied.status, denied.code) == (400, "invalid_model")


def test_inference_with_get_is_405(client: ExtProcClient, world: World) -> None:
    message = request_headers("/v1/models/llama-3-8b:predict", method="GET", key=world.acme_key,
                              end_of_stream=True, content_length=None, content_type=None)
    denied = denial(client.one(message))
    assert (denied.status, denied.headers["allow"]) == (405, "POST")


def test_content_length_over_the_tenant_maximum_is_413(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers(key=world.acme_key, content_length=4097)))
    assert (denied.status, denied.code) == (413, "request_too_large")
    assert "4096" in denied.message


def test_inference_with_a_non_json_content_type_is_415(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers("/v1/models/llama-3-8b:predict", key=world.acme_key,
                                               content_type="text/plain")))
    assert (denied.status, denied.code) == (415, "unsupported_media_type")


def test_kserve_v2_accepts_binary_tensor_content(client: ExtProcClient, world: World) -> None:
    message = request_headers(key=world.acme_key, content_type="application/octet-stream")
    assert allowed_headers(client.one(message)).set["x-igw-model"] == "llama-3-8b"


def test_invalid_content_length_is_400(client: ExtProcClient, world: World) -> None:
    message = request_headers(key=world.acme_key, content_length=None, extra=[("content-length", "12abc")])
    assert denial(client.one(message)).status == 400


def test_error_bodies_carry_no_internal_detail(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers(key="igw_000000000000_x")))
    assert "redis" not in denied.message.lower() and "igw:" not in denied.message
    assert denied.details == "igw_unknown_key"


def test_key_is_stored_only_as_a_digest(client: ExtProcClient, world: World) -> None:
    r = redis.Redis.from_url(world.redis_url)
    secret_part = world.acme_key.rsplit("_", 1)[1].encode()
    for name in r.scan_iter("igw:*"):
        kind = r.type(name)
        values: list[bytes] = [name]
        if kind == b"hash":
            values += [v for pair in r.hgetall(name).items() for v in pair]
        elif kind == b"string":
            values.append(r.get(name))
        elif kind == b"set":
            values += list(r.smembers(name))
        assert not any(secret_part in v for v in values), name
