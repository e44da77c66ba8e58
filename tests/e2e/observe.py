"""Reading the bed's services from the outside: Prometheus metrics of each replica."""

from __future__ import annotations

import urllib.request
from typing import Any


def metric(http_port: int, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on one service whose labels include `labels` (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ratelimit_metric(state: dict[str, Any], name: str, **labels: str) -> float:
    """The sum over every rate-limit replica of the bed."""
    return sum(metric(s["http_port"], name, **labels) for s in state["services"]["ratelimit"])
