"""The RLQS server (ratelimit_svc.rlqs.QuotaServer) on a real gRPC port, in a thread of the test process, so
tests can give it short timings (a stale stream, an idle bucket) and read what it holds; and a minimal
gateway speaking the RLQS protocol over a real channel, for the other side of a split or for reports no
Envoy would send."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw.envoy_quota import RLQS_HEALTH_SERVICE
from igw.procs import free_port
from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.rlqs import QuotaBudgets, QuotaServer


class QuotaServerThread:
    def __init__(self, holder: ConfigHolder, redis_url: str | None, **options: Any) -> None:
        self.holder, self.redis_url, self.options = holder, redis_url, options
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server: QuotaServer | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.server = QuotaServer(QuotaBudgets(self.holder, None), self.redis_url, **self.options)
        grpc_server = grpc.aio.server()
        rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(self.server, grpc_server)
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, grpc_server)
        for name in ("", RLQS_HEALTH_SERVICE):
            await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
        grpc_server.add_insecure_port(f"127.0.0.1:{self.port}")
        await grpc_server.start()
        self._ready.set()
        try:
            await self.server.run(self._stop)
        finally:
            await grpc_server.stop(0)
            await self.server.close()

    def start(self) -> QuotaServerThread:
        self._thread.start()
        assert self._ready.wait(10), "the RLQS server did not start"
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[QuotaServer], Any]) -> Any:
        """`fn(server)` on the server's loop, so what it reads is not changing under it."""
        async def inside() -> Any:
            assert self.server is not None
            return fn(self.server)

        return asyncio.run_coroutine_threadsafe(inside(), self.loop).result(10)

    def buckets_of_streams(self) -> list[set[str]]:
        return self.call(lambda s: [set(st.buckets) for st in s.streams.values()])


Usage = rlqs_pb2.RateLimitQuotaUsageReports.BucketQuotaUsage


def usage(bucket: dict[str, str], requests: int, seconds: float = 5.0) -> Usage:
    whole = int(seconds)
    return Usage(
        bucket_id=rlqs_pb2.BucketId(bucket=bucket), num_requests_allowed=requests,
        time_elapsed=duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9)))


def reports(domain: str, *usages: Usage) -> rlqs_pb2.RateLimitQuotaUsageReports:
    return rlqs_pb2.RateLimitQuotaUsageReports(domain=domain, bucket_quota_usages=list(usages))


@dataclass
class RawGateway:
    """One RLQS stream over a real channel: reports go in when sent, assignments are collected as they come."""

    target: str
    received: list[rlqs_pb2.RateLimitQuotaResponse] = field(default_factory=list)
    status: grpc.StatusCode | None = None
    details: str = ""
    _outgoing: queue.Queue[rlqs_pb2.RateLimitQuotaUsageReports | bytes | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self._channel = grpc.insecure_channel(self.target)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[bytes]:
        while (item := self._outgoing.get()) is not None:
            yield item if isinstance(item, bytes) else item.SerializeToString()

    def _consume(self) -> None:
        method = self._channel.stream_stream(
            "/envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas",
            request_serializer=None, response_deserializer=rlqs_pb2.RateLimitQuotaResponse.FromString)
        call = method(self._requests())
        try:
            for response in call:
                self.received.append(response)
            self.status = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.status, self.details = exc.code(), exc.details() or ""
        finally:
            self._done.set()

    def send(self, report: rlqs_pb2.RateLimitQuotaUsageReports | bytes) -> None:
        """A report, or the bytes of one (for what no message class would write)."""
        self._outgoing.put(report)

    def ended(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def rate(self, bucket: dict[str, str]) -> float | None:
        """Per second, of the last token bucket assigned to `bucket` (None: none yet, or not a token bucket)."""
        for response in reversed(self.received):
            for action in response.bucket_action:
                if dict(action.bucket_id.bucket) == bucket and action.HasField("quota_assignment_action"):
                    strategy = action.quota_assignment_action.rate_limit_strategy
                    if not strategy.HasField("token_bucket"):
                        return None
                    tb = strategy.token_bucket
                    return tb.tokens_per_fill.value / max(1, tb.fill_interval.seconds)
        return None

    def close(self) -> None:
        self._outgoing.put(None)
        self._done.wait(5)
        self._channel.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: Callable[[], None] | None = None) -> None:
    """Poll `condition` until it holds (calling `every` between polls, e.g. to keep a gateway reporting)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        if every is not None:
            every()
        time.sleep(0.2)
