"""Flags of the rate-limit service, each also read from upstream's environment variable name."""

from __future__ import annotations

import argparse
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlparse

from igw.redis_conn import masked_url, parse_redis_url
from igw.redis_sentinel import MASTER_PLACEHOLDER, SentinelTarget
from igw.runtime import (
    EnvDefaults,
    add_common_flags,
    add_server_tls_flags,
    non_empty,
    non_negative_int,
    parse_bool,
    parse_duration,
    parse_port,
    redis_url_arg,
    startup_error,
)
from ratelimit_svc.over_limit_cache import MIN_SIZE_BYTES as LOCAL_CACHE_MIN_BYTES

if TYPE_CHECKING:
    from igw.service_runtime import ServerTls


# Go's time.Duration is int64 nanoseconds: upstream refuses a longer duration at startup, and a longer one here
# would only be a value nothing can wait for (digit strings past float's range even become infinity).
GO_MAX_DURATION_S = (2**63 - 1) / 1e9
_GO_MAX_DURATION_TEXT = "2562047h47m16.854775807s"
# Counter keys get EXPIRE window + jitter; Redis refuses an expiry beyond about 9.2e15 seconds (its milliseconds
# must fit an int64), and then the key it just created would never expire. A year's window fits beside this.
MAX_EXPIRATION_JITTER_S = 10**15
GO_MAX_INT = 2**63 - 1  # upstream's integer settings are Go ints: a larger value stops it at startup


def _within_go_duration(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds > GO_MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"too large: at most {_GO_MAX_DURATION_TEXT} (Go's longest duration, "
                                         "as upstream reads it)")
    return seconds


def _duration(text: str) -> float:
    """parse_duration's forms, bounded as upstream's Go durations are, so that every duration setting of the
    service refuses the same values."""
    return _within_go_duration(parse_duration(text))


def _int_at_most(limit: int, why: str) -> Callable[[str], int]:
    """A non-negative integer setting with an upper bound, named `why` in the refusal: a value past what its
    consumer (Redis, upstream's Go int) takes would otherwise be accepted and fail later, far from the setting."""
    def parse(text: str) -> int:
        value = non_negative_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"{value} is too large: at most {limit} ({why})")
        return value

    parse.__name__ = "integer"
    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}") from None
    if not 0 < value <= 1:  # also refuses nan and inf, which compare false
        raise argparse.ArgumentTypeError(f"ratio {value} must be in (0, 1]")
    return value



def _socket_type(env: str) -> str:
    """Upstream's REDIS_SOCKET_TYPE / REDIS_PERSECOND_SOCKET_TYPE: a typo must not quietly mean tcp."""
    value = os.environ.get(env, "").strip().lower()
    if value not in ("", "tcp", "unix"):
        raise argparse.ArgumentTypeError(f"{env}={value!r} is neither tcp nor unix")
    return value


def _upstream_redis_url(text: str, socket_env: str, auth_env: str) -> str:
    """Our URL form, or upstream's: a bare `host:port` (socket type tcp) or a socket path (unix), with the
    password apart in the auth variable (`password` or `user:password`). An operator switching over keeps
    the environment they have, and one who moves to our URL form keeps their separate password; a setting
    that would be ignored, or that contradicts the URL, is an error rather than a silent surprise."""
    socket_type = _socket_type(socket_env)
    auth = os.environ.get(auth_env, "")
    user, _, password = auth.partition(":") if ":" in auth else ("", "", auth)
    userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}@" if auth else ""
    if "://" not in text:
        unix = socket_type == "unix" or text.startswith("/")
        return redis_url_arg(f"unix://{userinfo}{text}" if unix else f"redis://{userinfo}{text}")
    parsed = urlparse(text)
    if socket_type and (parsed.scheme == "unix") != (socket_type == "unix"):
        raise argparse.ArgumentTypeError(f"{socket_env}={socket_type} contradicts the {parsed.scheme}:// URL")
    if auth and "@" not in parsed.netloc:
        text = parsed._replace(netloc=userinfo + parsed.netloc).geturl()
    elif auth and (unquote(parsed.username or ""), unquote(parsed.password or "")) != (user, password):
        # (The same credentials are fine: argparse converts an environment default a second time.)
        raise argparse.ArgumentTypeError(f"{auth_env} is set and the URL carries other credentials: give them once")
    return redis_url_arg(text)


def _redis_url(text: str) -> str:
    return _upstream_redis_url(text, "REDIS_SOCKET_TYPE", "REDIS_AUTH")


def _redis_urls(text: str) -> list[str]:
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("give at least one redis URL (comma-separated)")
    urls = [_redis_url(url) for url in urls]
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"redis shard listed more than once: {', '.join(twice)}")
    return urls


def _redis_type(text: str) -> str:
    """Upstream's REDIS_TYPE, case-insensitive as there."""
    value = text.strip().lower()
    if value not in ("single", "cluster", "sentinel"):
        raise argparse.ArgumentTypeError(f"invalid redis type {text!r} (single, cluster or sentinel)")
    return value


_SENTINEL_FORM = "<master name>,<sentinel host:port>,... (e.g. mymaster,10.0.0.1:26379,10.0.0.2:26379)"


def _port_number(text: str) -> int | None:
    """A port from 1 to 65535 in ASCII digits, else None: str.isdigit() also takes characters such as "²"
    that int() then refuses with a traceback."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        return None
    return int(text)


def _host_port(text: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `[v6]:port`; None when `text` is not of that form."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            return None
    number = _port_number(port)
    if not host or number is None:
        return None
    return host, number


def _userinfo(auth_env: str) -> str:
    """The userinfo of a redis:// URL for upstream's `password` or `user:password` in `auth_env`."""
    auth = os.environ.get(auth_env, "")
    if not auth:
        return ""
    user, _, password = auth.partition(":") if ":" in auth else ("", "", auth)
    return f"{quote(user, safe='')}:{quote(password, safe='')}@"


