"""Upstream's stats over statsd (USE_STATSD, on by default there, or USE_DOG_STATSD).

envoyproxy/ratelimit counts its stats in a lyft/gostats store and flushes it every STATS_FLUSH_INTERVAL:
each counter that moved since the last flush becomes one `name:delta|c` line, and the per-call response
time one `name:ms|ms` line per call. Deployments run a statsd_exporter (or a Datadog agent) beside it and
build their dashboards on those names, so this module sends the same names: the ones upstream_prometheus.py
derives from our counters (`stat_counts`), never a second naming. EXTRA_TAGS go where gostats puts them
for plain statsd, into the name (`name.__k=v`, sorted by key), and where upstream's dogstatsd sink moves
them for USE_DOG_STATSD (`name:1|c|#k:v`).

The flusher is a task of the service's event loop: it only reads plain integers (the request path runs on
the same thread, see metrics.py), walks only the stats keys counted since the last flush (metrics.take_changed),
a chunk at a time with the requests let run in between. Over UDP (STATSD_PROTOCOL udp, the default here) it
packs lines into datagrams of at most 1432 bytes (gostats' size, which an MTU of 1500 carries unfragmented) sent
on a non-blocking socket; over TCP (gostats' default) it writes newline-terminated lines on one connection,
through the loop's transport, never waiting for the peer: what the peer has not read yet is capped at
MAX_BUFFERED bytes, past which a flush's lines are dropped, as gostats drops a full buffer.
Stats keys hold request values: their names are sanitized once, for statsd and USE_PROMETHEUS alike
(upstream_prometheus.sanitize_stat_key), and dogstatsd's tag separators are replaced here. A full socket buffer, an
unreachable or unresolvable host, a refused or lost connection drop that flush's lines, never a request; the host
is resolved (connected to, over TCP) at start and again at the flush after a failure. With --workers N each worker
flushes its own deltas; statsd sums them. At shutdown the flush in progress ends before the last one starts
(finish), so no count taken by a flush is left unsent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from operator import attrgetter

from ratelimit_svc import metrics, upstream_prometheus
from ratelimit_svc.settings import MOGRIFIER_GROUP_REF, StatsdTarget

MAX_DATAGRAM = 1432  # bytes of lines per datagram (a longer single line goes alone, as gostats sends it)
MAX_LINE = 65_507  # the most a UDP datagram carries over IPv4: a longer line cannot be sent at all
MAX_BUFFERED = 1 << 22  # bytes written over TCP that the peer has not read yet (gostats' cap): past it, drop
STREAM_BLOCK = 1 << 16  # bytes of lines per write over TCP (gostats' buffer): what is dropped at the cap
CONNECT_TIMEOUT = 1.5  # seconds for resolving and connecting over TCP (gostats' dial timeout)
SHUTDOWN_TIMEOUT = 3.0  # seconds finish() gives the flush in progress, the last flush and sending what is left
_TIMERS_PER_CHUNK = 2000  # response-time lines built and sent before letting requests run again (~2 ms)
_KEYS_PER_CHUNK = 250  # stats keys compared before letting requests run again (~1 ms when all moved)
_LINES_PER_SEND = 500  # counter lines gathered before they are packed and sent
_SHAPES_KEPT = 65_536  # cached line shapes; past this the cache starts over, so key growth cannot grow it
# dogstatsd reads `,` as the end of a tag and `#`, `@` as the start of a section; a request value may hold them
_DOGSTATSD_UNSAFE = re.compile(r"[#,@]")
_LIMIT_VALUES = attrgetter(*(f.name for f in fields(metrics.LimitStats)))


def _fill(template: str, found: re.Match[str]) -> str:
    return MOGRIFIER_GROUP_REF.sub(lambda ref: found.group(int(ref[0][1:])) or "", template)


def shape(name: str, target: StatsdTarget) -> tuple[str, str]:
    """(name part, after-the-type part) of a stat's lines. Upstream puts EXTRA_TAGS on all its scopes:
    gostats writes them into the name (`name.__k=v`, sorted by key); its dogstatsd sink takes them out again,
    applies the first mogrifier that matches the bare name, and sends every tag as `|#k:v,...`."""
    if not target.dogstatsd:
        return name + "".join(f".__{key}={value}" for key, value in target.extra_tags), ""
    name = _DOGSTATSD_UNSAFE.sub("_", name)  # before the mogrifiers, so no group carries one into a tag
    tags = [f"{key}:{value}" for key, value in target.extra_tags]
    for mogrifier in target.mogrifiers:
        if found := mogrifier.pattern.search(name):
            name = _fill(mogrifier.name, found)
            tags += [f"{key}:{_fill(value, found)}" for key, value in mogrifier.tags]
            break
    return name, "|#" + ",".join(tags) if tags else ""


def pack(lines: Iterable[str], dogstatsd: bool, too_long: Callable[[str], None] | None = None) -> list[bytes]:
    """Lines into datagrams of at most MAX_DATAGRAM bytes: newline-terminated lines as gostats writes them,
    newline-separated as datadog-go does. A line no datagram can carry (over MAX_LINE) is left out and handed
    to too_long: sent, the kernel would refuse it, and the lines around it must still go."""
    datagrams: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode() if dogstatsd else (line + "\n").encode()
        if len(data) > MAX_LINE:
            if too_long is not None:
                too_long(line)
            continue
        extra = len(data) + (1 if dogstatsd and current else 0)
        if current and size + extra > MAX_DATAGRAM:
            datagrams.append(b"\n".join(current) if dogstatsd else b"".join(current))
            current, size, extra = [], 0, len(data)
        current.append(data)
        size += extra
    if current:
        datagrams.append(b"\n".join(current) if dogstatsd else b"".join(current))
    return datagrams


def frame(lines: Iterable[str], too_long: Callable[[str], None] | None = None) -> list[bytes]:
    """Lines as a stream carries them, in blocks of about STREAM_BLOCK bytes: each line ends with a newline,
    all that separates them on TCP (for dogstatsd too). A line over MAX_BUFFERED is left out and handed to
    too_long: no buffer of ours would ever hold it."""
    blocks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        data = (line + "\n").encode()
        if len(data) > MAX_BUFFERED:
            if too_long is not None:
                too_long(line)
            continue
        if current and size + len(data) > STREAM_BLOCK:
            blocks.append(b"".join(current))
            current, size = [], 0
        current.append(data)
        size += len(data)
    if current:
        blocks.append(b"".join(current))
    return blocks


def address_family(protocol: str) -> socket.AddressFamily:
    """The family STATSD_PROTOCOL pins (udp4, tcp6, ...), as Go's network names do; AF_UNSPEC for udp and tcp."""
    return {"4": socket.AF_INET, "6": socket.AF_INET6}.get(protocol[-1], socket.AF_UNSPEC)


