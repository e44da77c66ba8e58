"""Compressed request bodies. The processor reads JSON bodies as sent and decompresses nothing, so a request
whose body it must read (model named in the body, or a model registered with inspect_body) and whose body is
content-encoded is refused with 415 at the headers phase, before any body is sent; a request whose body it
does not read goes on unchanged, encoding and all. Through the real Envoy 1.40 with the shipped filter
settings where the claim is what the client or the model server gets, in process where it is the
processor's answer."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import pytest

from ext_proc.processor import ProcessorShared, RequestProcessor
from ext_proc.shaping import applied_codings
from tests.ext_proc import test_envoy
from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import allowed_headers, denial, request_body, request_headers
from tests.ext_proc.test_hostile_input import http1
from tests.ext_proc.test_interleavings import CONFIG, KEY, REQUEST_ID, Lookups

gateway = test_envoy.gateway  # this module's own Envoy 1.40 in front of the processor, with the shipped settings

OPENAI_BODY = json.dumps({"model": "llama", "prompt": "hi"}).encode()


def post(gateway_url: str, path: str, key: str, body: bytes, encoding: str,
         content_type: str = "application/json") -> httpx.Response:
    return httpx.post(f"{gateway_url}{path}", content=body, timeout=5, headers={
        "authorization": f"Bearer {key}", "content-type": content_type, "content-encoding": encoding})


def first_answer(*encodings: str) -> object:
    """The processor's answer to the request headers alone (nothing else is sent before it); one
    content-encoding header per value given."""
    async def run() -> object:
        processor = RequestProcessor(CONFIG, Lookups(), ProcessorShared(CONFIG, memo_ttl=30))
        message = request_headers("/v1/chat/completions", key=KEY, content_length=40,
                                  extra=[*REQUEST_ID, *(("content-encoding", e) for e in encodings)])
        return (await processor.handle(message))[1]

    return asyncio.run(run())


# --- through Envoy -----------------------------------------------------------------------------------

def test_a_gzip_body_naming_its_model_is_a_json_415_naming_gzip(gateway: str, world: World) -> None:
    response = post(gateway, "/v1/completions", world.acme_key, gzip.compress(OPENAI_BODY), "gzip")
    assert response.status_code == 415, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "unsupported_content_encoding"
    assert "'gzip'" in error["message"] and "uncompressed" in error["message"]


def test_a_gzip_body_to_a_model_that_inspects_bodies_is_a_json_415(gateway: str, world: World) -> None:
    response = post(gateway, "/v2/models/guarded/infer", world.acme_key, gzip.compress(b'{"inputs": []}'), "gzip")
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_content_encoding"


def test_a_gzip_body_to_a_model_named_in_the_path_reaches_the_model_with_its_encoding(gateway: str,
                                                                                      world: World) -> None:
    body = gzip.compress(b'{"inputs": []}')
    response = post(gateway, "/v2/models/llama/infer", world.acme_key, body, "gzip")
    assert response.status_code == 200, response.text
    seen = response.json()["headers"]
    assert (seen["content-encoding"], seen["content-length"], seen["x-igw-model"]) == ("gzip", str(len(body)),
                                                                                       "llama-3-8b")


def test_a_gzip_octet_stream_body_to_a_model_that_inspects_bodies_is_only_counted_and_passes(
        gateway: str, world: World) -> None:
    response = post(gateway, "/v2/models/guarded/infer", world.acme_key, gzip.compress(b"\x00" * 64), "gzip",
                    content_type="application/octet-stream")
    assert response.status_code == 200, response.text
    assert response.json()["headers"]["content-encoding"] == "gzip"


def test_an_identity_encoded_body_naming_its_model_is_routed_on_it(gateway: str, world: World) -> None:
    response = post(gateway, "/v1/completions", world.acme_key, OPENAI_BODY, "identity")
    assert response.status_code == 200, response.text
    assert response.json()["headers"]["x-igw-model"] == "llama-3-8b"


def test_content_encoding_sent_twice_through_envoy_is_read_whole(gateway: str, world: World) -> None:
    body = gzip.compress(OPENAI_BODY)
    status, answer = http1(gateway, b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\n"
                           + b"authorization: Bearer " + world.acme_key.encode() + b"\r\n"
                           + b"content-type: application/json\r\ncontent-encoding: gzip\r\n"
                           + b"content-encoding: identity\r\ncontent-length: " + str(len(body)).encode()
                           + b"\r\n\r\n" + body)
    assert (status, json.loads(answer)["error"]["code"]) == (415, "unsupported_content_encoding")


# --- the processor's answer --------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "zstd", "GZip", "gzip, identity", "identity,br"])
def test_a_compressed_body_that_must_be_read_is_refused_at_the_headers_phase(encoding: str) -> None:
    refused = denial(first_answer(encoding))  # type: ignore[arg-type]
    assert (refused.status, refused.code) == (415, "unsupported_content_encoding")
    assert applied_codings(encoding) in refused.message


@pytest.mark.parametrize("encoding", ["identity", "IDENTITY", "identity, Identity", ""])
def test_an_identity_or_empty_encoding_asks_for_the_body_as_usual(encoding: str) -> None:
    allowed = allowed_headers(first_answer(encoding))  # type: ignore[arg-type]
    assert allowed.mode_override is not None


def test_content_encoding_sent_twice_is_read_whole_not_by_its_last_value() -> None:
    # Envoy joins repeats of this header itself; other senders may pass them as separate entries.
    refused = denial(first_answer("gzip", "identity"))  # type: ignore[arg-type]
    assert (refused.status, refused.code) == (415, "unsupported_content_encoding")


def test_a_compressed_body_is_refused_even_when_an_uncompressed_request_of_the_same_shape_was_memoised() -> None:
    async def run() -> tuple[object, object]:
        lookups, shared = Lookups(), ProcessorShared(CONFIG, memo_ttl=30)
        plain = request_headers("/v1/chat/completions", key=KEY, content_length=40, extra=REQUEST_ID)
        first = RequestProcessor(CONFIG, lookups, shared)
        await first.handle(plain)
        await first.handle(request_body(b'{"model": "llama-3-8b"}'))
        compressed = request_headers("/v1/chat/completions", key=KEY, content_length=40,
                                     extra=[*REQUEST_ID, ("content-encoding", "gzip")])
        again = RequestProcessor(CONFIG, lookups, shared)
        return (await RequestProcessor(CONFIG, lookups, shared).handle(plain))[1], (await again.handle(compressed))[1]

    plain_answer, compressed_answer = asyncio.run(run())
    assert allowed_headers(plain_answer).mode_override is not None  # type: ignore[arg-type]
    assert denial(compressed_answer).status == 415  # type: ignore[arg-type]
