"""ProcessingResponse builders: header mutations, mode overrides and JSON ImmediateResponses.

Pure: protobuf values in, protobuf values out, no I/O. Uses the xds-protos (upb) classes, the only
message classes fast enough for the request path (see ../shared/PERF_NOTES.md). Responses that never
change are built once at import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from ext_proc.decisions import Denial

ProcessingMode = processing_mode_pb2.ProcessingMode
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

BODY_NONE = ProcessingMode.NONE
BODY_STREAMED = ProcessingMode.STREAMED
BODY_BUFFERED = ProcessingMode.BUFFERED
BODY_BUFFERED_PARTIAL = ProcessingMode.BUFFERED_PARTIAL
BODY_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


def header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")), append_action=_OVERWRITE
    )


def header_mutation(set_headers: Iterable[tuple[str, str]], remove: Iterable[str]) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[header_option(k, v) for k, v in set_headers], remove_headers=list(remove)
    )


def request_headers_response(
    set_headers: Iterable[tuple[str, str]],
    remove: Iterable[str],
    *,
    clear_route_cache: bool,
    request_body_mode: int | None = None,
) -> pb.ProcessingResponse:
    common = pb.CommonResponse(header_mutation=header_mutation(set_headers, remove),
                               clear_route_cache=clear_route_cache)
    response = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
    if request_body_mode is not None:
        # Only what this request needs: its body, never the response phases (each is another message).
        # A STREAMED body followed by trailers never arrives with end_of_stream: its end is the trailers
        # message, so ask for it (a request without trailers sends none; checked through Envoy 1.40).
        response.mode_override.CopyFrom(ProcessingMode(
            request_body_mode=request_body_mode,
            response_header_mode=ProcessingMode.SKIP,
            response_body_mode=ProcessingMode.NONE,
            request_trailer_mode=ProcessingMode.SEND if request_body_mode == BODY_STREAMED else ProcessingMode.SKIP,
            response_trailer_mode=ProcessingMode.SKIP,
        ))
    return response


def request_body_response(
    set_headers: Iterable[tuple[str, str]] = (), *, clear_route_cache: bool = False
) -> pb.ProcessingResponse:
    common = pb.CommonResponse(clear_route_cache=clear_route_cache)
    headers = list(set_headers)
    if headers:
        common.header_mutation.CopyFrom(header_mutation(headers, ()))
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


def streamed_body_response(phase: str, chunk: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    """FULL_DUPLEX_STREAMED mode: Envoy forwards only what the processor sends back, so echo the chunk."""
    body = pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(
        streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream))))
    return pb.ProcessingResponse(**{phase: body})


def error_body(denial: Denial) -> bytes:
    return json.dumps({"error": {"code": denial.code, "message": denial.message}},
                      separators=(",", ":")).encode()


def immediate_response(denial: Denial, request_id: str | None) -> pb.ProcessingResponse:
    headers = [("content-type", "application/json"), *denial.headers]
    if request_id is not None:
        headers.append(("x-request-id", request_id))
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=denial.status),  # type: ignore[arg-type]
        headers=header_mutation(headers, ()),
        body=error_body(denial),
        details=f"igw_{denial.reason}",
    ))


# Answers that carry nothing: "continue unchanged" for each phase.
CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

CONTINUE = {
    "request_headers": CONTINUE_REQUEST_HEADERS,
    "request_body": CONTINUE_REQUEST_BODY,
    "request_trailers": CONTINUE_REQUEST_TRAILERS,
    "response_headers": CONTINUE_RESPONSE_HEADERS,
    "response_body": CONTINUE_RESPONSE_BODY,
    "response_trailers": CONTINUE_RESPONSE_TRAILERS,
}
