"""Status and stats arithmetic of a counted hit: fixed window as upstream computes it, and GCRA. Pure."""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

from ratelimit_svc.gcra import GcraResult

OK = 1  # envoy.service.ratelimit.v3.RateLimitResponse.Code
OVER_LIMIT = 2


def window_start(now: int, window_seconds: int) -> int:
    return now // window_seconds * window_seconds


def seconds_until_reset(now: int, window_seconds: int) -> int:
    return window_seconds - now % window_seconds


@dataclass(frozen=True, slots=True)
class Outcome:
    code: int
    remaining: int
    over: int  # hits to add to over_limit
    near: int  # hits to add to near_limit
    within: int  # hits to add to within_limit


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=4096)
def near_limit_threshold(limit: int, near_ratio: float) -> int:
    """Upstream multiplies in float32 (its NEAR_LIMIT_RATIO is a float32): 90 x 0.7 is 63 there but
    62.99999999999999 in float64, a threshold of 62. Same arithmetic, same near_limit stats as upstream."""
    return math.floor(_f32(_f32(limit) * _f32(near_ratio)))


def outcome(limit: int, after: int, hits: int, near_ratio: float) -> Outcome:
    """Status of a counter that reached `after` by adding `hits`, and how upstream counts its stats.

    Only the hits that crossed a threshold count against it, so a hits_addend of 5 that ends 2 over the
    limit adds 2 to over_limit and the rest that crossed the near threshold to near_limit.
    """
    before = after - hits
    near_threshold = near_limit_threshold(limit, near_ratio)
    if after > limit:
        if before >= limit:
            return Outcome(OVER_LIMIT, 0, hits, 0, 0)
        return Outcome(OVER_LIMIT, 0, after - limit, limit - max(near_threshold, before), 0)
    near = 0
    if after > near_threshold:
        near = hits if before >= near_threshold else after - near_threshold
    return Outcome(OK, limit - after, 0, near, hits)


def gcra_outcome(result: GcraResult, limit: int, hits: int, near_ratio: float) -> Outcome:
    """GCRA has no counter to compare; near_limit counts admitted hits that left less than
    (1 - near_ratio) of the bucket."""
    if not result.allowed:
        return Outcome(OVER_LIMIT, 0, hits, 0, 0)
    near = hits if result.remaining < limit - near_limit_threshold(limit, near_ratio) else 0
    return Outcome(OK, result.remaining, 0, near, hits)
