"""find_limit remembers matches per config: same answers as the walk, nothing carried across reloads, bounded."""

from __future__ import annotations

import pytest

from ratelimit_svc import lookup
from ratelimit_svc.config import parse_config
from ratelimit_svc.lookup import find_in_domain, find_limit

CONFIG = """\
domain: d
descriptors:
  - key: tenant
    rate_limit: {unit: second, requests_per_unit: 10}
    descriptors:
      - key: model
        rate_limit: {unit: minute, requests_per_unit: 5}
"""
ENTRIES = (("tenant", "acme"), ("model", "llama"))


def test_repeated_lookup_returns_the_walks_answer() -> None:
    config = parse_config([("a.yaml", CONFIG)])
    first = find_limit(config, "d", ENTRIES)
    assert first == find_in_domain(config.domains["d"], ENTRIES)
    assert find_limit(config, "d", ENTRIES) is first
    assert first is not None and first.limit.requests_per_unit == 5


def test_misses_are_remembered_as_misses() -> None:
    config = parse_config([("a.yaml", CONFIG)])
    assert find_limit(config, "d", (("nope", "x"),)) is None
    assert find_limit(config, "d", (("nope", "x"),)) is None
    assert find_limit(config, "other", ENTRIES) is None


def test_a_reloaded_config_starts_with_no_remembered_matches() -> None:
    old = parse_config([("a.yaml", CONFIG)])
    assert find_limit(old, "d", ENTRIES).limit.requests_per_unit == 5  # type: ignore[union-attr]
    new = parse_config([("a.yaml", CONFIG.replace("requests_per_unit: 5", "requests_per_unit: 7"))])
    assert find_limit(new, "d", ENTRIES).limit.requests_per_unit == 7  # type: ignore[union-attr]


def test_cache_stays_bounded_under_high_cardinality_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "LOOKUP_CACHE_MAX", 100)
    config = parse_config([("a.yaml", CONFIG)])
    for i in range(1_000):
        assert find_limit(config, "d", (("tenant", f"t{i}"),)) is not None
    assert len(config.lookups) <= 100
