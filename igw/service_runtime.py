"""What every service process does around its gRPC servicers: bind the gRPC port, serve the standard
health service (what Envoy's active health checks ask), serve /healthcheck, /livez and /metrics, and go
NOT_SERVING before it stops so Envoy drains it first. One implementation for ext_proc and the rate-limit
service, so both behave the same to Envoy and to operators, whichever gRPC framework carries them
(grpc.aio for the rate-limit service's unary calls, grpclib for ext_proc's streams: igw/grpclib_server.py
says why)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw.http_admin import HealthCheck, start_admin_server
from igw.tls import FilesWatch, TlsFileError, load_ca_file, load_key_pair
from igw.workers import ADMIN_PORT_ENV

_GRPC_INT_MAX = 2**31 - 1  # grpc core's "infinite" for its millisecond options


def max_connection_age_options(age: float, grace: float) -> list[tuple[str, int]]:
    """grpc.aio server options for upstream's GRPC_MAX_CONNECTION_AGE(_GRACE), in seconds: after `age`
    (plus or minus 10 %) a connection gets a GOAWAY, so clients such as Envoy reconnect and spread over
    replicas added since; calls still running after `grace` more are cut. 0 means never, as upstream."""
    options = []
    for name, seconds in (("grpc.max_connection_age_ms", age), ("grpc.max_connection_age_grace_ms", grace)):
        if seconds > 0:
            options.append((name, min(max(1, round(seconds * 1000)), _GRPC_INT_MAX)))
    return options


@dataclass(frozen=True)
class ServerTls:
    """TLS of a grpc.aio server: certificate and key, and with client_ca_file mutual TLS (every client
    must present a certificate that chains to it). client_san further requires one of the SANs of that
    certificate to match. `names` are the settings that hold the three paths, for error messages."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_san: str = ""
    names: tuple[str, str, str] = ("certificate", "key", "client CA")

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files; TlsFileError (naming setting and path) if one cannot be used. grpc
        itself would only fail later, at the first handshake, with nothing in the log to say why."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert, key = load_key_pair(context, self.cert_file, self.key_file, self.names[0], self.names[1])
        ca = load_ca_file(context, self.client_ca_file, self.names[2]) if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self, log: logging.Logger) -> grpc.ServerCredentials:
        """Credentials that pick up new files (a rotated certificate, as cert-manager or a Kubernetes
        secret update writes them) at the next connection after they change, without a restart."""
        return grpc.dynamic_ssl_server_credentials(
            self.load(), _CertificateReloader(self, log), require_client_authentication=bool(self.client_ca_file))

    def interceptors(self, log: logging.Logger) -> list[grpc.aio.ServerInterceptor]:
        return [ClientSanCheck(self.client_san, log)] if self.client_san else []


class _CertificateReloader:
    """grpc calls this before every TLS handshake: a stat of each file, and a reload when one changed.
    A bad new file is logged and the certificate in use kept (a half-written pair is retried once the
    second file lands, as that changes its stamp again; a failed load is retried, see FilesWatch)."""

    def __init__(self, tls: ServerTls, log: logging.Logger) -> None:
        self.tls = tls
        self.log = log
        self.watch = FilesWatch((tls.cert_file, tls.key_file, tls.client_ca_file))

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamps = self.watch.due()
        if stamps is None:
            return None
        try:
            config = self.tls.load()
        except TlsFileError as exc:
            log = self.log.error if self.watch.failed_with(stamps) else self.log.debug
            log("gRPC TLS files changed but cannot be used, keeping the current ones: %s (tried again in %.0f s)",
                exc, FilesWatch.RETRY_S)
            return None
        self.watch.succeeded(stamps)
        self.log.info("gRPC TLS files reloaded: %s", ", ".join(
            p for p in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if p))
        return config


# The SAN kinds Python's ssl names in getpeercert(), by the kind `wanted` spells.
_SAN_KINDS = {"ip": "IP Address", "uri": "URI", "dns": "DNS"}


