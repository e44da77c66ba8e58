"""How a bucket's global budget is divided between gateways, and turned into Envoy token buckets.

Pure functions. Envoy 1.40 enforces one token bucket per bucket id per Envoy process; several gateways
share one tenant-on-model budget, so each gets a slice: a floor for every gateway that reported the
bucket (an idle gateway can still start serving), the rest in proportion to its recent demand
(allowed + denied per second). Slices are whole tokens per fill and add up to the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def split_budget(budget: float, demands: dict[str, float], floor_fraction: float = 0.1) -> dict[str, float]:
    """Split `budget` (per second) between gateways by demand, each getting at least its floor."""
    if not demands:
        return {}
    n = len(demands)
    if budget <= 0:
        return dict.fromkeys(demands, 0.0)
    floor_each = budget * floor_fraction / n
    rest = budget - floor_each * n
    total_demand = sum(max(0.0, d) for d in demands.values())
    if total_demand <= 0:
        return {gw: budget / n for gw in demands}
    return {gw: floor_each + rest * max(0.0, d) / total_demand for gw, d in demands.items()}


def whole_tokens(shares: dict[str, float], budget: int) -> dict[str, int]:
    """Round shares to integers that sum to `budget` (largest remainder), so rounding never hands out
    more than the budget in total. Ties go by name, not by dict order: server replicas listing the same
    gateways in different orders must give the odd tokens to the same ones."""
    floors = {gw: math.floor(v) for gw, v in shares.items()}
    left = budget - sum(floors.values())
    for gw in sorted(shares, key=lambda g: (floors[g] - shares[g], g))[: max(0, left)]:
        floors[gw] += 1
    return floors


@dataclass(frozen=True, slots=True)
class TokenBucket:
    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: int  # Envoy 1.40 honours whole seconds only (see RLQS_NOTES.md)


MAX_FILL_INTERVAL_S = 60


def token_bucket(rate_per_s: float) -> TokenBucket | None:
    """A bucket admitting `rate_per_s` on average, never more.

    Envoy 1.40 fills whole tokens at whole-second intervals, so a rate is met exactly when some interval
    of at most a minute holds a whole number of tokens (100/minute: 5 tokens every 3 s; any N per W
    seconds with W <= 60 is exact); otherwise the closest rate below it is used. Rounding to whole tokens
    per second instead would hand out up to a third more (2/s for 100/minute). Rates under one per minute
    get one token per ceil(1/rate) seconds. None means "no tokens at all" (a budget of zero): the caller
    assigns DENY_ALL instead.
    """
    if rate_per_s <= 0:
        return None
    best: TokenBucket | None = None
    for interval in range(1, MAX_FILL_INTERVAL_S + 1):
        tokens = math.floor(rate_per_s * interval + 1e-9)
        if tokens >= 1 and (best is None or tokens / interval > best.tokens_per_fill / best.fill_interval_s + 1e-12):
            best = TokenBucket(max_tokens=tokens, tokens_per_fill=tokens, fill_interval_s=interval)
        if tokens >= 1 and abs(rate_per_s * interval - tokens) < 1e-9:
            break  # exact
    if best is None:
        return TokenBucket(max_tokens=1, tokens_per_fill=1, fill_interval_s=math.ceil(1 / rate_per_s - 1e-9))
    return best


def rate_per_second(requests_per_unit: int, window_seconds: int) -> float:
    return requests_per_unit / window_seconds if window_seconds else 0.0
