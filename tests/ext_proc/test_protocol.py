"""Every phase Envoy can send gets the matching answer; misuse ends the stream with a clear gRPC error."""

from __future__ import annotations

import grpc
import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import ExtProcClient, Mode, request_body, request_headers
from tests.helpers import Service, ServiceFactory


def rpc_error(client: ExtProcClient, messages: list[pb.ProcessingRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        client.exchange(messages)
    return info.value


def test_body_before_headers_is_invalid_argument(client: ExtProcClient) -> None:
    error = rpc_error(client, [request_body(b"{}")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_body received before request_headers" in error.details()


def test_message_without_a_phase_is_invalid_argument(client: ExtProcClient) -> None:
    error = rpc_error(client, [pb.ProcessingRequest()])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no phase" in error.details()


def test_headers_twice_is_invalid_argument(client: ExtProcClient, world: World) -> None:
    error = rpc_error(client, [request_headers(key=world.acme_key), request_headers(key=world.acme_key)])
    assert "twice" in error.details()


def test_message_after_an_immediate_response_is_invalid_argument(client: ExtProcClient) -> None:
    error = rpc_error(client, [request_headers(), request_body(b"{}")])
    assert "after the request was answered" in error.details()


def test_a_chunk_envoy_streamed_before_reading_a_body_refusal_ends_the_stream_cleanly(
    client: ExtProcClient, world: World, processor: Service
) -> None:
    # STREAMED: Envoy sends each chunk as it arrives, so the next chunk (and the trailers) may already be on
    # the wire when the processor refuses the one before. Over acme's 4096-byte maximum, then one more chunk.
    messages = [request_headers(key=world.acme_key, content_length=None), request_body(b"[" + b"1," * 2100,
                end_of_stream=False), request_body(b"1]", end_of_stream=False),
                pb.ProcessingRequest(request_trailers=pb.HttpTrailers())]
    errors_before = stream_errors(processor)
    answers = client.exchange(messages)
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "immediate_response"]
    assert stream_errors(processor) == errors_before


def stream_errors(processor: Service) -> float:
    text = httpx.get(f"{processor.http_base}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("igw_ext_proc_stream_errors_total{"))


def test_unparseable_bytes_are_a_grpc_error_not_a_crash(client: ExtProcClient, processor: Service) -> None:
    raw = client.channel.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError):
        list(raw(iter([b"\xff\xff\xff"]), timeout=5))
    assert processor.proc.alive()


def test_every_phase_is_answered_with_its_own_type(client: ExtProcClient, world: World) -> None:
    messages = [
        request_headers(key=world.acme_key, announced_body_mode=Mode.STREAMED, content_length=None),
        request_body(b"[1]", end_of_stream=False),
        pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"ok", end_of_stream=False)),
        pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
    ]
    answers = client.exchange(messages)
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers", "request_body", "request_trailers", "response_headers", "response_body",
        "response_trailers"]


def test_full_duplex_response_body_is_echoed_back(client: ExtProcClient, world: World) -> None:
    first = request_headers(key=world.acme_key, end_of_stream=True, content_length=None)
    first.protocol_config.response_body_mode = Mode.FULL_DUPLEX_STREAMED
    answers = client.exchange([first, pb.ProcessingRequest(response_body=pb.HttpBody(body=b"tok", end_of_stream=True))])
    streamed = answers[1].response_body.response.body_mutation.streamed_response
    assert (streamed.body, streamed.end_of_stream) == (b"tok", True)


def test_observability_mode_gets_no_answers(client: ExtProcClient, world: World) -> None:
    message = request_headers(key=world.acme_key)
    message.observability_mode = True
    assert client.exchange([message]) == []


def test_grpc_health_service_reports_serving(client: ExtProcClient) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(client: ExtProcClient) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_the_current_status(client: ExtProcClient) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    replies = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert next(replies).status == health_pb2.HealthCheckResponse.SERVING
    replies.cancel()


def test_message_over_the_size_limit_is_refused_before_it_is_buffered(
    client: ExtProcClient, processor: Service
) -> None:
    # The limit is max(4 MiB, max buffer + 64 KiB); the prefix alone announces the size.
    raw = client.channel.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b,
                                       _registered_method=False)
    big = request_body(b"x" * (5 * 1024 * 1024)).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        list(raw(iter([big]), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than the 4194304-byte limit" in info.value.details()
    assert processor.proc.alive()


def test_server_advertises_its_max_concurrent_streams(services: ServiceFactory, world: World) -> None:
    service = services.start_module("ext_proc", "--redis-url", world.redis_url, "--max-concurrent-streams", "7")
    assert http2_server_settings(service.grpc_port)[0x3] == 7  # SETTINGS_MAX_CONCURRENT_STREAMS


def http2_server_settings(port: int) -> dict[int, int]:
    """The SETTINGS in force after a server's opening frames (later SETTINGS frames override earlier
    ones), read off a plain socket after an HTTP/2 client preface."""
    import socket
    import struct

    settings: dict[int, int] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        buffer = b""
        sock.settimeout(1.0)
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    length = int.from_bytes(buffer[:3], "big")
                    kind, flags, payload = buffer[3], buffer[4], buffer[9:9 + length]
                    buffer = buffer[9 + length:]
                    if kind == 0x4 and not flags & 0x1:
                        for i in range(0, length, 6):
                            ident, value = struct.unpack(">HI", payload[i:i + 6])
                            settings[ident] = value
        except TimeoutError:
            pass  # the server has said all it says unprompted
    return settings
