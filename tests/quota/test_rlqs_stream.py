"""The life of an RLQS stream as Envoy and misbehaving clients drive it, over real gRPC (the server in a
thread of the test, real redis-server): reports no Envoy sends are refused with a status naming what is
wrong, an Envoy that froze or left gives its slice back, and a bucket nobody uses is abandoned."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from igw.procs import RedisServer
from ratelimit_svc.rlqs import DEMAND_PREFIX, MAX_BUCKETS_PER_STREAM
from tests.quota.gateway import QuotaGateway, admitted_per_bin, offer_load, start_gateway, statuses
from tests.quota.rlqs_server import QuotaServerThread, RawGateway, reports, usage, wait_for
from tests.quota.test_rlqs_server import FIXED, holder_for

BUDGET = 40
HEADERS = {"x-igw-tenant": "acme", "x-igw-model": "llama"}
RAW_BUCKET = {"gw": "raw", "tenant": "acme", "model": "llama"}
SHARED_KEY = "igw|model=llama,tenant=acme"
ServerFactory = Callable[..., QuotaServerThread]
RawFactory = Callable[[QuotaServerThread], RawGateway]


@pytest.fixture
def start_server(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., QuotaServerThread]]:
    started: list[QuotaServerThread] = []

    def start(**options: Any) -> QuotaServerThread:
        server = QuotaServerThread(holder_for(tmp_path, FIXED % BUDGET), redis_url, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def raw_gateways() -> Iterator[Callable[[QuotaServerThread], RawGateway]]:
    opened: list[RawGateway] = []

    def open_one(server: QuotaServerThread) -> RawGateway:
        gw = RawGateway(f"127.0.0.1:{server.port}")
        opened.append(gw)
        return gw

    yield open_one
    for gw in opened:
        gw.close()


@pytest.fixture
def envoys(tmp_path: Path, log_dir: Path) -> Iterator[Callable[[str, QuotaServerThread], QuotaGateway]]:
    started: list[QuotaGateway] = []

    def start(name: str, server: QuotaServerThread) -> QuotaGateway:
        gw = start_gateway(name, server.port, tmp_path, log_dir)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.proc.signal(signal.SIGCONT)
        gw.stop()


def refused(gw: RawGateway, code: grpc.StatusCode, needle: str) -> None:
    assert gw.ended(15), "the server kept the stream open"
    assert gw.status == code, (gw.status, gw.details)
    assert needle in gw.details, gw.details


def test_a_first_report_without_a_domain_is_refused_instead_of_every_bucket_being_unlimited(
        start_server: ServerFactory, raw_gateways: RawFactory) -> None:
    gw = raw_gateways(start_server())
    gw.send(reports("", usage(RAW_BUCKET, 100)))
    refused(gw, grpc.StatusCode.INVALID_ARGUMENT, "domain")
    assert gw.received == []  # no ALLOW_ALL (nor anything else) went out for it


def test_a_domain_change_within_a_stream_is_refused(
        start_server: ServerFactory, raw_gateways: RawFactory) -> None:
    gw = raw_gateways(start_server())
    gw.send(reports("igw", usage(RAW_BUCKET, 100)))
    gw.send(reports("other", usage(RAW_BUCKET, 100)))
    refused(gw, grpc.StatusCode.INVALID_ARGUMENT, "'igw' to 'other'")


@pytest.mark.parametrize(("bucket", "needle"), [
    ({}, "no entries"),
    ({"tenant": ""}, "empty key or value"),
    ({"tenant": "acme", "model": "x" * 2000}, "characters"),
    ({f"k{i}": "v" for i in range(20)}, "entries"),
], ids=["empty", "empty-value", "huge", "too-many-entries"])
def test_an_invalid_bucket_id_is_refused_naming_what_is_wrong(
        start_server: ServerFactory, raw_gateways: RawFactory,
        bucket: dict[str, str], needle: str) -> None:
    server = start_server()
    gw = raw_gateways(server)
    gw.send(reports("igw", usage(bucket, 1)))
    refused(gw, grpc.StatusCode.INVALID_ARGUMENT, needle)
    assert all(not held for held in server.buckets_of_streams())


def test_one_stream_cannot_make_the_server_hold_more_than_the_bucket_cap(
        start_server: ServerFactory, raw_gateways: RawFactory) -> None:
    server = start_server()
    gw = raw_gateways(server)
    many = [usage({"tenant": f"t{i}", "model": "llama"}, 1) for i in range(MAX_BUCKETS_PER_STREAM + 1)]
    gw.send(reports("igw", *many))
    refused(gw, grpc.StatusCode.RESOURCE_EXHAUSTED, str(MAX_BUCKETS_PER_STREAM))
    wait_for(lambda: server.buckets_of_streams() == [], 10, "the refused stream's buckets released")


def _busy(gw: RawGateway) -> Callable[[], None]:
    """A gateway offering the whole budget: reports 5 s of BUDGET/s, at most once a second."""
    last = [0.0]

    def report() -> None:
        if time.monotonic() - last[0] >= 1.0:
            gw.send(reports("igw", usage(RAW_BUCKET, BUDGET * 5)))
            last[0] = time.monotonic()

    return report


def _share_with_envoy(server: QuotaServerThread, envoy: QuotaGateway, raw: RawGateway) -> Callable[[], None]:
    """Envoy and the raw gateway both hold the bucket; the raw one's slice is below the budget."""
    offer_load([(envoy.url, HEADERS)], rate=20, seconds=0.5)
    wait_for(lambda: sum(SHARED_KEY in b for b in server.buckets_of_streams()) == 1, 10, "Envoy's bucket seen")
    keep_busy = _busy(raw)
    wait_for(lambda: (raw.rate(RAW_BUCKET) or BUDGET) < BUDGET, 10, "the raw gateway shares the budget", keep_busy)
    return keep_busy


