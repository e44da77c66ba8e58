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

from igw.runtime import parse_port, path_arg, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run the local gateway test bed (Envoy + services + demo models)")
    up.add_argument("--models", type=_models, default=None,
                    help="comma-separated demo model names (default: demo-linear,demo-logistic)")
    up.add_argument("--model-replicas", type=positive_int, default=1, help="replicas of each demo model")
    up.add_argument("--max-model-replicas", type=positive_int, default=None,
                    help="model endpoints Envoy declares per model, so replicas can be added later (default 6)")
    up.add_argument("--rate-limit-mode", choices=("rls", "rlqs"), default="rls",
                    help="rls: ask the rate-limit service per request (ShouldRateLimit); rlqs: quota push, "
                         "Envoy enforces token buckets the same service assigns (default rls)")
    up.add_argument("--replicas", type=positive_int, default=1,
                    help="replicas of ext_proc and of the rate-limit service")
    up.add_argument("--envoy-port", type=parse_port, default=None, help="gateway listener port (default 10000)")
    up.add_argument("--admin-port", type=parse_port, default=None, help="Envoy admin port (default 9901)")
    up.add_argument("--free-ports", action="store_true",
                    help="pick free loopback ports for everything not given, instead of the documented ports")
    up.add_argument("--state-file", type=path_arg, default=None,
                    help="write a JSON description of the running bed here once it is healthy")
    up.add_argument("--log-dir", type=path_arg, default=None,
                    help="directory for every process's log (default: a temp dir)")
    up.add_argument("--rate-limit-config", type=path_arg, default=None,
                    help="rate-limit config directory, domain igw (default: config/testbed/ratelimit)")
    up.add_argument("--ext-proc-workers", type=positive_int, default=1, help="--workers of each ext_proc replica")
    up.add_argument("--envoy-concurrency", type=positive_int, default=1, help="Envoy worker threads")
    up.set_defaults(func=_up, _parser=up)


def _models(text: str) -> tuple[str, ...]:
    from igw.topology import validate_model_names

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    try:
        validate_model_names(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def port_conflict(args: argparse.Namespace) -> str | None:
    """Envoy would refuse one port for both listeners, but only after every other process started."""
    from igw.topology import ADMIN_PORT, GATEWAY_PORT

    envoy = args.envoy_port or (None if args.free_ports else GATEWAY_PORT)
    admin = args.admin_port or (None if args.free_ports else ADMIN_PORT)
    if envoy is not None and envoy == admin:
        given = "--envoy-port and --admin-port are" if args.envoy_port and args.admin_port else (
            "--envoy-port is the default admin port" if args.envoy_port else "--admin-port is the default gateway port")
        return f"{given} {envoy}"
    return None


def paths_problem(args: argparse.Namespace) -> str | None:
    """What would make the bed fail only after everything started (the state file written over a directory)
    or fail with a traceback (a log directory that is a file): found before any process starts, as one line
    naming the flag."""
    if args.state_file is not None:
        if args.state_file.is_dir():
            return f"--state-file {args.state_file} is a directory"
        if parent := _first_existing_non_directory(args.state_file.parent):
            return f"--state-file {args.state_file}: {parent} is not a directory"
    if args.log_dir is not None and (blocker := _first_existing_non_directory(args.log_dir)):
        return f"--log-dir {args.log_dir}: {blocker} is not a directory"
    config = args.rate_limit_config
    if config is not None and config.exists() and not config.is_dir():
        return f"--rate-limit-config {config} is not a directory"
    return None


def _first_existing_non_directory(path: Path) -> Path | None:
    """The path itself or the nearest ancestor that exists, if that is not a directory (mkdir would fail)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _up(args: argparse.Namespace) -> int:
    from rich.console import Console

    from igw.cli import CommandError
    from igw.launcher import DEFAULT_MAX_MODEL_REPLICAS, DEFAULT_RATELIMIT_CONFIG, BedOptions, GatewayBed
    from igw.procs import ProcessError
    from igw.topology import DEFAULT_MODELS

    if conflict := port_conflict(args):
        args._parser.error(conflict)
    if problem := paths_problem(args):
        raise CommandError(problem)
    console = Console(stderr=False)
    options = BedOptions(
        models=args.models or DEFAULT_MODELS,
        model_replicas=args.model_replicas,
        max_model_replicas=args.max_model_replicas or max(DEFAULT_MAX_MODEL_REPLICAS, args.model_replicas),
        rate_limit_mode=args.rate_limit_mode,
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
        except OSError as exc:
            raise CommandError(f"cannot prepare the test bed: {exc}") from None
        console.print(f"igw up: starting the test bed, logs in {bed.log_dir}")
        try:
            state = bed.start()
        except (ProcessError, OSError) as exc:
            raise CommandError(f"the test bed did not start: {exc}") from None
        try:
            console.print(_table(bed, state))
            for line in _summary(state):
                console.print(line, soft_wrap=True, highlight=False, markup=False)
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
    table.add_column("component", no_wrap=True)
    table.add_column("listens on", overflow="fold")
    table.add_column("pid", no_wrap=True)

    def row(name: str, where: str) -> None:
        table.add_row(name, where, str(bed.procs[name].pid))

    t = bed.topology
    row("envoy", f"{t.gateway.address} (gateway), {t.admin.address} (admin)")
    row("redis", t.redis.address)
    for kind in ("ratelimit", "ext_proc"):
        for i, svc in enumerate(getattr(t, kind)):
            row(f"{kind}-{i}", f"{svc.grpc.address} (gRPC), :{svc.http.port} (health, metrics)")
    for replicas in state["models"].values():
        for replica in replicas:
            row(replica["name"], f"127.0.0.1:{replica['port']} (KServe v2)")
    return table


def _summary(state: dict) -> list[str]:
    lines = [f"gateway:      {state['gateway_url']}", f"envoy admin:  {state['envoy_admin_url']}",
             f"rate limits:  {state.get('rate_limit_mode', 'rls')} (config {state.get('rate_limit_config', '-')})",
             f"access log:   {state['access_log']}", f"logs:         {state['log_dir']}"]
    tenant = state.get("tenant")
    if tenant:
        lines.append(f"demo tenant:  {tenant['tenant_id']}  API key: {tenant['api_key']}")
        for other in state.get("tenants", {}).values():
            if other["tenant_id"] != tenant["tenant_id"]:
                lines.append(f"tenant:       {other['tenant_id']} (models {other['models']})  API key: "
                             f"{other['api_key']}")
        model = state["demo_models"][0]
        lines.append(f"try:          curl -H 'authorization: Bearer {tenant['api_key']}' -H 'content-type: "
                     f"application/json' -d '{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,4],"
                     f"\"datatype\":\"FP32\",\"data\":[1,2,3,4]}}]}}' "
                     f"{state['gateway_url']}/v2/models/{model}/infer")
    return lines
