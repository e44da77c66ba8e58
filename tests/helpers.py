"""Start our services as real processes for tests, the way Envoy and operators see them."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from igw.gateway_client import infer_body
from igw.procs import ManagedProcess, free_port, http_ok, python_module

_counter = itertools.count()


@dataclass
class Service:
    proc: ManagedProcess
    grpc_port: int
    http_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


class ServiceFactory:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ManagedProcess] = []

    def start_module(
        self,
        module: str,
        *args: str,
        env: dict[str, str] | None = None,
        wait_healthy: bool = True,
        grpc_port: int | None = None,
        http_port: int | None = None,
    ) -> Service:
        grpc_port = grpc_port or free_port()
        http_port = http_port or free_port()
        name = f"{module}-{next(_counter)}"
        proc = ManagedProcess(
            name,
            python_module(module, "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                          "--http-port", str(http_port), *args),
            log_dir=self.log_dir,
            env=env,
        ).start()
        self.started.append(proc)
        service = Service(proc, grpc_port, http_port)
        if wait_healthy:
            proc.wait_ready(lambda: http_ok(f"{service.http_base}/healthcheck"), 20, "healthy")
        return service

    def ratelimit(self, config_dir: Path, redis_url: str, *args: str, **kwargs: object) -> Service:
        return self.start_module(
            "ratelimit_svc", "--config-dir", str(config_dir), "--redis-url", redis_url, *args, **kwargs  # type: ignore[arg-type]
        )

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()
        self.started.clear()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A bad setting stops a service with exit 2 and one line naming it, never a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


class SteadyLoad:
    """One client sending through the gateway, `pause` seconds apart (~100/s by default), recording (send
    time, status) of every request; status 0 is a transport error."""

    def __init__(self, url: str, key: str, pause: float = 0.01) -> None:
        self.url, self.key, self.pause = url, key, pause
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5, headers={"authorization": f"Bearer {self.key}"}) as client:
            while not self._stop.is_set():
                sent = time.time()
                try:
                    status = client.post(self.url, json=infer_body()).status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((sent, status))
                self._stop.wait(self.pause)

    def failures(self, since: float, until: float = float("inf")) -> list[tuple[float, int]]:
        return [(t, s) for t, s in list(self.samples) if since <= t < until and s != 200]

    def count(self, since: float) -> int:
        return sum(1 for t, _ in list(self.samples) if t >= since)

    @contextmanager
    def running(self) -> Iterator[SteadyLoad]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)
