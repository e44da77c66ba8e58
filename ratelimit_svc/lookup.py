"""Find the limit that applies to one request descriptor: most specific match wins, as upstream.

At each level the entry's exact `key_value` is tried first, then wildcard values (`foo*`, `a*b`) in
config order, then the key-only default. A limit applies only if it sits at the descriptor's last
entry. The walk also yields the two names a match needs: the stats key (config path, or the request's
values for `detailed_metric` / `value_to_metric`) and the counter key, where `share_threshold` makes
every value matching one wildcard share a single counter.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratelimit_svc.config import Domain, RateLimit, RateLimitConfig


@dataclass(frozen=True, slots=True)
class Match:
    limit: RateLimit
    stats_key: str
    counter_key: str  # "<domain>_<k1>_<v1>_<k2>_<v2>_" ; the window start is appended by the cache
    entries: tuple[tuple[str, str], ...]
    group: str  # picks the counter's Redis shard (counters.py): counter_group(domain, counter_key)


def counter_group(domain: str, counter_key: str) -> str:
    """The domain and the first two `_`-separated fields after it: the first entry's key and value as the
    counter key spells them. A function of the counter key alone, so one counter is always on one shard
    (also when `_` in keys or values makes two descriptors spell the same key, which then share the
    counter as upstream's do); a descriptor and the ones nested under the same first entry share it."""
    head = counter_key[len(domain) + 1:].split("_", 2)[:2]
    return f"{domain}_{'_'.join(head)}"


LOOKUP_CACHE_MAX = 65_536  # 1,000 models x 50 tenants fit; beyond that the cache starts over


def find_limit(config: RateLimitConfig, domain_name: str, entries: tuple[tuple[str, str], ...]) -> Match | None:
    """Remembered per config: the same descriptors come back on every request of a tenant and model, and the
    walk below costs ~10x the dict lookup. High-cardinality values (a client IP, say) only make the cache
    start over when full, so memory stays bounded."""
    key = (domain_name, entries)
    cache = config.lookups
    try:
        return cache[key]  # type: ignore[return-value]
    except KeyError:
        pass
    domain = config.domains.get(domain_name)
    match = None if domain is None or not entries else find_in_domain(domain, entries)
    if len(cache) >= LOOKUP_CACHE_MAX:
        cache.clear()
    cache[key] = match
    return match


def find_in_domain(domain: Domain, entries: tuple[tuple[str, str], ...]) -> Match | None:
    level = domain.root
    found: RateLimit | None = None
    counter_values: list[str] = []
    stats_parts: list[str] = []  # config path, or request values where value_to_metric says so
    detail_parts: list[str] = []  # request values everywhere (detailed_metric), patterns where shared
    last = len(entries) - 1
    for i, (key, value) in enumerate(entries):
        node = level.children.get(f"{key}_{value}")
        if node is None and level.wildcards:
            node = level.match_wildcard(key, value)
        if node is None:
            node = level.children.get(key)
        if node is None:
            break
        own = f"{key}_{value}" if value else key
        if node.pattern and node.share_threshold:
            counter_values.append(node.pattern)
            stats_parts.append(node.segment)
            detail_parts.append(node.segment)
        else:
            counter_values.append(value)
            stats_parts.append(own if node.value_to_metric else node.segment)
            detail_parts.append(own)
        if i == last and node.limit is not None:
            found = node.limit
        if not node.children:
            break
        level = node
    if found is None:
        return None
    stats_key = domain.name + "." + ".".join(detail_parts if found.detailed_metric else stats_parts)
    counter_key = domain.name + "_" + "".join(
        f"{k}_{v}_" for (k, _), v in zip(entries, counter_values, strict=False)
    )
    return Match(found, stats_key, counter_key, entries, counter_group(domain.name, counter_key))
