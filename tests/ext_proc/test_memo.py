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
    issued = store.issue_key(store.connect(world.redis_url), "acme", expires_in=0.3)
    assert allowed_headers(client.one(request_headers(key=issued.key, extra=REQUEST_ID)))
    assert allowed_headers(client.one(request_headers(key=issued.key, extra=REQUEST_ID)))
    time.sleep(0.35)
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
