"""A small asyncio Redis client built for the request path.

redis-py's asyncio pipeline costs ~200 µs of Python CPU per call (see PERF_NOTES.md). Here one TCP
connection is shared by every concurrent request: each caller writes its commands straight onto the
socket and gets a future; replies are parsed by hiredis and handed back in FIFO order. Concurrent
callers therefore share round trips without any explicit batching step, and one caller's several
commands (one per descriptor) always cost a single round trip.

A timeout or a socket error poisons the connection (replies could no longer be matched to callers), so
it is closed, every pending caller fails fast, and the next call reconnects, with a short back-off
so a dead Redis costs callers a quick error instead of a connect timeout each.

TLS: a rediss:// URL. Its options ride in the query under redis-py's names (ssl_ca_certs, ssl_certfile,
ssl_keyfile, ssl_cert_reqs, ssl_check_hostname), so the one URL configures this client and the redis-py
clients of the same service (replica state, RLQS, ext_proc's stores) alike.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlparse

import hiredis

# TLS files are loaded and checked in igw/tls.py (ratelimit_svc/settings.py still imports these names from here).
from igw.tls import TlsFileError, load_ca_file, load_key_pair

Command = tuple[bytes | str | int | float, ...]

log = logging.getLogger("igw.redis")


class RedisError(Exception):
    """Redis could not answer: unreachable, timed out, or replied with an error."""


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


@dataclass(frozen=True)
class RedisTls:
    """How to talk TLS to one Redis: the server is verified against the system's CAs plus ca_file (as
    upstream's REDIS_TLS_CACERT does), cert_file/key_file are our client certificate (Redis with
    tls-auth-clients), check_hostname=False checks the chain but not the name (upstream's
    REDIS_TLS_SKIP_HOSTNAME_VERIFICATION), cert_reqs="none" checks nothing."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    cert_reqs: str = "required"
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """The client context; TlsFileError if a file is unreadable or not PEM."""
        context = ssl.create_default_context()
        if self.cert_reqs == "none" or not self.check_hostname:
            context.check_hostname = False
        context.verify_mode = _CERT_REQS[self.cert_reqs]
        if self.ca_file:
            load_ca_file(context, self.ca_file, "redis ssl_ca_certs")
        if self.cert_file:
            load_key_pair(context, self.cert_file, self.key_file, "redis ssl_certfile", "redis ssl_keyfile")
        elif self.key_file:
            raise TlsFileError(f"redis ssl_keyfile {self.key_file}: given without ssl_certfile")
        return context

    def query(self) -> str:
        """The URL query that spells these options for parse_redis_url and redis-py."""
        params = [("ssl_ca_certs", self.ca_file), ("ssl_certfile", self.cert_file), ("ssl_keyfile", self.key_file)]
        parts = [f"{name}={quote(value, safe='/')}" for name, value in params if value]
        if self.cert_reqs != "required":
            parts.append(f"ssl_cert_reqs={self.cert_reqs}")
        if not self.check_hostname:
            parts.append("ssl_check_hostname=false")
        return "&".join(parts)


