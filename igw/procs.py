"""Start, watch and stop the local processes of the test bed and of the test fixtures.

Tests and `igw up` share this module so that what the tests start is exactly what users run. Every
child gets its own process group and a parent-death signal, so nothing outlives the launcher even if
it is killed with SIGKILL; every child logs to a file whose tail is shown when it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


class ProcessError(RuntimeError):
    """A managed process failed to start, died, or did not become ready."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server started next. Chosen below the kernel's ephemeral range:
    a port from bind(0) lies inside it, where any outgoing connection (to Redis, to Envoy) may take it as
    its local port before the server binds, and the server then fails with "address in use". Ports are
    not handed out twice by one process."""
    low, _ = _ephemeral_range()
    start = max(1024, low - 12000)
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(start, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: the kernel's choice
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def set_parent_death_signal() -> None:
    """Runs in a child (preexec_fn): the kernel sends it SIGTERM when its parent dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _die_with_parent() -> None:
    """Runs in the child: SIGTERM it when the launcher dies, and give it its own process group."""
    os.setsid()
    set_parent_death_signal()


class ManagedProcess:
    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd or REPO_ROOT
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def wait_ready(self, check: Callable[[], bool], timeout: float = 20.0, what: str = "ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ProcessError(f"{self.name} exited with code {code} before {what}:\n{self.tail()}")
            if check():
                return
            time.sleep(0.05)
        raise ProcessError(f"{self.name} not {what} after {timeout:.0f}s:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(5)

    def stop(self, grace: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        # Children of the process (e.g. --workers) share its group; make sure none is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise ProcessError("redis-server not found: run ./dev setup (installs the Debian package)")
    return found


@dataclass(frozen=True)
class RedisTlsFiles:
    """A TLS-only redis-server: its certificate and key, the CA its clients' certificates must chain to,
    and whether it asks clients for one (tls-auth-clients)."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    auth_clients: bool = False


class RedisServer(ManagedProcess):
    """A throwaway redis-server on loopback: no persistence, its own directory. With `tls` it listens
    on TLS alone (plain port 0)."""

    def __init__(self, *, log_dir: Path, port: int | None = None, tls: RedisTlsFiles | None = None) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.data_dir = Path(tempfile.mkdtemp(prefix="igw-redis-"))
        listen = ["--port", str(self.port)]
        if tls is not None:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(Path(tls.cert_file).resolve()),
                "--tls-key-file", str(Path(tls.key_file).resolve()),
                "--tls-ca-cert-file", str(Path(tls.ca_file).resolve()),
                "--tls-auth-clients", "yes" if tls.auth_clients else "no",
            ]
        super().__init__(
            "redis",
            [
                redis_server_binary(),
                *listen,
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.data_dir),
                "--notify-keyspace-events", "",
            ],
            log_dir=log_dir,
        )

    @property
    def url(self) -> str:
        """rediss:// for a TLS server: the client still has to be told which CA to trust."""
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        super().start()
        self.wait_ready(lambda: port_open("127.0.0.1", self.port), 10, "listening")
        return self

    def stop(self, grace: float = 5.0) -> int | None:
        code = super().stop(grace)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return code


def http_ok(url: str, timeout: float = 0.5) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except Exception:
        return False


def python_module(module: str, *args: str) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", module, *args]
