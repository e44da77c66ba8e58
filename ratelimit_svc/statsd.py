"""Upstream's stats over statsd (USE_STATSD, on by default there, or USE_DOG_STATSD).

envoyproxy/ratelimit counts its stats in a lyft/gostats store and flushes it every STATS_FLUSH_INTERVAL:
each counter that moved since the last flush becomes one `name:delta|c` line, and the per-call response
time one `name:ms|ms` line per call. Deployments run a statsd_exporter (or a Datadog agent) beside it and
build their dashboards on those names, so this module sends the same names: the ones upstream_prometheus.py
derives from our counters (`stat_counts`), never a second naming. EXTRA_TAGS go where gostats puts them
for plain statsd, into the name (`name.__k=v`, sorted by key), and where upstream's dogstatsd sink moves
them for USE_DOG_STATSD (`name:1|c|#k:v`).

The flusher is a task of the service's event loop: it only reads plain integers (the request path runs on
the same thread, see metrics.py), packs lines into datagrams of at most 1432 bytes (gostats' size, which an
MTU of 1500 carries unfragmented), and sends them on a non-blocking UDP socket. A full socket buffer, an
unreachable or unresolvable host drop that flush's lines, never a request; the host is resolved at start and
again after a failed send. With --workers N each worker flushes its own deltas; statsd sums them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Iterable

from ratelimit_svc import upstream_prometheus
from ratelimit_svc.settings import MOGRIFIER_GROUP_REF, StatsdTarget

MAX_DATAGRAM = 1432  # bytes of lines per datagram (a longer single line goes alone, as gostats sends it)
_TIMERS_PER_CHUNK = 2000  # response-time lines built and sent before letting requests run again (~2 ms)


def _fill(template: str, found: re.Match[str]) -> str:
    return MOGRIFIER_GROUP_REF.sub(lambda ref: found.group(int(ref[0][1:])) or "", template)


def shape(name: str, target: StatsdTarget) -> tuple[str, str]:
    """(name part, after-the-type part) of a stat's lines. Upstream puts EXTRA_TAGS on all its scopes:
    gostats writes them into the name (`name.__k=v`, sorted by key); its dogstatsd sink takes them out again,
    applies the first mogrifier that matches the bare name, and sends every tag as `|#k:v,...`."""
    if not target.dogstatsd:
        return name + "".join(f".__{key}={value}" for key, value in target.extra_tags), ""
    tags = [f"{key}:{value}" for key, value in target.extra_tags]
    for mogrifier in target.mogrifiers:
        if found := mogrifier.pattern.search(name):
            name = _fill(mogrifier.name, found)
            tags += [f"{key}:{_fill(value, found)}" for key, value in mogrifier.tags]
            break
    return name, "|#" + ",".join(tags) if tags else ""


def pack(lines: Iterable[str], dogstatsd: bool) -> list[bytes]:
    """Lines into datagrams of at most MAX_DATAGRAM bytes: newline-terminated lines as gostats writes them,
    newline-separated as datadog-go does."""
    datagrams: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode() if dogstatsd else (line + "\n").encode()
        extra = len(data) + (1 if dogstatsd and current else 0)
        if current and size + extra > MAX_DATAGRAM:
            datagrams.append(b"\n".join(current) if dogstatsd else b"".join(current))
            current, size, extra = [], 0, len(data)
        current.append(data)
        size += extra
    if current:
        datagrams.append(b"\n".join(current) if dogstatsd else b"".join(current))
    return datagrams


class StatsdFlusher:
    """Sends what moved since the last flush; counters are taken at each flush whether or not it is
    delivered, as gostats latches them, so a statsd that comes back sees new counts, not a burst."""

    def __init__(self, target: StatsdTarget, log: logging.Logger) -> None:
        self.target = target
        self.log = log
        self.sent: dict[str, int] = {}  # counts at the last flush
        self.address: tuple[str, int] | tuple[str, int, int, int] | None = None
        self.sock: socket.socket | None = None
        self.failing = False  # the last resolve or send failed: log once until it works again
        self.shapes: dict[str, tuple[str, str]] = {}
        upstream_prometheus.CALLS.samples = []

    def _named(self, name: str) -> tuple[str, str]:
        """(what goes before `:value`, what goes after the type) of a stats name, cached: the same names
        come back every flush."""
        found = self.shapes.get(name)
        if found is None:
            found = self.shapes[name] = shape(name, self.target)
        return found

    def counter_lines(self) -> list[str]:
        """One line per counter that moved since the last flush, with its delta."""
        out: list[str] = []
        sent = self.sent
        for name, value in upstream_prometheus.stat_counts(upstream_prometheus.snapshot()):
            delta = value - sent.get(name, 0)
            if delta > 0:
                head, tail = self._named(name)
                out.append(f"{head}:{delta}|c{tail}")
                sent[name] = value
        return out

    def timer_lines(self, samples: list[float]) -> list[str]:
        """One line per call: upstream's interceptor records whole milliseconds (Go's Milliseconds truncates)."""
        head, tail = self._named(f"ratelimit_server.{upstream_prometheus.METHOD}.response_time")
        return [f"{head}:{int(seconds * 1000)}|ms{tail}" for seconds in samples]

    async def resolve(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.target.host, self.target.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            self._failed(f"cannot resolve STATSD_HOST {self.target.host!r}: {exc}")
            return False
        # As Go's resolver for "udp": an IPv4 address first (an agent on localhost often binds 127.0.0.1 only).
        family, _, _, _, address = next((info for info in infos if info[0] == socket.AF_INET), infos[0])
        if self.sock is None or self.sock.family != family:
            self.close()
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
        self.address = address  # type: ignore[assignment]
        return True

    def _failed(self, why: str) -> None:
        if not self.failing:
            self.log.warning("statsd: %s; stats are dropped until it works again", why)
        self.failing = True

    async def flush(self) -> None:
        """Counters first, then the response times in chunks, letting requests run between chunks: a busy
        interval holds a line per call, and building them all at once would stall the loop for milliseconds."""
        lines = self.counter_lines()
        calls = upstream_prometheus.CALLS
        samples, calls.samples = calls.samples or [], []
        if not lines and not samples:
            return
        if (self.address is None or self.sock is None) and not await self.resolve():
            return
        for start in range(0, max(len(samples), 1), _TIMERS_PER_CHUNK):
            lines += self.timer_lines(samples[start:start + _TIMERS_PER_CHUNK])
            if not self._send(pack(lines, self.target.dogstatsd)):
                return
            lines = []
            await asyncio.sleep(0)
        if self.failing:
            self.log.info("statsd: sending to %s:%d again", self.target.host, self.target.port)
        self.failing = False

    def _send(self, datagrams: list[bytes]) -> bool:
        assert self.sock is not None and self.address is not None
        for datagram in datagrams:
            try:
                self.sock.sendto(datagram, self.address)
            except BlockingIOError:
                continue  # the socket buffer is full: this datagram is lost, as a UDP packet may be
            except OSError as exc:
                self._failed(f"cannot send to {self.target.host}:{self.target.port}: {exc}")
                self.address = None  # resolve again at the next flush
                return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Every flush interval until stop (the service flushes once more after its gRPC server stopped)."""
        await self.resolve()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.target.flush_interval)
            if stop.is_set():
                return
            try:
                await self.flush()
            except Exception:  # a bug here must not end the loop that sends every later stat
                self.log.exception("statsd flush failed")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
