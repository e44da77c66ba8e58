"""`igw`: the one command-line entry point for operators and developers.

Each command group lives in its own module with a `register(subparsers)` function; this file only
assembles them. Exit codes: 0 success, 2 bad arguments, 1 any other failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from igw.errors import CommandError
from igw.redis_conn import masked_url
from igw.runtime import EnvDefaults, redis_url_arg

__all__ = ["CommandError", "main"]

COMMAND_MODULES = [
    "igw.commands.ratelimit",
    "igw.commands.demo",
    "ext_proc.cli",
    "igw.commands.replicas",
    "igw.commands.up",
    "igw.commands.policy",
]


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def redis_url(text: str) -> str:
    """Checked while parsing, so a typo is exit 2 and one line, not a traceback from the first command using it;
    the rest as the services check the same REDIS_URL (port, database, host, options, TLS files)."""
    if not text.lower().startswith(REDIS_SCHEMES):  # as redis-py checks it
        raise argparse.ArgumentTypeError(f"{masked_url(text)!r} is no Redis URL (use {', '.join(REDIS_SCHEMES)})")
    return redis_url_arg(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igw", description="Inference gateway extensions for Envoy and Istio.")
    env = EnvDefaults(parser)
    env.add("--redis-url", "REDIS_URL", default="redis://127.0.0.1:6379/0", type=redis_url,
            help="Redis holding tenants, keys, replica counts and counters")
    parser.set_defaults(_env=env)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env: EnvDefaults = args._env
    env.check()
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"igw: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
