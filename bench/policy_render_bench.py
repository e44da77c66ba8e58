"""Policy rendering at scale: load + validate a policy, render the rate-limit config and the Istio
manifests, validate every object against the schemas; and how the VirtualService layout scales.

    .venv/bin/python -m bench.policy_render_bench [--models 200,1000,5000] [--tenants 20] [--repeat 3]

Targets (scale issue): 1,000 models render (policy -> validated manifests) in under 10 s, every object
under 1 MiB, everything valid; 100,000 models rejected with a clear error. Medians of --repeat runs.
The layout table compares, in the same run, one VirtualService for all routes (the baseline), the
size-capped split this renderer uses, and one VirtualService per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from igw.policy import istio, ratelimit
from igw.policy.generate import generate_policy
from igw.policy.kube_schema import MAX_OBJECT_BYTES, validate_objects
from igw.policy.load import PolicyError, load_policy


def many_models(n: int, tenants: int) -> str:
    """The platform-shaped policy of `igw policy generate` (20 namespaces, 4 replicas, seed 1)."""
    return generate_policy(n, tenants, namespaces=20, replicas=4, seed=1)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def scale_row(n: int, tenants: int, repeat: int) -> dict[str, Any]:
    text = many_models(n, tenants)
    load_s, policy = timed(lambda: load_policy("bench.yaml", text), repeat)
    rl_s, shards = timed(lambda: ratelimit.render_shards(policy), repeat)
    istio_s, files = timed(lambda: istio.render(policy), repeat)
    objects = [o for objs in files.values() for o in objs]
    check_s, problems = timed(lambda: validate_objects(objects), repeat)
    sizes = [len(json.dumps(o, separators=(",", ":"))) for o in objects]
    total = load_s + rl_s + istio_s + check_s
    # The time target is set for 1,000 models; larger rows are measured against size and validity only.
    ok = (total < 10 or n > 1000) and max(sizes) < MAX_OBJECT_BYTES and not problems
    return {"models": n, "objects": len(objects), "config_maps": len(shards),
            "rl_bytes": sum(len(t) for t in shards.values()), "load": load_s, "ratelimit": rl_s,
            "istio": istio_s, "validate": check_s, "total": total, "max_obj": max(sizes),
            "invalid": len(problems), "ok": ok}


def layout_rows(n: int, tenants: int) -> list[dict[str, Any]]:
    policy = load_policy("bench.yaml", many_models(n, tenants))
    rows = []
    saved = istio.ROUTES_BYTES
    try:
        for label, budget in (("one VS (baseline)", 10**12), ("split at 256 KiB", saved), ("one VS per model", 1)):
            istio.ROUTES_BYTES = budget
            started = time.perf_counter()
            services = istio.render(policy)["21-virtual-services.yaml"]
            elapsed = time.perf_counter() - started
            sizes = [len(json.dumps(o, separators=(",", ":"))) for o in services]
            rows.append({"layout": label, "objects": len(services), "max_obj": max(sizes), "total": sum(sizes),
                         "render": elapsed, "fits": max(sizes) < MAX_OBJECT_BYTES})
    finally:
        istio.ROUTES_BYTES = saved
    return rows


def rejection(n: int) -> tuple[float, str]:
    text = many_models(n, 2)
    started = time.perf_counter()
    try:
        load_policy("huge.yaml", text)
        message = "ACCEPTED"
    except PolicyError as exc:
        message = str(exc)
    return time.perf_counter() - started, message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="200,1000,5000")
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(f"policy -> manifests, {args.tenants} tenants, median of {args.repeat} (seconds; bytes)")
    print(f"{'models':>7} {'objects':>7} {'CMs':>4} {'rl bytes':>9} {'load':>6} {'rl':>6} {'istio':>6} "
          f"{'valid.':>6} {'total':>6} {'max obj':>8} {'invalid':>7}  target")
    for n in (int(x) for x in args.models.split(",")):
        r = scale_row(n, args.tenants, args.repeat)
        print(f"{r['models']:>7} {r['objects']:>7} {r['config_maps']:>4} {r['rl_bytes']:>9} {r['load']:>6.2f} "
              f"{r['ratelimit']:>6.2f} {r['istio']:>6.2f} {r['validate']:>6.2f} {r['total']:>6.2f} "
              f"{r['max_obj']:>8} {r['invalid']:>7}  {'PASS' if r['ok'] else 'FAIL'} "
              f"({'<10 s, ' if n <= 1000 else ''}<1 MiB, valid)")

    print("\nVirtualService layout, 1000 models (same run)")
    rows = layout_rows(1000, args.tenants)
    base = rows[0]
    print(f"{'layout':<20} {'objects':>7} {'max obj':>8} {'total bytes':>11} {'render s':>8} {'vs base':>8}  fits")
    for r in rows:
        print(f"{r['layout']:<20} {r['objects']:>7} {r['max_obj']:>8} {r['total']:>11} {r['render']:>8.3f} "
              f"{r['total'] / base['total']:>8.2f}  {'yes' if r['fits'] else 'NO'}")

    seconds, message = rejection(100_000)
    verdict = "PASS" if message.startswith("huge.yaml:") and "at most" in message else "FAIL"
    print(f"\n100,000 models: {verdict} in {seconds:.2f} s: {message}")


if __name__ == "__main__":
    main()