def _sentinel_target(text: str, setting: str, auth_env: str, sentinel_auth_env: str) -> SentinelTarget:
    """Upstream's sentinel form of REDIS_URL: the master's name (as the sentinels monitor it), then the
    sentinels' host:port. Credentials come apart, as upstream: `auth_env` for the master, `sentinel_auth_env`
    for the sentinels (`password` or `user:password` each)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) < 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"{setting} {masked_url(text)!r} with REDIS_TYPE=sentinel: expected "
                                         f"{_SENTINEL_FORM}")
    name, *entries = parts
    if "://" in name or _host_port(name) is not None or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"{setting} {masked_url(text)!r} with REDIS_TYPE=sentinel: the first "
                                         f"entry, {masked_url(name)!r}, must be the name of the master the "
                                         f"sentinels monitor, not an address ({_SENTINEL_FORM})")
    userinfo = _userinfo(sentinel_auth_env)
    sentinels: list[str] = []
    for entry in entries:
        address = _host_port(entry)
        if address is None:
            raise argparse.ArgumentTypeError(f"{setting} with REDIS_TYPE=sentinel: sentinel {masked_url(entry)!r} "
                                             f"is not host:port ({_SENTINEL_FORM})")
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        sentinels.append(redis_url_arg(f"redis://{userinfo}{host}:{address[1]}/0"))
    twice = sorted({entry for entry in entries if entries.count(entry) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{setting} with REDIS_TYPE=sentinel: sentinel listed more than once: "
                                         f"{', '.join(twice)}")
    master_url = redis_url_arg(f"redis://{_userinfo(auth_env)}{MASTER_PLACEHOLDER}:6379/0")
    return SentinelTarget(name, tuple(sentinels), master_url)


def _redis_sentinel(text: str) -> SentinelTarget:
    return _sentinel_target(text, "REDIS_URL (--redis-url)", "REDIS_AUTH", "REDIS_SENTINEL_AUTH")


def _persecond_sentinel(text: str) -> SentinelTarget:
    return _sentinel_target(text, "REDIS_PERSECOND_URL (--redis-persecond-url)", "REDIS_PERSECOND_AUTH",
                            "REDIS_PERSECOND_SENTINEL_AUTH")


def _redis_seeds(text: str) -> list[str]:
    """REDIS_URL with REDIS_TYPE=cluster: the seed nodes, comma-separated, each in --redis-url's forms
    (upstream's bare host:port with REDIS_AUTH, or a redis:// / rediss:// URL). A cluster has database 0
    only and its nodes speak TCP, so a database number or a socket path is an error, not a surprise later;
    a bare seed names its port, as for the per-second cluster (see _cluster_seeds)."""
    return _cluster_seeds(text, _redis_url)


_SEEDS_FORM = "host:port,host:port,... (e.g. 10.0.0.1:6379,10.0.0.2:6379) or redis:// / rediss:// URLs"


def _persecond_seeds(text: str) -> list[str]:
    """REDIS_PERSECOND_URL with REDIS_PERSECOND_TYPE=cluster: the per-second cluster's seed nodes, in the forms
    of REDIS_URL's seeds, with the per-second Redis's own REDIS_PERSECOND_AUTH."""
    return _cluster_seeds(text, _persecond_redis_url)


def _cluster_seeds(text: str, url_of: Callable[[str], str]) -> list[str]:
    """The URLs of a cluster's comma-separated seed nodes, each read by `url_of` (the URL forms of the Redis
    they stand for, with its own auth and socket-type variables). A bare seed must name its port: upstream
    hands each seed to its cluster client, which dials it as host:port and fails on `10.0.0.1` alone, where
    the URL form would quietly mean port 6379 (a redis:// seed, our own form, keeps that default)."""
    seeds = [part.strip() for part in text.split(",") if part.strip()]
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed node of the cluster (host:port, comma-separated)")
    for seed in seeds:
        if "://" in seed or _host_port(seed) is not None:
            continue
        if seed.startswith("/"):
            raise argparse.ArgumentTypeError(f"cluster seed {seed!r} is not host:port: cluster nodes are reached "
                                             "over TCP, not a unix socket")
        raise argparse.ArgumentTypeError(f"seed {masked_url(seed)!r} is not host:port ({_SEEDS_FORM})")
    urls = []
    for seed in seeds:
        url = url_of(seed)
        address = parse_redis_url(url)
        if address.unix_path:
            raise argparse.ArgumentTypeError(f"cluster seed {masked_url(url)!r}: cluster nodes are reached over "
                                             "TCP (host:port), not a unix socket")
        if address.db:
            raise argparse.ArgumentTypeError(f"cluster seed {masked_url(url)!r}: a Redis Cluster has database 0 "
                                             f"only, not {address.db}")
        urls.append(url)
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"cluster seed listed more than once: {', '.join(map(masked_url, twice))}")
    return urls


def _backend(text: str) -> str:
    if text not in ("redis", "memory"):
        raise argparse.ArgumentTypeError(f"invalid backend {text!r} (redis or memory)")
    return text


# The per-second Redis as settings name it: one server's URL, a sentinel-managed master, or a cluster's seed URLs.
PerSecondTarget = str | SentinelTarget | tuple[str, ...]


def _persecond_redis_url(text: str) -> str:
    """REDIS_PERSECOND_URL in our URL form or upstream's, like REDIS_URL, but with the per-second Redis's
    own REDIS_PERSECOND_SOCKET_TYPE and REDIS_PERSECOND_AUTH, as upstream reads them."""
    return _upstream_redis_url(text, "REDIS_PERSECOND_SOCKET_TYPE", "REDIS_PERSECOND_AUTH")


@dataclass(frozen=True)
class UpstreamSetting:
    """An environment variable of envoyproxy/ratelimit that this service does not implement."""

    name: str
    refuse: bool  # True: behaviour we lack, so refuse to start; False: observability/ops only, warn
    harmless: tuple[str, ...]  # values (lower case) that change nothing here: upstream's default and the like
    why: str  # what we offer instead
    # Read upstream only with REDIS_PERSECOND=true: without a per-second Redis the value changes nothing there,
    # so here it is named in a warning instead of refused, and decided after the flags are parsed.
    persecond_only: bool = False


# Every upstream setting we do not implement and that could be set to something that matters. A value outside
# `harmless` either stops the service (`refuse`: it would silently lose behaviour the operator relies on)
# or is logged once at startup as a warning. Settings we implement are flags in build_parser, not here
# (tests/ratelimit/test_upstream_settings.py checks the two never overlap, BACKEND_TYPE's values aside).
# Upstream settings not listed change nothing here: TRACING_* and CONFIG_GRPC_XDS_* other than those below
# only matter with TRACING_ENABLED / CONFIG_TYPE=GRPC_XDS_SOTW, which are listed; REDIS_SENTINEL_AUTH and
# REDIS_PERSECOND_SENTINEL_AUTH are read with REDIS_TYPE / REDIS_PERSECOND_TYPE=sentinel (else a warning says
# they are ignored); REDIS_HEALTH_CHECK_ACTIVE_CONNECTION is always on here (a Redis that does not
# answer a PING makes /healthcheck fail).
_NO_POOL = "each Redis gets one connection that pipelines every concurrent call: there is no pool to size"
_PIPELINED = "calls are always pipelined: what is ready is written at once, there is no window or limit"
_ZERO_DURATION = ("0", "0s", "0ms", "0us", "0ns")
UPSTREAM_SETTINGS: tuple[UpstreamSetting, ...] = (
    UpstreamSetting("BACKEND_TYPE", True, ("redis", "memory"),
                    "memcached is not supported; counters live in Redis (redis) or in this process (memory)"),
    UpstreamSetting("REDIS_TYPE", True, ("single", "cluster", "sentinel"),
                    "not a redis type: single (REDIS_URL names one redis-server, REDIS_SHARDS may spread the "
                    "counters over several), cluster (REDIS_URL lists seed nodes of a Redis Cluster) or sentinel "
                    "(REDIS_URL is the master's name and its sentinels: mymaster,host1:26379,host2:26379)"),
    UpstreamSetting("REDIS_PERSECOND_TYPE", True, ("single", "cluster", "sentinel"),
                    "not a redis type for the per-second Redis: single (REDIS_PERSECOND_URL names one "
                    "redis-server), cluster (REDIS_PERSECOND_URL lists seed nodes of a Redis Cluster) or "
                    "sentinel (REDIS_PERSECOND_URL is the master's name and its sentinels: "
                    "mymaster,host1:26379,host2:26379)",
                    persecond_only=True),
    UpstreamSetting("CONFIG_TYPE", True, ("file",),
                    "an xDS config server is not supported; limits are read from YAML files (CONFIG_DIR or "
                    "RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY)"),
    UpstreamSetting("CONFIG_GRPC_XDS_SERVER_URL", False, ("localhost:18000",),
                    "used upstream only with CONFIG_TYPE=GRPC_XDS_SOTW, which is not supported"),
    UpstreamSetting("CONFIG_GRPC_XDS_NODE_ID", False, ("default",),
                    "used upstream only with CONFIG_TYPE=GRPC_XDS_SOTW, which is not supported"),
    UpstreamSetting("MEMCACHE_HOST_PORT", False, ("",),
                    "used upstream only with BACKEND_TYPE=memcache, which is not supported"),
    UpstreamSetting("MEMCACHE_SRV", False, ("",),
                    "used upstream only with BACKEND_TYPE=memcache, which is not supported"),
    UpstreamSetting("TRACING_ENABLED", False, ("false",), "no OpenTelemetry tracing"),
    UpstreamSetting("DEBUG_HOST", False, ("0.0.0.0",),
                    "no debug port (pprof, /rlconfig, /stats): metrics on /metrics of PORT; "
                    "`igw ratelimit check DIR` lists the limits a directory loads"),
    UpstreamSetting("DEBUG_PORT", False, ("6070",),
                    "no debug port (pprof, /rlconfig, /stats): metrics on /metrics of PORT; "
                    "`igw ratelimit check DIR` lists the limits a directory loads"),
    UpstreamSetting("HOST", False, ("0.0.0.0", "::"),
                    "the HTTP port (PORT) listens on GRPC_HOST (--host), like the gRPC port"),
    UpstreamSetting("REDIS_POOL_SIZE", False, ("10",), _NO_POOL),
    UpstreamSetting("REDIS_PERSECOND_POOL_SIZE", False, ("10",), _NO_POOL),
    UpstreamSetting("REDIS_POOL_ON_EMPTY_BEHAVIOR", False, ("wait",), _NO_POOL),
    UpstreamSetting("REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR", False, ("wait",), _NO_POOL),
    UpstreamSetting("REDIS_PIPELINE_WINDOW", False, _ZERO_DURATION, _PIPELINED),
    UpstreamSetting("REDIS_PIPELINE_LIMIT", False, ("0",), _PIPELINED),
    UpstreamSetting("REDIS_PERSECOND_PIPELINE_WINDOW", False, _ZERO_DURATION, _PIPELINED),
    UpstreamSetting("REDIS_PERSECOND_PIPELINE_LIMIT", False, ("0",), _PIPELINED),
    UpstreamSetting("REDIS_USE_EXPLICIT_PIPELINE", False, ("false",), _PIPELINED),
    UpstreamSetting("REDIS_PERSECOND_USE_EXPLICIT_PIPELINE", False, ("false",), _PIPELINED),
)


