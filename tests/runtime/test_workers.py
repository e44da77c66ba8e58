"""`--workers N` behind one admin port: /metrics carries every worker's samples with a `worker` label,
/healthcheck is healthy only when every worker is. (End-to-end: tests/ratelimit/test_service.py and
tests/ext_proc/test_metrics.py run real services with --workers 2.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from igw.procs import free_port
from igw.workers import _Merged, health_of, merge_expositions
from tests.helpers import ServiceFactory

WORKER_0 = """# HELP hits_total Hits
# TYPE hits_total counter
hits_total{key="a"} 3.0
# HELP depth Queue depth
# TYPE depth gauge
depth 2.0
"""
WORKER_1 = """# HELP hits_total Hits
# TYPE hits_total counter
hits_total{key="a"} 4.0
hits_total{key="b"} 1.0
"""


def render(texts: list[str | None]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merge_expositions(texts)))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_sample_is_labelled_with_its_worker_in_one_family_per_metric() -> None:
    text = render([WORKER_0, WORKER_1])
    assert text.count("# TYPE hits_total counter") == 1
    got = samples(text)
    assert got[("hits_total", (("key", "a"), ("worker", "0")))] == 3
    assert got[("hits_total", (("key", "a"), ("worker", "1")))] == 4
    assert got[("hits_total", (("key", "b"), ("worker", "1")))] == 1
    assert got[("depth", (("worker", "0"),))] == 2
    assert got[("igw_worker_up", (("worker", "0"),))] == 1 and got[("igw_worker_up", (("worker", "1"),))] == 1


def test_a_worker_that_cannot_be_scraped_is_reported_down_and_contributes_nothing() -> None:
    got = samples(render([WORKER_0, None]))
    assert got[("igw_worker_up", (("worker", "1"),))] == 0
    assert not [key for key in got if ("worker", "1") in key[1] and key[0] != "igw_worker_up"]


def test_health_needs_every_worker() -> None:
    assert health_of([(200, "OK\n"), (200, "OK")]) == (True, "worker 0: OK\nworker 1: OK\n")
    ok, text = health_of([(200, "OK"), (503, "redis unreachable")])
    assert not ok and "worker 1: HTTP 503: redis unreachable" in text
    ok, text = health_of([(0, "unreachable: refused"), (200, "OK")])
    assert not ok and "worker 0: down (unreachable: refused)" in text


def test_workers_exit_when_their_supervisor_is_killed_outright(services: ServiceFactory) -> None:
    service = services.start_module("bench.ext_proc_echo", "--workers", "2")
    supervisor = service.proc.pid
    workers = [int(pid) for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(supervisor, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (FileNotFoundError, IndexError):
        return "zombie"


def _ignores_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    ignored = int(status.split("SigIgn:", 1)[1].split("\n", 1)[0], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


STUBBORN_WORKER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
SUPERVISOR = """
import sys
import igw.workers as workers
workers.STOP_GRACE_S = 0.5
sys.exit(workers.run_workers(2, ["-c", sys.argv[1]], "127.0.0.1", int(sys.argv[2])))
"""


def test_workers_that_ignore_the_stop_signal_are_killed_after_the_grace_period() -> None:
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, STUBBORN_WORKER, str(free_port())])
    try:
        deadline = time.monotonic() + 10
        children_file = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
        while len(children_file.read_text().split()) < 2:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        workers = [int(pid) for pid in children_file.read_text().split()]
        # A worker still starting up would die of SIGTERM at once and the grace period would go untested.
        while not all(_ignores_sigterm(pid) for pid in workers):
            assert time.monotonic() < deadline, "workers did not start ignoring SIGTERM"
            time.sleep(0.05)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=5) == 0
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
    finally:
        supervisor.kill()
