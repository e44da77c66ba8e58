"""Redis Cluster for the request path: which master holds a key, and one pipelined write per master.

A cluster splits the key space into 16384 slots (CRC16/XMODEM of the key, or of its `{hash tag}`, mod
16384) and each master serves some of them. The slot map is read with CLUSTER SLOTS from the first node
that answers (the masters already known, then the seeds) at start, after a MOVED reply, and when a
node's connection fails; between those it is trusted as it is, and a stale entry costs one MOVED.

Each master gets one PipelinedRedis (igw/redis_conn.py), created when the first command goes to it and
closed when the master leaves the map. Replicas are never read from: counters must be read where they
are written. Redirections are followed, up to MAX_REDIRECTS per command (a slot moved again while the map
was stale gives MOVED then ASK; a migration finished or aborted between an ASK and the ASKING gives ASK then
MOVED; a bound, because nodes that disagree can send a command back and forth for as long as they do):
  - MOVED slot host:port: the slot has a new owner for good. The map entry is updated at once (the next
    requests go straight there), a full refresh runs in the background, and the command is sent again to
    the named node.
  - ASK slot host:port: the slot is being migrated and this key already left. ASKING and the command go
    to the named node; the map is left as it is (the slot is still the old owner's until the migration ends).
  - A redirection with no host (`:port`, sent under cluster-preferred-endpoint-type unknown-endpoint, or
    `?:port` for an unset hostname) names a node on the host of the node that sent it.
  - NOSCRIPT: the node restarted or flushed its scripts; the scripts given at construction are loaded on
    it and the command is sent again.
Anything else (TRYAGAIN while a multi-key slot is half migrated, CLUSTERDOWN) is the command's reply: the
caller knows which commands can be split into single-key ones (ratelimit_svc/counters.py does for TRYAGAIN).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence

import hiredis

from igw.redis_conn import Command, PipelinedRedis, RedisAddress, RedisError, parse_redis_url, retrieve_failure

SLOTS = 16384
# A map refresh asked for within this long of the previous one reuses it: a burst of MOVED replies or of
# failed calls (every request touching a dead node) must not turn into a burst of CLUSTER SLOTS.
REFRESH_MIN_INTERVAL = 0.2
# Redirections followed per command; redis-py allows a few more, but two hops cover every single change of
# the slot map (MOVED then ASK, ASK then MOVED) and one spare covers a second change during the first.
MAX_REDIRECTS = 3
# Hosts a node announces when it has none to give: RESP null (unknown-endpoint), "" or "?" (hostname
# preferred but unset). The node is then on the host the client already reached.
NO_HOST = (None, b"", "", b"?", "?")

log = logging.getLogger("igw.redis_cluster")


def key_slot(key: str | bytes) -> int:
    """The slot Redis Cluster puts `key` in: CRC16/XMODEM (binascii's CRC-CCITT with a zero start is that
    CRC) of the key, or of the text between the first `{` and the next `}` when that is not empty."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return binascii.crc_hqx(data, 0) & (SLOTS - 1)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_slots_reply(reply: object, asked_host: str) -> tuple[list[str | None], list[str]]:
    """(owner of each slot, masters in order of first appearance) from a CLUSTER SLOTS reply. A master
    announced without a host (null under cluster-preferred-endpoint-type unknown-endpoint, "?" or "" when
    the preferred hostname is unset) is on the host that was asked, as the command's documentation says."""
    if not isinstance(reply, list):
        raise RedisError(f"unexpected CLUSTER SLOTS reply: {reply!r}")
    owners: list[str | None] = [None] * SLOTS
    masters: list[str] = []
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], list) or len(entry[2]) < 2:
            raise RedisError(f"unexpected CLUSTER SLOTS entry: {entry!r}")
        start, end = int(entry[0]), int(entry[1])
        announced = entry[2][0]
        host = asked_host if announced in NO_HOST else _text(announced)
        name = f"{host}:{int(entry[2][1])}"
        if name not in masters:
            masters.append(name)
        for slot in range(start, end + 1):
            owners[slot] = name
    return owners, masters


def _split_name(name: str) -> tuple[str, int]:
    host, _, port = name.rpartition(":")
    return host.strip("[]"), int(port)