def upstream_settings_in(environ: Mapping[str, str], persecond: bool | None = None) -> tuple[list[str], list[str]]:
    """(refusals, warnings): one line for each upstream setting of the table set to a value that matters.
    `persecond` None: every setting but the per-second-only ones; True/False (REDIS_PERSECOND, known once the
    flags are parsed): only those."""
    refusals: list[str] = []
    warnings: list[str] = []
    for setting in UPSTREAM_SETTINGS:
        if setting.persecond_only == (persecond is None):
            continue
        raw = environ.get(setting.name)
        if raw is None or raw.strip().lower() in setting.harmless or not raw.strip():
            continue
        if setting.persecond_only and not persecond:
            warnings.append(f"{setting.name}={raw} is ignored: REDIS_PERSECOND (--redis-persecond) is not true, "
                            "so there is no per-second Redis, as upstream")
        elif setting.refuse:
            refusals.append(f"{setting.name}={raw}: {setting.why}")
        else:
            warnings.append(f"{setting.name}={raw} is ignored: {setting.why}")
    return refusals, warnings



@dataclass(frozen=True)
class UpstreamPrometheus:
    """Where USE_PROMETHEUS serves upstream's Prometheus metrics (ratelimit_svc/upstream_prometheus.py)."""

    host: str  # "": every interface, as upstream's ":9090"
    port: int
    path: str


@dataclass(frozen=True)
class Mogrifier:
    """One of upstream's USE_DOG_STATSD_MOGRIFIERS: a stats name that `pattern` finds (anywhere in it, as Go's
    FindStringSubmatch) is sent as `name`, plus `tags`; `$N` in either is the pattern's group N."""

    label: str  # the mogrifier's name in USE_DOG_STATSD_MOGRIFIERS
    pattern: re.Pattern[str]
    name: str
    tags: tuple[tuple[str, str], ...]


# STATSD_PROTOCOL's values: gostats hands the setting to Go's net.Dial, whose network names these are. Its
# default there is tcp; here udp, what this service sent before it read the setting (and all a Datadog agent
# accepts), so a deployment that relied on it keeps its stats.
STATSD_PROTOCOLS = ("udp", "udp4", "udp6", "tcp", "tcp4", "tcp6")


@dataclass(frozen=True)
class StatsdTarget:
    """Where and how upstream's stats go over statsd (ratelimit_svc/statsd.py): USE_STATSD / USE_DOG_STATSD."""

    host: str
    port: int
    flush_interval: float  # seconds, > 0
    dogstatsd: bool  # tags as `|#k:v` (USE_DOG_STATSD); else in the name as gostats writes them (`.__k=v`)
    extra_tags: tuple[tuple[str, str], ...] = ()  # EXTRA_TAGS, sorted by key, values with `.:|` made `_`
    mogrifiers: tuple[Mogrifier, ...] = ()  # with dogstatsd: the first that matches a name renames and tags it
    protocol: str = "udp"  # STATSD_PROTOCOL, one of STATSD_PROTOCOLS (Go's network names, as gostats dials them)


@dataclass(frozen=True)
class Settings:
    config_dir: Path
    redis_url: str  # REDIS_TYPE=cluster: the first seed node (for logs); the seeds are in redis_cluster
    redis_shards: tuple[str, ...]  # where the counters live; (redis_url,) unless --redis-shards; () with a cluster
    backend: str
    host: str
    grpc_port: int
    http_port: int
    redis_timeout: float
    fail_open: bool
    near_limit_ratio: float
    cache_key_prefix: str
    merge_domains: bool
    expiration_jitter_max_seconds: int
    response_headers: bool
    limit_header: str
    remaining_header: str
    reset_header: str
    response_dynamic_metadata: bool
    shadow_mode: bool
    quota_mode: bool
    ignore_dotfiles: bool
    poll_interval: float
    replica_max_age: float
    log_level: str
    log_format: str
    workers: int
    local_cache_size_bytes: int = 0  # 0: no over-limit cache
    stop_cache_key_increment_when_overlimit: bool = False
    healthy_with_at_least_one_config_loaded: bool = False  # also need a domain in the config to be healthy
    force_start_without_initial_config: bool = False  # open the ports first, load the config in the background
    redis_persecond_url: str | None = None  # REDIS_PERSECOND: where counters of unit=second limits live
    redis_persecond_timeout: float = 0.25
    upstream_warnings: tuple[str, ...] = ()  # upstream settings set here that change nothing: logged at startup
    # gRPC socket and TLS (upstream's GRPC_UDS, GRPC_MAX_CONNECTION_AGE*, GRPC_SERVER_USE_TLS and friends).
    # Redis TLS has no field: REDIS_TLS* turn redis_url, redis_shards, redis_persecond_url and the cluster seeds
    # into rediss:// URLs that carry the options (igw/redis_conn.py), which every Redis client of the service
    # understands.
    grpc_uds: str = ""  # serve gRPC on this unix socket instead of host:grpc_port
    grpc_max_connection_age: float = 86400.0  # seconds; 0: never
    grpc_max_connection_age_grace: float = 3600.0
    grpc_tls: ServerTls | None = None  # files already checked
    prometheus: UpstreamPrometheus | None = None  # USE_PROMETHEUS: upstream's metrics endpoint; None: off
    statsd: StatsdTarget | None = None  # USE_STATSD / USE_DOG_STATSD: upstream's stats over statsd; None: off
    redis_type: str = "single"  # REDIS_TYPE: single (redis_shards), cluster (redis_cluster), sentinel
    redis_cluster: tuple[str, ...] = ()  # REDIS_TYPE=cluster: the seed nodes' URLs (TLS folded in)
    redis_sentinel: SentinelTarget | None = None  # REDIS_TYPE=sentinel: the master and its sentinels
    redis_persecond_sentinel: SentinelTarget | None = None  # REDIS_PERSECOND_TYPE=sentinel, with REDIS_PERSECOND
    # REDIS_PERSECOND_TYPE=cluster, with REDIS_PERSECOND: the per-second cluster's seed URLs (TLS folded in)
    redis_persecond_cluster: tuple[str, ...] = ()
    # Replica counts (adaptive limits) and RLQS demand: --state-redis-url, else redis_url in single mode;
    # None (cluster mode without it): not shared, adaptive limits stay at their min. In sentinel mode without
    # it: None here, and the sentinel-managed master (redis_sentinel) holds them (see `state_redis`).
    state_redis_url: str | None = None

    @property
    def state_redis(self) -> str | SentinelTarget | None:
        """Where replica counts and RLQS demand live: --state-redis-url, else the single Redis of the
        counters (the sentinel-managed master in sentinel mode), else (cluster) nowhere."""
        if self.state_redis_url is not None:
            return self.state_redis_url
        return self.redis_sentinel if self.redis_type == "sentinel" else None


