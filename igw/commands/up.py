"""`igw up`: run the whole local test bed until Ctrl-C or SIGTERM.

Starts redis-server, the rate-limit service, ext_proc, the demo model servers and Envoy (igw/launcher.py),
waits for each to be healthy, seeds the demo tenant, prints what runs where, then reports any component
that dies. On SIGINT/SIGTERM it stops everything and removes the state file.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from igw.runtime import parse_port, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run the local gateway test bed (Envoy + services + demo models)")
    up.add_argument("--models", type=_models, default=None,
                    help="comma-separated demo model names (default: demo-linear,demo-logistic)")
    up.add_argument("--model-replicas", type=positive_int, default=1, help="replicas of each demo model")
    up.add_argument("--replicas", type=positive_int, default=1,
                    help="replicas of ext_proc and of the rate-limit service")
    up.add_argument("--envoy-port", type=parse_port, default=None, help="gateway listener port (default 10000)")
    up.add_argument("--admin-port", type=parse_port, default=None, help="Envoy admin port (default 9901)")
    up.add_argument("--free-ports", action="store_true",
                    help="pick free loopback ports for everything not given, instead of the documented ports")
    up.add_argument("--state-file", type=Path, default=None,
                    help="write a JSON description of the running bed here once it is healthy")
    up.add_argument("--log-dir", type=Path, default=None,
                    help="directory for every process's log (default: a temp dir)")
    up.add_argument("--rate-limit-config", type=Path, default=None,
                    help="rate-limit config directory, domain igw (default: config/testbed/ratelimit)")
    up.add_argument("--ext-proc-workers", type=positive_int, default=1, help="--workers of each ext_proc replica")
    up.add_argument("--envoy-concurrency", type=positive_int, default=1, help="Envoy worker threads")
    up.set_defaults(func=_up)


def _models(text: str) -> tuple[str, ...]:
    from igw.topology import validate_model_names

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    try:
        validate_model_names(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _up(args: argparse.Namespace) -> int:
    from rich.console import Console

    from igw.cli import CommandError
    from igw.launcher import DEFAULT_RATELIMIT_CONFIG, BedOptions, GatewayBed
    from igw.procs import ProcessError
    from igw.topology import DEFAULT_MODELS

    console = Console(stderr=False)
    options = BedOptions(
        models=args.models or DEFAULT_MODELS,
        model_replicas=args.model_replicas,
        replicas=args.replicas,
        free_ports=args.free_ports,
        envoy_port=args.envoy_port,
        admin_port=args.admin_port,
        log_dir=args.log_dir,
        state_file=args.state_file,
        rate_limit_config=args.rate_limit_config or DEFAULT_RATELIMIT_CONFIG,
        ext_proc_workers=args.ext_proc_workers,
        envoy_concurrency=args.envoy_concurrency,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            bed = GatewayBed(options)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        console.print(f"igw up: starting the test bed, logs in {bed.log_dir}")
        try:
            state = bed.start()
        except ProcessError as exc:
            raise CommandError(f"the test bed did not start: {exc}") from None
        try:
            console.print(_table(bed, state))
            if args.state_file:
                console.print(f"state file: {args.state_file}")
            console.print("running; Ctrl-C or SIGTERM stops everything")
            stop.wait()
            console.print("igw up: stopping")
        finally:
            bed.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _table(bed: object, state: dict) -> object:
    from rich.table import Table

    from igw.launcher import GatewayBed

    assert isinstance(bed, GatewayBed)
    table = Table(title="igw test bed")
    for column in ("component", "listens on", "pid", "log"):
        table.add_column(column)

    def row(name: str, where: str) -> None:
        proc = bed.procs[name]
        table.add_row(name, where, str(proc.pid), str(proc.log_path))

    row("envoy", f"{state['gateway_url']} (admin {state['envoy_admin_url']})")
    row("redis", state["redis_url"])
    for kind in ("ratelimit", "ext_proc"):
        for svc in state["services"][kind]:
            row(svc["name"], f"gRPC 127.0.0.1:{svc['grpc_port']}, HTTP :{svc['http_port']}")
    for replicas in state["models"].values():
        for replica in replicas:
            row(replica["name"], replica["url"])
    tenant = state.get("tenant") or {}
    if tenant:
        table.caption = (f"demo tenant {tenant.get('tenant_id')!r}, API key {tenant.get('api_key')}; "
                         f"access log {state['access_log']}")
    return table
