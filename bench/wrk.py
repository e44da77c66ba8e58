"""Run Debian's `wrk` (closed loop: fixed connections, fixed duration) and parse what it prints.

`./dev bench` installs wrk when it is missing. wrk runs pinned to one CPU (taskset) so it does not
wander onto the core the process under test is using at that moment more than the scheduler forces.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


class WrkMissing(RuntimeError):
    pass


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise WrkMissing("wrk not found: run `./dev bench ...` (installs the Debian package) or apt-get install wrk")
    return found


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def lua_script(method: str, headers: dict[str, str], body: bytes, rotate_header: str | None = None,
               rotate_values: list[str] | None = None) -> str:
    """A wrk script sending one fixed request, or rotating one header's value over `rotate_values`."""
    lines = [f"wrk.method = {_lua_string(method)}", f"wrk.body = {_lua_string(body.decode())}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    if rotate_header and rotate_values:
        lines.append("local values = {" + ",".join(_lua_string(v) for v in rotate_values) + "}")
        lines.append("local n = 0")
        lines.append("request = function()\n  n = n + 1\n"
                     f"  wrk.headers[{_lua_string(rotate_header)}] = values[(n % #values) + 1]\n"
                     "  return wrk.format()\nend")
    return "\n".join(lines) + "\n"


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    raw: str

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def as_dict(self) -> dict[str, float | int]:
        out = asdict(self)
        out.pop("raw")
        out["errors"] = self.errors
        return out


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if not total:
        raise ValueError(f"unexpected wrk output:\n{output}")
    seconds = _ms(total.group(2) + total.group(3)) / 1000
    pct = {p: _ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)", output, re.M)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    requests = int(total.group(1))
    return WrkResult(
        requests=requests, seconds=seconds, rps=requests / seconds if seconds else 0.0,
        p50_ms=pct.get("50", 0.0), p90_ms=pct.get("90", 0.0), p99_ms=pct.get("99", 0.0),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        raw=output,
    )


def run(url: str, *, duration: float, connections: int = 16, threads: int = 1, script: str = "",
        cpu: int | None = None, timeout_s: float = 5.0) -> WrkResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
        script_path = handle.name
    try:
        args = [wrk_binary(), "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
                "--timeout", f"{timeout_s:.0f}s", "--latency", "-s", script_path, url]
        if cpu is not None and shutil.which("taskset"):
            args = ["taskset", "-c", str(cpu), *args]
        out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
        return parse(out.stdout)
    finally:
        Path(script_path).unlink(missing_ok=True)
