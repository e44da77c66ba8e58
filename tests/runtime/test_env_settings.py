"""Settings read from the environment: a bad value stops the start naming the variable, and a password in
a URL never reaches the message (it lands in the logs)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from igw.runtime import EnvDefaults, parse_bool, parse_duration
from tests.helpers import assert_one_line_error


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


def test_a_duration_too_long_to_represent_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="too large"):
        parse_duration("9" * 400)  # float() makes it inf, which no consumer can store or sleep on


def test_a_duration_past_gos_longest_is_refused_and_gos_longest_is_accepted() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="too large"):
        parse_duration("9999999999999999h")  # finite, but overflows timers and Redis TTLs downstream
    assert parse_duration("2562047h") == 2562047 * 3600


@pytest.mark.parametrize("module", ["ext_proc", "ratelimit_svc"])
def test_a_bad_environment_variable_is_one_line_without_the_usage_text(module: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "WORKERS": "0"}
    proc = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=30, env=env)
    assert_one_line_error(proc.returncode, proc.stderr, "WORKERS='0'", "at least 1")


def test_an_endless_duration_from_the_environment_stops_the_start_naming_the_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "STALE_IF_ERROR": "9" * 400}
    proc = subprocess.run([sys.executable, "-m", "ext_proc"], capture_output=True, text=True, timeout=30, env=env)
    assert_one_line_error(proc.returncode, proc.stderr, "STALE_IF_ERROR", "too large")


@pytest.mark.parametrize(("flag", "what"), [("--key-secret", "key secret"), ("--host", "host")])
def test_ext_proc_refuses_an_empty_value_for_a_flag_that_needs_one(flag: str, what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ext_proc", flag, ""], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"argument {flag}: {what} must not be empty" in proc.stderr


def test_ext_proc_refuses_one_port_for_grpc_and_http_before_binding() -> None:
    env = {"PATH": "/usr/bin:/bin", "GRPC_PORT": "9003"}  # HTTP_PORT's default
    proc = subprocess.run([sys.executable, "-m", "ext_proc"], capture_output=True, text=True, timeout=30, env=env)
    assert_one_line_error(proc.returncode, proc.stderr, "--grpc-port (GRPC_PORT) and --http-port (HTTP_PORT) are "
                                                        "both 9003")
