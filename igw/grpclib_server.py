"""The gRPC server for streaming request-path services (ext_proc), on grpclib instead of grpc.aio.

Why two frameworks: measured on our 2-core machines (README, "gRPC framework"), grpc.aio spends about
25 context switches and 80 system calls per ext_proc stream shuttling completions between its poller
threads and the event loop, and every microsecond of Python work on the loop thread costs several more
there. grpclib runs HTTP/2 on the event loop itself (no threads): driven by a Python gRPC client, an echo
processor carries ~10 % more streams per second than on grpc.aio and the real processor ~25 % more;
behind Envoy the gain is smaller (+3-8 % requests/s, the same processor CPU per request). For unary
calls (the rate-limit service) grpc.aio is faster, so that service stays on it.

grpclib has no receive-size limit and no setting for MAX_CONCURRENT_STREAMS; both are added here
with a few lines that touch grpclib's stream and protocol internals. The version is pinned in
pyproject.toml and tests/ext_proc/test_protocol.py covers both limits, so an upgrade that moves
them fails a test instead of silently dropping a limit.

TLS: GrpclibBackend serves with an ssl.SSLContext (igw/tls.py's ServerContext, which also swaps in
rotated files). The client SAN check runs once per connection, when its handshake is done: a connection
whose verified client certificate has no matching SAN gets a method table of its own in which every
method fails UNAUTHENTICATED, so its calls are refused with a reason and the others pay nothing per call.
Without TLS (or without a SAN to check) the protocol class is the plain one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterable
from typing import Any, Protocol

import grpclib.server
from google.protobuf.message import Message
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from h2.settings import SettingCodes

from igw.service_runtime import san_matches

log = logging.getLogger("igw.grpclib")

SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HealthCheckResponse.SERVICE_UNKNOWN


class Servable(Protocol):
    def __mapping__(self) -> dict[str, Any]: ...


async def recv_bounded(stream: grpclib.server.Stream[Any, Any], message_type: type[Message],
                       limit: int) -> Any:
    """The next message of `stream`, or None at its end; a message longer than `limit` bytes is refused
    from its 5-byte length prefix, before any of it is buffered (RESOURCE_EXHAUSTED)."""
    raw = stream._stream  # grpclib.protocol.Stream (pinned version, see module docstring)
    prefix = await raw.recv_data(5)
    if not prefix:
        return None
    if len(prefix) != 5:
        raise GRPCError(Status.INVALID_ARGUMENT, "truncated gRPC message prefix")
    if prefix[0]:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed gRPC messages are not supported")
    size = int.from_bytes(prefix[1:], "big")
    if size > limit:
        raise GRPCError(Status.RESOURCE_EXHAUSTED,
                        f"gRPC message of {size} bytes is larger than the {limit}-byte limit")
    data = await raw.recv_data(size)
    if len(data) != size:
        raise GRPCError(Status.INVALID_ARGUMENT, f"gRPC message truncated: {len(data)} of {size} bytes")
    connection = raw.connection  # what grpclib's own recv_message updates (keepalive accounting)
    connection.messages_received += 1
    connection.last_message_received = time.monotonic()
    try:
        return message_type.FromString(data)
    except Exception as exc:  # upb raises DecodeError; anything else is just as undecodable
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"cannot decode {message_type.DESCRIPTOR.full_name}: {exc}") from None


class HealthService:
    """grpc.health.v1 (what Envoy's active gRPC health checks call) with statuses set by the service.
    Uses grpcio-health-checking's message classes: grpclib's own copies of them would register the same
    proto names twice in one process (the rate-limit service's runtime imports grpc's)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.status: dict[str, int] = {name: NOT_SERVING for name in names}
        self.changed = asyncio.Event()

    def set(self, name: str, status: int) -> None:
        self.status[name] = status
        self.changed.set()
        self.changed = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/grpc.health.v1.Health/Check": Handler(self.Check, Cardinality.UNARY_UNARY, HealthCheckRequest,
                                                   HealthCheckResponse),
            "/grpc.health.v1.Health/Watch": Handler(self.Watch, Cardinality.UNARY_STREAM, HealthCheckRequest,
                                                   HealthCheckResponse),
        }

    async def Check(self, stream: grpclib.server.Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        status = self.status.get(request.service)
        if status is None:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        await stream.send_message(HealthCheckResponse(status=status))  # type: ignore[arg-type]

    async def Watch(self, stream: grpclib.server.Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        last = None
        while True:
            changed = self.changed
            status = self.status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await stream.send_message(HealthCheckResponse(status=status))  # type: ignore[arg-type]
                last = status
            await changed.wait()


class _Protocol(H2Protocol):
    def __init__(self, like: H2Protocol, max_concurrent_streams: int) -> None:
        super().__init__(like.handler, like.config, like.h2_config)
        self.max_concurrent_streams = max_concurrent_streams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connection._connection.update_settings(
            {SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams})
        self.connection.flush()


class ConnectionSanCheck:
    """Refuses (UNAUTHENTICATED) every call on a connection whose verified client certificate carries no
    SAN matching `san`, as igw/service_runtime.py's ClientSanCheck does per call on grpc.aio. Decided once
    per connection, right after its handshake."""

    def __init__(self, san: str, log: logging.Logger) -> None:
        self.san = san
        self.log = log
        self.refused = 0
        self.next_log = 0.0
        self.refusing: dict[str, Handler] = {}

    def build(self, mapping: dict[str, Handler]) -> None:
        """The method table of refused connections: the same methods (so their streams are set up as
        usual and a client learns why), each failing at once."""
        message = f"client certificate has no subject alternative name {self.san!r}"

        async def refuse(stream: grpclib.server.Stream[Any, Any]) -> None:
            raise GRPCError(Status.UNAUTHENTICATED, message)

        self.refusing = {name: Handler(refuse, method.cardinality, method.request_type, method.reply_type)
                         for name, method in mapping.items()}

    def allowed(self, transport: asyncio.BaseTransport) -> bool:
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        entries = [(str(kind), str(value)) for kind, value in (cert or {}).get("subjectAltName", ())]
        if any(san_matches(self.san, value, kind) for kind, value in entries):
            return True
        sans = [value for _, value in entries]
        self.refused += 1
        now = time.monotonic()
        if now >= self.next_log:  # at most one line a minute: a misconfigured fleet reconnects fast
            self.next_log = now + 60
            self.log.warning("refused the calls of a gRPC client %s whose certificate SANs %s do not include %s "
                             "(%d connections refused so far)", transport.get_extra_info("peername"),
                             sans or "(none)", self.san, self.refused)
        return False


class _SanCheckedProtocol(_Protocol):
    def __init__(self, like: H2Protocol, max_concurrent_streams: int, check: ConnectionSanCheck) -> None:
        super().__init__(like, max_concurrent_streams)
        self.check = check

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # called once the TLS handshake is done
        if not self.check.allowed(transport):
            self.handler.mapping = self.check.refusing  # type: ignore[attr-defined]  # this connection's only


class _Server(grpclib.server.Server):
    def __init__(self, handlers: list[Servable], max_concurrent_streams: int,
                 san_check: ConnectionSanCheck | None = None) -> None:
        super().__init__(handlers)  # type: ignore[arg-type]
        self.max_concurrent_streams = max_concurrent_streams
        self.san_check = san_check
        if san_check is not None:
            san_check.build(self._mapping)

    def _protocol_factory(self) -> H2Protocol:
        if self.san_check is not None:
            return _SanCheckedProtocol(super()._protocol_factory(), self.max_concurrent_streams, self.san_check)
        return _Protocol(super()._protocol_factory(), self.max_concurrent_streams)


class GrpclibBackend:
    """The grpclib side of igw.service_runtime.ServiceRuntime: bind, health statuses, graceful stop. With
    `ssl_context` the port serves TLS only; `client_san` (with a context that verifies client
    certificates) refuses the calls of clients whose certificate lacks that SAN, logging to `logger`."""

    def __init__(self, handlers: Iterable[Servable], max_concurrent_streams: int = 100, *,
                 ssl_context: ssl.SSLContext | None = None, client_san: str = "",
                 logger: logging.Logger = log) -> None:
        if client_san and (ssl_context is None or ssl_context.verify_mode != ssl.CERT_REQUIRED):
            raise ValueError("a client SAN check needs TLS with verified client certificates")
        self.handlers = list(handlers)
        self.health: HealthService | None = None
        self.max_concurrent_streams = max_concurrent_streams
        self.ssl_context = ssl_context
        self.san_check = ConnectionSanCheck(client_san, logger) if client_san else None
        self.server: _Server | None = None

    async def bind(self, host: str, port: int, health_names: Iterable[str]) -> str | None:
        self.health = HealthService(health_names)
        self.server = _Server([*self.handlers, self.health], self.max_concurrent_streams, self.san_check)
        try:
            await self.server.start(host, port, reuse_port=True, ssl=self.ssl_context)
        except OSError as exc:
            return str(exc)
        return None

    async def set_status(self, name: str, serving: bool) -> None:
        assert self.health is not None
        self.health.set(name, SERVING if serving else NOT_SERVING)

    async def stop(self, grace: float) -> None:
        """Stop accepting connections, give streams in flight up to `grace` seconds, then cancel the rest
        (grpclib's own close() cancels at once, which would cut requests Envoy already forwarded)."""
        server = self.server
        if server is None:
            return
        loop = asyncio.get_running_loop()
        if server._server is not None:
            server._server.close()
        deadline = loop.time() + grace
        # grpclib keeps a finished call's task in _tasks until its next clean-up: only those not done are in flight.
        while (any(not task.done() for handler in server._handlers for task in handler._tasks.values())
               and loop.time() < deadline):
            await asyncio.sleep(0.02)
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), 1.0)
        except TimeoutError:
            log.debug("connections still open at stop; the process exit closes them")
