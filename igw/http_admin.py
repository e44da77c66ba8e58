"""The admin HTTP port of each service: /healthcheck, /livez and /metrics.

/healthcheck says whether the service can do its work now (config loaded, Redis or the Kubernetes API
reachable): readiness. /livez says only that the process's event loop still answers: liveness. Kubernetes
restarts a container whose liveness probe fails, and a restart cures a wedged process but not an outage of
a dependency, so a liveness probe on /healthcheck would restart every replica during a Redis or API-server
outage, and leave them in CrashLoopBackOff when it ends.

The services need only a few read-only endpoints, so a few lines on asyncio streams beat a web
framework dependency. With `--workers N` each worker serves them on a loopback port of its own and the
supervisor answers on the service's admin port for all of them (igw/workers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


# What a route answers: (status, body, content type).
Answer = tuple[int, bytes, str]
TEXT = "text/plain; charset=utf-8"


def _response(status: int, body: bytes, content_type: str = TEXT) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def start_http_server(host: str | None, port: int, routes: Mapping[str, Callable[[], Awaitable[Answer]]],
                            not_found: bytes = b"not found\n") -> asyncio.Server:
    """GET (or HEAD) of a path in `routes` answers what its handler returns; other paths 404 with
    `not_found`, other methods 405. One request per connection. Served on the event loop, so a handler
    reads the service's state between two requests, never during one. host None: every interface."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode(errors="replace").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            route = routes.get(path)
            if method not in ("GET", "HEAD"):
                payload = _response(405, b"method not allowed\n")
            elif route is None:
                payload = _response(404, not_found)
            else:
                payload = _response(*await route())
            writer.write(payload)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def start_admin_server(host: str, port: int, health: HealthCheck) -> asyncio.Server:
    async def healthcheck() -> Answer:
        ok, detail = await health()
        return 200 if ok else 503, (detail + "\n").encode(), TEXT

    async def livez() -> Answer:
        return 200, b"alive\n", TEXT

    async def metrics() -> Answer:
        return 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST

    return await start_http_server(host, port, {"/healthcheck": healthcheck, "/livez": livez, "/metrics": metrics})
