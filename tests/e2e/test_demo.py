"""`igw demo` (the README's main job) as a user runs it: its own bed, every case as the demo policy says,
the scaling scenario, a summary, and nothing left running."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from igw.procs import VENV_BIN


def _pids_with_log_dir(log_dir: Path) -> list[int]:
    """Processes whose command line or open files mention the log dir (the bed's children log there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(t.startswith(str(log_dir)) for t in targets):
            found.append(int(entry.name))
    return found


def test_igw_demo_runs_every_case_as_expected_then_stops_the_bed(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    result = subprocess.run([str(VENV_BIN / "igw"), "demo", "--log-dir", str(log_dir)], capture_output=True,
                            text=True, timeout=90, env={**os.environ, "COLUMNS": "160"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "UNEXPECTED" not in output
    for case in ("KServe v2 path -> demo-linear", "OpenAI body, model='linear' -> demo-linear", "bad API key",
                 "missing API key", "forbidden model", "unknown model", "body too large", "burst over quota",
                 "scaling @ 4 replicas"):
        assert case in output, case
    assert "adaptive limits: demo-linear scaled 2 -> 4 -> 2" in output
    assert "cases as expected" in output
    assert (log_dir / "envoy-access.log").exists()
    assert _pids_with_log_dir(log_dir) == []
