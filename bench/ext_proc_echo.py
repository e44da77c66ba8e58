"""The baseline for bench/ext_proc_bench.py: an external processor with the same framework and no logic.

Same gRPC framework and glue as ext_proc.server (grpclib on uvloop, the same bounded message reader,
the same service runtime and health service, the same message classes); every message is answered
"continue unchanged" with the response type of its phase. Whatever the real processor costs beyond
this is its own logic.

    .venv/bin/python -m bench.ext_proc_echo --host 127.0.0.1 --grpc-port N --http-port M [--workers N]
"""

from __future__ import annotations

import asyncio
import logging
import sys

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from ext_proc.responses import CONTINUE
from ext_proc.server import PROCESS_METHOD, SERVICE_NAME, max_message_bytes
from ext_proc.settings import Settings, parse_settings
from igw.grpclib_server import GrpclibBackend, recv_bounded
from igw.runtime import service_main
from igw.service_runtime import ServiceRuntime


class EchoProcessor:
    def __init__(self, max_message: int) -> None:
        self.max_message = max_message

    def __mapping__(self) -> dict[str, Handler]:
        return {PROCESS_METHOD: Handler(self.Process, Cardinality.STREAM_STREAM, pb.ProcessingRequest,
                                        pb.ProcessingResponse)}

    async def Process(self, stream: Stream[pb.ProcessingRequest, pb.ProcessingResponse]) -> None:
        while (request := await recv_bounded(stream, pb.ProcessingRequest, self.max_message)) is not None:
            await stream.send_message(CONTINUE[request.WhichOneof("request")])


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    backend = GrpclibBackend([EchoProcessor(max_message_bytes(settings))], settings.max_concurrent_streams)
    runtime = ServiceRuntime(backend, [SERVICE_NAME], logging.getLogger("ext_proc_echo"))
    return await runtime.serve_until(stop, settings.host, settings.grpc_port, settings.http_port)


def main(argv: list[str] | None = None) -> int:
    return service_main("bench.ext_proc_echo", parse_settings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
