"""Small helpers the gateway benchmarks share: medians, fixed-width tables, PASS/FAIL lines, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else 0.0


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others; floats as given (format them before)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                           strict=True)))

    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_results(name: str, data: dict[str, Any], text: str, directory: Path | None = None) -> Path:
    """bench/results/<name>.json (machine-readable, read by bench.capacity) and <name>.txt (what was printed)."""
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=1, sort_keys=False))
    (directory / f"{name}.txt").write_text(text)
    return path


def read_results(name: str, directory: Path | None = None) -> dict[str, Any] | None:
    path = (directory or RESULTS_DIR) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


class Printer:
    """Prints and keeps what it printed, so the same text lands in bench/results/<name>.txt."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
