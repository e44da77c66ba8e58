"""Flags of the ext_proc service; each also comes from an environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from ext_proc.apikeys import DEFAULT_KEY_SECRET
from igw.runtime import (
    EnvDefaults,
    add_common_flags,
    add_server_tls_flags,
    non_empty,
    parse_bool,
    parse_duration,
    parse_port,
    positive_duration,
    positive_int,
    redis_url_arg,
    startup_error,
)
from igw.tls import SERVER_TLS_NAMES, ServerFiles, TlsFileError, server_tls_settings_problem


def _non_negative_duration(text: str) -> float:
    return parse_duration(text)


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str
    host: str
    grpc_port: int
    http_port: int
    key_secret: bytes
    key_secret_is_default: bool
    cache_ttl: float
    stale_if_error: float
    cache_max_entries: int
    redis_timeout: float
    max_buffer_bytes: int
    forward_credentials: bool
    max_concurrent_streams: int
    log_level: str
    log_format: str
    workers: int
    grpc_tls: ServerFiles | None = None  # None: plain-text gRPC
    grpc_client_san: str = ""


def build_parser() -> tuple[argparse.ArgumentParser, EnvDefaults]:
    parser = argparse.ArgumentParser(
        prog="python -m ext_proc",
        description="Envoy external processor (envoy.service.ext_proc.v3) for inference requests: API-key "
        "authentication, model resolution, request checks and trusted x-igw-* headers.",
    )
    env = EnvDefaults(parser)
    env.add("--redis-url", "REDIS_URL", default="redis://127.0.0.1:6379/0", type=redis_url_arg,
            help="Redis holding tenants, API keys and models")
    env.add("--host", "GRPC_HOST", default=os.environ.get("HOST") or "0.0.0.0", type=non_empty("host"),
            help="address to bind (falls back to env HOST)")
    env.add("--grpc-port", "GRPC_PORT", default=9002, type=parse_port, help="gRPC port")
    env.add("--http-port", "HTTP_PORT", default=9003, type=parse_port,
            help="HTTP port for /healthcheck, /livez and /metrics")
    env.add("--key-secret", "IGW_KEY_SECRET", default=DEFAULT_KEY_SECRET, type=non_empty("key secret"),
            help="HMAC secret API keys are hashed with; must match the one `igw keys issue` used")
    env.add("--cache-ttl", "CACHE_TTL", default=10.0, type=positive_duration,
            help="how long a tenant/key/model read from Redis is reused (changes arrive sooner via pub/sub)")
    env.add("--stale-if-error", "STALE_IF_ERROR", default=0.0, type=_non_negative_duration,
            help="while Redis is unreachable, keep using expired cache entries this much longer (0: fail closed "
                 "at TTL)")
    env.add("--cache-max-entries", "CACHE_MAX_ENTRIES", default=100_000, type=positive_int,
            help="entries per cache (keys, tenants, models)")
    env.add("--redis-timeout", "REDIS_TIMEOUT", default=0.25, type=positive_duration,
            help="deadline of one Redis lookup; a slower Redis means 503 for uncached callers")
    env.add("--max-buffer-bytes", "MAX_BUFFER_BYTES", default=1024 * 1024, type=positive_int,
            help="largest body read whole (BUFFERED); larger bodies are STREAMED; keep <= Envoy's buffer limit")
    env.add("--forward-credentials", "FORWARD_CREDENTIALS", default=False, type=parse_bool,
            help="pass Authorization / x-api-key on to the model server (default: removed)")
    env.add("--max-concurrent-streams", "MAX_CONCURRENT_STREAMS", default=1000, type=positive_int,
            help="HTTP/2 streams per connection from Envoy")
    add_server_tls_flags(env)
    add_common_flags(env)
    return parser, env


def _grpc_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerFiles | None:
    """The TLS files, read and checked now (every worker of --workers N does so too), so a bad one stops
    the start with a line naming it instead of failing each handshake later."""
    if problem := server_tls_settings_problem(args):
        startup_error(parser, problem)
    if not args.grpc_server_use_tls:
        return None
    files = ServerFiles(args.grpc_server_tls_cert, args.grpc_server_tls_key, args.grpc_client_tls_cacert or None,
                        names=SERVER_TLS_NAMES)
    try:
        files.h2_context()
    except TlsFileError as exc:
        startup_error(parser, str(exc))
    return files


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser, env = build_parser()
    args = env.parse(argv)
    if args.grpc_port == args.http_port:  # else the second bind fails as "address already in use", by ourselves
        startup_error(parser, f"--grpc-port (GRPC_PORT) and --http-port (HTTP_PORT) are both {args.grpc_port}")
    return Settings(
        redis_url=args.redis_url,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        key_secret=args.key_secret.encode(),
        key_secret_is_default=args.key_secret == DEFAULT_KEY_SECRET,
        cache_ttl=args.cache_ttl,
        stale_if_error=args.stale_if_error,
        cache_max_entries=args.cache_max_entries,
        redis_timeout=args.redis_timeout,
        max_buffer_bytes=args.max_buffer_bytes,
        forward_credentials=args.forward_credentials,
        max_concurrent_streams=args.max_concurrent_streams,
        log_level=args.log_level,
        log_format=args.log_format,
        workers=args.workers,
        grpc_tls=_grpc_tls(parser, args),
        grpc_client_san=args.grpc_client_tls_san,
    )
