"""Redis Sentinel for the request path: the master that the sentinels name, behind one pipelined connection.

Upstream's REDIS_TYPE=sentinel names a master and its sentinels in one setting ("mymaster,host1:26379,...").
The master's address is asked with SENTINEL GET-MASTER-ADDR-BY-NAME from the sentinels in the order given,
and the first address that answers ROLE as a master wins (a sentinel that is down, refuses our credentials,
does not know the name, or names a replica, is skipped for the next: a sentinel cut off from the others
keeps naming the master of before a failover); the sentinel that named it is asked first from then on.
Counters then go to that master over a PipelinedRedis (igw/redis_conn.py), exactly as to a single Redis;
only the failover cases add work:
  - the master's connection fails or times out: the sentinels are asked again in the background, and the
    calls meanwhile fail (UNAVAILABLE, or pass with --fail-open) as with a single Redis that is down;
  - it answers READONLY or MASTERDOWN (a demoted master, now a replica of the new one): asked again the
    same way;
  - the health probe sends PING and ROLE: a master still LOADING its dataset (it answers ROLE, but fails
    every other command) turns the health check to 503 naming that, and so does a demoted master that
    still answers, until the new master is known; the probe re-asks the sentinels every RECHECK_INTERVAL
    even when all looks well: an old master that survived a failover keeps answering as a master until
    the sentinels get round to demoting it.
Asks are never closer than ASK_MIN_INTERVAL: a burst of failed calls costs the sentinels one question.

The platform's state Redis (replica counts, RLQS demand) talks to the same master through redis-py's own
sentinel support (`state_redis_client`). Its pool would move only on a connection error or READONLY, so an
old master that survives a failover would keep the state while the counters moved on: the pool takes the
master that a SentinelRedis of the same target uses, and is disconnected whenever that one switches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import hiredis

from igw.redis_conn import (
    Command,
    CommandRunner,
    PipelinedRedis,
    RedisAddress,
    RedisError,
    parse_redis_url,
    retrieve_failure,
)

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.sentinel import SentinelConnectionPool

# At most this many asks per second reach the sentinels from one process, however many calls fail.
ASK_MIN_INTERVAL = 0.25
# The health probe asks again after this long even when the master answers as a master: after a failover,
# the sentinels demote a surviving old master only when they next look at it (seconds later), and until then
# it accepts writes that its resync with the new master then drops.
RECHECK_INTERVAL = 1.0

# The host of SentinelTarget.master_url: replaced by the address a sentinel names before any connection.
MASTER_PLACEHOLDER = "sentinel-master"

log = logging.getLogger("igw.redis_sentinel")

# Per target, the master a SentinelRedis checked and uses, and the state clients' pools that must follow it:
# the state and the counters have to stay on one Redis (see state_redis_client).
_masters: dict[SentinelTarget, tuple[str, int]] = {}
_state_pools: dict[SentinelTarget, weakref.WeakSet[SentinelConnectionPool]] = {}
_disconnects: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class SentinelTarget:
    """A master as REDIS_TYPE=sentinel names it. `sentinels` are redis:// (or rediss://) URLs carrying
    REDIS_SENTINEL_AUTH; `master_url` carries REDIS_AUTH and the TLS options of the master, with
    MASTER_PLACEHOLDER for its host until a sentinel says where it is."""

    master_name: str
    sentinels: tuple[str, ...]
    master_url: str

    @property
    def hosts(self) -> str:
        """The sentinels as operators wrote them, for logs and /healthcheck (no credentials)."""
        return ", ".join(_host_port(parse_redis_url(url)) for url in self.sentinels)


def _host_port(address: RedisAddress) -> str:
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _role(reply: object) -> str:
    """The first word of a ROLE reply, with Redis's legacy "slave" as "replica"."""
    kind = _text(reply[0]) if isinstance(reply, list) and reply else repr(reply)
    return "replica" if kind == "slave" else kind