def build_parser(redis_type: str = "single", persecond_type: str = "single") -> tuple[argparse.ArgumentParser,
                                                                                     EnvDefaults]:
    """`redis_type` picks how --redis-url is read: one server, (cluster) a comma-separated seed list or
    (sentinel) a master's name and its sentinels; `persecond_type` the same for --redis-persecond-url, whose
    cluster seeds are read as text here and checked in parse_settings (only with REDIS_PERSECOND, as
    upstream reads them, and refused in one line naming the setting)."""
    persecond_url_type = {"cluster": str, "sentinel": _persecond_sentinel}.get(persecond_type, _persecond_redis_url)
    url_type = {"cluster": _redis_seeds, "sentinel": _redis_sentinel}.get(redis_type, _redis_url)
    parser = argparse.ArgumentParser(
        prog="python -m ratelimit_svc",
        description="Envoy global rate-limit service (envoy.service.ratelimit.v3), compatible with "
        "envoyproxy/ratelimit's YAML config, with adaptive per-replica quotas.",
    )
    env = EnvDefaults(parser)
    # An empty --config-dir is refused; an empty CONFIG_DIR counts as unset, as every empty variable (EnvDefaults).
    env.add("--config-dir", "CONFIG_DIR", default=None, type=non_empty("config directory"),
            help="directory of *.yaml configs; default RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY")
    # No default master and sentinels: with REDIS_TYPE=sentinel, REDIS_URL must be given (parse_settings).
    env.add("--redis-url", "REDIS_URL", default=None if redis_type == "sentinel" else "redis://127.0.0.1:6379/0",
            type=url_type,
            help="redis://[:password@]host:port/db, the same with rediss:// for TLS, or unix:///path; "
                 "upstream's bare host:port or socket path "
                 "(REDIS_SOCKET_TYPE, REDIS_AUTH) also works; with --redis-type cluster, the cluster's seed "
                 "nodes, comma-separated; with --redis-type sentinel, the master's name and its sentinels "
                 "(mymaster,host1:26379,host2:26379; REDIS_SENTINEL_AUTH for the sentinels)")
    env.add("--redis-type", "REDIS_TYPE", default="single", type=_redis_type,
            help="single: --redis-url is one redis-server (--redis-shards may add more); cluster: a Redis "
                 "Cluster holds the counters, --redis-url lists seed nodes; sentinel: the master that Redis "
                 "Sentinel names holds them, followed through failovers")
    env.add("--state-redis-url", "IGW_STATE_REDIS_URL", default=None, type=redis_url_arg,
            help="the Redis of replica counts (adaptive limits) and quota-push (RLQS) demand; default "
                 "--redis-url (single); with --redis-type cluster, none unless given (adaptive limits stay "
                 "at their min, RLQS demand is not shared between replicas)")
    env.add("--redis-shards", "REDIS_SHARDS", default=None, type=_redis_urls,
            help="comma-separated redis URLs to spread the counters over (by descriptor domain and first "
                 "entry); default: the --redis-url server. Replica counts and quota push stay on --redis-url")
    env.add("--backend", "BACKEND_TYPE", default="redis", type=_backend,
            help="where counters live: redis (shared by replicas) or memory (this process only)")
    env.add("--host", "GRPC_HOST", default="0.0.0.0", help="address to bind")
    env.add("--grpc-port", "GRPC_PORT", default=8081, type=parse_port, help="gRPC port")
    env.add("--http-port", "PORT", default=8080, type=parse_port,
            help="HTTP port for /healthcheck, /livez and /metrics")
    env.add("--redis-timeout", "REDIS_TIMEOUT", default=0.25, type=_duration,
            help="per-call Redis deadline; a slower Redis makes the call fail (or pass with --fail-open)")
    env.add("--fail-open", "FAIL_OPEN", default=False, type=parse_bool,
            help="answer OK instead of a gRPC error when Redis is unavailable")
    env.add("--near-limit-ratio", "NEAR_LIMIT_RATIO", default=0.8, type=_ratio, help="near_limit threshold")
    env.add("--cache-key-prefix", "CACHE_KEY_PREFIX", default="", help="prefix of every Redis counter key")
    env.add("--merge-domain-config", "MERGE_DOMAIN_CONFIG", default=False, type=parse_bool,
            help="merge files that declare the same domain instead of rejecting them")
    env.add("--expiration-jitter-max-seconds", "EXPIRATION_JITTER_MAX_SECONDS", default=300,
            type=_int_at_most(MAX_EXPIRATION_JITTER_S, "Redis refuses a longer TTL on the counter keys"),
            help="random extra TTL on counter keys, spreads expiry load")
    env.add("--response-headers", "LIMIT_RESPONSE_HEADERS_ENABLED", default=False, type=parse_bool,
            help="add draft RateLimit-* headers to responses")
    env.add("--limit-header", "LIMIT_LIMIT_HEADER", default="RateLimit-Limit", help="limit header name")
    env.add("--remaining-header", "LIMIT_REMAINING_HEADER", default="RateLimit-Remaining",
            help="remaining header name")
    env.add("--reset-header", "LIMIT_RESET_HEADER", default="RateLimit-Reset", help="reset header name")
    env.add("--response-dynamic-metadata", "RESPONSE_DYNAMIC_METADATA", default=False, type=parse_bool,
            help="return descriptor metadata of passing limits as dynamic metadata")
    env.add("--shadow-mode", "SHADOW_MODE", default=False, type=parse_bool,
            help="global shadow mode: never answer OVER_LIMIT, only count")
    env.add("--quota-mode", "QUOTA_MODE", default=False, type=parse_bool,
            help="treat every limit as quota_mode")
    env.add("--ignore-dotfiles", "RUNTIME_IGNOREDOTFILES", default=False, type=parse_bool,
            help="skip config files whose name starts with a dot")
    env.add("--config-poll-interval", "CONFIG_POLL_INTERVAL", default=0.5, type=_duration,
            help="how often the config directory is checked for changes")
    env.add("--local-cache-size-in-bytes", "LOCAL_CACHE_SIZE_IN_BYTES", default=0,
            type=_int_at_most(GO_MAX_INT, "a Go int, as upstream reads it"),
            help="memory for keys seen over their fixed-window limit, answered OVER_LIMIT without Redis "
                 "until their window ends (about 260 bytes + key length each; at least 512 KiB, as upstream); "
                 "0 turns it off")
    env.add("--stop-cache-key-increment-when-overlimit", "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", default=False,
            type=parse_bool, help="when a request's hits would take some fixed-window counters over their limit, "
                                  "increment only those (costs a read before the write)")
    env.add("--healthy-with-at-least-one-config-loaded", "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", default=False,
            type=parse_bool, help="healthy only while the config in force declares at least one domain "
                                  "(a config must be loaded in any case)")
    env.add("--force-start-without-initial-config", "FORCE_START_WITHOUT_INITIAL_CONFIG", default=False,
            type=parse_bool, help="open the ports before the first config load, which then runs in the "
                                  "background (calls fail and health is 503 until it is in force)")
    env.add("--redis-persecond", "REDIS_PERSECOND", default=False, type=parse_bool,
            help="keep the counters of limits whose unit is second on the --redis-persecond-url Redis")
    env.add("--redis-persecond-url", "REDIS_PERSECOND_URL", default=None,
            type=persecond_url_type,
            help="the per-second Redis, in --redis-url's forms (upstream's uses REDIS_PERSECOND_SOCKET_TYPE, "
                 "REDIS_PERSECOND_AUTH); with REDIS_PERSECOND_TYPE=sentinel, a master's name and its sentinels "
                 "(REDIS_PERSECOND_SENTINEL_AUTH); with REDIS_PERSECOND_TYPE=cluster, the per-second cluster's "
                 "seed nodes, comma-separated")
    env.add("--redis-persecond-timeout", "REDIS_PERSECOND_TIMEOUT", default=None, type=_duration,
            help="per-call deadline on the per-second Redis; default --redis-timeout")
    env.add("--replica-max-age", "REPLICA_MAX_AGE", default=10.0, type=_duration,
            help="replica data older than this is stale; adaptive limits fall back to their min")
    _add_tls_flags(env)
    env.add("--use-prometheus", "USE_PROMETHEUS", default=False, type=parse_bool,
            help="also serve upstream's Prometheus metrics (ratelimit_service_*, the names of its default "
                 "statsd_exporter mapping) on --prometheus-addr at --prometheus-path")
    env.add("--prometheus-addr", "PROMETHEUS_ADDR", default=":9090",
            help="host:port of the --use-prometheus endpoint; an empty host listens on every interface")
    env.add("--prometheus-path", "PROMETHEUS_PATH", default="/metrics", help="path of the --use-prometheus endpoint")
    env.add("--prometheus-mapper-yaml", "PROMETHEUS_MAPPER_YAML", default="",
            help="upstream's custom statsd_exporter mapping file: not supported, only the default mapping "
                 "is served (refused with --use-prometheus)")
    _add_statsd_flags(env)
    add_common_flags(env)
    return parser, env


