"""Every measurement of the scale issue from one command, with one pass/fail summary at the end.

    ./dev bench platform_scale [--quick] [--only NAME,NAME]

Runs, each in its own process (so each starts from a clean slate), the benches that measure the
platform's size and prints their tables as they come, then every PASS/FAIL line they printed:

  policy_render_bench    1,000-model policy -> manifests: < 10 s, objects < 1 MiB, valid; 100,000 rejected
  scale_bench            rate-limit config of 1,000 models x 50 tenants; Envoy with 1,000 models
  replica_watcher_bench  4,000 pods / 1,000 models: full sync < 5 s, 200 events/s replay lag p99 < 500 ms
  adaptive_step_bench    replicas 4 -> 2 -> 6 under 2x load: settled +-10 % within 1 s, both modes
  gateway_bench          throughput per feature (feeds capacity)
  latency_bench          open-loop latency added per path (feeds capacity)
  ratelimit_bench        Redis CPU per call with the counters on 1, 4, 6 and 8 shards (feeds capacity)
  capacity               cores for 66,000 requests/s, per-request mode and quota push

`--quick` shortens the long ones (fewer rounds, a 10 s watcher replay) for a smoke run; the figures in
the README come from full runs. Whole run: about 23 minutes on 2 cores (quick: about 9).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHES: list[tuple[str, list[str], list[str]]] = [  # name, full flags, quick flags
    ("policy_render_bench", [], ["--models", "1000", "--repeat", "1"]),
    ("scale_bench", [], ["--rounds", "1", "--duration", "3"]),
    ("replica_watcher_bench", [], ["--replay", "10", "--rounds", "1"]),
    ("adaptive_step_bench", [], ["--phase", "3"]),
    ("gateway_bench", [], ["--rounds", "1"]),
    ("latency_bench", [], ["--rounds", "1"]),
    *(("ratelimit_bench", ["--shards", n], ["--shards", n, "--rounds", "1", "--duration", "3"])
      for n in ("1", "4", "6", "8")),
    ("capacity", [], []),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, for a smoke test")
    parser.add_argument("--only", help="comma-separated bench names")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    verdicts: list[tuple[str, str]] = []
    failures = 0
    for name, full, quick in BENCHES:
        if wanted is not None and name not in wanted:
            continue
        flags = quick if args.quick else full
        print(f"\n===== {name} {' '.join(flags)}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", f"bench.{name}", *flags], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            stripped = line.strip()
            if stripped.startswith(("PASS", "FAIL")) or stripped.endswith(("PASS", "FAIL")) or " PASS " in stripped \
                    or " FAIL " in stripped:
                verdicts.append((name, stripped))
        code = proc.wait()
        if code != 0:
            failures += 1
            verdicts.append((name, f"ERROR: exited with code {code}"))
        print(f"===== {name}: {time.monotonic() - started:.0f} s", flush=True)
    print("\nSummary of every target (PASS/FAIL lines as each bench printed them):")
    for name, line in verdicts:
        print(f"  {name:<22} {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