def san_matches(wanted: str, san: str, kind: str | None = None) -> bool:
    """Whether a certificate SAN entry satisfies the configured one. The kind wanted is read from `wanted`:
    an IP address matches the same address only; a URI (a SPIFFE ID) only the same string, exactly, as
    URI paths are case-sensitive; a DNS name matches without regard to case or a trailing dot, or through
    a wildcard entry (*.example.com) covering its first label, never several labels nor a whole top-level
    domain (*.com). `kind` is the entry's own kind when the caller knows it (Python's ssl does, grpc does
    not): then a DNS entry spelled like a wanted IP address, say, does not count."""
    try:
        wanted_ip = ipaddress.ip_address(wanted)
    except ValueError:
        pass
    else:
        if kind is not None and kind != _SAN_KINDS["ip"]:
            return False
        try:
            return ipaddress.ip_address(san) == wanted_ip
        except ValueError:
            return False
    if ":" in wanted or "/" in wanted or "@" in wanted:  # a URI or an e-mail address: compared as is
        return san == wanted and (kind is None or kind in (_SAN_KINDS["uri"], "email"))
    if kind is not None and kind != _SAN_KINDS["dns"]:
        return False
    wanted, san = wanted.lower().rstrip("."), san.lower().rstrip(".")
    if san == wanted:
        return bool(wanted)
    if not wanted or "*" in wanted:
        return False
    if not san.startswith("*.") or "." not in san[2:]:
        return False
    label, _, rest = wanted.partition(".")
    return bool(label) and rest == san[2:]


