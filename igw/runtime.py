"""Process plumbing shared by both services: flags with environment fallbacks, logging, event loop
and `--workers N`.

One Python process tops out near one core (see PERF_NOTES.md), so `--workers N` re-executes the same
command N times; the children bind the same ports with SO_REUSEPORT and the kernel spreads
connections. The parent only supervises: it forwards SIGTERM/SIGINT and exits non-zero if a worker dies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, Protocol

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


MAX_DURATION_S = 2**63 / 1e9  # Go's longest time.Duration (about 292 years), as upstream's settings allow


def parse_duration(text: str) -> float:
    """'250ms', '2s', '1m', or a bare number of seconds, as upstream's Go durations mostly are."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 250ms, 2s, 1m)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    seconds = value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        # Hundreds of digits parse as inf, and absurd finite values overflow timers and Redis TTLs later.
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: too large (at most 2562047h47m16.854775807s, Go's longest duration)")
    return seconds


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    # Go's strconv.ParseBool spellings (upstream's settings) plus yes/no and on/off.
    if lowered in ("1", "t", "true", "yes", "on"):
        return True
    if lowered in ("0", "f", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true or false)")


def redis_url_arg(text: str) -> str:
    from igw.redis_conn import parse_redis_url

    try:
        parse_redis_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} out of range 1-65535")
    return port


def http_url(text: str) -> str:
    """An http(s):// URL with a host (a Kubernetes API server): the kubernetes client would take "host:8001" as
    a path and fail later with a warning and a retry trace instead of naming the flag."""
    from urllib.parse import urlparse

    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is no http:// or https:// URL with a host")
    try:
        _ = parsed.port  # raises on a port that is no number or out of range
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: invalid port") from None
    return text


def path_arg(text: str) -> Path:
    """A path argument; an empty one is refused instead of meaning the current directory (Path("") is ".",
    so `--out "$UNSET_VAR"` would write into wherever the command runs)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return Path(text)


def port_or_zero(text: str) -> int:
    """A port where 0 means "off" (an optional admin listener)."""
    return 0 if text.strip() == "0" else parse_port(text)


def non_empty(what: str) -> Callable[[str], str]:
    """A text setting that must not be empty: an explicit `--flag ""` would otherwise pass silently (an
    empty environment variable already counts as unset, see EnvDefaults)."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        return text

    parse.__name__ = what
    return parse


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be greater than zero")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


class EnvDefaults:
    """Adds arguments whose default comes from an environment variable, parsed like the flag itself,
    so a bad value in the environment is reported as clearly as a bad flag."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.env_errors: list[str] = []

    def add(self, flag: str, env: str, *, default: Any, type: Callable[[str], Any] = str, help: str) -> None:
        raw = os.environ.get(env)
        value = default
        if raw is not None and raw != "":
            try:
                value = type(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                from igw.redis_conn import masked_url  # a URL's password must not reach the logs

                self.env_errors.append(f"environment variable {env}={masked_url(raw)!r}: {exc}")
        shown = f" (env {env}, default {default!r})" if default not in (None, "") else f" (env {env})"
        if type is parse_bool:  # `--fail-open` alone means true, as a switch; `--fail-open false` still parses
            self.parser.add_argument(flag, type=type, default=value, nargs="?", const=True, metavar="BOOL",
                                     help=help + shown)
            return
        self.parser.add_argument(flag, type=type, default=value, help=help + shown)

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        args = self.parser.parse_args(argv)
        self.check()
        return args

    def check(self) -> None:
        """Exit 2 with one line if an environment variable was bad: the usage text would only suggest the
        command line is wrong, and it is not."""
        if self.env_errors:
            startup_error(self.parser, "; ".join(self.env_errors))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def startup_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """One line, without the usage text: the command line is well formed, a setting's value is not."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def add_server_tls_flags(env: EnvDefaults) -> None:
    """Upstream envoyproxy/ratelimit's names for gRPC server TLS, read by both services (README, "TLS"): one
    vocabulary for operators, checked together by igw.tls.server_tls_settings_problem."""
    env.add("--grpc-server-use-tls", "GRPC_SERVER_USE_TLS", default=False, type=parse_bool,
            help="serve gRPC over TLS (needs --grpc-server-tls-cert and --grpc-server-tls-key); HTTP stays plain")
    env.add("--grpc-server-tls-cert", "GRPC_SERVER_TLS_CERT", default="",
            help="PEM certificate chain of the gRPC server; new files are used from the next connection on")
    env.add("--grpc-server-tls-key", "GRPC_SERVER_TLS_KEY", default="", help="PEM private key of that certificate")
    env.add("--grpc-client-tls-cacert", "GRPC_CLIENT_TLS_CACERT", default="",
            help="PEM CA(s): clients must present a certificate signed by one (mutual TLS)")
    env.add("--grpc-client-tls-san", "GRPC_CLIENT_TLS_SAN", default="",
            help="with --grpc-client-tls-cacert: calls from a client whose certificate has no such subject "
                 "alternative name (DNS, IP, URI; *.domain certificates match one label) fail UNAUTHENTICATED")


