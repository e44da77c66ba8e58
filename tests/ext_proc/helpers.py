"""Building ext_proc messages the way Envoy sends them, and reading the answers, for the tests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

Mode = processing_mode_pb2.ProcessingMode


def request_headers(
    path: str = "/v2/models/llama-3-8b/infer",
    *,
    method: str = "POST",
    key: str | None = None,
    api_key: str | None = None,
    content_type: str | None = "application/json",
    content_length: int | None = 2,
    end_of_stream: bool = False,
    extra: Sequence[tuple[str, str]] = (),
    announced_body_mode: int | None = None,
) -> pb.ProcessingRequest:
    pairs = [(":method", method), (":path", path), (":authority", "gateway.local"), (":scheme", "http")]
    if key is not None:
        pairs.append(("authorization", f"Bearer {key}"))
    if api_key is not None:
        pairs.append(("x-api-key", api_key))
    if content_type is not None:
        pairs.append(("content-type", content_type))
    if content_length is not None:
        pairs.append(("content-length", str(content_length)))
    pairs.extend(extra)
    message = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]),
        end_of_stream=end_of_stream,
    ))
    if announced_body_mode is not None:
        message.protocol_config.request_body_mode = announced_body_mode  # type: ignore[assignment]
    return message


def request_body(body: bytes, *, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


@dataclass
class Denied:
    status: int
    code: str
    message: str
    headers: dict[str, str]
    details: str


def denial(response: pb.ProcessingResponse) -> Denied:
    assert response.HasField("immediate_response"), f"expected an ImmediateResponse, got {response}"
    immediate = response.immediate_response
    body = json.loads(immediate.body)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return Denied(immediate.status.code, body["error"]["code"], body["error"]["message"],
                  set_headers(immediate.headers), immediate.details)


def set_headers(mutation: pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: (h.header.raw_value.decode() if h.header.raw_value else h.header.value)
            for h in mutation.set_headers}


@dataclass
class Allowed:
    set: dict[str, str]
    remove: list[str]
    clear_route_cache: bool
    mode_override: Any


def allowed_headers(response: pb.ProcessingResponse) -> Allowed:
    assert response.HasField("request_headers"), f"expected a request_headers answer, got {response}"
    common = response.request_headers.response
    return Allowed(set_headers(common.header_mutation), list(common.header_mutation.remove_headers),
                   common.clear_route_cache, response.mode_override if response.HasField("mode_override") else None)


class ExtProcClient:
    """Drives Process streams as Envoy would: one stream per HTTP request."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)

    def exchange(self, messages: Iterable[pb.ProcessingRequest], timeout: float = 5) -> list[pb.ProcessingResponse]:
        return list(self.stub.Process(iter(list(messages)), timeout=timeout))

    def one(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        (response,) = self.exchange([message])
        return response

    def close(self) -> None:
        self.channel.close()