def redirect_target(target: str, sender: str) -> str:
    """The node a MOVED/ASK `target` ("host:port") names; with no host (":port", "?:port") it is on the host
    of `sender`, the node that answered with the redirection."""
    host, _, port = target.rpartition(":")
    if host in ("", "?"):
        return f"{_split_name(sender)[0]}:{port}"
    return target


class RedisCluster:
    """The masters of one Redis Cluster, each behind its own pipelined connection. Every node is reached
    with the credentials and TLS settings of the first seed (a cluster's nodes share them). `label` names the
    cluster in logs and errors, so that a service with two clusters (the rate-limit service's main and
    per-second ones) says which one a line is about."""

    def __init__(self, seeds: Sequence[RedisAddress | str], *, timeout: float = 0.5, connect_timeout: float = 0.5,
                 scripts: Sequence[str] = (), label: str = "redis cluster") -> None:
        if not seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        self.label = label
        self.seeds = [parse_redis_url(seed) if isinstance(seed, str) else seed for seed in seeds]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.scripts = tuple(scripts)
        self.owners: list[str | None] = [None] * SLOTS
        self.masters: list[str] = []
        self.nodes: dict[str, PipelinedRedis] = {}
        self.last_error = ""  # why the last map refresh failed, for health pages
        self.refreshes = 0
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = -REFRESH_MIN_INTERVAL

    # -- topology ----------------------------------------------------------------------------------

    @property
    def mapped(self) -> bool:
        return bool(self.masters)

    @property
    def complete(self) -> bool:
        """Every slot has a master in the map (else calls on the others fail until a refresh finds one)."""
        return bool(self.masters) and not self.last_error

    def node_of(self, slot: int) -> str | None:
        return self.owners[slot]

    def address_of(self, name: str) -> RedisAddress:
        host, port = _split_name(name)
        return dataclasses.replace(self.seeds[0], host=host, port=port, db=0)

    def connection(self, name: str) -> PipelinedRedis:
        redis = self.nodes.get(name)
        if redis is None:
            redis = self.nodes[name] = PipelinedRedis(self.address_of(name), timeout=self.timeout,
                                                      connect_timeout=self.connect_timeout)
        return redis

    async def refresh(self) -> None:
        """Read the slot map now (joining a refresh already running); RedisError when no node answers."""
        task = self._refresh
        if task is None or task.done():
            task = self._refresh = asyncio.create_task(self._read_map())
            task.add_done_callback(retrieve_failure)
        await asyncio.shield(task)

    def refresh_soon(self) -> None:
        """A refresh in the background, unless one is running or the last one is very recent."""
        if self._refresh is not None and not self._refresh.done():
            return
        if time.monotonic() - self._refreshed_at < REFRESH_MIN_INTERVAL:
            return
        self._refresh = asyncio.create_task(self._read_map())
        self._refresh.add_done_callback(retrieve_failure)

    async def _read_map(self) -> None:
        self._refreshed_at = time.monotonic()
        self.refreshes += 1
        known = list(self.masters)
        seeds = [f"{seed.host}:{seed.port}" for seed in self.seeds]
        errors: list[str] = []
        partial: tuple[int, list[str | None], list[str]] | None = None
        for name in dict.fromkeys([*known, *seeds]):
            temporary = name not in self.nodes
            redis = self.connection(name) if not temporary else PipelinedRedis(
                self.address_of(name), timeout=self.timeout, connect_timeout=self.connect_timeout)
            try:
                reply = await redis.execute("CLUSTER", "SLOTS")
                owners, masters = parse_slots_reply(reply, redis.address.host)
            except RedisError as exc:
                errors.append(f"{name}: {exc}")
                continue
            finally:
                if temporary:
                    redis.close()
            if not masters:
                errors.append(f"{name}: no slot is assigned (cluster not created yet?)")
                continue
            unassigned = owners.count(None)
            if unassigned:  # a node that has not heard of every master yet (a cluster being formed): ask on
                errors.append(f"{name}: {unassigned} slots without a master")
                if partial is None or unassigned < partial[0]:
                    partial = (unassigned, owners, masters)
                continue
            self._install(owners, masters)
            self.last_error = ""
            return
        if partial is not None:
            self._install(partial[1], partial[2])
            self.last_error = f"{partial[0]} slots have no master in the cluster map"
            return
        self.last_error = "no node of the cluster answered CLUSTER SLOTS (" + "; ".join(errors) + ")"
        raise RedisError(self.last_error)

    def _install(self, owners: list[str | None], masters: list[str]) -> None:
        if masters != self.masters:
            log.info("%s masters: %s", self.label, ", ".join(masters))
        self.owners, self.masters = owners, masters
        for name in [name for name in self.nodes if name not in masters]:
            self.nodes.pop(name).close()

    # -- commands ----------------------------------------------------------------------------------

    async def execute_many(self, name: str, commands: list[Command]) -> list[object]:
        """Send `commands` to master `name` in one write and return their replies, with MOVED and ASK
        followed up to MAX_REDIRECTS times per command and NOSCRIPT once per node (the redirected commands
        of a hop go out together, one write per node). A command still redirected after that gets an
        error reply saying so. RedisError when a node cannot be reached; a map refresh is then started."""
        replies = await self._run(name, commands, asking=False)
        senders = dict.fromkeys(range(len(commands)), name)  # the node that gave each pending reply
        for hop in range(MAX_REDIRECTS + 1):
            moved: dict[tuple[str, bool], list[int]] = {}
            for i, sender in senders.items():
                reply = replies[i]
                if isinstance(reply, hiredis.ReplyError):
                    text = str(reply)
                    if text.startswith(("MOVED ", "ASK ")):
                        kind, slot, target = text.split(" ", 2)
                        target = redirect_target(target, sender)
                        ask = kind == "ASK"
                        if not ask:
                            self.owners[int(slot)] = target
                        moved.setdefault((target, ask), []).append(i)
            if not moved:
                break
            if hop == MAX_REDIRECTS:
                for indexes in moved.values():
                    for i in indexes:
                        replies[i] = hiredis.ReplyError(
                            f"{replies[i]} (still redirected after {MAX_REDIRECTS} redirections: the cluster's "
                            "slot map is changing or its nodes disagree about it)")
                break
            if any(not ask for _, ask in moved):
                self.refresh_soon()
            hops = list(moved.items())
            again = await asyncio.gather(*(self._run(target, [commands[i] for i in indexes], asking=ask)
                                           for (target, ask), indexes in hops))
            senders = {}
            for ((target, _), indexes), part in zip(hops, again, strict=True):
                for i, reply in zip(indexes, part, strict=True):
                    replies[i] = reply
                    senders[i] = target
        return replies

    async def _run(self, name: str, commands: list[Command], *, asking: bool) -> list[object]:
        redis = self.connection(name)
        wire = [c for command in commands for c in (("ASKING",), command)] if asking else commands
        try:
            replies = await redis.execute_many(wire)
            if asking:
                replies = replies[1::2]
            missing = [i for i, reply in enumerate(replies)
                       if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")]
            if missing and self.scripts:
                await redis.execute_many([("SCRIPT", "LOAD", script) for script in self.scripts])
                resend = [commands[i] for i in missing]
                wire = [c for command in resend for c in (("ASKING",), command)] if asking else resend
                again = await redis.execute_many(wire)
                for i, reply in zip(missing, again[1::2] if asking else again, strict=True):
                    replies[i] = reply
        except RedisError:
            self.refresh_soon()
            raise
        return replies

    async def ping_all(self) -> dict[str, bool]:
        """Every master of the map and whether it answered a PING; the map is read first if it is empty
        (no seed answered so far) or incomplete. Empty when there is still no map."""
        if not self.complete:
            with contextlib.suppress(RedisError):
                await self.refresh()
        masters = list(self.masters)
        up = await asyncio.gather(*(self.connection(name).ping() for name in masters))
        if not all(up):
            self.refresh_soon()
        return dict(zip(masters, up, strict=True))

    def shown(self, name: str) -> str:
        """A node as logs and /healthcheck name it: its URL without the password."""
        return self.address_of(name).url

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        for redis in self.nodes.values():
            redis.close()
        self.nodes.clear()