def _add_statsd_flags(env: EnvDefaults) -> None:
    # Read as text and checked in _statsd, so that a bad value is one line naming the setting (startup_error).
    env.add("--use-statsd", "USE_STATSD", default=None, type=parse_bool,
            help="send upstream's stats (ratelimit.service.rate_limit.<domain>.<key>.total_hits, ...) over "
                 "statsd to --statsd-host:--statsd-port; default true, as upstream, unless --use-prometheus or "
                 "--use-dog-statsd is on (upstream allows one of the three)")
    env.add("--statsd-host", "STATSD_HOST", default="localhost", help="statsd host (resolved, or connected to over "
            "TCP, at start and again at the flush after a failure)")
    env.add("--statsd-port", "STATSD_PORT", default="8125", help="statsd port (UDP or TCP: --statsd-protocol)")
    env.add("--statsd-protocol", "STATSD_PROTOCOL", default="udp",
            help="how statsd lines are sent: udp (datagrams of at most 1432 bytes), tcp (newline-terminated lines "
                 "on one connection, reconnected after a failure), or udp4, udp6, tcp4, tcp6 to pin the address "
                 "family; default udp (upstream's gostats defaults to tcp)")
    env.add("--stats-flush-interval", "STATS_FLUSH_INTERVAL", default="10s",
            help="how often counters that moved are sent (Go form: 10s, 500ms, 1m)")
    env.add("--extra-tags", "EXTRA_TAGS", default="",
            help="tags added to every stat: k1:v1,k2:v2 (in the name as .__k1=v1 with plain statsd, as "
                 "upstream's gostats; |#k1:v1 with --use-dog-statsd)")
    env.add("--use-dog-statsd", "USE_DOG_STATSD", default=False, type=parse_bool,
            help="send the stats in dogstatsd form (tags as |#k:v) to --statsd-host:--statsd-port")
    env.add("--use-dog-statsd-mogrifiers", "USE_DOG_STATSD_MOGRIFIERS", default="",
            help="with --use-dog-statsd: names of mogrifiers (A,B), each set by DOG_STATSD_MOGRIFIER_A_PATTERN "
                 "(a regular expression), _NAME (the name sent, $1 for a group) and _TAGS (k:$2,...)")
    env.add("--disable-stats", "DISABLE_STATS", default=False, type=parse_bool,
            help="send no upstream stats: neither statsd nor the --use-prometheus endpoint (/metrics on the "
                 "HTTP port stays)")


_TAG_FORM = "comma-separated key:value pairs, e.g. EXTRA_TAGS=env:prod,region:eu"


def _extra_tags(parser: argparse.ArgumentParser, text: str, warnings: list[str]) -> tuple[tuple[str, str], ...]:
    """Upstream reads EXTRA_TAGS as a Go map (each pair split at its first `:`, a later key wins) and gostats
    drops a tag whose key or value is empty and turns `.`, `:` and `|` of a value into `_`."""
    tags: dict[str, str] = {}
    if not text:
        return ()
    for pair in text.split(","):
        key, colon, value = pair.partition(":")
        if not colon:
            startup_error(parser, f"EXTRA_TAGS (--extra-tags) {text!r}: {pair!r} is not key:value ({_TAG_FORM})")
        if not key or not value:
            warnings.append(f"EXTRA_TAGS: tag {pair!r} is dropped: its key or value is empty (as upstream)")
            continue
        tags[key] = re.sub(r"[.:|]", "_", value)
    return tuple(sorted(tags.items()))


_MOGRIFIER_ENV = "DOG_STATSD_MOGRIFIER"
MOGRIFIER_GROUP_REF = re.compile(r"\$\d+")  # $1 in a mogrifier's name or tag: group 1


def _mogrifiers(parser: argparse.ArgumentParser, text: str) -> tuple[Mogrifier, ...]:
    """Upstream's USE_DOG_STATSD_MOGRIFIERS=A,B with DOG_STATSD_MOGRIFIER_A_PATTERN, _NAME and _TAGS
    (k:$1,k2:v): a missing pattern or name, a pattern that does not compile, an empty tag key or value
    stop it at startup, as here; a `$N` past the pattern's groups would crash it at the first match, so
    it is refused here too. Upstream tries them in no fixed order (a Go map); here, in the order given."""
    mogrifiers: list[Mogrifier] = []
    for label in (part for part in text.split(",") if part):
        prefix = f"{_MOGRIFIER_ENV}_{label}"
        where = f"USE_DOG_STATSD_MOGRIFIERS: mogrifier {label!r}"
        pattern_text = os.environ.get(f"{prefix}_PATTERN", "")
        name = os.environ.get(f"{prefix}_NAME", "")
        if not pattern_text:
            startup_error(parser, f"{where}: {prefix}_PATTERN is not set (a regular expression)")
        if not name:
            startup_error(parser, f"{where}: {prefix}_NAME is not set (the name to send, $1 for a group)")
        try:
            pattern = re.compile(pattern_text)
        except re.error as exc:
            startup_error(parser, f"{where}: {prefix}_PATTERN {pattern_text!r} is not a regular expression: {exc}")
        tags: dict[str, str] = {}
        for pair in (part for part in os.environ.get(f"{prefix}_TAGS", "").split(",") if part):
            key, colon, value = pair.partition(":")
            if not colon or not key or not value:
                startup_error(parser, f"{where}: {prefix}_TAGS: {pair!r} is not key:value (e.g. domain:$1)")
            tags[key] = value
        for template in (name, *tags.values()):
            for ref in MOGRIFIER_GROUP_REF.findall(template):
                if int(ref[1:]) > pattern.groups:
                    startup_error(parser, f"{where}: {ref} in {template!r} but {prefix}_PATTERN has "
                                           f"{pattern.groups} group(s)")
        mogrifiers.append(Mogrifier(label, pattern, name, tuple(tags.items())))
    return tuple(mogrifiers)


