"""GCRA (generic cell rate algorithm): a token bucket kept as one timestamp, the theoretical arrival
time (TAT) of the next request.

A limit of L per window W emits one token every T = W/L; the bucket holds `burst` tokens. A request of
n hits is admitted iff `max(TAT, now) + n*T - now <= burst*T`. Unlike a fixed window, which admits up
to 2L within a few milliseconds around a window edge, GCRA never admits more than
`burst + d/T` hits in any interval of length d. The same arithmetic runs in Redis as a Lua script (one
atomic round trip, Redis's own clock so every service replica agrees) and here for the pure tests and
the in-memory backend.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    tat_ms: float  # the stored TAT after this request (unchanged when denied); fractional, not truncated
    remaining: int  # whole tokens left after this request
    wait_ms: int  # denied: until it would be admitted; allowed: until the bucket is full again


def gcra(tat_ms: float | None, now_ms: float, interval_ms: float, burst: int, hits: int) -> GcraResult:
    """Truncating the stored TAT to whole ms would shorten every interval (150/s is 6.67 ms, not 6 ms)
    and admit more than the limit, so TATs stay fractional here and in Redis."""
    tat = now_ms if tat_ms is None or tat_ms < now_ms else tat_ms
    capacity = burst * interval_ms
    new_tat = tat + hits * interval_ms
    if new_tat - now_ms <= capacity:
        remaining = int((capacity - (new_tat - now_ms)) // interval_ms) if interval_ms > 0 else burst
        return GcraResult(True, new_tat, remaining, int(new_tat - now_ms))
    remaining = int((capacity - (tat - now_ms)) // interval_ms) if interval_ms > 0 else 0
    return GcraResult(False, tat, max(0, remaining), int(new_tat - now_ms - capacity))


# KEYS[1]: bucket key. ARGV: interval_ms, burst, hits. Returns {allowed, remaining, wait_ms}.
LUA = """
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2]) * interval
local hits = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + hits * interval
if new_tat - now <= capacity then
  local remaining = 0
  if interval > 0 then remaining = math.floor((capacity - (new_tat - now)) / interval) end
  if hits > 0 then
    redis.call('SET', KEYS[1], string.format('%.4f', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
  end
  return {1, remaining, math.floor(new_tat - now)}
end
local remaining = 0
if interval > 0 then remaining = math.max(0, math.floor((capacity - (tat - now)) / interval)) end
return {0, remaining, math.floor(new_tat - now - capacity)}
"""
