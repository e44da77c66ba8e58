"""What every service process does around its gRPC servicers: bind the gRPC port, serve the standard
health service (what Envoy's active health checks ask), serve /healthcheck and /metrics, and go
NOT_SERVING before it stops so Envoy drains it first. One implementation for ext_proc and the rate-limit
service, so both behave the same to Envoy and to operators."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw.http_admin import HealthCheck, start_admin_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceRuntime:
    def __init__(self, server: grpc.aio.Server, health_names: Iterable[str], log: logging.Logger) -> None:
        self.server = server
        self.names = ("", *health_names)
        self.log = log
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.http: asyncio.Server | None = None
        self.address = ""

    async def start(self, host: str, grpc_port: int, http_port: int, health_check: HealthCheck) -> bool:
        """Bind and start both ports; False (after logging which port) if either cannot be bound."""
        self.address = f"{host}:{grpc_port}"
        if self.server.add_insecure_port(self.address) == 0:
            self.log.error("cannot bind gRPC port %s", self.address)
            return False
        await self.server.start()
        try:
            self.http = await start_admin_server(host, http_port, health_check)
        except OSError as exc:
            self.log.error("cannot bind HTTP port %s:%d: %s", host, http_port, exc)
            await self.server.stop(0)
            return False
        return True

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in self.names:
            await self.health.set(name, status)

    async def stop(self, grace: float = 1.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)
        if self.http is not None:
            self.http.close()
