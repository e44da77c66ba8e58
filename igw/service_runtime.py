"""What every service process does around its gRPC servicers: bind the gRPC port, serve the standard
health service (what Envoy's active health checks ask), serve /healthcheck and /metrics, and go
NOT_SERVING before it stops so Envoy drains it first. One implementation for ext_proc and the rate-limit
service, so both behave the same to Envoy and to operators, whichever gRPC framework carries them
(grpc.aio for the rate-limit service's unary calls, grpclib for ext_proc's streams: igw/grpclib_server.py
says why)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw.http_admin import HealthCheck, start_admin_server
from igw.workers import ADMIN_PORT_ENV


class GrpcBackend(Protocol):
    async def bind(self, host: str, port: int, health_names: Iterable[str]) -> str | None:
        """Start serving; None on success, else why the port could not be bound."""

    async def set_status(self, name: str, serving: bool) -> None: ...
    async def stop(self, grace: float) -> None: ...


class AioBackend:
    """A grpc.aio server plus grpc's own health servicer."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)

    async def bind(self, host: str, port: int, health_names: Iterable[str]) -> str | None:
        if self.server.add_insecure_port(f"{host}:{port}") == 0:
            return "address in use or not available"
        await self.server.start()
        return None

    async def set_status(self, name: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


def freeze_startup_objects() -> None:
    """Move what startup allocated (modules, protobuf descriptors, the loaded config: ~50k objects) out
    of the cyclic collector's reach: a full collection walking them takes 7-11 ms on our machines, a
    pause every request in flight pays. Objects allocated later (a reloaded config too) are collected
    as usual."""
    gc.collect()
    gc.freeze()


async def _always_healthy() -> tuple[bool, str]:
    return True, "OK"


class ServiceRuntime:
    def __init__(self, backend: GrpcBackend, health_names: Iterable[str], log: logging.Logger) -> None:
        self.backend = backend
        self.names = ("", *health_names)
        self.log = log
        self.http: asyncio.Server | None = None
        self.address = ""
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self, host: str, grpc_port: int, http_port: int, health_check: HealthCheck) -> bool:
        """Bind and start both ports; False (after logging which port) if either cannot be bound."""
        self.address = f"{host}:{grpc_port}"
        error = await self.backend.bind(host, grpc_port, self.names)
        if error is not None:
            self.log.error("cannot bind gRPC port %s: %s", self.address, error)
            return False
        if worker_admin := os.environ.get(ADMIN_PORT_ENV):  # a worker of --workers N: igw/workers.py
            host, http_port = "127.0.0.1", int(worker_admin)
        try:
            self.http = await start_admin_server(host, http_port, health_check)
        except OSError as exc:
            self.log.error("cannot bind HTTP port %s:%d: %s", host, http_port, exc)
            await self.backend.stop(0)
            return False
        freeze_startup_objects()
        return True

    async def set_serving(self, serving: bool) -> None:
        for name in self.names:
            await self.backend.set_status(name, serving)

    async def serve_until(self, stop: asyncio.Event, host: str, grpc_port: int, http_port: int,
                          health_check: HealthCheck | None = None, grace: float = 0.5) -> int:
        """The whole life of a server with nothing else to run (the benches' echo baselines): bind,
        SERVING, wait for `stop`, stop. Exit code 1 when a port cannot be bound."""
        if not await self.start(host, grpc_port, http_port, health_check or _always_healthy):
            return 1
        await self.set_serving(True)
        await stop.wait()
        await self.stop(grace)
        return 0

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run one of the service's background loops (probes, watchers); stop() ends it after the
        gRPC server, so nothing a request in flight still needs goes away under it."""
        self.tasks.append(asyncio.create_task(work))

    async def stop(self, grace: float = 1.0) -> None:
        await self.set_serving(False)
        await self.backend.stop(grace)
        if self.http is not None:
            self.http.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
