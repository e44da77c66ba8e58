"""The RLQS server's push decisions, driven by usage reports as Envoy sends them (real redis-server, the
real config loader): what each gateway stream is assigned as budgets, demand and streams change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from envoy.service.rate_limit_quota.v3 import rlqs_pb2
from google.protobuf import duration_pb2

from ratelimit_svc.loader import ConfigHolder
from ratelimit_svc.rlqs import GatewayStream, QuotaBudgets, QuotaServer

FIXED = """
domain: igw
descriptors:
  - key: tenant
    value: acme
    descriptors:
      - key: model
        value: llama
        rate_limit: {unit: second, requests_per_unit: %d}
"""


def holder_for(tmp_path: Path, text: str) -> ConfigHolder:
    directory = tmp_path / "cfg"
    directory.mkdir(exist_ok=True)
    (directory / "igw.yaml").write_text(text)
    holder = ConfigHolder(directory)
    assert holder.reload()
    return holder


def report(gw: str, requests: int, seconds: int = 5, domain: str = "igw", tenant: str = "acme",
           model: str = "llama") -> rlqs_pb2.RateLimitQuotaUsageReports:
    usage = rlqs_pb2.RateLimitQuotaUsageReports.BucketQuotaUsage(
        bucket_id=rlqs_pb2.BucketId(bucket={"gw": gw, "tenant": tenant, "model": model}),
        time_elapsed=duration_pb2.Duration(seconds=seconds), num_requests_allowed=requests)
    return rlqs_pb2.RateLimitQuotaUsageReports(domain=domain, bucket_quota_usages=[usage])


async def send(server: QuotaServer, stream: GatewayStream,
               *reports: rlqs_pb2.RateLimitQuotaUsageReports) -> None:
    async def iterate() -> AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports]:
        for item in reports:
            yield item

    server.streams[stream.stream_id] = stream
    await server._read(stream, iterate())


def rate_of(stream: GatewayStream) -> float:
    """The rate (per second) of the last assignment pushed to a stream; 0 for DENY_ALL."""
    (kind, _, per_fill, interval), _ = next(iter(stream.sent.values()))
    assert kind != "allow"
    return per_fill / interval if kind == "tokens" else 0.0


def test_every_gateway_keeps_a_nonzero_slice_when_whole_tokens_would_round_it_away(
        tmp_path: Path, redis_url: str) -> None:
    async def run() -> list[float]:
        server = QuotaServer(QuotaBudgets(holder_for(tmp_path, FIXED % 3), None), redis_url)
        busy, idle1, idle2 = GatewayStream("busy"), GatewayStream("idle1"), GatewayStream("idle2")
        await send(server, idle1, report("a", 0))
        await send(server, idle2, report("b", 0))
        await send(server, busy, report("c", 250))
        await server.close()
        return [rate_of(s) for s in (busy, idle1, idle2)]

    rates = asyncio.run(run())
    assert all(r > 0 for r in rates), rates  # the floor: an idle gateway can still start serving
    assert sum(rates) <= 3 + 1e-9


def test_gateways_of_different_domains_do_not_share_a_budget(tmp_path: Path, redis_url: str) -> None:
    other = (FIXED % 100).replace("domain: igw", "domain: other")
    holder = holder_for(tmp_path, FIXED % 4)
    (tmp_path / "cfg" / "other.yaml").write_text(other)
    assert holder.reload()

    async def run() -> tuple[float, float]:
        server = QuotaServer(QuotaBudgets(holder, None), redis_url)
        mine, theirs = GatewayStream("mine"), GatewayStream("theirs")
        await send(server, mine, report("a", 20, domain="igw"))
        await send(server, theirs, report("b", 20, domain="other"))
        await server.close()
        return rate_of(mine), rate_of(theirs)

    assert asyncio.run(run()) == (4.0, 100.0)


def test_two_server_replicas_never_hand_out_more_than_the_budget_together(tmp_path: Path, redis_url: str) -> None:
    """Each replica splits the budget from its own streams' demand (in memory) and the other's (from Redis):
    the two must round the same numbers the same way, or each gives the odd token to its own gateway."""
    holder = holder_for(tmp_path, FIXED % 41)

    async def run() -> tuple[float, float]:
        one = QuotaServer(QuotaBudgets(holder, None), redis_url)
        two = QuotaServer(QuotaBudgets(holder, None), redis_url)
        a, b = GatewayStream("a-stream"), GatewayStream("b-stream")
        await send(one, a, report("a", 50))  # 10/s
        elapsed = duration_pb2.Duration(seconds=4, nanos=999_900_000)  # 10.0002/s
        late = report("b", 50)
        late.bucket_quota_usages[0].time_elapsed.CopyFrom(elapsed)
        await send(two, b, late)
        await one.recompute()
        await two.recompute()
        await one.close()
        await two.close()
        return rate_of(a), rate_of(b)

    rates = asyncio.run(run())
    assert sum(rates) <= 41, rates
