"""Settings read from the environment: a bad value stops the start naming the variable, and a password in
a URL never reaches the message (it lands in the logs)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from igw.runtime import EnvDefaults, parse_bool


@pytest.mark.parametrize("module", ["ext_proc", "ratelimit_svc"])
def test_a_bad_redis_url_from_the_environment_is_named_without_its_password(module: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://igw:n0t-in-logs@127.0.0.1:notaport/0"}
    proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2
    assert "REDIS_URL" in proc.stderr and "igw:***@127.0.0.1" in proc.stderr
    assert "n0t-in-logs" not in proc.stderr


def _parser() -> EnvDefaults:
    env = EnvDefaults(argparse.ArgumentParser(prog="svc"))
    env.add("--fail-open", "IGW_TEST_FAIL_OPEN", default=False, type=parse_bool, help="fail open")
    return env


def test_a_boolean_flag_alone_means_true() -> None:
    assert _parser().parse(["--fail-open"]).fail_open is True


def test_a_boolean_flag_still_takes_a_value() -> None:
    assert _parser().parse(["--fail-open", "false"]).fail_open is False


def test_a_boolean_flag_with_a_bad_value_is_refused_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse(["--fail-open", "maybe"])
    assert exited.value.code == 2
    assert "--fail-open" in capsys.readouterr().err


@pytest.mark.parametrize(("module", "flag"),
                         [("ext_proc", "--grpc-server-use-tls"), ("ratelimit_svc", "--shadow-mode")])
def test_the_services_accept_boolean_flags_alone(module: str, flag: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, flag, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"{flag} [BOOL]" in proc.stdout
