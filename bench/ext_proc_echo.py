"""The baseline for bench/ext_proc_bench.py: an external processor with the same framework and no logic.

Same gRPC server construction (ext_proc.server.grpc_server), same grpc.aio + uvloop loop, same
message classes and the same stream loop shape; every message is answered "continue unchanged" with
the response type of its phase. Whatever the real processor costs beyond this is its own logic.

    .venv/bin/python -m bench.ext_proc_echo --host 127.0.0.1 --grpc-port N --http-port M [--workers N]
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ext_proc.responses import CONTINUE
from ext_proc.server import SERVICE_NAME, grpc_server
from ext_proc.settings import Settings, parse_settings
from igw.runtime import service_main
from igw.service_runtime import ServiceRuntime


class EchoProcessor(pb_grpc.ExternalProcessorServicer):
    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            yield CONTINUE[request.WhichOneof("request")]


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    server = grpc_server(settings)
    pb_grpc.add_ExternalProcessorServicer_to_server(EchoProcessor(), server)
    runtime = ServiceRuntime(server, [SERVICE_NAME], logging.getLogger("ext_proc_echo"))

    async def healthy() -> tuple[bool, str]:
        return True, "OK"

    if not await runtime.start(settings.host, settings.grpc_port, settings.http_port, healthy):
        return 1
    await runtime.set_serving(True)
    await stop.wait()
    await runtime.stop(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    return service_main("bench.ext_proc_echo", parse_settings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