class ClientSanCheck(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose client certificate carries no SAN matching `san`,
    upstream's GRPC_CLIENT_TLS_SAN. grpc's Python API has no hook into the handshake itself, so the
    check runs per call on the verified certificate grpc reports: the connection opens, its calls fail."""

    def __init__(self, san: str, log: logging.Logger) -> None:
        self.san = san
        self.log = log
        self.wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self.refused = 0
        self.next_log = 0.0

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        wrapped = self.wrapped.get(method)
        if wrapped is None:
            wrapped = self.wrapped[method] = self._guard(handler)
        return wrapped

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        sans = [value.decode(errors="replace")
                for value in context.auth_context().get("x509_subject_alternative_name", ())]
        if any(san_matches(self.san, san) for san in sans):
            return
        self.refused += 1
        now = time.monotonic()
        if now >= self.next_log:  # at most one line a minute: a misconfigured fleet retries fast
            self.next_log = now + 60
            self.log.warning("refused a gRPC client whose certificate SANs %s do not include %s (%d refused so far)",
                             sans or "(none)", self.san, self.refused)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"client certificate has no subject alternative name {self.san!r}")

    def _guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        check = self.check
        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler))
        for kind, make in kinds:
            inner = getattr(handler, kind)
            if inner is None:
                continue
            if inspect.isasyncgenfunction(inner):
                async def behaviour(request: Any, context: grpc.aio.ServicerContext, inner: Any = inner) -> Any:
                    await check(context)
                    async for response in inner(request, context):
                        yield response
            else:
                async def behaviour(request: Any, context: grpc.aio.ServicerContext, inner: Any = inner) -> Any:
                    await check(context)
                    return await inner(request, context)
            return make(behaviour, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        return handler


class GrpcBackend(Protocol):
    async def bind(self, host: str, port: int, health_names: Iterable[str]) -> str | None:
        """Start serving; None on success, else why the port could not be bound."""

    async def set_status(self, name: str, serving: bool) -> None: ...
    async def stop(self, grace: float) -> None: ...


class AioBackend:
    """A grpc.aio server plus grpc's own health servicer; TLS with `credentials`, and on the unix socket
    `uds` (upstream's GRPC_UDS) instead of host:port when given."""

    def __init__(self, server: grpc.aio.Server, credentials: grpc.ServerCredentials | None = None,
                 uds: str = "") -> None:
        self.server = server
        self.credentials = credentials
        self.uds = uds
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)

    def target(self, host: str, port: int) -> str:
        return f"unix:{self.uds}" if self.uds else f"{host}:{port}"

    async def bind(self, host: str, port: int, health_names: Iterable[str]) -> str | None:
        target = self.target(host, port)
        try:
            if self.credentials is not None:
                bound = self.server.add_secure_port(target, self.credentials)
            else:
                bound = self.server.add_insecure_port(target)
        except RuntimeError:  # grpc raises (older versions returned 0) and logs the reason itself
            bound = 0
        if bound == 0:
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
        self.draining = False

    async def start(self, host: str, grpc_port: int, http_port: int, health_check: HealthCheck) -> bool:
        """Bind and start both ports; False (after logging which port) if either cannot be bound."""
        target = getattr(self.backend, "target", None)  # AioBackend may listen on a unix socket instead
        self.address = target(host, grpc_port) if target else f"{host}:{grpc_port}"
        error = await self.backend.bind(host, grpc_port, self.names)
        if error is not None:
            self.log.error("cannot bind gRPC port %s: %s", self.address, error)
            return False
        if worker_admin := os.environ.get(ADMIN_PORT_ENV):  # a worker of --workers N: igw/workers.py
            host, http_port = "127.0.0.1", int(worker_admin)
        try:
            self.http = await start_admin_server(host, http_port, self._readiness(health_check))
        except OSError as exc:
            self.log.error("cannot bind HTTP port %s:%d: %s", host, http_port, exc)
            await self.backend.stop(0)
            return False
        freeze_startup_objects()
        _RUNNING.add(self)
        return True

    def _readiness(self, health_check: HealthCheck) -> HealthCheck:
        """/healthcheck: 503 while draining whatever the service's own check says, so a readiness probe (and
        the --workers supervisor, which asks every worker) takes the process out of rotation too."""
        async def readiness() -> tuple[bool, str]:
            if self.draining:
                return False, "draining: stopping soon (calls still served)"
            return await health_check()

        return readiness

    async def set_serving(self, serving: bool) -> None:
        """Health for every service name. Once draining it stays NOT_SERVING: the services' probe loops set
        it again every few hundred milliseconds and must not bring a stopping process back into rotation."""
        serving = serving and not self.draining
        for name in self.names:
            await self.backend.set_status(name, serving)

    async def drain(self, seconds: float) -> None:
        """Go NOT_SERVING (gRPC health) and 503 (/healthcheck) but keep serving every call, new connections
        included: Envoy keeps sending a host new calls until its active health checks have seen it fail
        (interval x unhealthy threshold), and Kubernetes removes a pod from its endpoints only as it sends
        SIGTERM, so a process that stopped at once would fail the calls of that gap."""
        if self.draining:
            return
        self.draining = True
        await self.set_serving(False)
        self.log.info("stop signal: draining for %g s (health NOT_SERVING, /healthcheck 503, calls still served); "
                      "a second signal stops at once", seconds)

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
        _RUNNING.discard(self)
        await self.set_serving(False)
        await self.backend.stop(grace)
        if self.http is not None:
            self.http.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# The runtimes serving in this process, which a stop signal drains (igw.runtime.run_async): the services
# create theirs inside serve(), out of reach of the signal handler.
_RUNNING: set[ServiceRuntime] = set()


async def drain_then_stop(seconds: float, stop: asyncio.Event) -> None:
    """What the first stop signal does with a drain period: drain every runtime serving, then set `stop`
    after `seconds`, or as soon as something else sets it (a second signal). Nothing serving yet (a
    signal during startup) means nothing to drain: stop at once."""
    runtimes = list(_RUNNING)
    for runtime in runtimes:
        await runtime.drain(seconds)
    if runtimes:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    stop.set()