def add_common_flags(env: EnvDefaults) -> None:
    env.add("--log-level", "LOG_LEVEL", default="info", type=log_level, help="log level")
    env.add("--log-format", "LOG_FORMAT", default="text", type=log_format, help="text or json")
    env.add("--workers", "WORKERS", default=1, type=positive_int, help="processes sharing the ports (SO_REUSEPORT)")
    _add_drain_flag(env)


def drain_duration(text: str) -> float:
    """--drain-seconds: a duration of at least 0 (a bare number is seconds, 250ms and 5s work too)."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"drain {text!r} must not be negative")
    return parse_duration(text)


def _add_drain_flag(env: EnvDefaults) -> None:
    env.add("--drain-seconds", "IGW_DRAIN_SECONDS", default=0.0, type=drain_duration,
            help="on SIGTERM/SIGINT, report NOT_SERVING (gRPC health) and 503 (/healthcheck) but keep serving "
                 "this long before stopping, so Envoy's health checks move traffic away first; a second signal "
                 "stops at once")


def drain_seconds_of(argv: list[str]) -> float:
    """--drain-seconds (or IGW_DRAIN_SECONDS) in a service's command line, which the service's own parser has
    already checked: the services' Settings leave out what only the process plumbing (run_async, the --workers
    supervisor) reads."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_drain_flag(EnvDefaults(parser))
    known, _ = parser.parse_known_args(argv)
    return float(known.drain_seconds)


def log_level(text: str) -> str:
    if text.upper() not in ("DEBUG", "INFO", "WARN", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(f"invalid log level {text!r} (debug, info, warn, error)")
    return "WARNING" if text.upper() == "WARN" else text.upper()


def log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"invalid log format {text!r} (text or json)")
    return text


class ServiceSettings(Protocol):
    host: str
    http_port: int
    log_level: str
    log_format: str
    workers: int


def service_main(
    module: str,
    parse: Callable[[list[str]], ServiceSettings],
    serve: Callable[[Any, asyncio.Event], Coroutine[Any, Any, int]],
    argv: list[str] | None = None,
) -> int:
    """`python -m <module>` of a service: parse flags (exit 2 on bad ones), log, then either supervise
    --workers copies of itself or serve until SIGTERM/SIGINT."""
    argv = sys.argv[1:] if argv is None else argv
    settings = parse(argv)
    setup_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from igw.workers import run_workers

        return run_workers(settings.workers, ["-m", module, *argv], settings.host, settings.http_port)
    return run_async(lambda stop: serve(settings, stop), drain_seconds_of(argv))


def run_async(main: Callable[[asyncio.Event], Coroutine[Any, Any, int]], drain_seconds: float = 0.0) -> int:
    """Run main(stop_event) on uvloop; SIGTERM/SIGINT set the event for a clean shutdown, after a drain of
    `drain_seconds` (igw.service_runtime.drain_then_stop) when it is above 0; a second signal sets it at once."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        runner = asyncio.run

    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        draining: list[asyncio.Task[None]] = []

        def on_signal() -> None:
            if drain_seconds > 0 and not draining:
                from igw.service_runtime import drain_then_stop

                draining.append(loop.create_task(drain_then_stop(drain_seconds, stop)))
            else:
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            return await main(stop)
        finally:
            for task in draining:
                task.cancel()

    return runner(wrapper())
