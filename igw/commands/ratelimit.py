"""`igw ratelimit check DIR`: validate a rate-limit config directory exactly as the service would."""

from __future__ import annotations

import argparse
import json

from igw.runtime import path_arg
from ratelimit_svc.config import ConfigError
from ratelimit_svc.loader import read_config_dir


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("ratelimit", help="rate-limit service tools")
    cmds = group.add_subparsers(dest="ratelimit_command", metavar="COMMAND")
    cmds.required = True
    check = cmds.add_parser("check", help="load a config directory and list its limits, or show the error")
    check.add_argument("config_dir", type=path_arg)
    check.add_argument("--merge-domain-config", action="store_true", help="merge files sharing a domain")
    check.add_argument("--output", choices=("text", "json"), default="text")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from igw.cli import CommandError

    if not args.config_dir.is_dir():
        what = "is not a directory" if args.config_dir.exists() else "does not exist"
        raise CommandError(f"config directory {str(args.config_dir)!r} {what}")
    try:
        config = read_config_dir(args.config_dir, merge_domains=args.merge_domain_config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    limits = config.describe()
    if args.output == "json":
        print(json.dumps({"files": list(config.files), "limits": dict(limits)}, indent=2))
    else:
        for key, text in limits:
            print(f"{key}: {text}")
        print(f"OK: {len(config.files)} file(s), {len(config.domains)} domain(s), {len(limits)} limit(s)")
    return 0
