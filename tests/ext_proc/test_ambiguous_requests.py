"""Requests the gateway and the model server could read differently: a path the model server would
normalise into another model's, a JSON body naming "model" twice, two Authorization headers that Envoy
joins into one. The gateway refuses each with a JSON 400 / 401 rather than authorising one reading while
the model server acts on another. Through the real Envoy 1.40 where the claim is what a client gets, in
process (the `Lookups` of test_interleavings) for the variants."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.ext_proc import test_envoy
from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import allowed_headers, denial, request_body, request_headers
from tests.ext_proc.test_hostile_input import answers, http1
from tests.ext_proc.test_interleavings import KEY, REQUEST_ID

gateway = test_envoy.gateway  # this module's own Envoy 1.40 in front of the processor, with the shipped settings


def raw_post(gateway_url: str, path: bytes, key: str, body: bytes, extra: bytes = b"") -> tuple[int, dict]:
    """A raw HTTP/1.1 POST: httpx normalises dot segments away before sending, Envoy (by default) does not."""
    status, payload = http1(gateway_url, b"POST " + path + b" HTTP/1.1\r\nhost: gw\r\nx-api-key: " + key.encode()
                            + b"\r\n" + extra + b"content-type: application/json\r\ncontent-length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
    return status, json.loads(payload)


# --- paths a model server would normalise --------------------------------------------------------------

def test_a_path_with_dot_segments_is_refused_instead_of_being_routed_on_the_body(gateway: str, world: World) -> None:
    # acme may call llama-* but not mistral-7b; a model server that resolves the dot segments would run mistral.
    status, payload = raw_post(gateway, b"/v1/models/llama:predict/../../models/mistral-7b:predict", world.acme_key,
                               json.dumps({"model": "llama"}).encode())
    assert (status, payload["error"]["code"]) == (400, "invalid_path"), payload


@pytest.mark.parametrize("path", [
    "/v1/chat/completions/../../v1/models/mistral:predict",
    "/v1/models/./llama-3-8b:predict",
    "/v1//models/mistral:predict",
    "/v1/chat/%2e%2E/completions",
    "/v1/chat%2F..%2F..%2Fv1%2Fmodels%2Fmistral:predict",
    "/v2/models/llama-3-8b/infer/..",
], ids=["dot-dot", "dot", "empty segment", "percent-encoded dots", "percent-encoded slashes", "trailing dot-dot"])
def test_a_path_a_server_would_normalise_differently_is_a_400_naming_the_path(path: str) -> None:
    body = json.dumps({"model": "llama-3-8b"}).encode()
    (answer,) = answers(request_headers(path, key=KEY, content_length=len(body), extra=REQUEST_ID))
    refused = denial(answer)  # type: ignore[arg-type]
    assert (refused.status, refused.code) == (400, "invalid_path")
    assert "path" in refused.message


@pytest.mark.parametrize("path", ["/v2/models/llama-3-8b/infer?next=/../x", "/v2/models/llama-3-8b%2Dx/infer",
                                  "/v2/models/llama-3-8b/infer/"],
                         ids=["dots in the query", "percent-encoded name", "trailing slash"])
def test_paths_without_dot_or_empty_segments_are_not_refused_as_invalid(path: str) -> None:
    (answer,) = answers(request_headers(path, key=KEY, extra=REQUEST_ID))
    if answer.HasField("immediate_response"):  # type: ignore[attr-defined]
        assert denial(answer).code != "invalid_path"  # type: ignore[arg-type]


def test_a_model_name_with_a_percent_encoded_slash_is_still_looked_up(gateway: str, world: World) -> None:
    status, payload = raw_post(gateway, b"/v1/models/meta%2Fllama:predict", world.acme_key, b"{}")
    assert (status, payload["error"]["code"]) == (404, "model_not_found"), payload
    assert "meta/llama" in payload["error"]["message"]


# --- a JSON body naming its model twice ---------------------------------------------------------------

def test_a_body_naming_the_model_twice_is_refused_not_routed_on_either(gateway: str, world: World) -> None:
    response = httpx.post(f"{gateway}/v1/completions", content=b'{"model": "mistral-7b", "model": "llama"}',
                          timeout=5, headers={"x-api-key": world.acme_key, "content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "repeated_model"


@pytest.mark.parametrize("body", [
    b'{"model": "mistral", "mod\\u0065l": "llama-3-8b"}',
    b'{"\\u006D\\u006f\\u0064\\u0065\\u006c": "mistral", "prompt": "\\u00e9", "model": "llama-3-8b"}',
], ids=["escaped second key", "escaped first key"])
def test_a_model_key_spelled_with_escapes_counts_as_naming_it_again(body: bytes) -> None:
    _, answer = answers(request_headers("/v1/chat/completions", key=KEY, content_length=len(body), extra=REQUEST_ID),
                        request_body(body))
    assert denial(answer).code == "repeated_model"  # type: ignore[arg-type]


@pytest.mark.parametrize("body", [
    b'{"model": "llama-3-8b", "tools": [{"model": "mistral"}], "messages": [{"content": "model"}]}',
    b'{"model": "llama-3-8b", "prompt": "caf\\u00e9 \\"model\\": x"}',
], ids=["nested model keys", "escapes and the word in a string"])
def test_a_body_naming_the_model_once_at_the_top_passes(body: bytes) -> None:
    _, answer = answers(request_headers("/v1/chat/completions", key=KEY, content_length=len(body), extra=REQUEST_ID),
                        request_body(body))
    assert not answer.HasField("immediate_response"), answer  # type: ignore[attr-defined]


# --- two Authorization headers, which Envoy joins into one -------------------------------------------

def test_two_authorization_headers_through_envoy_are_refused_as_sent_twice(gateway: str, world: World) -> None:
    status, payload = http1(gateway, b"POST /v2/models/llama/infer HTTP/1.1\r\nhost: gw\r\n"
                            b"authorization: Bearer " + world.acme_key.encode() + b"\r\n"
                            b"authorization: Bearer igw_000000000000_not-a-key\r\n"
                            b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    error = json.loads(payload)["error"]
    assert (status, error["code"]) == (401, "invalid_authorization")
    assert "more than once" in error["message"]


def test_an_authorization_header_with_one_bearer_key_still_passes() -> None:
    (answer,) = answers(request_headers(key=KEY, extra=REQUEST_ID))
    assert allowed_headers(answer).set["x-igw-tenant"] == "acme"  # type: ignore[arg-type]


# --- other headers Envoy joins -----------------------------------------------------------------------

def test_two_content_type_headers_through_envoy_are_a_json_415_not_read_by_the_last(gateway: str,
                                                                                     world: World) -> None:
    status, payload = http1(gateway, b"POST /v2/models/llama/infer HTTP/1.1\r\nhost: gw\r\nx-api-key: "
                            + world.acme_key.encode() + b"\r\ncontent-type: text/plain\r\n"
                            b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    assert (status, json.loads(payload)["error"]["code"]) == (415, "unsupported_media_type")


# --- a byte order mark -------------------------------------------------------------------------------

def test_a_body_naming_its_model_after_a_byte_order_mark_is_routed_on_it(gateway: str, world: World) -> None:
    body = b"\xef\xbb\xbf" + json.dumps({"model": "llama"}).encode()  # as .NET and PowerShell clients may send
    response = httpx.post(f"{gateway}/v1/completions", content=body, timeout=5, headers={
        "x-api-key": world.acme_key, "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["headers"]["x-igw-model"] == "llama-3-8b"
