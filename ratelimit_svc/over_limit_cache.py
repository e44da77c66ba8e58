"""The local over-limit cache (upstream's LOCAL_CACHE_SIZE_IN_BYTES): fixed-window counter keys seen over
their limit, kept in this process until their window ends, so later hits on them are answered OVER_LIMIT
without a Redis round trip. Pure: the caller passes the time (a monotonic clock) in.

Why it is sound: a fixed-window counter only grows within its window, and its key names the window, so a
counter seen above a limit stays above that limit (and any lower one) until the key stops being used.
Each entry keeps the limit it was over: a lookup with a higher limit (an adaptive limit that rose with the
replicas, a reloaded config, a request override) ignores and drops the entry, since the counter may be
under the new limit; Redis decides again.

Size: the bound is in bytes, like upstream's freecache, counted with an estimate per entry of
ENTRY_OVERHEAD_BYTES plus the key string's own size (`sys.getsizeof`, about 49 bytes + its length for an
ASCII key). The overhead covers the OrderedDict slot and link, the (expiry, limit) tuple, its float and
int; measured with tracemalloc on CPython 3.11 it is 130-205 bytes depending on where the hash table is
in its growth, so the estimate (208) is an upper bound and an ASCII key of n characters counts 257 + n
bytes: 1 MiB holds about 3,300 keys of 60 characters (freecache stores 24 + n bytes an entry, so upstream
fits about three times as many in the same setting).

Eviction when an entry does not fit: first the expired entries (a full sweep, at most once a second so
a cache full of live keys does not scan on every insert), then the least recently used ones. Keys of
past windows are never looked up again, so they drift to the LRU end and go first anyway.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

ENTRY_OVERHEAD_BYTES = 208
# The smallest cache, as upstream's freecache has it: a smaller LOCAL_CACHE_SIZE_IN_BYTES gets this much there, so
# a setting that works upstream (1000 caches thousands of keys) must not silently cache nothing here.
MIN_SIZE_BYTES = 512 * 1024
SWEEP_INTERVAL_SECONDS = 1.0


def entry_bytes(key: str) -> int:
    """Estimated memory of one entry: what the size bound counts."""
    return ENTRY_OVERHEAD_BYTES + sys.getsizeof(key)


class OverLimitCache:
    """key -> (expires_at, limit). Single-threaded by design: the service's request path runs on one
    event loop, so there is no lock."""

    __slots__ = ("_entries", "_next_sweep", "evictions", "size_bytes", "used_bytes")

    def __init__(self, size_bytes: int) -> None:
        if size_bytes <= 0:
            raise ValueError(f"over-limit cache size must be positive, got {size_bytes} bytes")
        self.size_bytes = size_bytes
        self.used_bytes = 0
        self.evictions = 0  # live entries dropped to make room (expired ones are not counted)
        self._entries: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._next_sweep = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    def is_over(self, key: str, limit: int, now: float) -> bool:
        """True when `key` was seen over a limit of at least `limit` and its window has not ended."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        expires_at, over_limit = entry
        if now >= expires_at or limit > over_limit:
            self._drop(key)
            return False
        self._entries.move_to_end(key)
        return True

    def add(self, key: str, limit: int, expires_at: float, now: float) -> None:
        """Remember that `key`'s counter is over `limit` until `expires_at` (the end of its window)."""
        if expires_at <= now:
            return
        need = entry_bytes(key)
        if need > self.size_bytes:
            return  # could never fit: leave the cache as it is
        entries = self._entries
        if key in entries:
            self._drop(key)
        while self.used_bytes + need > self.size_bytes:
            if now >= self._next_sweep:
                self._sweep(now)
                continue
            oldest, _ = entries.popitem(last=False)
            self.used_bytes -= entry_bytes(oldest)
            self.evictions += 1
        entries[key] = (expires_at, limit)
        self.used_bytes += need

    def _drop(self, key: str) -> None:
        del self._entries[key]
        self.used_bytes -= entry_bytes(key)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL_SECONDS
        expired = [key for key, (expires_at, _) in self._entries.items() if now >= expires_at]
        for key in expired:
            self._drop(key)
