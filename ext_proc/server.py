"""gRPC and HTTP wiring of the ext_proc service: the Process stream, health, cache invalidation.

The servicer is glue only: read a message, let the RequestProcessor answer it, write the answer, time
it. Protocol misuse ends the stream with INVALID_ARGUMENT and a message naming what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ext_proc import metrics
from ext_proc.cache import Directory
from ext_proc.processor import ProcessorConfig, ProcessorShared, ProtocolError, RequestProcessor
from ext_proc.settings import Settings
from igw.redis_conn import PipelinedRedis
from igw.service_runtime import ServiceRuntime

log = logging.getLogger("ext_proc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessorServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, new_processor: Callable[[], RequestProcessor]) -> None:
        self.new_processor = new_processor

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        processor = self.new_processor()
        observe = metrics.observe_phase
        perf_counter = time.perf_counter
        try:
            async for request in request_iterator:
                started = perf_counter()
                phase, response = await processor.handle(request)
                observe(phase, perf_counter() - started)
                if not request.observability_mode:  # Envoy does not wait for (or read) answers then
                    yield response
        except ProtocolError as exc:
            metrics.STREAM_ERRORS.labels(exc.reason).inc()
            log.warning("ext_proc protocol error: %s", exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def grpc_server(settings: Settings) -> grpc.aio.Server:
    """The gRPC server both the service and the bench's echo processor use (same framework and options)."""
    max_message = max(4 * 1024 * 1024, settings.max_buffer_bytes + 64 * 1024)
    return grpc.aio.server(options=[
        ("grpc.so_reuseport", 1),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
    ])


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    if settings.key_secret_is_default:
        log.warning("using the built-in API key secret: fine for the local test bed, set IGW_KEY_SECRET elsewhere")
    redis = PipelinedRedis(settings.redis_url, timeout=settings.redis_timeout,
                           connect_timeout=settings.redis_timeout)
    directory = Directory(redis, ttl=settings.cache_ttl, stale_if_error=settings.stale_if_error,
                          max_entries=settings.cache_max_entries)
    config = ProcessorConfig(settings.key_secret, settings.max_buffer_bytes, settings.forward_credentials)
    # Half the TTL: a memo made from a cache entry near its end must not outlive it by much.
    shared = ProcessorShared(config, memo_ttl=settings.cache_ttl / 2)

    server = grpc_server(settings)
    pb_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorServicer(lambda: RequestProcessor(config, directory, shared)), server
    )
    runtime = ServiceRuntime(server, [SERVICE_NAME], log)
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

    tasks = [
        asyncio.create_task(probe_redis()),
        asyncio.create_task(directory.watch_invalidations(settings.redis_url, stop)),
    ]
    log.info("ext_proc ready: grpc=%s http=%s:%d redis=%s pid=%d", runtime.address, settings.host,
             settings.http_port, redis.address.url, os.getpid())
    await stop.wait()
    log.info("ext_proc stopping")
    await runtime.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    redis.close()
    return 0