def test_a_frozen_envoy_s_stream_is_closed_its_slice_goes_to_the_others_and_it_rejoins_when_thawed(
        start_server: ServerFactory, raw_gateways: RawFactory,
        envoys: Callable[[str, QuotaServerThread], QuotaGateway]) -> None:
    """SIGSTOP keeps Envoy's TCP connection open (the kernel still acknowledges) but no report comes."""
    server = start_server()
    envoy, raw = envoys("gw-frozen", server), raw_gateways(server)
    keep_busy = _share_with_envoy(server, envoy, raw)
    envoy.proc.signal(signal.SIGSTOP)
    wait_for(lambda: raw.rate(RAW_BUCKET) == BUDGET, 45, "the frozen Envoy's slice handed back", keep_busy)
    envoy.proc.signal(signal.SIGCONT)
    wait_for(lambda: sum(SHARED_KEY in b for b in server.buckets_of_streams()) == 2, 20,
             "the thawed Envoy reporting its bucket on a new stream", keep_busy)
    wait_for(lambda: (raw.rate(RAW_BUCKET) or BUDGET) < BUDGET, 10, "the budget shared again", keep_busy)


def test_a_stream_closed_by_envoy_gives_its_slice_to_the_other_gateways(
        start_server: ServerFactory, raw_gateways: RawFactory,
        envoys: Callable[[str, QuotaServerThread], QuotaGateway]) -> None:
    server = start_server()
    envoy, raw = envoys("gw-leaving", server), raw_gateways(server)
    keep_busy = _share_with_envoy(server, envoy, raw)
    envoy.stop()
    wait_for(lambda: raw.rate(RAW_BUCKET) == BUDGET, 15, "the stopped Envoy's slice handed back", keep_busy)


