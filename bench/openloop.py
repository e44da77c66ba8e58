"""Open-loop HTTP/1.1 load generator: requests leave at scheduled times whatever the answers do.

    python -m bench.openloop URL --rate 500 --duration 8 [--warmup 1] [--cpu N] [--header K:V ...]
                             [--body-file F] [--method POST]

wrk2 is not in Debian, so this is our own. Latency is measured from each request's *scheduled* send
time to the end of its answer, so a stall (in the gateway, or in this process) counts against every
request it delayed instead of hiding behind fewer sends (coordinated omission). Requests go over a
pool of keep-alive connections; a request finding no idle connection opens a new one (that cost is
part of its latency). It speaks just enough HTTP/1.1 for our peers (answers with content-length or
chunked), on uvloop with asyncio protocols, so one core sustains well above 1,000 requests/s; the
printed `send_lag` and `cpu_cores` show whether it kept up. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from collections import Counter, deque
from urllib.parse import urlsplit

# The event loop's timers have 1 ms resolution: fire a request up to this much before its time rather than
# up to 1 ms after it.
EARLY = 0.0005


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def send(self, data: bytes) -> asyncio.Future[int]:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        status = self._complete()
        if status is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def _complete(self) -> int | None:
        """The status once a whole answer is buffered (then the buffer is cleared), else None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        body_start = end + 4
        if "content-length" in fields:
            total = body_start + int(fields["content-length"])
            if len(self.buffer) < total:
                return None
            del self.buffer[:total]
            return status
        if fields.get("transfer-encoding", "").lower() == "chunked":
            pos = body_start
            while True:
                line_end = self.buffer.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(self.buffer[pos:line_end]).split(b";")[0], 16)
                pos = line_end + 2 + size + 2
                if len(self.buffer) < pos:
                    return None
                if size == 0:
                    del self.buffer[:pos]
                    return status
        if status in (204, 304):
            del self.buffer[:body_start]
            return status
        raise ValueError("answer without content-length or chunked encoding")


def build_request(method: str, host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


async def run(url: str, rate: float, duration: float, warmup: float, method: str, headers: dict[str, str],
              body: bytes, max_connections: int, preconnect: int) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = build_request(method, f"{host}:{port}", path, headers, body)
    loop = asyncio.get_running_loop()
    idle: deque[HttpConnection] = deque()
    open_count = 0

    async def connect() -> HttpConnection:
        nonlocal open_count
        open_count += 1
        try:
            _, conn = await loop.create_connection(HttpConnection, host, port)
        except BaseException:
            open_count -= 1
            raise
        return conn

    for _ in range(preconnect):
        idle.append(await connect())

    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[str] = Counter()
    pending: set[asyncio.Task[None]] = set()
    measure_from_index = int(rate * warmup)
    total = int(rate * (warmup + duration))

    async def one(index: int, due: float) -> None:
        nonlocal open_count
        conn: HttpConnection | None = None
        # Sent late: the delay counts (from `due`). Sent early (timer slack): from the real send time.
        origin = min(due, time.perf_counter())
        try:
            while idle:
                candidate = idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
                open_count -= 1
            if conn is None:
                if open_count >= max_connections:
                    statuses["pool_exhausted"] += 1
                    return
                conn = await connect()
            status = await asyncio.wait_for(conn.send(request), 10)
            done = time.perf_counter()
            if index >= measure_from_index:
                latencies.append(done - origin)
                statuses[str(status)] += 1
            idle.append(conn)
        except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
            if index >= measure_from_index:
                statuses[type(exc).__name__] += 1
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
                open_count -= 1

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter() + 0.01
    i = 0
    while i < total:
        now = time.perf_counter()
        while i < total:
            due = start + i / rate
            if due > now + EARLY:
                break
            if i >= measure_from_index:
                lags.append(max(0.0, now - due))
            task = loop.create_task(one(i, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - EARLY - time.perf_counter()))
    sent_end = time.perf_counter()
    if pending:
        await asyncio.wait(pending, timeout=15)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    latencies.sort()
    lags.sort()
    elapsed = sent_end - start
    ok = sum(n for s, n in statuses.items() if s.isdigit() and 200 <= int(s) < 300)
    measured = total - measure_from_index
    return {
        "rate": rate,
        "scheduled": measured,
        "completed": len(latencies),
        "ok": ok,
        "errors": measured - ok,
        "statuses": dict(statuses),
        "achieved_send_rate": (total / elapsed) if elapsed > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p90_ms": percentile(latencies, 0.90) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "p999_ms": percentile(latencies, 0.999) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else 0.0,
        "send_lag_p99_ms": percentile(lags, 0.99) * 1000,
        "send_lag_max_ms": (lags[-1] * 1000) if lags else 0.0,
        "cpu_cores": ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / max(1e-9, elapsed),
        "connections": open_count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    parser.add_argument("--method", default="POST")
    parser.add_argument("--header", action="append", default=[], help="K:V, repeatable")
    parser.add_argument("--body-file", default="")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--preconnect", type=int, default=16)
    args = parser.parse_args()
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            parser.error(f"--header {item!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    body = open(args.body_file, "rb").read() if args.body_file else b""  # noqa: SIM115
    import uvloop

    result = uvloop.run(run(args.url, args.rate, args.duration, args.warmup, args.method, headers, body,
                            args.max_connections, args.preconnect))
    result["cpu"] = args.cpu
    print(json.dumps(result))


if __name__ == "__main__":
    main()
