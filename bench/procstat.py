"""CPU time of a process tree from /proc, to report CPU per call next to throughput."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int, include_children: bool = True) -> float:
    """User + system CPU of pid (and its live descendants, e.g. --workers children)."""
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
        if include_children:
            pids += _children(current)
    return total


def pin(pid: int, cpus: set[int]) -> bool:
    """Restrict pid, all its threads and its live descendants to `cpus` (taskset -a). False when the
    machine has no taskset or too few CPUs, so callers can say the run was not pinned."""
    if not shutil.which("taskset") or not cpus <= set(range(os.cpu_count() or 1)):
        return False
    pids = [pid]
    ok = True
    while pids:
        current = pids.pop()
        done = subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, sorted(cpus))), str(current)],
                              capture_output=True, check=False)
        ok = ok and done.returncode == 0
        pids += _children(current)
    return ok
