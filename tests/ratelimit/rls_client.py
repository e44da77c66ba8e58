"""A ShouldRateLimit client for tests, speaking gRPC to the real service as Envoy does."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
Entries = Sequence[tuple[str, str]]


def descriptor(entries: Entries, *, hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


def avoid_window_edges(margin_s: float = 0.3, minute_margin_s: float = 1.0) -> None:
    now = time.time()
    if now % 60 > 60 - minute_margin_s:
        time.sleep(60 - now % 60 + 0.01)
    elif now % 1 > 1 - margin_s:
        time.sleep(1 - now % 1 + 0.01)


class RlsClient:
    def __init__(self, target: str, domain: str = "test-domain") -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)
        self.domain = domain

    def call(
        self, *descriptors: Entries | ratelimit_pb2.RateLimitDescriptor, hits_addend: int = 0,
        domain: str | None = None, timeout: float = 5,
    ) -> rls_pb2.RateLimitResponse:
        built = [d if isinstance(d, ratelimit_pb2.RateLimitDescriptor) else descriptor(d) for d in descriptors]
        request = rls_pb2.RateLimitRequest(
            domain=self.domain if domain is None else domain, descriptors=built, hits_addend=hits_addend
        )
        return self.stub.ShouldRateLimit(request, timeout=timeout)

    def codes(self, entries: Entries, n: int) -> list[int]:
        """n calls in a row, started where they all fall in one fixed window of a second or a minute (a burst
        that straddled a window boundary would be counted in two windows)."""
        avoid_window_edges()
        return [self.call(entries).overall_code for _ in range(n)]

    def close(self) -> None:
        self.channel.close()
