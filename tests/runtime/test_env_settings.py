"""Settings read from the environment: a bad value stops the start naming the variable, and a password in
a URL never reaches the message (it lands in the logs)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["ext_proc", "ratelimit_svc"])
def test_a_bad_redis_url_from_the_environment_is_named_without_its_password(module: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://igw:n0t-in-logs@127.0.0.1:notaport/0"}
    proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2
    assert "REDIS_URL" in proc.stderr and "igw:***@127.0.0.1" in proc.stderr
    assert "n0t-in-logs" not in proc.stderr
