"""The admin HTTP port of each service: /healthcheck and /metrics.

Both services need only two read-only endpoints, so a few lines on asyncio streams beat a web
framework dependency. With `--workers N` each worker serves them on a loopback port of its own and the
supervisor answers on the service's admin port for all of them (igw/workers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def start_admin_server(host: str, port: int, health: HealthCheck) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode(errors="replace").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                payload = _response(405, b"method not allowed\n")
            elif path == "/healthcheck":
                ok, detail = await health()
                payload = _response(200 if ok else 503, (detail + "\n").encode())
            elif path == "/metrics":
                payload = _response(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            else:
                payload = _response(404, b"not found\n")
            writer.write(payload)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
