"""Input a careless or hostile client sends: repeated credentials, names with a trailing newline, empty
chunked bodies, JSON nested without end. In process (the `Lookups` of test_interleavings) where the
claim is the processor's answer, through the real Envoy 1.40 where it is what the client gets."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from ext_proc.jsonscan import MAX_DEPTH, JsonStructureError, JsonStructureScanner
from ext_proc.processor import ProcessorShared, RequestProcessor
from ext_proc.records import RecordError, check_label, check_model_name, check_tenant_id
from tests.ext_proc import test_envoy
from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import Mode, denial, request_body, request_headers
from tests.ext_proc.test_interleavings import CONFIG, KEY, REQUEST_ID, Lookups

gateway = test_envoy.gateway  # this module's own Envoy 1.40 in front of the processor, with the shipped settings


def answers(*messages: object) -> list[object]:
    async def run() -> list[object]:
        processor = RequestProcessor(CONFIG, Lookups(), ProcessorShared(CONFIG, memo_ttl=30))
        return [(await processor.handle(message))[1] for message in messages]  # type: ignore[arg-type]

    return asyncio.run(run())


def http1(gateway_url: str, request: bytes) -> tuple[int, bytes]:
    """One raw HTTP/1.1 exchange, for what httpx will not send (the same header twice)."""
    host, port = gateway_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), body


# --- names that end in a newline ---------------------------------------------------------------------

def test_a_model_version_ending_in_a_newline_is_a_json_400_not_a_gateway_error(gateway: str, world: World) -> None:
    response = httpx.post(f"{gateway}/v2/models/llama/versions/1%0A/infer", content=b"{}", timeout=5, headers={
        "authorization": f"Bearer {world.acme_key}", "content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_model"


def test_a_model_named_in_the_body_with_a_trailing_newline_is_400() -> None:
    body = json.dumps({"model": "llama-3-8b\n"}).encode()
    _, answer = answers(request_headers("/v1/chat/completions", key=KEY, content_length=len(body), extra=REQUEST_ID),
                        request_body(body))
    refused = denial(answer)  # type: ignore[arg-type]
    assert (refused.status, refused.code) == (400, "invalid_model")


@pytest.mark.parametrize("check", [check_model_name, check_tenant_id, lambda v: check_label("tier", v)],
                         ids=["model", "tenant", "label"])
def test_operators_cannot_store_a_name_ending_in_a_newline(check: object) -> None:
    with pytest.raises(RecordError):
        check("llama\n")  # type: ignore[operator]


# --- credentials -------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["valid first", "valid last"])
def test_an_x_api_key_header_sent_twice_is_refused_whichever_comes_last(gateway: str, world: World,
                                                                         order: str) -> None:
    keys = [world.acme_key.encode(), b"igw_000000000000_not-a-key"]
    if order == "valid last":
        keys.reverse()
    status, body = http1(gateway, b"POST /v2/models/llama/infer HTTP/1.1\r\nhost: gw\r\n"
                         + b"".join(b"x-api-key: " + key + b"\r\n" for key in keys)
                         + b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (401, "invalid_authorization")
    assert "x-api-key" in error["message"]


def test_a_malformed_x_api_key_is_refused_naming_x_api_key_not_authorization() -> None:
    (answer,) = answers(request_headers(api_key="Bearer " + KEY, extra=REQUEST_ID))
    refused = denial(answer)  # type: ignore[arg-type]
    assert refused.status == 401
    assert "x-api-key" in refused.message and "Authorization" not in refused.message


# --- bodies ------------------------------------------------------------------------------------------

def test_an_empty_chunked_body_where_the_model_is_named_in_it_is_refused_as_missing() -> None:
    _, answer = answers(request_headers("/v1/chat/completions", key=KEY, content_length=None, extra=REQUEST_ID),
                        request_body(b"", end_of_stream=True))
    refused = denial(answer)  # type: ignore[arg-type]
    assert (refused.status, refused.message) == (400, "this call needs a JSON request body")


def test_the_streamed_json_scanner_refuses_nesting_deeper_than_the_buffered_parser() -> None:
    scanner = JsonStructureScanner()
    scanner.feed(b"[" * MAX_DEPTH)  # as deep as BUFFERED mode's parser (orjson) accepts
    with pytest.raises(JsonStructureError, match="nested"):
        scanner.feed(b"[")


def test_a_streamed_body_of_brackets_keeps_no_state_proportional_to_its_size() -> None:
    scanner = JsonStructureScanner()
    with pytest.raises(JsonStructureError):
        for _ in range(64):
            scanner.feed(b"{" * 65536)
    assert len(scanner._stack) <= MAX_DEPTH


def test_a_chunked_body_naming_its_model_and_larger_than_envoys_buffer_is_a_json_413(gateway: str,
                                                                                       world: World) -> None:
    body = json.dumps({"model": "llama", "prompt": "x" * 1_600_000}).encode()  # Envoy buffers 1 MiB
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no content-length: chunked
    response = httpx.post(f"{gateway}/v1/completions", content=chunks, timeout=10, headers={
        "authorization": f"Bearer {world.acme_key}", "content-type": "application/json"})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_chunked_body_naming_its_model_within_the_limits_is_routed_on_it(gateway: str, world: World) -> None:
    body = json.dumps({"model": "llama", "prompt": "hi"}).encode()
    response = httpx.post(f"{gateway}/v1/completions", content=iter([body[:10], body[10:]]), timeout=5, headers={
        "authorization": f"Bearer {world.acme_key}", "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["headers"]["x-igw-model"] == "llama-3-8b"


def test_a_chunked_body_naming_its_model_and_followed_by_trailers_is_routed_on_it(gateway: str,
                                                                                   world: World) -> None:
    body = json.dumps({"model": "llama", "prompt": "hi"}).encode()
    headers = [("authorization", f"Bearer {world.acme_key}"), ("content-type", "application/json")]
    assert test_envoy.h2_post(gateway, "/v1/completions", headers, body, [("x-checksum", "abc")]) == 200


def test_a_chunked_body_cut_at_envoys_buffer_limit_is_413_not_invalid_json() -> None:
    # BUFFERED_PARTIAL: Envoy's buffer (here as large as the processor's) filled up before the body ended.
    cut_at_the_buffer_limit = b'{"model": "llama-3-8b", "prompt": "'.ljust(CONFIG.max_buffer_bytes, b"x")
    headers_answer, answer = answers(
        request_headers("/v1/chat/completions", key=KEY, content_length=None, extra=REQUEST_ID),
        request_body(cut_at_the_buffer_limit, end_of_stream=False))
    assert headers_answer.mode_override.request_body_mode == Mode.BUFFERED_PARTIAL  # type: ignore[attr-defined]
    refused = denial(answer)  # type: ignore[arg-type]
    assert (refused.status, refused.code) == (413, "request_too_large")



def test_a_short_invalid_chunked_body_followed_by_trailers_is_still_invalid_json() -> None:
    _, answer = answers(request_headers("/v1/chat/completions", key=KEY, content_length=None, extra=REQUEST_ID),
                        request_body(b'{"model": "llama-3-8b",', end_of_stream=False))  # trailers come next
    refused = denial(answer)  # type: ignore[arg-type]
    assert (refused.status, refused.code) == (400, "invalid_json")
