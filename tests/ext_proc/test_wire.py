"""Wire compatibility: messages encoded by envoy-data-plane (betterproto2, an independent generation of
Envoy's API) go through the running processor, and its answers decode with the same library."""

from __future__ import annotations

import json

import envoy_data_plane.envoy.config.core.v3 as core
import envoy_data_plane.envoy.service.ext_proc.v3 as dp

from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import ExtProcClient


def data_plane_stream(client: ExtProcClient, messages: list[dp.ProcessingRequest]) -> list[dp.ProcessingResponse]:
    call = client.channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=bytes, response_deserializer=dp.ProcessingResponse.parse,
    )
    return list(call(iter(messages), timeout=5))


def headers(pairs: list[tuple[str, str]], end_of_stream: bool = False) -> dp.ProcessingRequest:
    return dp.ProcessingRequest(request_headers=dp.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]),
        end_of_stream=end_of_stream))


def test_data_plane_headers_round_trip(client: ExtProcClient, world: World) -> None:
    (answer,) = data_plane_stream(client, [headers([
        (":method", "POST"), (":path", "/v2/models/llama/versions/2/infer"), ("x-api-key", world.acme_key),
        ("content-type", "application/json"), ("content-length", "2"), ("x-igw-tenant", "forged")])])
    common = answer.request_headers.response
    set_headers = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    assert set_headers["x-igw-model"] == b"llama-3-8b" and set_headers["x-igw-model-version"] == b"2"
    assert set_headers["x-igw-tenant"] == b"acme"
    assert "x-igw-tenant" in common.header_mutation.remove_headers
    assert common.clear_route_cache is True


def test_data_plane_body_and_immediate_response_round_trip(client: ExtProcClient, world: World) -> None:
    answers = data_plane_stream(client, [
        headers([(":method", "POST"), (":path", "/v1/completions"), ("authorization", f"Bearer {world.acme_key}"),
                 ("content-type", "application/json"), ("content-length", "5")]),
        dp.ProcessingRequest(request_body=dp.HttpBody(body=b"{nope", end_of_stream=True)),
    ])
    assert answers[0].mode_override.request_body_mode == 2  # BUFFERED
    immediate = answers[1].immediate_response
    assert int(immediate.status.code) == 400
    assert json.loads(immediate.body)["error"]["code"] == "invalid_json"
    assert {h.header.key for h in immediate.headers.set_headers} >= {"content-type", "x-request-id"}
