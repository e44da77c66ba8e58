"""gRPC and HTTP wiring of the ext_proc service: the Process stream, health, cache invalidation.

The servicer is glue only: read a message, let the RequestProcessor answer it, write the answer, time
it. Protocol misuse ends the stream with INVALID_ARGUMENT and a message naming what was wrong; a message
over the size limit with RESOURCE_EXHAUSTED before it is buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from ext_proc import metrics
from ext_proc.cache import Directory
from ext_proc.processor import ProcessorConfig, ProcessorShared, ProtocolError, RequestProcessor
from ext_proc.settings import Settings
from igw.grpclib_server import GrpclibBackend, recv_bounded
from igw.redis_conn import PipelinedRedis
from igw.service_runtime import ServiceRuntime
from igw.tls import ServerContext, TlsFileError

log = logging.getLogger("ext_proc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS_METHOD = f"/{SERVICE_NAME}/Process"


class ExternalProcessorServicer:
    """grpclib handler of ExternalProcessor/Process (igw/grpclib_server.py says why not grpc.aio)."""

    def __init__(self, new_processor: Callable[[], RequestProcessor], max_message_bytes: int) -> None:
        self.new_processor = new_processor
        self.max_message_bytes = max_message_bytes

    def __mapping__(self) -> dict[str, Handler]:
        return {PROCESS_METHOD: Handler(self.Process, Cardinality.STREAM_STREAM, pb.ProcessingRequest,
                                        pb.ProcessingResponse)}

    async def Process(self, stream: Stream[pb.ProcessingRequest, pb.ProcessingResponse]) -> None:
        processor = self.new_processor()
        observe = metrics.observe_phase
        perf_counter = time.perf_counter
        limit = self.max_message_bytes
        try:
            while (request := await recv_bounded(stream, pb.ProcessingRequest, limit)) is not None:
                started = perf_counter()
                phase, response = await processor.handle(request)
                observe(phase, perf_counter() - started)
                if response is not None and not request.observability_mode:  # Envoy reads no answer then
                    await stream.send_message(response)
        except ProtocolError as exc:
            metrics.STREAM_ERRORS.labels(exc.reason).inc()
            log.warning("ext_proc protocol error: %s", exc)
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        except GRPCError as exc:
            metrics.STREAM_ERRORS.labels(exc.status.name.lower()).inc()
            log.warning("ext_proc stream refused: %s", exc.message)
            raise


def max_message_bytes(settings: Settings) -> int:
    """A buffered body arrives as one message: room for the largest one plus its envelope."""
    return max(4 * 1024 * 1024, settings.max_buffer_bytes + 64 * 1024)


def _tls_summary(settings: Settings) -> str:
    if settings.grpc_tls is None:
        return ""
    if settings.grpc_tls.client_ca_file is None:
        return " (TLS)"
    san = f", SAN {settings.grpc_client_san}" if settings.grpc_client_san else ""
    return f" (mutual TLS{san})"


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    if settings.key_secret_is_default:
        log.warning("using the built-in API key secret: fine for the local test bed, set IGW_KEY_SECRET elsewhere")
    tls: ServerContext | None = None
    if settings.grpc_tls is not None:
        try:
            tls = ServerContext(settings.grpc_tls, log)
        except TlsFileError as exc:  # checked at startup; a file changed since
            log.error("cannot serve gRPC over TLS: %s", exc)
            return 1
    redis = PipelinedRedis(settings.redis_url, timeout=settings.redis_timeout,
                           connect_timeout=settings.redis_timeout)
    directory = Directory(redis, ttl=settings.cache_ttl, stale_if_error=settings.stale_if_error,
                          max_entries=settings.cache_max_entries)
    config = ProcessorConfig(settings.key_secret, settings.max_buffer_bytes, settings.forward_credentials)
    # Half the TTL: a memo made from a cache entry near its end must not outlive it by much.
    shared = ProcessorShared(config, memo_ttl=settings.cache_ttl / 2)

    servicer = ExternalProcessorServicer(lambda: RequestProcessor(config, directory, shared),
                                         max_message_bytes(settings))
    backend = GrpclibBackend([servicer], settings.max_concurrent_streams, ssl_context=tls.context if tls else None,
                             client_san=settings.grpc_client_san, logger=log)
    runtime = ServiceRuntime(backend, [SERVICE_NAME], log)
    redis_ok = False

    async def health_state() -> tuple[bool, str]:
        return True, f"OK (redis {'up' if redis_ok else 'down'}, pubsub {'up' if directory.subscribed else 'down'})"

    if not await runtime.start(settings.host, settings.grpc_port, settings.http_port, health_state):
        return 1
    # Serving even while Redis is down: cached callers still pass and uncached ones get a clean 503,
    # which beats Envoy failing every request because no endpoint is healthy.
    await runtime.set_serving(True)

    async def probe_redis() -> None:
        nonlocal redis_ok
        while not stop.is_set():
            redis_ok = await redis.ping()
            metrics.REDIS_UP.set(1 if redis_ok else 0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    runtime.spawn(probe_redis())
    runtime.spawn(directory.watch_invalidations(settings.redis_url, stop))
    log.info("ext_proc ready: grpc=%s%s http=%s:%d redis=%s pid=%d", runtime.address, _tls_summary(settings),
             settings.host, settings.http_port, redis.address.url, os.getpid())
    await stop.wait()
    log.info("ext_proc stopping")
    await runtime.stop()
    redis.close()
    return 0