def test_an_idle_bucket_is_abandoned_and_its_slice_goes_to_the_busy_gateway(
        start_server: ServerFactory, raw_gateways: RawFactory,
        envoys: Callable[[str, QuotaServerThread], QuotaGateway]) -> None:
    server = start_server(abandon_idle_after=6.0)
    envoy, raw = envoys("gw-idle", server), raw_gateways(server)
    keep_busy = _share_with_envoy(server, envoy, raw)
    wait_for(lambda: raw.rate(RAW_BUCKET) == BUDGET, 30, "the idle bucket's slice handed back", keep_busy)
    abandoned_at = time.time()
    wait_for(lambda: min(server.call(lambda s: [st.last_report for st in s.streams.values()])) > abandoned_at + 1,
             15, "Envoy's next report", keep_busy)
    # Envoy dropped the bucket (it reports the buckets it holds, idle ones included): the raw gateway's alone.
    assert sum(SHARED_KEY in b for b in server.buckets_of_streams()) == 1
    # And it still serves; its next request makes the bucket anew.
    assert set(s for _, s in offer_load([(envoy.url, HEADERS)], rate=10, seconds=0.3)[0]) == {200}
    wait_for(lambda: sum(SHARED_KEY in b for b in server.buckets_of_streams()) == 2, 15, "Envoy's bucket back",
             keep_busy)


@pytest.mark.parametrize("value", ["garbage", "inf:{now}", "nan:{now}", "-5:{now}", "5:never"])
def test_a_malformed_demand_entry_in_redis_is_ignored_and_ends_no_stream(
        start_server: ServerFactory, raw_gateways: RawFactory, redis_url: str, value: str) -> None:
    """Another server replica (another version, a hand edit) may write what this one cannot read."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.hset(DEMAND_PREFIX + SHARED_KEY, "elsewhere", value.format(now=f"{time.time():.3f}"))
    client.close()
    gw = raw_gateways(start_server())
    gw.send(reports("igw", usage(RAW_BUCKET, BUDGET * 5)))
    wait_for(lambda: gw.rate(RAW_BUCKET) is not None or gw.ended(0), 10, "an assignment or the stream's end")
    assert not gw.ended(0), (gw.status, gw.details)
    assert gw.rate(RAW_BUCKET) == BUDGET


def test_a_budget_change_is_pushed_at_once_to_every_stream_holding_the_bucket(
        start_server: ServerFactory, raw_gateways: RawFactory, tmp_path: Path) -> None:
    """As a replica-count change or a config reload does: the server is woken, no report is waited for."""
    server = start_server()
    one, two = raw_gateways(server), raw_gateways(server)
    buckets = [dict(RAW_BUCKET, gw="one"), dict(RAW_BUCKET, gw="two")]
    for gw, bucket in zip((one, two), buckets, strict=True):
        gw.send(reports("igw", usage(bucket, BUDGET * 5)))
    wait_for(lambda: (one.rate(buckets[0]) or 0) + (two.rate(buckets[1]) or 0) == BUDGET, 10, "the first split")
    (tmp_path / "cfg" / "igw.yaml").write_text(FIXED % (BUDGET // 4))
    server.call(lambda s: (s.budgets.holder.reload(), s.wake()))
    wait_for(lambda: (one.rate(buckets[0]), two.rate(buckets[1])) == (BUDGET / 8, BUDGET / 8), 10,
             "both streams' new slices")


def test_a_report_with_fields_this_server_does_not_know_is_served(
        start_server: ServerFactory, raw_gateways: RawFactory) -> None:
    """A newer Envoy may add fields to the work-in-progress API: they are skipped, not an error."""
    gw = raw_gateways(start_server())
    unknown_field_99 = bytes([0x98, 0x06, 0x01])  # tag (99 << 3 | varint) and the value 1
    gw.send(reports("igw", usage(RAW_BUCKET, BUDGET * 5)).SerializeToString() + unknown_field_99)
    wait_for(lambda: gw.rate(RAW_BUCKET) is not None or gw.ended(0), 10, "an assignment or the stream's end")
    assert gw.rate(RAW_BUCKET) == BUDGET, (gw.status, gw.details)


def test_assignments_carry_a_ttl_long_enough_to_ride_out_a_restart_or_failover(
        start_server: ServerFactory, raw_gateways: RawFactory) -> None:
    """Envoy 1.40 ignores expired_assignment_behavior reuse_last_assignment: once an assignment's TTL runs
    out, the bucket is open (RLQS_NOTES.md; the next two tests show Envoy honouring a TTL either side). So the
    TTL itself is how long a dead server's budgets hold: ten minutes, not the one minute it was."""
    gw = raw_gateways(start_server())
    gw.send(reports("igw", usage(RAW_BUCKET, BUDGET * 5)))
    wait_for(lambda: gw.rate(RAW_BUCKET) is not None or gw.ended(0), 10, "an assignment")
    ttls = {action.quota_assignment_action.assignment_time_to_live.seconds
            for response in gw.received for action in response.bucket_action
            if action.HasField("quota_assignment_action")}
    assert ttls == {600}