class SentinelRedis(CommandRunner):
    """The current master of a sentinel-managed Redis. It answers `execute_many`, `execute`, `ping` and
    `close` as a PipelinedRedis does, so the counters use it as a single Redis."""

    def __init__(self, target: SentinelTarget, *, timeout: float = 0.5, connect_timeout: float = 0.5) -> None:
        self.target = target
        self.name = target.master_name
        self.sentinels = [parse_redis_url(url) for url in target.sentinels]
        self.template = parse_redis_url(target.master_url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # One connection per sentinel, kept: an ask costs a round trip, and a sentinel that stays down is
        # logged once per cause rather than at every ask.
        self._sentinel_conns = [PipelinedRedis(address, timeout=timeout, connect_timeout=connect_timeout)
                                for address in self.sentinels]
        self.master: PipelinedRedis | None = None
        self.last_error = ""  # why the last ask found no master, for health pages
        self.problem = ""  # what the last health probe found wrong
        self.asks = 0
        self._ask: asyncio.Task[None] | None = None
        self._asked_at = -ASK_MIN_INTERVAL

    # -- where the master is ---------------------------------------------------------------------

    async def discover(self) -> None:
        """Ask the sentinels now, or join an ask running; an ask finished within ASK_MIN_INTERVAL counts
        as now. RedisError when no sentinel named a master."""
        task = self._ask
        if task is None or task.done():
            if task is not None and time.monotonic() - self._asked_at < ASK_MIN_INTERVAL:
                if self.master is None:
                    raise RedisError(self.last_error or f"no master of {self.name!r} known")
                return
            task = self._start_ask()
        await asyncio.shield(task)

    def discover_soon(self) -> None:
        """An ask in the background, unless one is running or the last one is very recent."""
        if self._ask is not None and not self._ask.done():
            return
        if time.monotonic() - self._asked_at < ASK_MIN_INTERVAL:
            return
        self._start_ask()

    def _start_ask(self) -> asyncio.Task[None]:
        self._asked_at = time.monotonic()
        task = self._ask = asyncio.create_task(self._ask_sentinels())
        task.add_done_callback(retrieve_failure)
        return task

    async def _ask_sentinels(self) -> None:
        self.asks += 1
        errors: list[str] = []
        for sentinel in list(self._sentinel_conns):
            where = _host_port(sentinel.address)
            try:
                reply = await sentinel.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except RedisError as exc:
                errors.append(f"{where}: {exc}")
                continue
            if not isinstance(reply, list) or len(reply) != 2:
                errors.append(f"{where}: does not monitor a master named {self.name!r}")
                continue
            try:
                host, port = _text(reply[0]), int(reply[1])
            except ValueError:
                errors.append(f"{where}: unexpected reply {reply!r}")
                continue
            master, why = await self._checked(host, port)
            if master is None:
                errors.append(f"{where}: names {_host_port(RedisAddress(host=host, port=port))}, {why}")
                continue
            self._use(master, where)
            if sentinel is not self._sentinel_conns[0]:  # ask it first from now on, as the sentinels' guide says
                self._sentinel_conns.remove(sentinel)
                self._sentinel_conns.insert(0, sentinel)
            self.last_error = ""
            self._asked_at = time.monotonic()
            return
        self.last_error = (f"no sentinel named a master {self.name!r} that answers as one (sentinels "
                           f"{self.target.hosts}: " + "; ".join(errors) + ")")
        self._asked_at = time.monotonic()
        raise RedisError(self.last_error)

    async def _checked(self, host: str, port: int) -> tuple[PipelinedRedis | None, str]:
        """A connection to the address a sentinel named, if it answers ROLE as a master, else why not. A
        sentinel on the wrong side of a partition names the master of before the failover, now a replica:
        trusting it would pin the counters to READONLY replies for as long as it stays behind."""
        current = self.master
        if current is not None and (current.address.host, current.address.port) == (host, port):
            conn = current
        else:
            address = dataclasses.replace(self.template, host=host, port=port)
            conn = PipelinedRedis(address, timeout=self.timeout, connect_timeout=self.connect_timeout)
        try:
            role = await conn.execute("ROLE")
        except RedisError as exc:
            why = f"which does not answer ROLE: {exc}"
        else:
            kind = _role(role)
            if kind == "master":
                return conn, ""
            why = f"which is a {kind}"
        if conn is not current:
            conn.close()
        return None, why

    def _use(self, master: PipelinedRedis, sentinel: str) -> None:
        current = self.master
        host, port = master.address.host, master.address.port
        _masters[self.target] = (host, port)
        if master is current:
            return
        self.master = master
        log.log(logging.WARNING if current is not None else logging.INFO,
                "redis sentinel: master %r is at %s:%d (was %s; asked %s)", self.name, host, port,
                f"{current.address.host}:{current.address.port}" if current is not None else "unknown", sentinel)
        if current is not None:
            current.close()
        _follow(self.target, (host, port))

    # -- commands --------------------------------------------------------------------------------

    async def execute_many(self, commands: list[Command]) -> list[object]:
        """As PipelinedRedis.execute_many, on the current master. RedisError while none is known or its
        connection fails; either, and a READONLY reply, has the sentinels asked again."""
        master = self.master
        if master is None:
            self.discover_soon()
            raise RedisError(f"redis sentinel: no master of {self.name!r} known: "
                             f"{self.last_error or 'asking the sentinels'}")
        try:
            replies = await master.execute_many(commands)
        except RedisError:
            self.discover_soon()
            raise
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith(("READONLY", "MASTERDOWN")):
                self.discover_soon()  # a demoted master: the sentinels know the new one, or will soon
                break
        return replies

    async def ping(self) -> bool:
        """For the health probe: a master is known, answers, and is a master. Asks the sentinels when
        no master is known, when it is not one, and every RECHECK_INTERVAL."""
        if self.master is None:
            try:
                await self.discover()
            except RedisError as exc:
                self.problem = str(exc)
                return False
        elif time.monotonic() - self._asked_at > RECHECK_INTERVAL:
            self.discover_soon()
        master = self.master
        if master is None:
            self.problem = self.last_error or f"no master of {self.name!r} known"
            return False
        where = f"master {self.name!r} at {_host_port(master.address)}"
        try:
            # PING as a single Redis is probed, besides ROLE: a master loading its dataset answers ROLE, but
            # PING and every counter command get LOADING.
            pong, role = await master.execute_many([("PING",), ("ROLE",)])
        except RedisError as exc:
            self.problem = f"{where}: {exc}"
            self.discover_soon()
            return False
        kind = _role(role) if isinstance(role, list) else None
        if kind is not None and kind != "master":
            self.problem = f"{where} is a {kind} now (failover)"
            self.discover_soon()
            return False
        if kind is None or pong not in (b"PONG", "PONG"):
            reply = role if kind is None else pong
            self.problem = f"{where}: {_text(reply)}"
            if not str(reply).startswith("LOADING"):  # a master loading its dataset stays the master
                self.discover_soon()
            return False
        self.problem = ""
        return True

    def shown(self) -> str:
        """The master as logs and /healthcheck name it, with what is wrong if anything."""
        where = f" at {_host_port(self.master.address)}" if self.master is not None else ""
        text = f"redis sentinel master {self.name!r}{where} (sentinels {self.target.hosts})"
        problem = self.problem or ("" if self.master is not None else self.last_error or "not found yet")
        return f"{text}: {problem}" if problem else text

    def close(self) -> None:
        if self.master is not None and _masters.get(self.target) == (self.master.address.host,
                                                                      self.master.address.port):
            del _masters[self.target]  # nobody checks it any more: the state clients ask the sentinels again
        if self._ask is not None:
            self._ask.cancel()
        if self.master is not None:
            self.master.close()
        for sentinel in self._sentinel_conns:
            sentinel.close()


def state_redis_client(target: str | SentinelTarget, *, socket_timeout: float,
                       socket_connect_timeout: float) -> aioredis.Redis:
    """A redis-py client of the platform's state Redis: a URL, or the master of a sentinel target. Its pool
    connects to the master that a SentinelRedis of the same target checked and uses, and is dropped when
    that one switches (redis-py alone would move only on a connection error or READONLY, and an old master
    that survives a failover answers neither for seconds); with no such SentinelRedis, redis-py asks the
    sentinels itself."""
    import redis.asyncio as aioredis
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    if isinstance(target, str):
        return aioredis.from_url(target, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout)
    followed = target

    class FollowingPool(SentinelConnectionPool):
        async def get_master_address(self) -> tuple[str, int]:
            known = _masters.get(followed)
            if known is None:
                return await super().get_master_address()  # type: ignore[no-any-return]
            if self.master_address != known:
                self.master_address = known
                await self.disconnect(inuse_connections=False)
            return known

    sentinels = [parse_redis_url(url) for url in target.sentinels]
    first = sentinels[0]
    master = parse_redis_url(target.master_url)
    sentinel_kwargs: dict[str, object] = {"socket_timeout": socket_timeout,
                                          "socket_connect_timeout": socket_connect_timeout,
                                          **_auth_kwargs(first), **_tls_kwargs(first)}
    sentinel = Sentinel([(s.host, s.port) for s in sentinels], sentinel_kwargs=sentinel_kwargs,
                        socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
                        db=master.db, **_auth_kwargs(master), **_tls_kwargs(master))
    client = sentinel.master_for(target.master_name, connection_pool_class=FollowingPool)
    _state_pools.setdefault(target, weakref.WeakSet()).add(client.connection_pool)
    return client


def _follow(target: SentinelTarget, address: tuple[str, int]) -> None:
    """Drop every connection of the state clients of `target`, in use or not (a pub/sub subscription holds
    its connection for good), so that they reconnect to `address`, the master the counters just moved to."""
    for pool in list(_state_pools.get(target, ())):
        if pool.master_address is None or pool.master_address == address:
            continue
        pool.master_address = address
        task = asyncio.get_running_loop().create_task(pool.disconnect(inuse_connections=True))
        _disconnects.add(task)
        task.add_done_callback(_disconnects.discard)
        task.add_done_callback(retrieve_failure)  # a failed disconnect leaves a connection the next error moves


def _auth_kwargs(address: RedisAddress) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    if address.password:
        kwargs["password"] = address.password
        if address.username:
            kwargs["username"] = address.username
    return kwargs


def _tls_kwargs(address: RedisAddress) -> dict[str, object]:
    tls = address.tls
    if tls is None:
        return {}
    kwargs: dict[str, object] = {"ssl": True, "ssl_cert_reqs": tls.cert_reqs, "ssl_check_hostname": tls.check_hostname}
    for name, value in (("ssl_ca_certs", tls.ca_file), ("ssl_certfile", tls.cert_file),
                        ("ssl_keyfile", tls.key_file)):
        if value:
            kwargs[name] = value
    return kwargs
