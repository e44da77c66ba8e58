"""Repeated request shapes reuse an earlier headers answer; what differs per request is still checked."""

from __future__ import annotations

import time

from ext_proc import store
from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import ExtProcClient, allowed_headers, denial, request_headers

REQUEST_ID = [("x-request-id", "memo-test-1")]


def test_repeated_shape_still_enforces_the_body_limit(client: ExtProcClient, world: World) -> None:
    assert allowed_headers(client.one(request_headers(key=world.acme_key, content_length=2000, extra=REQUEST_ID)))
    denied = denial(client.one(request_headers(key=world.acme_key, content_length=5000, extra=REQUEST_ID)))
    assert denied.status == 413


def test_repeated_shape_still_notices_key_expiry(client: ExtProcClient, world: World) -> None:
    # Long enough for two calls on a loaded machine; then wait out the expiry itself, not a fixed pause.
    issued = store.issue_key(store.connect(world.redis_url), "acme", expires_in=1.5)
    assert allowed_headers(client.one(request_headers(key=issued.key, extra=REQUEST_ID)))
    assert allowed_headers(client.one(request_headers(key=issued.key, extra=REQUEST_ID)))
    time.sleep(max(0.0, issued.expires_at - time.time()) + 0.05)
    assert denial(client.one(request_headers(key=issued.key, extra=REQUEST_ID))).message == "the API key has expired"


def test_repeated_shape_follows_a_revocation(client: ExtProcClient, world: World) -> None:
    c = store.connect(world.redis_url)
    issued = store.issue_key(c, "acme")
    for _ in range(3):
        assert allowed_headers(client.one(request_headers(key=issued.key, extra=REQUEST_ID)))
    store.revoke_key(c, key_id=issued.key_id)
    deadline = time.monotonic() + 1.0
    while not client.one(request_headers(key=issued.key, extra=REQUEST_ID)).HasField("immediate_response"):
        assert time.monotonic() < deadline, "memoised answer outlived the revocation"
        time.sleep(0.01)


def test_repeated_shape_with_a_new_forged_header_strips_it(client: ExtProcClient, world: World) -> None:
    assert allowed_headers(client.one(request_headers(key=world.acme_key, extra=REQUEST_ID)))
    forged = [*REQUEST_ID, ("x-igw-tenant", "initech")]
    allowed = allowed_headers(client.one(request_headers(key=world.acme_key, extra=forged)))
    assert "x-igw-tenant" in allowed.remove and allowed.set["x-igw-tenant"] == "acme"


def test_repeated_body_model_follows_an_alias_change(client: ExtProcClient, world: World) -> None:
    import json

    from tests.ext_proc.helpers import request_body

    c = store.connect(world.redis_url)
    store.set_alias(c, "memo-alias", "llama-3-8b")
    body = json.dumps({"model": "memo-alias", "messages": []}).encode()

    def routed_model() -> bytes:
        _, answer = client.exchange([request_headers("/v1/chat/completions", key=world.acme_key,
                                                     content_length=len(body), extra=REQUEST_ID),
                                     request_body(body)])
        assert answer.HasField("request_body"), answer
        return {h.header.key: h.header.raw_value
                for h in answer.request_body.response.header_mutation.set_headers}["x-igw-model"]

    assert routed_model() == routed_model() == b"llama-3-8b"
    store.set_alias(c, "memo-alias", "llama-3-70b")
    deadline = time.monotonic() + 1.0
    while routed_model() != b"llama-3-70b":
        assert time.monotonic() < deadline, "memoised body answer outlived the alias change"
        time.sleep(0.01)


def test_repeated_body_model_follows_a_tenant_losing_the_model(client: ExtProcClient, world: World) -> None:
    import json

    from tests.ext_proc.helpers import request_body

    c = store.connect(world.redis_url)
    store.create_tenant(c, "memo-tenant", department="d", tier="standard", models="llama-*")
    key = store.issue_key(c, "memo-tenant").key
    body = json.dumps({"model": "llama-3-70b", "messages": []}).encode()

    def body_answer() -> object:
        return client.exchange([request_headers("/v1/chat/completions", key=key, content_length=len(body),
                                                extra=REQUEST_ID), request_body(body)])[-1]

    assert body_answer().HasField("request_body")  # type: ignore[attr-defined]
    assert body_answer().HasField("request_body")  # type: ignore[attr-defined]
    store.update_tenant(c, "memo-tenant", models="mistral-*")
    deadline = time.monotonic() + 1.0
    while not body_answer().HasField("immediate_response"):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "memoised body answer outlived the tenant change"
        time.sleep(0.01)
    assert denial(body_answer()).status == 403  # type: ignore[arg-type]
