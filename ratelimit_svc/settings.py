"""Flags of the rate-limit service, each also read from upstream's environment variable name."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from igw.runtime import (
    EnvDefaults,
    add_common_flags,
    non_negative_int,
    parse_bool,
    parse_duration,
    parse_port,
    redis_url_arg,
)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"ratio {value} must be in (0, 1]")
    return value



def _redis_url(text: str) -> str:
    """Our URL form, or upstream's: REDIS_URL is a bare `host:port` (REDIS_SOCKET_TYPE=tcp) or a socket
    path (REDIS_SOCKET_TYPE=unix), with the password apart in REDIS_AUTH (`password` or `user:password`).
    An operator switching over keeps the environment they have."""
    if "://" not in text:
        unix = os.environ.get("REDIS_SOCKET_TYPE", "").lower() == "unix" or text.startswith("/")
        auth = os.environ.get("REDIS_AUTH", "")
        user, _, password = auth.partition(":") if ":" in auth else ("", "", auth)
        userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}@" if auth else ""
        text = f"unix://{userinfo}{text}" if unix else f"redis://{userinfo}{text}"
    return redis_url_arg(text)


def _redis_urls(text: str) -> list[str]:
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("give at least one redis URL (comma-separated)")
    urls = [_redis_url(url) for url in urls]
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"redis shard listed more than once: {', '.join(twice)}")
    return urls


def _backend(text: str) -> str:
    if text not in ("redis", "memory"):
        raise argparse.ArgumentTypeError(f"invalid backend {text!r} (redis or memory)")
    return text



@dataclass(frozen=True)
class Settings:
    config_dir: Path
    redis_url: str
    redis_shards: tuple[str, ...]  # where the counters live; (redis_url,) unless --redis-shards
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


def build_parser() -> tuple[argparse.ArgumentParser, EnvDefaults]:
    parser = argparse.ArgumentParser(
        prog="python -m ratelimit_svc",
        description="Envoy global rate-limit service (envoy.service.ratelimit.v3), compatible with "
        "envoyproxy/ratelimit's YAML config, with adaptive per-replica quotas.",
    )
    env = EnvDefaults(parser)
    env.add("--config-dir", "CONFIG_DIR", default=None,
            help="directory of *.yaml configs; default RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY")
    env.add("--redis-url", "REDIS_URL", default="redis://127.0.0.1:6379/0", type=_redis_url,
            help="redis://[:password@]host:port/db or unix:///path; upstream's bare host:port or socket path "
                 "(REDIS_SOCKET_TYPE, REDIS_AUTH) also works")
    env.add("--redis-shards", "REDIS_SHARDS", default=None, type=_redis_urls,
            help="comma-separated redis URLs to spread the counters over (by descriptor domain and first "
                 "entry); default: the --redis-url server. Replica counts and quota push stay on --redis-url")
    env.add("--backend", "BACKEND_TYPE", default="redis", type=_backend,
            help="where counters live: redis (shared by replicas) or memory (this process only)")
    env.add("--host", "GRPC_HOST", default="0.0.0.0", help="address to bind")
    env.add("--grpc-port", "GRPC_PORT", default=8081, type=parse_port, help="gRPC port")
    env.add("--http-port", "PORT", default=8080, type=parse_port, help="HTTP port for /healthcheck and /metrics")
    env.add("--redis-timeout", "REDIS_TIMEOUT", default=0.25, type=parse_duration,
            help="per-call Redis deadline; a slower Redis makes the call fail (or pass with --fail-open)")
    env.add("--fail-open", "FAIL_OPEN", default=False, type=parse_bool,
            help="answer OK instead of a gRPC error when Redis is unavailable")
    env.add("--near-limit-ratio", "NEAR_LIMIT_RATIO", default=0.8, type=_ratio, help="near_limit threshold")
    env.add("--cache-key-prefix", "CACHE_KEY_PREFIX", default="", help="prefix of every Redis counter key")
    env.add("--merge-domain-config", "MERGE_DOMAIN_CONFIG", default=False, type=parse_bool,
            help="merge files that declare the same domain instead of rejecting them")
    env.add("--expiration-jitter-max-seconds", "EXPIRATION_JITTER_MAX_SECONDS", default=300,
            type=non_negative_int, help="random extra TTL on counter keys, spreads expiry load")
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
    env.add("--config-poll-interval", "CONFIG_POLL_INTERVAL", default=0.5, type=parse_duration,
            help="how often the config directory is checked for changes")
    env.add("--local-cache-size-in-bytes", "LOCAL_CACHE_SIZE_IN_BYTES", default=0, type=non_negative_int,
            help="memory for keys seen over their fixed-window limit, answered OVER_LIMIT without Redis "
                 "until their window ends (about 260 bytes + key length each); 0 turns it off")
    env.add("--replica-max-age", "REPLICA_MAX_AGE", default=10.0, type=parse_duration,
            help="replica data older than this is stale; adaptive limits fall back to their min")
    add_common_flags(env)
    return parser, env


def config_dir_from_runtime_env() -> Path:
    """Upstream's layout: RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY."""
    root = os.environ.get("RUNTIME_ROOT", "/srv/runtime_data/current")
    sub = os.environ.get("RUNTIME_SUBDIRECTORY", "")
    app = os.environ.get("RUNTIME_APPDIRECTORY", "config")
    return Path(root, sub, app) if sub else Path(root, app)


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser, env = build_parser()
    args = env.parse(argv)
    config_dir = Path(args.config_dir) if args.config_dir else config_dir_from_runtime_env()
    if not config_dir.is_dir():
        parser.error(f"config directory {str(config_dir)!r} does not exist or is not a directory")
    if not os.access(config_dir, os.R_OK | os.X_OK):
        parser.error(f"config directory {str(config_dir)!r} is not readable")
    return Settings(
        config_dir=config_dir,
        redis_url=args.redis_url,
        redis_shards=tuple(args.redis_shards or [args.redis_url]),
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
        local_cache_size_bytes=args.local_cache_size_in_bytes,
    )
