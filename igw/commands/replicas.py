"""`igw replicas set | list | watch`: publish, inspect and follow live replica counts (schema: igw.replicas)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import threading
import time

from igw.runtime import (
    EnvDefaults,
    http_url,
    log_format,
    log_level,
    non_empty,
    non_negative_int,
    parse_duration,
    port_or_zero,
    positive_duration,
    setup_logging,
)

_MODEL = re.compile(r"^[^\s\x00-\x1f]{1,253}$")


def _model_name(text: str) -> str:
    if not _MODEL.match(text):
        raise argparse.ArgumentTypeError(f"invalid model name {text!r} (1-253 characters, no spaces)")
    return text


MAX_TTL_DAYS = 365


def _ttl(text: str) -> int:
    """Whole seconds, at most a year: far beyond that Redis refuses the EXPIRE inside the MULTI block that
    already wrote the count, which would then stay without any expiry while the command reports a failure."""
    seconds = parse_duration(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"TTL {text!r} is under 1s")
    if seconds > MAX_TTL_DAYS * 86400:
        raise argparse.ArgumentTypeError(f"TTL {text!r} is more than {MAX_TTL_DAYS} days")
    return math.ceil(seconds)


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("replicas", help="live replica counts per model (adaptive quotas)")
    cmds = group.add_subparsers(dest="replicas_command", metavar="COMMAND")
    cmds.required = True

    set_ = cmds.add_parser("set", help="publish a model's ready replicas by hand (operators, test bed)")
    set_.add_argument("model", type=_model_name)
    set_.add_argument("--ready", type=non_negative_int, help="ready replicas (default: the number of --replica)")
    set_.add_argument("--version", action="append", default=[], metavar="V[=N]",
                      help="version of the replicas; repeat as V=N to split them between versions")
    set_.add_argument("--replica", action="append", default=[], metavar="ID", type=non_empty("replica identity"),
                      help="a ready replica's identity")
    set_.add_argument("--ttl", type=_ttl, default=None, help="expiry, e.g. 15s or 1h (default 15s)")
    set_.add_argument("--publisher", default=None, help="who wrote it (default cli/<host>/<pid>)")
    set_.set_defaults(func=_set)

    list_ = cmds.add_parser("list", help="show the published replica counts")
    list_.add_argument("--output", choices=("text", "json"), default="text")
    list_.add_argument("--stale-after", type=positive_duration, default=10.0,
                       help="flag counts older than this as stale (default 10s, the rate limiter's max age)")
    list_.set_defaults(func=_list)

    watch = cmds.add_parser("watch", help="follow EndpointSlices in Kubernetes and publish ready counts")
    source = watch.add_mutually_exclusive_group()
    source.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster in a Pod, else ~/.kube/config)")
    source.add_argument("--in-cluster", action="store_true", help="use the Pod's service account")
    source.add_argument("--api-server", type=http_url,
                        help="API server URL without auth (kubectl proxy, test servers)")
    watch.add_argument("--context", help="kubeconfig context")
    env = EnvDefaults(watch)
    env.add("--selector", "IGW_REPLICAS_SELECTOR", default="igw.ai/model", type=non_empty("label selector"),
            help="label selector for the model Services' EndpointSlices")
    env.add("--namespace", "IGW_REPLICAS_NAMESPACE", default="", help="watch one namespace (default all)")
    env.add("--model-label", "IGW_REPLICAS_MODEL_LABEL", default="igw.ai/model", type=non_empty("model label"),
            help="label naming the model")
    env.add("--version-label", "IGW_REPLICAS_VERSION_LABEL", default="igw.ai/model-version",
            help="label naming the model version")
    env.add("--heartbeat", "IGW_REPLICAS_HEARTBEAT", default=5.0, type=positive_duration,
            help="rewrite every model this often")
    env.add("--ttl", "IGW_REPLICAS_TTL", default=15, type=_ttl, help="expiry of each model's key")
    env.add("--publisher", "IGW_REPLICAS_PUBLISHER", default="", help="identity written with each count")
    env.add("--http-port", "IGW_REPLICAS_HTTP_PORT", default=0, type=port_or_zero,
            help="serve /healthcheck, /livez and /metrics on this port (0: off)")
    env.add("--log-level", "LOG_LEVEL", default="info", type=log_level, help="log level")
    env.add("--log-format", "LOG_FORMAT", default="text", type=log_format, help="text or json")
    watch.set_defaults(func=_watch, _watch_env=env)


def _redis(url: str):  # type: ignore[no-untyped-def]
    from igw.replicas_publish import connect

    return connect(url)


def _redis_failure(url: str, exc: Exception) -> Exception:
    from igw.cli import CommandError
    from igw.redis_conn import masked_url  # the line lands in terminals, CI logs and Pod logs

    return CommandError(f"cannot reach Redis at {masked_url(url)}: {exc}")


def _versions(specs: list[str], ready: int | None) -> tuple[dict[str, int], int]:
    from igw.cli import CommandError

    if not specs:
        if ready is None:
            return {}, 0
        return ({"": ready} if ready else {}), ready
    if len(specs) == 1 and "=" not in specs[0]:
        count = ready if ready is not None else 0
        return ({specs[0]: count} if count else {}), count
    versions: dict[str, int] = {}
    for spec in specs:
        name, sep, number = spec.partition("=")
        if not sep or not name:
            raise CommandError(f"--version {spec!r}: with several versions write each as VERSION=COUNT")
        if name in versions:  # the later count would silently replace the earlier one
            raise CommandError(f"--version {spec!r}: version {name!r} is given twice")
        try:
            versions[name] = non_negative_int(number)
        except argparse.ArgumentTypeError as exc:
            raise CommandError(f"--version {spec!r}: {exc}") from None
    total = sum(versions.values())
    if ready is not None and ready != total:
        raise CommandError(f"--ready {ready} does not match the version counts (they add up to {total})")
    return {k: v for k, v in versions.items() if v}, total


def _set(args: argparse.Namespace) -> int:
    import redis

    from igw.cli import CommandError
    from igw.replicas import DEFAULT_TTL, ReplicaState
    from igw.replicas_publish import PublishError, default_publisher, send_states

    ready = args.ready
    if args.replica:
        if len(set(args.replica)) != len(args.replica):
            raise CommandError("--replica: the same identity is given twice")
        if ready is None:
            ready = len(args.replica)
        elif ready != len(args.replica):
            raise CommandError(f"--ready {ready} but {len(args.replica)} --replica given")
    if ready is None and not any("=" in spec for spec in args.version):
        raise CommandError("give --ready N, --replica ID or --version V=N")
    versions, ready = _versions(args.version, ready)
    state = ReplicaState(args.model, ready, versions, tuple(sorted(args.replica)), time.time(),
                         args.publisher or default_publisher("cli"))
    ttl = args.ttl or DEFAULT_TTL
    client = _redis(args.redis_url)
    try:
        send_states(client, [(state, True)], ttl)
    except (redis.RedisError, OSError, PublishError) as exc:
        raise _redis_failure(args.redis_url, exc) from None
    finally:
        client.close()
    print(f"{args.model}: ready {ready} (expires in {ttl}s)")
    return 0


def _list(args: argparse.Namespace) -> int:
    import redis

    from igw.replicas_publish import read_states

    client = _redis(args.redis_url)
    try:
        states = read_states(client)
    except (redis.RedisError, OSError) as exc:
        raise _redis_failure(args.redis_url, exc) from None
    finally:
        client.close()
    now = time.time()
    rows = []
    for model, (state, ttl) in states.items():
        if state is None:
            rows.append({"model": model, "ready": None, "versions": {}, "replicas": [], "age_seconds": None,
                         "ttl_seconds": None, "publisher": None, "stale": True, "expired": True})
            continue
        age = max(0.0, state.age(now))
        rows.append({"model": model, "ready": state.ready, "versions": state.versions,
                     "replicas": list(state.replicas), "age_seconds": round(age, 3),
                     "ttl_seconds": round(ttl, 3), "publisher": state.publisher,
                     "stale": age > args.stale_after, "expired": False})
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no replica counts published")
        return 0
    table = [("MODEL", "READY", "VERSIONS", "AGE", "TTL", "PUBLISHER", "STATE")]
    for row in rows:
        if row["expired"]:
            table.append((row["model"], "-", "-", "-", "-", "-", "expired"))
            continue
        versions = ",".join(f"{k or '-'}:{v}" for k, v in sorted(row["versions"].items())) or "-"
        table.append((row["model"], str(row["ready"]), versions, f"{row['age_seconds']:.1f}s",
                      f"{row['ttl_seconds']:.0f}s", row["publisher"], "stale" if row["stale"] else "fresh"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip())
    return 0


def _watch(args: argparse.Namespace) -> int:
    from igw.cli import CommandError
    from igw.replica_watcher import ReplicaWatcher, WatcherSettings, api_client, discovery_api

    env: EnvDefaults = args._watch_env
    env.check()
    try:
        settings = WatcherSettings(namespace=args.namespace or None, selector=args.selector,
                                   model_label=args.model_label, version_label=args.version_label,
                                   heartbeat=args.heartbeat, ttl=args.ttl, publisher=args.publisher)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        client = api_client(api_server=args.api_server, kubeconfig=args.kubeconfig, in_cluster=args.in_cluster,
                            context=args.context)
    except Exception as exc:  # the kubernetes config loaders raise several unrelated types
        raise CommandError(f"no Kubernetes API configuration: {exc}") from None
    setup_logging(args.log_level, args.log_format)
    watcher = ReplicaWatcher(discovery_api(client), _redis(args.redis_url), settings)
    if args.http_port:
        _start_admin(args.http_port, watcher)

    import signal

    def on_signal(_sig: int, _frame: object) -> None:
        watcher.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.getLogger(__name__).info("watching EndpointSlices (%s) as %s", settings.selector, watcher.publisher)
    watcher.run()
    return 0


def _start_admin(port: int, watcher: object) -> None:
    """/healthcheck (200 once synced and in contact with the API) and /metrics, on a side event loop."""
    import asyncio

    from igw.http_admin import start_admin_server

    ready = threading.Event()
    failure: list[BaseException] = []

    async def health() -> tuple[bool, str]:
        return watcher.health()  # type: ignore[attr-defined,no-any-return]

    async def serve() -> None:
        try:
            await start_admin_server("0.0.0.0", port, health)
        except Exception as exc:  # whatever stops the listener is reported, not left dying in this thread
            failure.append(exc)
            ready.set()
            return
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(serve()), name="igw-admin", daemon=True).start()
    ready.wait(5)
    if failure:
        from igw.cli import CommandError

        raise CommandError(f"cannot serve /healthcheck on port {port}: {failure[0]}")

