"""Adaptive step response: how fast the admitted rate follows a model's ready replicas, through the real
gateway (Envoy + ext_proc + rate limiting + model servers), in both rate-limit modes.

    .venv/bin/python -m bench.adaptive_step_bench [--modes rls,rlqs] [--per-replica 25] [--phase 4]

The test bed runs with 4 ready replicas of a model; the model is then flipped 4 -> 2 -> 6 by stopping and
starting real model servers (the launcher publishes the ready count to Redis exactly as the Kubernetes
watcher does: igw:replicas:<model> plus the change notification). One tenant alone holds the model's
capacity, `per_replica` requests/s per ready replica, and offers twice the largest limit, open loop,
for the whole run. Admitted (200) and denied (429) requests are counted per 100 ms bin of send time.

Per phase the table shows the target, the admitted rate once settled (median of 0.5 s windows after the
settle point), the settle time (from the replica change until the admitted rate over a trailing window
enters +-10 % of the target and stays there) and the overshoot (the largest windowed rate above the target
after the change, in %). The per-request mode uses GCRA (`algorithm: gcra`, burst = 1/10 s of the rate)
so 100 ms bins are meaningful; quota push enforces Envoy's token bucket, which Envoy 1.40 refills once
per second, so its rate is judged over 1 s windows (its settle time cannot be below ~1 s by
construction). Target (scale issue): settled within +-10 % in under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from igw.gateway_client import Request, Result, offer, v2_infer
from igw.launcher import BedOptions, GatewayBed

MODEL = "demo-linear"
TENANT = "demo"
BIN = 0.1


def bench_policy(per_replica: int, mode: str) -> str:
    algorithm = "\n          algorithm: gcra\n          burst: {burst}" if mode == "rls" else ""
    return f"""# adaptive step bench: tenant demo alone holds demo-linear's capacity
