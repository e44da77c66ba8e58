"""PipelinedRedis, the request-path Redis client: replies reach the right caller, failures are quick and
clear, and a connection that failed heals on the next call. Against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest
import redis

from igw.procs import RedisServer, free_port
from igw.redis_conn import PipelinedRedis, RedisError, encode_command, parse_redis_url


@pytest.mark.asyncio
async def test_concurrent_callers_each_get_their_own_replies(redis_url: str) -> None:
    client = PipelinedRedis(redis_url)
    replies = await asyncio.gather(*(client.execute("ECHO", f"caller-{i}") for i in range(200)))
    assert replies == [f"caller-{i}".encode() for i in range(200)]
    client.close()


@pytest.mark.asyncio
async def test_several_commands_of_one_caller_come_back_in_order_with_error_replies_returned(redis_url: str) -> None:
    client = PipelinedRedis(redis_url)
    replies = await client.execute_many([("SET", "k", "v"), ("INCR", "k"), ("GET", "k")])
    assert replies[0] == b"OK" and replies[2] == b"v"
    assert "not an integer" in str(replies[1])
    with pytest.raises(RedisError, match="not an integer"):
        await client.execute("INCR", "k")
    assert await client.execute("GET", "k") == b"v"  # an error reply does not break the connection
    client.close()


@pytest.mark.asyncio
async def test_the_database_in_the_url_is_selected(redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/3"
    client = PipelinedRedis(url)
    await client.execute("SET", "in-db-3", "yes")
    client.close()
    check = redis.Redis(port=redis_server.port, db=3)
    assert check.get("in-db-3") == b"yes"
    check.delete("in-db-3")
    check.close()


@pytest.mark.asyncio
async def test_a_redis_that_stops_answering_fails_callers_at_the_timeout_and_the_next_call_reconnects(
    own_redis: RedisServer,
) -> None:
    client = PipelinedRedis(own_redis.url, timeout=0.2)
    assert await client.ping()
    os.kill(own_redis.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(RedisError, match="did not answer within 200 ms"):
        await client.execute("PING")
    assert 0.15 < time.monotonic() - started < 1.0
    assert not client.connected  # replies could no longer be matched to callers: the connection is dropped
    os.kill(own_redis.pid, signal.SIGCONT)
    await asyncio.sleep(0.25)  # past the reconnect back-off
    assert await client.execute("PING") == b"PONG"
    client.close()


@pytest.mark.asyncio
async def test_an_unreachable_redis_fails_fast_and_retries_only_after_the_back_off() -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5, retry_backoff=0.3)
    started = time.monotonic()
    with pytest.raises(RedisError, match=re.escape("cannot connect to redis at redis://127.0.0.1")):
        await client.execute("PING")
    with pytest.raises(RedisError, match=re.escape("unavailable (retrying)")):
        await client.execute("PING")
    assert time.monotonic() - started < 0.3


def test_commands_are_encoded_as_resp_arrays_of_bulk_strings() -> None:
    assert encode_command(("SET", b"k\r\n", 12, 1.5)) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n"


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:6379/0", "scheme must be redis:// or unix://"),
    ("redis://127.0.0.1:6379/zero", "database must be a number, got 'zero'"),
    ("redis://127.0.0.1:99999/0", "invalid port"),
    ("redis:///0", "host is missing"),
    ("unix://", "unix socket path is empty"),
    ("redis://127.0.0.1:0/0", "port must be 1-65535, got 0"),
    ("redis://127.0.0.1:6379/99999999999999999999", "database 99999999999999999999 is out of range"),
    ("redis://127.0.0.1:6379/\u00b2", "database must be a number"),
    ("unix:///tmp/r.sock?db=99999999999", "is out of range"),
])
def test_bad_urls_are_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_redis_url(url)


def test_a_url_with_password_and_unix_socket_parses() -> None:
    address = parse_redis_url("unix://:s3cret@/run/redis.sock?db=2")
    assert (address.unix_path, address.db, address.password) == ("/run/redis.sock", 2, "s3cret")
    assert parse_redis_url("redis://user:pw@redis:6380/1").url == "redis://user:***@redis:6380/1"
