"""The demo quota policy (config/testbed/ratelimit) gives what `igw demo` expects: adaptive per-model
limits for `demo` and `demo-half` in a 2:1 split, computed by the rate-limit service's own code."""

from __future__ import annotations

import pytest

from igw.commands.demo import demo_limit
from igw.launcher import DEFAULT_RATELIMIT_CONFIG
from ratelimit_svc.adaptive import effective_limit, share_totals
from ratelimit_svc.loader import read_config_dir
from ratelimit_svc.lookup import find_limit


@pytest.fixture(scope="module")
def config():  # type: ignore[no-untyped-def]
    return read_config_dir(DEFAULT_RATELIMIT_CONFIG)


@pytest.mark.parametrize("tenant", ["demo", "demo-half"])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 6])
def test_demo_tenants_get_the_adaptive_limit_igw_demo_expects(config, tenant: str, replicas: int) -> None:  # type: ignore[no-untyped-def]
    match = find_limit(config, "igw", (("tenant", tenant), ("model", "demo-linear")))
    assert match is not None and match.limit.adaptive is not None
    adaptive = match.limit.adaptive
    total = share_totals(config)[("igw", adaptive.share_key, None)]
    assert effective_limit(adaptive, replicas, total) == demo_limit(tenant, replicas)


def test_demo_half_gets_half_of_demo_with_two_and_four_replicas() -> None:
    assert [demo_limit("demo", r) for r in (2, 4)] == [20, 40]
    assert [demo_limit("demo-half", r) for r in (2, 4)] == [10, 20]