domain: igw
descriptors:
  - key: tenant
    value: {TENANT}
    descriptors:
      - key: model
        value: {MODEL}
        rate_limit:
          unit: second
          requests_per_unit_per_replica: {per_replica}
          min: 1{algorithm.format(burst=max(1, per_replica * 2 // 10))}
"""


VERBOSE = False


@dataclass
class Phase:
    replicas: int
    target: float
    previous: float
    changed_at: float  # time.time() of the replica change taking effect (published)
    ends_at: float


def binned(results: list[Result], start: float) -> dict[int, tuple[int, int]]:
    bins: dict[int, tuple[int, int]] = {}
    for r in results:
        b = int((r.sent_at - start) / BIN)
        ok, denied = bins.get(b, (0, 0))
        bins[b] = (ok + (r.status == 200), denied + (r.status == 429))
    return bins


def windowed_rate(bins: dict[int, tuple[int, int]], end_bin: int, window_bins: int) -> float:
    return sum(bins.get(b, (0, 0))[0] for b in range(end_bin - window_bins + 1, end_bin + 1)) / (window_bins * BIN)


def analyse(phase: Phase, bins: dict[int, tuple[int, int]], start: float, window_bins: int) -> dict[str, float]:
    first = int((phase.changed_at - start) / BIN)
    last = int((phase.ends_at - start) / BIN) - 1
    rates = {b: windowed_rate(bins, b, window_bins) for b in range(first, last + 1)}
    if VERBOSE:
        print(f"  {phase.replicas} replicas, target {phase.target:.0f}/s, windowed admitted/s per bin:",
              [round(r) for r in rates.values()])
    inside = [abs(r - phase.target) <= 0.10 * phase.target for r in rates.values()]
    settle_bin = None
    for i, b in enumerate(rates):
        if all(inside[i:]):
            settle_bin = b
            break
    settle = (settle_bin + 1) * BIN - (phase.changed_at - start) if settle_bin is not None else float("nan")
    after = [rates[b] for b in rates if settle_bin is not None and b >= settle_bin]
    # Overshoot: beyond the new target in the direction of the change, once the rate has reached it
    # (before that, the trailing window still holds the old rate: that is lag, reported as settle time).
    rising = phase.target > phase.previous
    reached = [r for i, r in enumerate(rates.values())
               if any((x >= phase.target) if rising else (x <= phase.target) for x in list(rates.values())[:i + 1])]
    excess = [(r - phase.target) if rising else (phase.target - r) for r in reached]
    overshoot = max([0.0, *excess]) / phase.target * 100
    return {"settle": settle, "rate": statistics.median(after) if after else float("nan"), "overshoot": overshoot}


def run_mode(mode: str, per_replica: int, phase_s: float) -> list[tuple[Phase, dict[str, float]]]:
    work = Path(tempfile.mkdtemp(prefix=f"igw-step-{mode}-"))
    config = work / "ratelimit"
    config.mkdir()
    (config / "igw.yaml").write_text(bench_policy(per_replica, mode))
    options = BedOptions(model_replicas=4, max_model_replicas=6, rate_limit_mode=mode, rate_limit_config=config,
                         log_dir=work / "logs")
    with GatewayBed(options) as bed:
        state = bed.state
        key = state["tenants"][TENANT]["api_key"]
        request: Request = v2_infer(state["gateway_url"], MODEL, key)
        offered = 2 * per_replica * 6
        phases: list[Phase] = []
        results: list[Result] = []

        def load() -> None:
            results.extend(offer(request, rate=offered, seconds=phase_s * 4 + 1, timeout=5))

        start = time.time()
        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(phase_s)  # settle at 4 replicas first
        phases.append(Phase(4, per_replica * 4, per_replica * 4, start + 1.0, time.time()))
        for replicas in (2, 6):
            if replicas < 4:
                bed.remove_model_replica(MODEL, 4 - replicas)
            else:
                bed.add_model_replica(MODEL, replicas - 2)
            event = bed.scale_events[-1]
            changed = event.published_at or event.changed_at
            time.sleep(phase_s)
            phases.append(Phase(replicas, per_replica * replicas, phases[-1].target, changed, time.time()))
        loader.join()
    bins = binned(results, start)
    window_bins = 5 if mode == "rls" else 10
    errors = sum(1 for r in results if r.status not in (200, 429))
    print(f"\n{mode}: offered {offered}/s open loop for {phase_s * 3:.0f} s; rate judged over "
          f"{window_bins * BIN:.1f} s windows; other statuses: {errors}")
    return [(p, analyse(p, bins, start, window_bins)) for p in phases[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="rls,rlqs")
    parser.add_argument("--per-replica", type=int, default=25, help="requests/s per ready replica")
    parser.add_argument("--phase", type=float, default=4.0, help="seconds per replica count")
    parser.add_argument("--verbose", action="store_true", help="print the windowed rate of every bin")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    print(f"{'mode':<5} {'replicas':>9} {'target/s':>9} {'admitted/s':>11} {'settle s':>9} {'overshoot':>10}  target")
    rows = []
    for mode in args.modes.split(","):
        for phase, result in run_mode(mode, args.per_replica, args.phase):
            ok = result["settle"] < 1.0 and abs(result["rate"] - phase.target) <= 0.1 * phase.target
            rows.append((mode, phase, result, ok))
    print(f"\n{'mode':<5} {'replicas':>9} {'target/s':>9} {'admitted/s':>11} {'settle s':>9} {'overshoot':>10}  target")
    for mode, phase, result, ok in rows:
        print(f"{mode:<5} {'4 -> ' + str(phase.replicas) if phase.replicas == 2 else '2 -> 6':>9} "
              f"{phase.target:>9.0f} {result['rate']:>11.1f} {result['settle']:>9.2f} "
              f"{result['overshoot']:>9.0f}%  {'PASS' if ok else 'FAIL'} (+-10 % within 1 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
