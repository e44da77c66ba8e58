"""How one bucket's budget is divided between gateways and turned into Envoy token buckets (pure)."""

from __future__ import annotations

import pytest
from envoy.service.rate_limit_quota.v3 import rlqs_pb2

from ratelimit_svc.quota_split import TokenBucket, split_budget, token_bucket, whole_tokens
from ratelimit_svc.rlqs import assignment_for, bucket_action, bucket_key


def test_split_follows_demand_above_the_floor() -> None:
    shares = split_budget(100, {"a": 30.0, "b": 10.0}, floor_fraction=0.1)
    assert shares["a"] == pytest.approx(5 + 90 * 0.75)
    assert shares["b"] == pytest.approx(5 + 90 * 0.25)


def test_split_always_adds_up_to_the_budget() -> None:
    shares = split_budget(40, {"a": 1.0, "b": 7.0, "c": 0.0})
    assert sum(shares.values()) == pytest.approx(40)


def test_an_idle_gateway_keeps_its_floor() -> None:
    shares = split_budget(100, {"busy": 500.0, "idle": 0.0}, floor_fraction=0.1)
    assert shares["idle"] == pytest.approx(5)


def test_no_demand_anywhere_splits_evenly() -> None:
    assert split_budget(30, {"a": 0.0, "b": 0.0, "c": 0.0}) == {"a": 10, "b": 10, "c": 10}


def test_a_gateway_leaving_hands_its_slice_to_the_others() -> None:
    before = split_budget(60, {"a": 10.0, "b": 10.0, "c": 10.0})
    after = split_budget(60, {"a": 10.0, "b": 10.0})
    assert before["a"] == pytest.approx(20) and after["a"] == pytest.approx(30)


def test_a_budget_change_scales_every_slice() -> None:
    low = split_budget(20, {"a": 3.0, "b": 1.0})
    high = split_budget(60, {"a": 3.0, "b": 1.0})
    assert high["a"] == pytest.approx(3 * low["a"]) and high["b"] == pytest.approx(3 * low["b"])


def test_zero_budget_gives_nothing() -> None:
    assert split_budget(0, {"a": 5.0}) == {"a": 0.0}


def test_whole_tokens_never_exceed_the_budget() -> None:
    tokens = whole_tokens({"a": 13.4, "b": 13.3, "c": 13.3}, 40)
    assert sum(tokens.values()) == 40 and tokens == {"a": 14, "b": 13, "c": 13}


def test_token_bucket_per_second_for_rates_of_one_or_more() -> None:
    assert token_bucket(40) == TokenBucket(max_tokens=40, tokens_per_fill=40, fill_interval_s=1)


def test_token_bucket_for_slow_rates_uses_a_longer_whole_second_interval() -> None:
    assert token_bucket(0.25) == TokenBucket(max_tokens=1, tokens_per_fill=1, fill_interval_s=4)


def test_unlimited_bucket_is_allow_all_and_empty_budget_is_deny_all() -> None:
    assert assignment_for(None)[0] == "allow"
    assert assignment_for(0)[0] == "deny"


def test_assignments_always_carry_a_ttl() -> None:
    bucket_id = rlqs_pb2.BucketId(bucket={"gw": "g", "tenant": "t", "model": "m"})
    action = bucket_action(bucket_id, assignment_for(12))
    assert action.quota_assignment_action.assignment_time_to_live.seconds >= 30
    bucket = action.quota_assignment_action.rate_limit_strategy.token_bucket
    assert (bucket.max_tokens, bucket.tokens_per_fill.value, bucket.fill_interval.seconds) == (12, 12, 1)


def test_gateways_share_a_budget_whatever_their_own_name() -> None:
    a = rlqs_pb2.BucketId(bucket={"gw": "a", "tenant": "t", "model": "m"})
    b = rlqs_pb2.BucketId(bucket={"gw": "b", "tenant": "t", "model": "m"})
    assert bucket_key(a) == bucket_key(b) == "model=m,tenant=t"


@pytest.mark.parametrize(("requests", "window"), [(100, 60), (90, 60), (7, 1), (1000, 60), (5, 60), (3, 3600),
                                                  (86400, 86400), (37, 10)])
def test_token_bucket_never_admits_more_than_the_rate_and_is_exact_for_per_window_limits(
        requests: int, window: int) -> None:
    rate = requests / window
    bucket = token_bucket(rate)
    assert bucket is not None
    admitted = bucket.tokens_per_fill / bucket.fill_interval_s
    assert admitted <= rate + 1e-9
    if window <= 60 or requests % (window // 60 or 1) == 0:
        assert abs(admitted - rate) < 1e-9, bucket


def test_token_bucket_for_100_per_minute_fills_5_tokens_every_3_seconds() -> None:
    assert token_bucket(100 / 60) == TokenBucket(max_tokens=5, tokens_per_fill=5, fill_interval_s=3)


def test_token_bucket_for_an_uneven_slice_stays_below_it() -> None:
    bucket = token_bucket(3.7123)
    assert bucket is not None and 3.65 < bucket.tokens_per_fill / bucket.fill_interval_s <= 3.7123