def masked_url(url: str) -> str:
    """`url` as an error message may show it: a password in it replaced by ***, as a bad URL stops the
    start with a line that lands in the logs."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    user = parsed.username or ""
    host = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=f"{user}:***@{host}").geturl()


def _parse_tls(url: str, query: dict[str, list[str]]) -> RedisTls:
    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    cert_reqs = (one("ssl_cert_reqs") or "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"redis url {masked_url(url)!r}: ssl_cert_reqs must be none, optional or required")
    check = (one("ssl_check_hostname") or "true").lower()
    if check not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"redis url {masked_url(url)!r}: ssl_check_hostname must be true or false")
    return RedisTls(one("ssl_ca_certs"), one("ssl_certfile"), one("ssl_keyfile"), cert_reqs,
                    check in ("true", "1", "yes"))


def with_tls(url: str, tls: RedisTls) -> str:
    """`url` turned into a rediss:// URL carrying `tls`'s options; options the URL already spells
    itself win (a shard with a CA of its own keeps it). Unix socket URLs are refused: Redis serves
    TLS on TCP only."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        raise ValueError(f"redis url {masked_url(url)!r}: TLS needs a TCP redis:// URL, not a unix socket")
    query = parse_qs(parsed.query)
    extra = [part for part in tls.query().split("&") if part and part.split("=", 1)[0] not in query]
    merged = "&".join(p for p in (parsed.query, *extra) if p)
    return parsed._replace(scheme="rediss", query=merged).geturl()


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int = 0
    password: str | None = None
    username: str | None = None
    unix_path: str | None = None
    tls: RedisTls | None = None

    @property
    def url(self) -> str:
        """For logs and errors, which reach operators' log stores, /healthcheck and gRPC status messages:
        the password masked, no TLS options (paths only add noise there). Not a URL to connect with."""
        auth = f"{quote(self.username or '', safe='')}:***@" if self.password else ""
        if self.unix_path:
            return f"unix://{auth}{self.unix_path}?db={self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Accept redis://[[user]:password@]host[:port][/db], the same with rediss:// (TLS, options in the
    query: see the module docstring) and unix:///path?db=N; reject anything else. The TLS files are
    loaded once here, so a missing or malformed one is reported where the URL is given (at startup)."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query, keep_blank_values=True)
    tls_options = sorted(name for name in _TLS_QUERY if name in query)
    if parsed.scheme in ("unix", "redis") and tls_options:
        raise ValueError(f"redis url {masked_url(url)!r}: {', '.join(tls_options)}: TLS options need a rediss:// URL")
    known = ("db",) if parsed.scheme == "unix" else _TLS_QUERY
    if unknown := sorted(name for name in query if name not in known):
        # redis-py (the service's other clients of the same URL) would act on options this client ignores
        # (ssl_ca_path, ssl_min_version, db=...) or take them as strings: refused rather than half-applied.
        raise ValueError(f"redis url {masked_url(url)!r}: unknown option {unknown[0]!r} (known: {', '.join(known)})")
    if repeated := sorted(name for name, values in query.items() if len(values) > 1):
        raise ValueError(f"redis url {masked_url(url)!r}: option {repeated[0]!r} given more than once")
    if parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError(f"redis url {masked_url(url)!r}: unix socket path is empty")
        db = 0
        for part in parsed.query.split("&"):
            if part.startswith("db="):
                db = _parse_db(url, part[3:])
        return RedisAddress("", 0, db, parsed.password and unquote(parsed.password), None, parsed.path)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"redis url {masked_url(url)!r}: scheme must be redis:// or unix:// (rediss:// for TLS)")
    if not parsed.hostname:
        raise ValueError(f"redis url {masked_url(url)!r}: host is missing")
    try:
        port = 6379 if parsed.port is None else parsed.port
    except ValueError as exc:
        raise ValueError(f"redis url {masked_url(url)!r}: invalid port") from exc
    if port == 0:  # not "the default": a server never listens there
        raise ValueError(f"redis url {masked_url(url)!r}: port must be 1-65535, got 0")
    path = parsed.path.lstrip("/")
    db = _parse_db(url, path) if path else 0
    password = unquote(parsed.password) if parsed.password else None
    username = unquote(parsed.username) if parsed.username else None
    tls = _parse_tls(url, query) if parsed.scheme == "rediss" else None
    if tls is not None:
        tls.context()
    return RedisAddress(parsed.hostname, port, db, password, username, tls=tls)


MAX_DB = 2**31 - 1  # SELECT takes a C int; the server's `databases` setting bounds it further


def _parse_db(url: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"redis url {masked_url(url)!r}: database must be a number, got {text!r}")
    if int(text) > MAX_DB:
        raise ValueError(f"redis url {masked_url(url)!r}: database {text} is out of range (at most {MAX_DB})")
    return int(text)


def encode_command(args: Command) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        data = arg if kind is bytes else (arg.encode() if kind is str else str(arg).encode())  # type: ignore[union-attr]
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Batch:
    __slots__ = ("deadline", "future", "remaining", "replies")

    def __init__(self, future: asyncio.Future[list[object]], count: int, deadline: float) -> None:
        self.future = future
        self.remaining = count
        self.deadline = deadline
        self.replies: list[object] = []


class _RespProtocol(asyncio.Protocol):
    def __init__(self, on_lost: callable) -> None:  # type: ignore[valid-type]
        self.reader = hiredis.Reader()
        self.pending: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.outgoing: list[bytes] = []  # commands of this loop iteration, written together
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not pending:  # a reply nobody waits for: the stream is out of sync
                self._on_lost(RedisError("redis sent an unexpected reply"))
                return
            batch = pending[0]
            batch.replies.append(reply)
            batch.remaining -= 1
            if batch.remaining == 0:
                pending.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(RedisError(f"redis connection lost: {exc or 'closed by server'}"))

    def fail_all(self, exc: Exception) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.pending:
            batch = self.pending.popleft()
            if not batch.future.done():
                batch.future.set_exception(exc)


class CommandRunner:
    """What the counters need of a Redis: commands pipelined in one write. PipelinedRedis is one connection;
    igw/redis_sentinel.py's SentinelRedis is one that follows a sentinel-managed master."""

    async def execute_many(self, commands: list[Command]) -> list[object]:
        raise NotImplementedError

    async def execute(self, *command: bytes | str | int | float) -> object:
        reply = (await self.execute_many([command]))[0]
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply


