"""Requests whose body matters: model named in the JSON body, inspected models, unknown sizes.

The processor asks for the body with a mode_override (BUFFERED if it fits in --max-buffer-bytes, 1024
here, else STREAMED) and answers the body phase.
"""

from __future__ import annotations

import json

from tests.ext_proc.conftest import MAX_BUFFER_BYTES, World
from tests.ext_proc.helpers import ExtProcClient, Mode, allowed_headers, denial, request_body, request_headers

CHAT = "/v1/chat/completions"


def chat_body(model: str = "llama", **extra: object) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def test_openai_call_asks_for_the_buffered_body(client: ExtProcClient, world: World) -> None:
    body = chat_body()
    (headers_answer, _) = client.exchange([request_headers(CHAT, key=world.acme_key, content_length=len(body)),
                                           request_body(body)])
    allowed = allowed_headers(headers_answer)
    assert allowed.mode_override.request_body_mode == Mode.BUFFERED
    assert allowed.mode_override.response_header_mode == Mode.SKIP
    assert "x-igw-model" not in allowed.set and allowed.set["x-igw-tenant"] == "acme"


def test_openai_model_from_body_is_resolved_and_routed(client: ExtProcClient, world: World) -> None:
    body = chat_body("llama")
    _, body_answer = client.exchange([request_headers(CHAT, key=world.acme_key, content_length=len(body)),
                                      request_body(body)])
    assert body_answer.HasField("request_body")
    common = body_answer.request_body.response
    assert {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers} == {
        "x-igw-model": b"llama-3-8b"}
    assert common.clear_route_cache


def test_body_that_is_not_json_is_400(client: ExtProcClient, world: World) -> None:
    answers = client.exchange([request_headers(CHAT, key=world.acme_key, content_length=9),
                               request_body(b'{"model":')])
    denied = denial(answers[1])
    assert (denied.status, denied.code) == (400, "invalid_json")


def test_body_without_model_is_400(client: ExtProcClient, world: World) -> None:
    answers = client.exchange([request_headers(CHAT, key=world.acme_key, content_length=13),
                               request_body(b'{"prompt":"x"}')])
    assert denial(answers[1]).code == "missing_model"


def test_unknown_model_in_body_is_404(client: ExtProcClient, world: World) -> None:
    body = chat_body("no-such-model")
    answers = client.exchange([request_headers(CHAT, key=world.acme_key, content_length=len(body)),
                               request_body(body)])
    assert denial(answers[1]).status == 404


def test_model_in_body_outside_the_tenants_globs_is_403(client: ExtProcClient, world: World) -> None:
    body = chat_body("mistral-7b")
    answers = client.exchange([request_headers(CHAT, key=world.acme_key, content_length=len(body)),
                               request_body(body)])
    assert denial(answers[1]).status == 403


def test_openai_call_without_a_body_is_400(client: ExtProcClient, world: World) -> None:
    message = request_headers(CHAT, key=world.acme_key, content_length=None, end_of_stream=True)
    assert denial(client.one(message)).code == "bad_request"


def test_openai_body_larger_than_the_inspect_buffer_is_413(client: ExtProcClient, world: World) -> None:
    denied = denial(client.one(request_headers(CHAT, key=world.acme_key, content_length=MAX_BUFFER_BYTES + 1)))
    assert (denied.status, denied.code) == (413, "request_too_large")


def test_streamed_body_over_the_tenant_maximum_is_413(client: ExtProcClient, world: World) -> None:
    """No content-length (chunked): the processor streams the body to count it, holding none of it."""
    headers_answer, *chunk_answers = client.exchange([
        request_headers(key=world.acme_key, content_length=None),
        request_body(b"[" + b"1," * 1000, end_of_stream=False),
        request_body(b"2," * 1000, end_of_stream=False),
        request_body(b"3," * 1000, end_of_stream=False),
    ])
    assert allowed_headers(headers_answer).mode_override.request_body_mode == Mode.STREAMED
    assert chunk_answers[0].HasField("request_body") and chunk_answers[1].HasField("request_body")
    denied = denial(chunk_answers[2])
    assert (denied.status, denied.code) == (413, "request_too_large")


def test_streamed_body_within_the_maximum_passes(client: ExtProcClient, world: World) -> None:
    answers = client.exchange([request_headers(key=world.acme_key, content_length=None),
                               request_body(b"[1,", end_of_stream=False), request_body(b"2]")])
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body", "request_body"]


def test_inspected_model_with_invalid_json_is_400(client: ExtProcClient, world: World) -> None:
    answers = client.exchange([request_headers("/v2/models/guarded/infer", key=world.acme_key, content_length=5),
                               request_body(b"{nope")])
    assert allowed_headers(answers[0]).mode_override.request_body_mode == Mode.BUFFERED
    assert allowed_headers(answers[0]).set["x-igw-model"] == "guarded"
    assert denial(answers[1]).code == "invalid_json"


def test_inspected_model_larger_than_the_buffer_is_streamed_and_checked(client: ExtProcClient, world: World) -> None:
    chunk = b'{"inputs": [' + b"1," * 700
    answers = client.exchange([
        request_headers("/v2/models/guarded/infer", key=world.acme_key, content_length=len(chunk) * 2),
        request_body(chunk, end_of_stream=False),
        request_body(b"2]", end_of_stream=True),  # never closes the object
    ])
    assert allowed_headers(answers[0]).mode_override.request_body_mode == Mode.STREAMED
    assert answers[1].HasField("request_body")
    assert denial(answers[2]).code == "invalid_json"


def test_inspected_model_with_valid_json_passes(client: ExtProcClient, world: World) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}'
    answers = client.exchange([request_headers("/v2/models/guarded/infer", key=world.acme_key,
                                               content_length=len(body)), request_body(body)])
    assert answers[1].HasField("request_body") and not answers[1].HasField("immediate_response")


def test_announced_body_mode_that_is_not_needed_is_switched_off(client: ExtProcClient, world: World) -> None:
    message = request_headers(key=world.acme_key, announced_body_mode=Mode.BUFFERED)
    assert allowed_headers(client.one(message)).mode_override.request_body_mode == Mode.NONE


def test_announced_buffered_mode_needs_no_override(client: ExtProcClient, world: World) -> None:
    body = chat_body()
    answers = client.exchange([
        request_headers(CHAT, key=world.acme_key, content_length=len(body), announced_body_mode=Mode.BUFFERED),
        request_body(body)])
    assert allowed_headers(answers[0]).mode_override is None
    assert answers[1].request_body.response.clear_route_cache