class _Connection(asyncio.Protocol):
    """Our end of the TCP connection. statsd never answers, so what it sends is ignored; its close or reset (a
    restart) marks the connection lost, and the next flush connects again instead of writing into it."""

    def __init__(self) -> None:
        self.lost = False

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.lost = True
        return False  # close our side too: a statsd that stopped reading will not read again on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class StatsdFlusher:
    """Sends what moved since the last flush; counters are taken at each flush whether or not it is
    delivered, as gostats latches them, so a statsd that comes back sees new counts, not a burst."""

    def __init__(self, target: StatsdTarget, log: logging.Logger) -> None:
        self.target = target
        self.log = log
        self.sent: dict[str, int] = {}  # service counters at the last flush, by name
        self.sent_limits: dict[str, list[int]] = {}  # a stats key's LimitStats values at the last flush
        self.too_long = 0  # lines left out because no datagram (no stream buffer) carries them (logged once)
        self.stream = target.protocol.startswith("tcp")
        self.family = address_family(target.protocol)
        self.address: tuple[str, int] | tuple[str, int, int, int] | None = None  # UDP: where datagrams go
        self.sock: socket.socket | None = None  # UDP
        self.transport: asyncio.WriteTransport | None = None  # TCP
        self.connection: _Connection | None = None  # TCP
        self.task: asyncio.Task[None] | None = None  # run(), from start()
        self.failing = False  # the last resolve or send failed: log once until it works again
        self.shapes: dict[str, tuple[str, str]] = {}
        upstream_prometheus.CALLS.samples = []
        metrics.forget_changes()  # this flusher has sent nothing: its first flush walks every key

    def _named(self, name: str) -> tuple[str, str]:
        """(what goes before `:value`, what goes after the type) of a stats name, cached: the same names
        come back every flush."""
        found = self.shapes.get(name)
        if found is None:
            if len(self.shapes) >= _SHAPES_KEPT:
                self.shapes.clear()
            found = self.shapes[name] = shape(name, self.target)
        return found

    def service_lines(self) -> list[str]:
        """One line per service counter that moved since the last flush, with its delta."""
        out: list[str] = []
        sent = self.sent
        for name, value in upstream_prometheus.service_counts().items():
            delta = value - sent.get(name, 0)
            if delta > 0:
                head, tail = self._named(name)
                out.append(f"{head}:{delta}|c{tail}")
                sent[name] = value
        return out

    def limit_lines(self, changed: list[tuple[str, metrics.LimitStats]]) -> list[str]:
        """One line per limit stat of these stats keys that moved since the last flush, with its delta."""
        out: list[str] = []
        sent = self.sent_limits
        for key, stats in changed:
            values = _LIMIT_VALUES(stats)
            before = sent.get(key)
            if before is None:
                before = sent[key] = [0] * len(values)
            for i, value in enumerate(values):
                delta = value - before[i]
                if delta > 0:
                    head, tail = self._named(upstream_prometheus.limit_names(key)[i])
                    out.append(f"{head}:{delta}|c{tail}")
                    before[i] = value
        return out

    def counter_lines(self) -> list[str]:
        """Every counter line of a flush at once (the flush itself builds them a chunk at a time)."""
        out = self.service_lines()
        for lines in self._limit_chunks(metrics.take_changed()):
            out += lines
        return out

    def _limit_chunks(self, changed: list[tuple[str, metrics.LimitStats]]) -> Iterator[list[str]]:
        for start in range(0, len(changed), _KEYS_PER_CHUNK):
            yield self.limit_lines(changed[start:start + _KEYS_PER_CHUNK])

    def timer_lines(self, samples: list[float]) -> list[str]:
        """One line per call: upstream's interceptor records whole milliseconds (Go's Milliseconds truncates)."""
        head, tail = self._named(f"ratelimit_server.{upstream_prometheus.METHOD}.response_time")
        return [f"{head}:{int(seconds * 1000)}|ms{tail}" for seconds in samples]

    async def ready(self) -> bool:
        """Whether lines can be sent now: resolves the host again (UDP) or connects again (TCP) when the last
        attempt failed or the connection was lost."""
        if self.stream:
            if self.connection is not None and not self.connection.lost:
                return True
            return await self.connect()
        return (self.address is not None and self.sock is not None) or await self.resolve()

    async def connect(self) -> bool:
        self.close()
        loop = asyncio.get_running_loop()
        where = f"{self.target.host}:{self.target.port}"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                # Tries every address of the name in turn: an agent on localhost often binds one family only.
                transport, connection = await loop.create_connection(
                    _Connection, self.target.host, self.target.port, family=self.family)
        except TimeoutError:
            self._failed(f"cannot connect to {where} over TCP within {CONNECT_TIMEOUT:g}s")
            return False
        except socket.gaierror as exc:
            self._failed(f"cannot resolve STATSD_HOST {self.target.host!r}: {exc}")
            return False
        except OSError as exc:
            self._failed(f"cannot connect to {where} over TCP: {exc}")
            return False
        self.transport, self.connection = transport, connection
        return True

    async def resolve(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.target.host, self.target.port, family=self.family,
                                           type=socket.SOCK_DGRAM)
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

    def _chunks(self, changed: list[tuple[str, metrics.LimitStats]], samples: list[float]) -> Iterator[list[str]]:
        """A flush's lines, a chunk at a time: the service counters, the limit stats of the keys counted since
        the last flush, then the response times."""
        lines = self.service_lines()
        for more in self._limit_chunks(changed):
            lines += more
            if len(lines) >= _LINES_PER_SEND:
                yield lines
                lines = []
            else:
                yield []  # a pause only: these lines go with the next chunk's, in fuller datagrams
        for start in range(0, len(samples), _TIMERS_PER_CHUNK):
            lines += self.timer_lines(samples[start:start + _TIMERS_PER_CHUNK])
            yield lines
            lines = []
        if lines:
            yield lines

    def _too_long(self, line: str) -> None:
        if not self.too_long:
            self.log.warning("statsd: a line of %d bytes is dropped, over the %d %s (%.80s...); later such lines "
                             "are dropped without a warning", len(line.encode()),
                             *((MAX_BUFFERED, "the TCP send buffer holds") if self.stream
                               else (MAX_LINE, "a datagram carries")), line)
        self.too_long += 1

    async def flush(self) -> None:
        """In chunks, letting requests run between them: with many stats keys or a busy interval (a line per
        call), building every line at once would stall the loop. Counters are taken even when sending fails,
        as gostats latches them."""
        changed = metrics.take_changed()
        calls = upstream_prometheus.CALLS
        samples, calls.samples = calls.samples or [], []
        sending = None  # None: nothing sent yet; False: resolving, connecting or sending failed, the rest is dropped
        for lines in self._chunks(changed, samples):
            if lines and sending is not False:
                if not await self.ready():
                    sending = False
                elif self.stream:
                    sending = self._write(frame(lines, self._too_long))
                else:
                    sending = self._send(pack(lines, self.target.dogstatsd, self._too_long))
            await asyncio.sleep(0)
        if sending and self.failing:
            self.log.info("statsd: sending to %s:%d again", self.target.host, self.target.port)
            self.failing = False

    def _write(self, blocks: list[bytes]) -> bool:
        """Into the connection's buffer, which the loop sends as the peer reads: never waits, so a statsd that
        stopped reading costs at most MAX_BUFFERED bytes and no request a moment."""
        assert self.transport is not None and self.connection is not None
        where = f"{self.target.host}:{self.target.port}"
        if self.connection.lost or self.transport.is_closing():
            self._failed(f"the TCP connection to {where} was lost")
            self.close()  # connect again at the next flush
            return False
        for block in blocks:
            waiting = self.transport.get_write_buffer_size()
            if waiting + len(block) > MAX_BUFFERED:
                self._failed(f"{where} is not reading: {waiting} bytes are waiting")
                return False
            self.transport.write(block)  # whole lines only, so the stream stays line by line whatever is dropped
        return True

    def _send(self, datagrams: list[bytes]) -> bool:
        assert self.sock is not None and self.address is not None
        for datagram in datagrams:
            try:
                self.sock.sendto(datagram, self.address)
            except BlockingIOError:
                continue  # the socket buffer is full: this datagram is lost, as a UDP packet may be
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:  # this datagram only (pack keeps lines within MAX_LINE)
                    self._too_long(datagram.decode(errors="replace"))
                    continue
                self._failed(f"cannot send to {self.target.host}:{self.target.port}: {exc}")
                self.address = None  # resolve again at the next flush
                return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Every flush interval until stop. A flush under way when stop is set ends first: it has taken its
        counts (metrics.take_changed), and only it can send them. The service then flushes once more (finish)."""
        await self.ready()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.target.flush_interval)
            if stop.is_set():
                return
            try:
                await self.flush()
            except Exception:  # a bug here must not end the loop that sends every later stat
                self.log.exception("statsd flush failed")

    def start(self, stop: asyncio.Event) -> None:
        """run() as a task of its own, not one the service runtime cancels at shutdown: cancelled mid-flush, it
        would lose the counts it had taken and not sent yet."""
        self.task = asyncio.create_task(self.run(stop))

    async def finish(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """At shutdown, once stop is set and the gRPC server has stopped: lets the flush in progress end, sends
        what the last calls counted, and waits for the TCP connection to pass it on; all within `timeout`, so a
        statsd that hangs cannot hold the service's exit."""
        deadline = asyncio.get_running_loop().time() + timeout
        if self.task is not None:
            done, _ = await asyncio.wait({self.task}, timeout=timeout)
            if not done:
                self.log.warning("statsd: the flush in progress did not end within %gs at shutdown; its stats "
                                 "are dropped", timeout)
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
            elif not self.task.cancelled() and (exc := self.task.exception()) is not None:
                self.log.error("statsd: the flusher had ended: %r", exc)
        try:
            async with asyncio.timeout_at(deadline):
                await self.flush()
                await self._drain()
        except TimeoutError:
            self.log.warning("statsd: the last flush was not sent within %gs at shutdown", timeout)
        except Exception:
            self.log.exception("statsd: the last flush failed")
        self.close()

    async def _drain(self) -> None:
        """Until the TCP buffer is written out: the process exits next, and what is left in it would be lost."""
        while (self.transport is not None and self.connection is not None and not self.connection.lost
               and self.transport.get_write_buffer_size()):
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.transport is not None:
            self.transport.close()  # sends what is buffered while the loop runs, then closes
            self.transport = None
            self.connection = None
