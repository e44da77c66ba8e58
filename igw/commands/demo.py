"""`igw demo`: the README's main job (`./dev demo`).

Starts the whole test bed (igw/launcher.py, free ports, 2 replicas of each demo model) or uses one that
already runs (`--state-file` written by `igw up`), sends sample traffic through Envoy (good requests by
path and by OpenAI-style body with aliases, refusals, a burst over quota) and runs the scaling scenario
of the adaptive limits: demo-linear goes from 2 replicas to 4 and back while `demo` and `demo-half`
(shares 2:1 in config/testbed/ratelimit) burst at it; the admitted rate per window follows the replicas.
Then it prints a summary table and the scaling result, stops what it started, and exits 1 if any case
did not behave as the demo policy says.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from igw.gateway_client import (
    Request,
    Result,
    openai_style,
    percentile,
    send,
    send_in_one_window,
    v2_infer,
    wait_for_limit,
)
from igw.runtime import path_arg

# The demo policy (config/testbed/ratelimit/igw.yaml): 15/s per ready replica, shared 2:1.
PER_REPLICA = 15
SHARES = {"demo": 2, "demo-half": 1}
SCALE_MODEL = "demo-linear"
BURST_MODEL = "demo-logistic"
LARGE_BODY = 4 * 1024 * 1024 + 1  # tier standard allows 4 MiB


def demo_limit(tenant: str, replicas: int) -> int:
    """What the demo policy grants `tenant` per second on a model with `replicas` ready replicas."""
    return max(5, math.floor(PER_REPLICA * replicas * SHARES[tenant] / sum(SHARES.values()) + 1e-9))


# What `plan` and the summary read from the state file `igw up --state-file` writes, with the JSON type of each.
STATE_FIELDS: dict[str, type] = {"gateway_url": str, "tenant": dict, "demo_models": list, "models": dict,
                                 "log_dir": str}
_JSON_NAMES = {str: "string", dict: "object", list: "array"}


def state_file_problem(state: object) -> str | None:
    """Why a parsed state file cannot drive the demo (another JSON file, an older format), or None: checked
    before any traffic, so a wrong path is one line instead of a KeyError halfway through."""
    if not isinstance(state, dict):
        return f"a JSON object was expected, not {type(state).__name__}"
    for name, kind in STATE_FIELDS.items():
        if not isinstance(state.get(name), kind):
            return f"{name!r} is missing or not a JSON {_JSON_NAMES[kind]}"
    if not state["demo_models"]:
        return "'demo_models' is empty"
    if not isinstance(state["tenant"].get("api_key"), str):
        return "'tenant' has no 'api_key'"
    return None


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="start the test bed, send sample traffic through Envoy, print what happened")
    demo.add_argument("--state-file", type=path_arg, default=None,
                      help="use the bed `igw up --state-file PATH` runs instead of starting one "
                           "(the scaling scenario needs a bed this command starts, and is skipped)")
    demo.add_argument("--log-dir", type=path_arg, default=None, help="process logs of the bed (default: a temp dir)")
    demo.add_argument("--keep-logs", action="store_true", help="print where the logs are kept")
    demo.add_argument("--skip-scaling", action="store_true", help="leave out the scaling scenario")
    demo.set_defaults(func=_demo)


@dataclass
class Case:
    name: str
    requests: list[Request]
    expected: Counter[int]  # status -> count
    window: bool = True  # send inside one rate-limit window
    concurrency: int = 1
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return Counter(r.status for r in self.results) == self.expected


@dataclass
class ScalingStep:
    replicas: int
    admitted: dict[str, int]
    expected: dict[str, int]
    switch_s: float | None  # replica change -> first answer with the new limit


def plan(state: dict[str, Any]) -> list[Case]:
    """The sample traffic, with what the demo policy says each case must get."""
    gw = state["gateway_url"]
    tenants = state.get("tenants") or {"demo": state["tenant"]}
    demo = tenants["demo"]["api_key"]
    models = state["demo_models"]
    cases = [Case(f"KServe v2 path -> {m}", [v2_infer(gw, m, demo)] * 10, Counter({200: 10})) for m in models]
    aliases = state["tenant"].get("aliases", {})
    for alias, model in aliases.items():
        cases.append(Case(f"OpenAI body, model={alias!r} -> {model}", [openai_style(gw, alias, demo)] * 5,
                          Counter({200: 5})))
    cases += [
        Case("bad API key", [v2_infer(gw, models[0], "igw_000000000000_" + "x" * 43)] * 5, Counter({401: 5})),
        Case("missing API key", [v2_infer(gw, models[0], None)] * 5, Counter({401: 5})),
    ]
    restricted = tenants.get("demo-restricted")
    if restricted and len(models) > 1:
        other = next(m for m in models if m != restricted["models"])
        cases.append(Case(f"forbidden model (demo-restricted -> {other})",
                          [v2_infer(gw, other, restricted["api_key"])] * 5, Counter({403: 5})))
    cases += [
        Case("unknown model", [v2_infer(gw, "no-such-model", demo)] * 5, Counter({404: 5})),
        Case("body too large (> 4 MiB)", [v2_infer(gw, models[0], demo, body=b"0" * LARGE_BODY)] * 3,
             Counter({413: 3}), window=False),
    ]
    if BURST_MODEL in models:
        limit = demo_limit("demo", len(state["models"][BURST_MODEL]))
        cases.append(Case(f"burst over quota: 40 at once, demo -> {BURST_MODEL} ({limit}/s)",
                          [v2_infer(gw, BURST_MODEL, demo)] * 40, Counter({200: limit, 429: 40 - limit}),
                          concurrency=16))
    return cases


def _scaling_burst(state: dict[str, Any], replicas: int) -> Case:
    gw, tenants = state["gateway_url"], state["tenants"]
    requests = [v2_infer(gw, SCALE_MODEL, tenants["demo"]["api_key"])] * 60
    requests += [v2_infer(gw, SCALE_MODEL, tenants["demo-half"]["api_key"])] * 30
    expected_demo, expected_half = demo_limit("demo", replicas), demo_limit("demo-half", replicas)
    return Case(f"scaling @ {replicas} replicas: demo 60 + demo-half 30 at once", requests,
                Counter({200: expected_demo + expected_half, 429: 90 - expected_demo - expected_half}),
                concurrency=24)


def _run_case(case: Case, advance: Any) -> None:
    if case.window:
        case.results = send_in_one_window(case.requests, concurrency=case.concurrency, on_done=advance)
    else:
        case.results = send(case.requests, concurrency=case.concurrency, on_done=advance)


def _scaling(bed: Any, progress: Any, task: Any, cases: list[Case]) -> list[ScalingStep]:
    state = bed.state
    probe = v2_infer(state["gateway_url"], SCALE_MODEL, state["tenants"]["demo"]["api_key"])
    steps: list[ScalingStep] = []

    def measure(replicas: int, switch: float | None) -> None:
        case = _scaling_burst(state, replicas)
        progress.update(task, description=case.name)
        _run_case(case, lambda _r: progress.advance(task))
        cases.append(case)
        split = len(case.requests) * 2 // 3
        admitted = {"demo": [r.status for r in case.results[:split]].count(200),
                    "demo-half": [r.status for r in case.results[split:]].count(200)}
        steps.append(ScalingStep(replicas, admitted, {t: demo_limit(t, replicas) for t in SHARES}, switch))

    start = len(state["models"][SCALE_MODEL])
    wait_for_limit(probe, demo_limit("demo", start), since=time.time())
    measure(start, None)
    progress.update(task, description=f"scaling {SCALE_MODEL}: starting 2 more replicas")
    bed.add_model_replica(SCALE_MODEL, 2, wait_routable=False)
    event = bed.scale_events[-1]
    switch = wait_for_limit(probe, demo_limit("demo", start + 2), since=event.changed_at)
    measure(start + 2, switch)
    progress.update(task, description=f"scaling {SCALE_MODEL}: stopping them")
    bed.remove_model_replica(SCALE_MODEL, 2)
    event = bed.scale_events[-1]
    switch = wait_for_limit(probe, demo_limit("demo", start), since=event.changed_at)
    measure(start, switch)
    return steps


def _summary(cases: list[Case]) -> Any:
    from rich.table import Table

    table = Table(title="igw demo: requests through Envoy")
    for column, justify in (("case", "left"), ("requests", "right"), ("statuses seen", "left"),
                            ("expected", "left"), ("p50 ms", "right"), ("p99 ms", "right"), ("", "center")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]

    def counts(counter: Counter[int]) -> str:
        return ", ".join(f"{status}×{n}" for status, n in sorted(counter.items()))

    for case in cases:
        latencies = [r.elapsed_ms for r in case.results]
        seen = Counter(r.status for r in case.results)
        table.add_row(case.name, str(len(case.results)), counts(seen), counts(case.expected),
                      f"{percentile(latencies, 50):.1f}", f"{percentile(latencies, 99):.1f}",
                      "[green]ok[/]" if case.ok else "[red]UNEXPECTED[/]")
    return table


def _scaling_table(steps: list[ScalingStep]) -> Any:
    from rich.table import Table

    table = Table(title=f"adaptive limits: {SCALE_MODEL} scaled 2 -> 4 -> 2 (admitted per 1 s window)")
    for column in ("ready replicas", "demo (share 2)", "demo-half (share 1)", "switch time", ""):
        table.add_column(column, justify="right")
    for step in steps:
        ok = step.admitted == step.expected
        table.add_row(str(step.replicas),
                      f"{step.admitted['demo']} (limit {step.expected['demo']})",
                      f"{step.admitted['demo-half']} (limit {step.expected['demo-half']})",
                      "-" if step.switch_s is None else f"{step.switch_s * 1000:.0f} ms",
                      "[green]ok[/]" if ok else "[red]UNEXPECTED[/]")
    return table


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from igw.cli import CommandError
    from igw.launcher import BedOptions, GatewayBed
    from igw.procs import ProcessError

    console = Console()
    started = time.monotonic()
    bed: GatewayBed | None = None
    if args.state_file:
        try:
            state = json.loads(args.state_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CommandError(f"cannot read the state file {args.state_file}: {exc}") from None
        if problem := state_file_problem(state):
            raise CommandError(f"the state file {args.state_file} is not one `igw up --state-file` wrote: {problem}")
        console.print(f"igw demo: using the running bed at {state['gateway_url']} ({args.state_file})")
    else:
        try:
            bed = GatewayBed(BedOptions(model_replicas=2, max_model_replicas=4, log_dir=args.log_dir),
                             on_death=lambda d: console.print(f"[red]igw demo: {d.report()}[/]"))
        except OSError as exc:  # e.g. --log-dir names a file
            raise CommandError(f"cannot prepare the test bed: {exc}") from None
        with console.status("starting the test bed: redis, rate-limit service, ext_proc, model servers, Envoy"):
            try:
                state = bed.start()
            except (ProcessError, OSError) as exc:
                raise CommandError(f"the test bed did not start: {exc}") from None
        console.print(f"igw demo: test bed up in {time.monotonic() - started:.1f} s; gateway "
                      f"{state['gateway_url']}, logs in {state['log_dir']}")
    try:
        cases = plan(state)
        scaling = bed is not None and not args.skip_scaling and SCALE_MODEL in state["models"]
        total = sum(len(c.requests) for c in cases) + (3 * 90 if scaling else 0)
        steps: list[ScalingStep] = []
        columns = (SpinnerColumn(), TextColumn("{task.description:<64}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("sample traffic", total=total)
            for case in cases:
                progress.update(task, description=case.name)
                _run_case(case, lambda _r: progress.advance(task))
            if scaling:
                steps = _scaling(bed, progress, task, cases)
            progress.update(task, description="done")
        console.print(_summary(cases))
        if steps:
            console.print(_scaling_table(steps))
            console.print("The limit follows the ready replicas the launcher publishes to Redis "
                          "(igw:replicas:<model>); switch time = replica change -> first answer carrying the "
                          "new limit in x-ratelimit-limit.")
        elif bed is None:
            console.print("scaling scenario skipped: it starts and stops model servers, so it needs a bed "
                          "igw demo starts itself")
        bad = [c.name for c in cases if not c.ok] + [f"scaling @ {s.replicas}" for s in steps
                                                      if s.admitted != s.expected]
        if args.keep_logs:
            console.print(f"logs in {state['log_dir']}")
        if bad:
            console.print(f"[red]igw demo: {len(bad)} case(s) did not behave as the demo policy says: "
                          f"{'; '.join(bad)}[/]")
            return 1
        console.print(f"igw demo: all {len(cases)} cases as expected in {time.monotonic() - started:.1f} s")
        return 0
    finally:
        if bed is not None:
            with console.status("stopping the test bed"):
                bed.stop()