def retrieve_failure(task: asyncio.Task[None]) -> None:
    """Done-callback of a background task whose failure is kept elsewhere (a `last_error` for health pages):
    mark the exception retrieved, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class PipelinedRedis(CommandRunner):
    """One shared, self-healing, pipelined connection. Safe for any number of concurrent callers."""

    def __init__(
        self,
        address: RedisAddress | str,
        *,
        timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retry_backoff: float = 0.2,
    ) -> None:
        self.address = parse_redis_url(address) if isinstance(address, str) else address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry_backoff = retry_backoff
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Future[_RespProtocol] | None = None
        self._next_attempt = 0.0
        self._last_error: Exception | None = None
        self._ssl: ssl.SSLContext | None = None
        self._logged_error = ""
        self.errors = 0

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    @property
    def last_error(self) -> str:
        """Why the last connection attempt failed (a refused TLS certificate, say), for health pages."""
        return str(self._last_error) if self._last_error is not None else ""

    async def _connect(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if now < self._next_attempt:
            raise RedisError(f"redis at {self.address.url} unavailable (retrying): {self._last_error}")
        protocol = _RespProtocol(self._lost)
        try:
            if self.address.unix_path:
                coro = loop.create_unix_connection(lambda: protocol, self.address.unix_path)
            elif self.address.tls is not None:
                if self._ssl is None:
                    self._ssl = self.address.tls.context()
                coro = loop.create_connection(lambda: protocol, self.address.host, self.address.port,
                                              ssl=self._ssl, server_hostname=self.address.host)
            else:
                coro = loop.create_connection(lambda: protocol, self.address.host, self.address.port)
            await asyncio.wait_for(coro, self.connect_timeout)
            setup: list[Command] = []
            if self.address.password:
                if self.address.username:
                    setup.append(("AUTH", self.address.username, self.address.password))
                else:
                    setup.append(("AUTH", self.address.password))
            if self.address.db:
                setup.append(("SELECT", self.address.db))
            if setup:
                replies = await self._send(protocol, setup, self.connect_timeout)
                for reply in replies:
                    if isinstance(reply, hiredis.ReplyError):
                        raise RedisError(f"redis setup failed: {reply}")
        except (TimeoutError, OSError, RedisError, TlsFileError) as exc:
            if protocol.transport is not None:
                protocol.transport.abort()
            self._last_error = exc if not isinstance(exc, asyncio.TimeoutError) else RedisError("connect timeout")
            self._next_attempt = time.monotonic() + self.retry_backoff
            self.errors += 1
            if str(self._last_error) != self._logged_error:  # once per cause, not once per retry
                self._logged_error = str(self._last_error)
                log.warning("cannot connect to redis at %s: %s", self.address.url, self._last_error)
            raise RedisError(f"cannot connect to redis at {self.address.url}: {self._last_error}") from exc
        self._logged_error = ""
        self._protocol = protocol
        return protocol

    def _lost(self, exc: Exception) -> None:
        protocol = self._protocol
        self._protocol = None
        if protocol is not None:
            if protocol.transport is not None:
                protocol.transport.abort()
            protocol.fail_all(exc)

    async def _get_protocol(self) -> _RespProtocol:
        protocol = self._protocol
        if protocol is not None:
            return protocol
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            self._connecting = loop.create_future()
            try:
                protocol = await self._connect()
                self._connecting.set_result(protocol)
            except Exception as exc:
                self._connecting.set_exception(exc)
                self._connecting.exception()  # mark retrieved
                raise
            finally:
                self._connecting = None
            return protocol
        return await asyncio.shield(self._connecting)

    async def _send(self, protocol: _RespProtocol, commands: list[Command], timeout: float) -> list[object]:
        """Replies come back in order, so only the oldest pending batch can be the first to time out: one
        watchdog per connection checks it, instead of a timer per call (timers cost more than the call)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[object]] = loop.create_future()
        protocol.pending.append(_Batch(future, len(commands), loop.time() + timeout))
        if not protocol.outgoing:
            # Coalesce: every caller of this event-loop iteration shares one write (one syscall).
            loop.call_soon(self._flush, protocol)
        protocol.outgoing.extend([encode_command(c) for c in commands])
        if protocol.watchdog is None:
            protocol.watchdog = loop.call_later(timeout / 4, self._watch, protocol)
        return await future

    @staticmethod
    def _flush(protocol: _RespProtocol) -> None:
        data, protocol.outgoing = protocol.outgoing, []
        if protocol.transport is not None and not protocol.transport.is_closing():
            protocol.transport.write(b"".join(data))

    def _watch(self, protocol: _RespProtocol) -> None:
        protocol.watchdog = None
        if not protocol.pending:
            return
        loop = asyncio.get_running_loop()
        if protocol.pending[0].deadline <= loop.time():
            self.errors += 1
            error = RedisError(f"redis at {self.address.url} did not answer within {self.timeout * 1000:.0f} ms")
            if self._protocol is protocol:
                self._lost(error)
            else:
                protocol.fail_all(error)
            return
        protocol.watchdog = loop.call_later(self.timeout / 4, self._watch, protocol)

    async def execute_many(self, commands: list[Command]) -> list[object]:
        """Send all commands in one write and return their replies; Redis error replies are returned."""
        protocol = await self._get_protocol()
        try:
            return await self._send(protocol, commands, self.timeout)
        except RedisError:
            self.errors += 1
            raise

    async def ping(self) -> bool:
        try:
            return await self.execute("PING") in (b"PONG", "PONG")
        except RedisError:
            return False

    def close(self) -> None:
        if self._protocol is not None:
            self._lost(RedisError("connection closed by client"))