def _statsd(parser: argparse.ArgumentParser, args: argparse.Namespace, warnings: list[str]) -> StatsdTarget | None:
    """Which of upstream's sinks is on. Upstream allows one of statsd, dogstatsd and Prometheus and refuses
    two; USE_STATSD defaults to true there, so its deployments with USE_DOG_STATSD or USE_PROMETHEUS set
    USE_STATSD=false. Here an unset USE_STATSD is false beside either, so our own USE_PROMETHEUS deployments
    keep working; USE_STATSD=true with USE_PROMETHEUS sends both (they go to different places)."""
    port_text = args.statsd_port
    statsd_port = _port_number(port_text)
    if statsd_port is None:
        startup_error(parser, f"STATSD_PORT (--statsd-port) {port_text!r}: not a port number from 1 to 65535")
    protocol = args.statsd_protocol.strip().lower()
    if protocol not in STATSD_PROTOCOLS:
        startup_error(parser, f"STATSD_PROTOCOL (--statsd-protocol) {args.statsd_protocol!r}: not one of "
                               f"{', '.join(STATSD_PROTOCOLS)}")
    try:
        interval = _go_duration(args.stats_flush_interval)
    except argparse.ArgumentTypeError as exc:
        startup_error(parser, f"STATS_FLUSH_INTERVAL (--stats-flush-interval): {exc}")
    if interval <= 0:
        startup_error(parser, f"STATS_FLUSH_INTERVAL (--stats-flush-interval) {args.stats_flush_interval!r}: "
                               "must be greater than zero (e.g. 10s)")
    tags = _extra_tags(parser, args.extra_tags, warnings)
    host = args.statsd_host.strip()
    if not host:
        startup_error(parser, "STATSD_HOST (--statsd-host) is empty: give the statsd host (default localhost)")
    if args.use_dog_statsd and args.use_statsd:
        startup_error(parser, "USE_DOG_STATSD=true and USE_STATSD=true: one statsd form at a time, as upstream; "
                               "set USE_STATSD=false for dogstatsd")
    use_statsd = args.use_statsd if args.use_statsd is not None else not (args.use_dog_statsd or args.use_prometheus)
    mogrifiers: tuple[Mogrifier, ...] = ()
    if args.use_dog_statsd:
        mogrifiers = _mogrifiers(parser, args.use_dog_statsd_mogrifiers)
    elif args.use_dog_statsd_mogrifiers:
        warnings.append(f"USE_DOG_STATSD_MOGRIFIERS={args.use_dog_statsd_mogrifiers} is ignored: "
                        "USE_DOG_STATSD (--use-dog-statsd) is not true, as upstream")
    if args.disable_stats:
        return None
    if not (use_statsd or args.use_dog_statsd):
        return None
    return StatsdTarget(host, statsd_port, interval, args.use_dog_statsd, tags, mogrifiers, protocol)


_ADDR_EXAMPLES = "examples: :9090, 127.0.0.1:9090, [::1]:9090"


def _upstream_prometheus(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         warnings: list[str]) -> UpstreamPrometheus | None:
    """USE_PROMETHEUS's endpoint, checked only when it is on: upstream reads the other three only then."""
    if not args.use_prometheus:
        for name, value, default in (("PROMETHEUS_ADDR", args.prometheus_addr, ":9090"),
                                     ("PROMETHEUS_PATH", args.prometheus_path, "/metrics"),
                                     ("PROMETHEUS_MAPPER_YAML", args.prometheus_mapper_yaml, "")):
            if value != default:
                warnings.append(f"{name}={value} is ignored: USE_PROMETHEUS (--use-prometheus) is not true, "
                                "as upstream")
        return None
    if args.prometheus_mapper_yaml:
        startup_error(parser, f"PROMETHEUS_MAPPER_YAML (--prometheus-mapper-yaml) {args.prometheus_mapper_yaml}: "
                               "custom statsd_exporter mapping files are not supported; USE_PROMETHEUS serves "
                               "upstream's default mapping only (unset PROMETHEUS_MAPPER_YAML)")
    addr = args.prometheus_addr
    setting = f"PROMETHEUS_ADDR (--prometheus-addr) {addr!r}"
    if addr.startswith("["):
        host, bracket, rest = addr[1:].partition("]")
        if not bracket or not rest.startswith(":") or ":" not in host:
            startup_error(parser, f"{setting}: not host:port ({_ADDR_EXAMPLES})")
        port_text = rest[1:]
    else:
        host, colon, port_text = addr.rpartition(":")
        if not colon or ":" in host:
            startup_error(parser, f"{setting}: not host:port ({_ADDR_EXAMPLES}; an IPv6 host goes in brackets)")
    port = _port_number(port_text)
    if port is None or port_text != port_text.strip():
        startup_error(parser, f"{setting}: port {port_text!r} is not a number from 1 to 65535 ({_ADDR_EXAMPLES})")
    path = args.prometheus_path
    if not path.startswith("/"):
        startup_error(parser, f"PROMETHEUS_PATH (--prometheus-path) {path!r}: must start with / (default /metrics)")
    return UpstreamPrometheus(host, port, path)


_ANY_HOST = ("", "0.0.0.0", "::")


def _port_collision(args: argparse.Namespace, prometheus: UpstreamPrometheus | None) -> str | None:
    """Two of the service's own listeners on one port: the second bind would fail after the config load, as
    "address already in use" by ourselves (or, with SO_REUSEPORT, share the port). Port 0 (any free port)
    never collides; listeners on different specific addresses do not either; GRPC_UDS leaves the gRPC port
    unbound."""
    listeners: list[tuple[str, str, int]] = []
    if not args.grpc_uds:
        listeners.append(("GRPC_PORT (--grpc-port)", args.host, args.grpc_port))
    listeners.append(("PORT (--http-port)", args.host, args.http_port))
    if prometheus is not None:
        listeners.append((f"PROMETHEUS_ADDR (--prometheus-addr) {args.prometheus_addr!r}", prometheus.host,
                          prometheus.port))
    return _shared_port(listeners)


def _shared_port(listeners: Sequence[tuple[str, str, int]]) -> str | None:
    """The first two of (setting, host, port) that would bind the same address, named; None if none do."""
    for i, (name, host, port) in enumerate(listeners):
        for other, other_host, other_port in listeners[:i]:
            if port and port == other_port and (host == other_host or {host, other_host} & set(_ANY_HOST)):
                return f"{other} and {name} are both port {port}: give each listener its own port"
    return None


def config_dir_from_runtime_env() -> Path:
    """Upstream's layout: RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY. An empty variable counts as
    unset, as every setting read through EnvDefaults (an empty RUNTIME_ROOT would otherwise mean the directory
    the service happens to run in)."""
    root = os.environ.get("RUNTIME_ROOT") or "/srv/runtime_data/current"
    sub = os.environ.get("RUNTIME_SUBDIRECTORY", "")
    app = os.environ.get("RUNTIME_APPDIRECTORY") or "config"
    return Path(root, sub, app) if sub else Path(root, app)