def test_within_its_ttl_a_dead_server_s_last_budget_stays_enforced(
        start_server: ServerFactory, envoys: Callable[[str, QuotaServerThread], QuotaGateway]) -> None:
    ttl = 30
    server = start_server(assignment_ttl=ttl)
    envoy = envoys("gw-expiry", server)
    offer_load([(envoy.url, HEADERS)], rate=20, seconds=0.5)
    wait_for(lambda: bool(server.call(lambda s: [st.sent for st in s.streams.values() if st.sent])), 10,
             "the first assignment sent")
    server.stop()
    time.sleep(2)  # the server is gone for good: Envoy has only the assignment it holds
    per_second = admitted_per_bin(offer_load([(envoy.url, HEADERS)], rate=120, seconds=4)[0])
    steady = [per_second.get(s, 0) for s in range(1, 4)]
    assert sum(steady) / len(steady) <= BUDGET * 1.1, f"admitted per second after the server died: {steady}"


def test_past_its_ttl_an_assignment_of_a_dead_server_no_longer_limits(
        start_server: ServerFactory, envoys: Callable[[str, QuotaServerThread], QuotaGateway]) -> None:
    """The configured expired behaviour: fail open, as the per-request filter does when its service is down."""
    ttl = 6
    server = start_server(assignment_ttl=ttl)
    envoy = envoys("gw-expired", server)
    offer_load([(envoy.url, HEADERS)], rate=20, seconds=0.5)
    wait_for(lambda: bool(server.call(lambda s: [st.sent for st in s.streams.values() if st.sent])), 10,
             "the first assignment sent")
    server.stop()
    time.sleep(ttl + 3)  # let the assignment expire; what is asserted is the admitted rate after
    results = offer_load([(envoy.url, HEADERS)], rate=120, seconds=2)[0]
    assert set(statuses(results)) == {200}, statuses(results)


def test_a_gateway_gets_its_assignment_while_the_state_redis_is_frozen(
        tmp_path: Path, own_redis: RedisServer, raw_gateways: RawFactory) -> None:
    """Demand cannot be shared then, but the gateway is still served (from this replica's own view)."""
    server = QuotaServerThread(holder_for(tmp_path, FIXED % BUDGET), own_redis.url).start()
    try:
        os.kill(own_redis.pid, signal.SIGSTOP)
        gw = raw_gateways(server)
        gw.send(reports("igw", usage(RAW_BUCKET, BUDGET * 5)))
        wait_for(lambda: gw.rate(RAW_BUCKET) is not None or gw.ended(0), 15, "an assignment or the stream's end")
        assert gw.rate(RAW_BUCKET) == BUDGET, (gw.status, gw.details)
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
        server.stop()


def test_a_bucket_s_budget_gauge_goes_when_no_stream_holds_the_bucket_any_more(
        start_server: ServerFactory, raw_gateways: RawFactory) -> None:
    """Buckets come and go (tenants, abandoned idle buckets): their metric series must go with them."""
    from prometheus_client import REGISTRY

    def budget_series() -> float | None:
        return REGISTRY.get_sample_value("rlqs_bucket_budget_per_second", {"bucket": "igw|model=llama,tenant=gone"})

    server = start_server()
    gw = raw_gateways(server)
    gw.send(reports("igw", usage({"tenant": "gone", "model": "llama"}, 5)))
    wait_for(lambda: budget_series() is not None, 10, "the bucket's budget gauge")
    gw.close()
    wait_for(lambda: budget_series() is None, 10, "the bucket's budget gauge removed")
