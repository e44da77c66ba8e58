"""`igw --redis-url` (and REDIS_URL) is checked as the services check the same setting: a malformed URL is exit 2
and one line naming it, never a traceback from the first command that connects, and never its password."""

from __future__ import annotations

import pytest

from igw.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(exited.value.code or 0), err


def test_a_port_that_is_no_number_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--redis-url", "redis://127.0.0.1:abc/0", "tenants", "list")
    assert code == 2 and "argument --redis-url: redis url 'redis://127.0.0.1:abc/0': invalid port" in err


def test_a_url_without_a_host_is_refused_without_showing_its_password(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--redis-url", "redis://:s3cret@", "replicas", "list")
    assert code == 2 and "host is missing" in err and "s3cret" not in err


def test_an_option_the_services_would_refuse_is_refused_here_too(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--redis-url", "redis://127.0.0.1:6379/0?socket_timeout=abc", "models", "list")
    assert code == 2 and "unknown option 'socket_timeout'" in err


def test_a_missing_tls_file_of_a_rediss_url_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--redis-url", "rediss://127.0.0.1:6379/0?ssl_ca_certs=/no/such/ca.pem", "tenants", "list")
    assert code == 2 and "/no/such/ca.pem" in err


def test_a_bad_redis_url_in_the_environment_is_one_line_naming_the_variable(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://ops:s3cret@127.0.0.1:99999/0")
    code, err = run(capsys, "tenants", "list")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("igw: error: environment variable REDIS_URL=") and "invalid port" in err
    assert "s3cret" not in err