def _redis_type_given(argv: list[str] | None) -> str:
    """--redis-type / REDIS_TYPE before the real parse, which needs it to read --redis-url. A bad value is
    left to the real parse to report (as "single" here)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--redis-type", default=os.environ.get("REDIS_TYPE") or "single")
    try:
        known, _ = pre.parse_known_args(argv)
        return _redis_type(known.redis_type)
    except (argparse.ArgumentError, argparse.ArgumentTypeError):
        return "single"


def parse_settings(argv: list[str] | None = None) -> Settings:
    persecond_type = os.environ.get("REDIS_PERSECOND_TYPE", "").strip().lower()
    parser, env = build_parser(_redis_type_given(argv), persecond_type)
    # Before the flags: BACKEND_TYPE=memcache gets this line rather than the flag's "invalid backend".
    refusals, warnings = upstream_settings_in(os.environ)
    if refusals:  # one line each, without the usage text: nothing is wrong with the command line
        parser.exit(2, "".join(f"{parser.prog}: error: {line}\n" for line in refusals))
    args = env.parse(argv)
    refusals, persecond_warnings = upstream_settings_in(os.environ, persecond=args.redis_persecond)
    if refusals:
        parser.exit(2, "".join(f"{parser.prog}: error: {line}\n" for line in refusals))
    warnings += persecond_warnings
    config_dir = Path(args.config_dir) if args.config_dir is not None else config_dir_from_runtime_env()
    # Without CONFIG_DIR the path comes from upstream's defaults: say so, the operator never typed it.
    shown = repr(str(config_dir)) + ("" if args.config_dir is not None else
                                     " (RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY, as neither "
                                     "--config-dir nor CONFIG_DIR is set)")
    if not config_dir.is_dir():
        parser.error(f"config directory {shown} does not exist or is not a directory")
    if not os.access(config_dir, os.R_OK | os.X_OK):
        parser.error(f"config directory {shown} is not readable")
    persecond_url: PerSecondTarget | None = None
    if args.redis_persecond:
        if args.redis_persecond_url is None:
            parser.error("REDIS_PERSECOND=true (--redis-persecond) needs REDIS_PERSECOND_URL (--redis-persecond-url), "
                         "the Redis for the counters of limits whose unit is second")
        if args.backend == "memory":
            warnings.append("REDIS_PERSECOND=true is ignored: BACKEND_TYPE=memory keeps every counter in this process")
        elif persecond_type == "cluster":
            try:
                persecond_url = tuple(_persecond_seeds(args.redis_persecond_url))
            except argparse.ArgumentTypeError as exc:
                startup_error(parser, f"REDIS_PERSECOND_URL (--redis-persecond-url) with REDIS_PERSECOND_TYPE="
                                      f"cluster: {exc}")
        else:
            persecond_url = args.redis_persecond_url  # a SentinelTarget with REDIS_PERSECOND_TYPE=sentinel
    elif args.redis_persecond_url is not None:
        warnings.append("REDIS_PERSECOND_URL is ignored: REDIS_PERSECOND (--redis-persecond) is not true, so "
                        "per-second counters stay with the others, as upstream")
    local_cache_size = args.local_cache_size_in_bytes
    if 0 < local_cache_size < LOCAL_CACHE_MIN_BYTES:
        warnings.append(f"LOCAL_CACHE_SIZE_IN_BYTES={local_cache_size} is below the smallest cache: using "
                        f"{LOCAL_CACHE_MIN_BYTES} bytes, as upstream (its freecache has the same minimum)")
        local_cache_size = LOCAL_CACHE_MIN_BYTES
    cluster = args.redis_type == "cluster"
    sentinel = args.redis_type == "sentinel"
    if cluster and args.redis_shards:
        startup_error(parser, "REDIS_SHARDS (--redis-shards) cannot be used with REDIS_TYPE=cluster "
                               "(--redis-type cluster): the cluster spreads the counters over its masters itself; "
                               "list its seed nodes in REDIS_URL and unset REDIS_SHARDS")
    if sentinel and args.redis_url is None:
        startup_error(parser, f"REDIS_TYPE=sentinel (--redis-type sentinel) needs REDIS_URL (--redis-url): "
                               f"{_SENTINEL_FORM}")
    if sentinel and args.redis_shards:
        startup_error(parser, "REDIS_SHARDS (--redis-shards) cannot be used with REDIS_TYPE=sentinel "
                               "(--redis-type sentinel): the counters live on the one master the sentinels "
                               "name; unset REDIS_SHARDS")
    for name, used in (("REDIS_SENTINEL_AUTH", sentinel),
                       ("REDIS_PERSECOND_SENTINEL_AUTH", isinstance(persecond_url, SentinelTarget))):
        if os.environ.get(name) and not used:
            warnings.append(f"{name} is ignored: it authenticates to Redis Sentinel, which is used only with "
                            f"{'REDIS_TYPE' if name == 'REDIS_SENTINEL_AUTH' else 'REDIS_PERSECOND_TYPE'}=sentinel"
                            " (as upstream)")
    redis_urls = _redis_tls(parser, args, persecond_url, warnings)
    statsd = _statsd(parser, args, warnings)
    prometheus = _upstream_prometheus(parser, args, warnings)
    if args.disable_stats and prometheus is not None:
        warnings.append("USE_PROMETHEUS=true is ignored: DISABLE_STATS=true turns upstream's stats off, as "
                        "upstream (/metrics on PORT stays)")
        prometheus = None
    if problem := _port_collision(args, prometheus):
        startup_error(parser, problem)
    persecond_url = redis_urls.persecond
    return Settings(
        config_dir=config_dir,
        redis_url=redis_urls.main,
        redis_shards=() if cluster or sentinel else redis_urls.shards,
        redis_type=args.redis_type,
        redis_cluster=redis_urls.shards if cluster else (),
        redis_sentinel=redis_urls.sentinel,
        redis_persecond_sentinel=redis_urls.persecond_sentinel,
        redis_persecond_cluster=redis_urls.persecond if isinstance(redis_urls.persecond, tuple) else (),
        state_redis_url=redis_urls.state,
        grpc_uds=_grpc_uds(parser, args),
        grpc_max_connection_age=args.grpc_max_connection_age,
        grpc_max_connection_age_grace=args.grpc_max_connection_age_grace,
        grpc_tls=_grpc_tls(parser, args),
        backend=args.backend,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        redis_timeout=args.redis_timeout,
        fail_open=args.fail_open,
        near_limit_ratio=args.near_limit_ratio,
        cache_key_prefix=args.cache_key_prefix,
        merge_domains=args.merge_domain_config,
        expiration_jitter_max_seconds=args.expiration_jitter_max_seconds,
        response_headers=args.response_headers,
        limit_header=args.limit_header,
        remaining_header=args.remaining_header,
        reset_header=args.reset_header,
        response_dynamic_metadata=args.response_dynamic_metadata,
        shadow_mode=args.shadow_mode,
        quota_mode=args.quota_mode,
        ignore_dotfiles=args.ignore_dotfiles,
        poll_interval=args.config_poll_interval,
        replica_max_age=args.replica_max_age,
        log_level=args.log_level,
        log_format=args.log_format,
        workers=args.workers,
        local_cache_size_bytes=local_cache_size,
        stop_cache_key_increment_when_overlimit=args.stop_cache_key_increment_when_overlimit,
        healthy_with_at_least_one_config_loaded=args.healthy_with_at_least_one_config_loaded,
        force_start_without_initial_config=args.force_start_without_initial_config,
        redis_persecond_url=persecond_url if isinstance(persecond_url, str) else None,
        redis_persecond_timeout=(args.redis_timeout if args.redis_persecond_timeout is None
                                 else args.redis_persecond_timeout),
        upstream_warnings=tuple(warnings),
        prometheus=prometheus,
        statsd=statsd,
    )


# --- gRPC socket and TLS, Redis TLS ---------------------------------------------------------------------------

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_duration(text: str) -> float:
    """Seconds from Go's duration forms (24h, 1h30m, 1.5s, 0), as upstream's environment has them, or a
    bare number of seconds."""
    value = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return _within_go_duration(float(value))
    parts = _GO_DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (Go form: 24h, 1h30m, 90s; 0 for never)")
    return _within_go_duration(sum(float(number) * _GO_UNITS[unit] for number, unit in parts))


def _add_tls_flags(env: EnvDefaults) -> None:
    env.add("--grpc-uds", "GRPC_UDS", default="",
            help="serve gRPC on this unix socket path instead of --host:--grpc-port (HTTP stays on its port)")
    env.add("--grpc-max-connection-age", "GRPC_MAX_CONNECTION_AGE", default="24h", type=_go_duration,
            help="send clients a GOAWAY after a connection lived this long (+/-10%%), so they reconnect and "
                 "spread over new replicas; 0: never")
    env.add("--grpc-max-connection-age-grace", "GRPC_MAX_CONNECTION_AGE_GRACE", default="1h", type=_go_duration,
            help="close a connection this long after its GOAWAY even with calls in flight; 0: never")
    add_server_tls_flags(env)
    env.add("--redis-tls", "REDIS_TLS", default=False, type=parse_bool,
            help="talk TLS to the --redis-url and --redis-shards servers (a rediss:// URL does so anyway)")
    env.add("--redis-persecond-tls", "REDIS_PERSECOND_TLS", default=False, type=parse_bool,
            help="talk TLS to the --redis-persecond-url server")
    env.add("--redis-tls-client-cert", "REDIS_TLS_CLIENT_CERT", default="",
            help="PEM client certificate for Redis servers that verify clients (tls-auth-clients)")
    env.add("--redis-tls-client-key", "REDIS_TLS_CLIENT_KEY", default="", help="PEM private key of that certificate")
    env.add("--redis-tls-cacert", "REDIS_TLS_CACERT", default="",
            help="PEM CA(s) trusted for Redis server certificates, besides the system's")
    env.add("--redis-tls-skip-hostname-verification", "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", default=False,
            type=parse_bool, help="check that the Redis certificate chains to a trusted CA, not that it names the host")


def _grpc_uds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    path = args.grpc_uds
    if not path:
        return ""
    if args.workers > 1:
        startup_error(parser, f"GRPC_UDS (--grpc-uds) {path}: WORKERS={args.workers} processes cannot share one "
                               "unix socket (each would replace the one before); run one process per socket")
    if len(os.fsencode(path)) > 107:
        startup_error(parser, f"GRPC_UDS (--grpc-uds) {path}: longer than the 107 bytes a unix socket path may have")
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        startup_error(parser, f"GRPC_UDS (--grpc-uds) {path}: directory {str(parent)!r} does not exist or is "
                               "not writable")
    return path


def _grpc_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerTls | None:
    from igw.service_runtime import ServerTls
    from igw.tls import SERVER_TLS_NAMES, TlsFileError, server_tls_settings_problem

    if problem := server_tls_settings_problem(args):
        startup_error(parser, problem)
    if not args.grpc_server_use_tls:
        return None
    tls = ServerTls(args.grpc_server_tls_cert, args.grpc_server_tls_key, args.grpc_client_tls_cacert or None,
                    args.grpc_client_tls_san, names=SERVER_TLS_NAMES)
    try:
        tls.load()
    except TlsFileError as exc:
        startup_error(parser, str(exc))
    return tls


@dataclass(frozen=True)
class _RedisUrls:
    main: str
    shards: tuple[str, ...]  # with a cluster: its seeds; with sentinel: none
    persecond: PerSecondTarget | None
    state: str | None
    sentinel: SentinelTarget | None = None
    persecond_sentinel: SentinelTarget | None = None


def _redis_tls(parser: argparse.ArgumentParser, args: argparse.Namespace, persecond: PerSecondTarget | None,
               warnings: list[str]) -> _RedisUrls:
    """The Redis URLs with REDIS_TLS* folded in: REDIS_TLS makes --redis-url and the shards rediss://,
    REDIS_PERSECOND_TLS the per-second one, and the file settings apply to every rediss:// URL (a URL that
    spells an option itself keeps it)."""
    from igw.redis_conn import RedisTls, TlsFileError, load_ca_file, load_key_pair, with_tls

    target: SentinelTarget | None = None
    if args.redis_type == "cluster":
        main, shards = args.redis_url[0], list(args.redis_url)
    elif args.redis_type == "sentinel":
        target = args.redis_url
        main, shards = target.sentinels[0], []
    else:
        main, shards = args.redis_url, list(args.redis_shards or [args.redis_url])
    options = [name for name, value in (("REDIS_TLS_CACERT", args.redis_tls_cacert),
                                        ("REDIS_TLS_CLIENT_CERT", args.redis_tls_client_cert),
                                        ("REDIS_TLS_CLIENT_KEY", args.redis_tls_client_key),
                                        ("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
                                         args.redis_tls_skip_hostname_verification)) if value]
    if args.redis_tls_client_key and not args.redis_tls_client_cert:
        startup_error(parser, f"REDIS_TLS_CLIENT_KEY (--redis-tls-client-key) {args.redis_tls_client_key} is set "
                               "without REDIS_TLS_CLIENT_CERT (--redis-tls-client-cert)")
    try:
        context = ssl.create_default_context()
        if args.redis_tls_cacert:
            load_ca_file(context, args.redis_tls_cacert, "REDIS_TLS_CACERT (--redis-tls-cacert)")
        if args.redis_tls_client_cert:
            load_key_pair(context, args.redis_tls_client_cert, args.redis_tls_client_key or None,
                          "REDIS_TLS_CLIENT_CERT (--redis-tls-client-cert)",
                          "REDIS_TLS_CLIENT_KEY (--redis-tls-client-key)")
    except TlsFileError as exc:
        startup_error(parser, str(exc))
    tls = RedisTls(args.redis_tls_cacert or None, args.redis_tls_client_cert or None,
                   args.redis_tls_client_key or None, check_hostname=not args.redis_tls_skip_hostname_verification)

    def secured(url: str, on: bool, setting: str) -> str:
        if not (on or urlparse(url).scheme == "rediss"):
            return url
        try:
            return with_tls(url, tls)
        except ValueError as exc:
            startup_error(parser, f"{setting}: {exc}")

    def secured_target(target: SentinelTarget, on: bool, setting: str) -> SentinelTarget:
        """TLS to the master and to the sentinels alike (a sentinel deployment serves both on TLS or neither)."""
        return SentinelTarget(target.master_name, tuple(secured(url, on, setting) for url in target.sentinels),
                              secured(target.master_url, on, setting))

    main = secured(main, args.redis_tls, "REDIS_TLS=true (--redis-tls)")
    shards = [secured(url, args.redis_tls, "REDIS_TLS=true (--redis-tls)") for url in shards]
    if target is not None:
        target = secured_target(target, args.redis_tls, "REDIS_TLS=true (--redis-tls)")
    persecond_target: SentinelTarget | None = None
    if isinstance(persecond, SentinelTarget):
        persecond = persecond_target = secured_target(persecond, args.redis_persecond_tls,
                                                      "REDIS_PERSECOND_TLS=true (--redis-persecond-tls)")
    elif isinstance(persecond, tuple):
        persecond = tuple(secured(url, args.redis_persecond_tls, "REDIS_PERSECOND_TLS=true (--redis-persecond-tls)")
                          for url in persecond)
    elif persecond is not None:
        persecond = secured(persecond, args.redis_persecond_tls, "REDIS_PERSECOND_TLS=true (--redis-persecond-tls)")
    elif args.redis_persecond_tls:
        warnings.append("REDIS_PERSECOND_TLS is ignored: there is no per-second Redis (REDIS_PERSECOND is not true)")
    state = args.state_redis_url
    if state is not None:
        state = secured(state, False, "IGW_STATE_REDIS_URL (--state-redis-url)")
    elif args.redis_type == "single":
        state = main
    urls = [main, *shards, *([persecond] if isinstance(persecond, str) else []),
            *(persecond if isinstance(persecond, tuple) else ()), *([state] if state else [])]
    for each in (target, persecond_target):
        if each is not None:
            urls += [*each.sentinels, each.master_url]
    if options and not any(urlparse(url).scheme == "rediss" for url in urls):
        startup_error(parser, f"{options[0]} is set but no Redis is reached over TLS: set REDIS_TLS=true "
                               "(--redis-tls) or give rediss:// URLs")
    if args.redis_type == "cluster":
        _same_node_settings(parser, shards, "REDIS_URL (--redis-url)")
    if isinstance(persecond, tuple):
        _same_node_settings(parser, persecond, "REDIS_PERSECOND_URL (--redis-persecond-url)")
    return _RedisUrls(main, tuple(shards), persecond, state, target, persecond_target)


def _same_node_settings(parser: argparse.ArgumentParser, seeds: Sequence[str], setting: str) -> None:
    """The cluster client reaches every node with the first seed's credentials and TLS settings, so seeds
    that differ in them are refused rather than half used."""
    first = parse_redis_url(seeds[0])
    for seed in seeds[1:]:
        address = parse_redis_url(seed)
        if (address.username, address.password, address.tls) != (first.username, first.password, first.tls):
            startup_error(parser, f"{setting}: cluster seeds {first.url} and {address.url} differ in credentials "
                                   "or TLS settings; every node of a cluster is reached with the same ones")
