"""`igw up` and `igw demo` on bad arguments: refused before any process starts, with one line naming the flag,
instead of failing after the whole bed started or with a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from igw.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_up_refuses_one_port_for_the_gateway_and_envoy_admin(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "up", "--envoy-port", "18000", "--admin-port", "18000")
    assert code == 2 and "--envoy-port and --admin-port are 18000" in err


def test_up_refuses_a_gateway_port_that_is_the_default_admin_port(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "up", "--envoy-port", "9901")
    assert code == 2 and "--envoy-port is the default admin port 9901" in err


def test_up_refuses_a_state_file_that_is_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, "up", "--free-ports", "--state-file", str(tmp_path))
    assert code == 1 and err == f"igw: error: --state-file {tmp_path} is a directory\n"


def test_up_refuses_a_log_dir_below_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(capsys, "up", "--free-ports", "--log-dir", str(blocker / "logs"))
    assert code == 1 and err == f"igw: error: --log-dir {blocker / 'logs'}: {blocker} is not a directory\n"


def test_up_says_a_rate_limit_config_file_is_not_a_directory(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    config = tmp_path / "igw.yaml"
    config.write_text("domain: igw\n")
    code, err = run(capsys, "up", "--free-ports", "--rate-limit-config", str(config))
    assert code == 1 and "is not a directory" in err


def test_demo_names_what_a_foreign_state_file_lacks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"gateway_url": "http://127.0.0.1:1"}')
    code, err = run(capsys, "demo", "--state-file", str(state))
    assert code == 1 and err.count("\n") == 1
    assert "not one `igw up --state-file` wrote: 'tenant' is missing or not a JSON object" in err


def test_demo_refuses_a_state_file_that_is_no_json_object(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("[]")
    code, err = run(capsys, "demo", "--state-file", str(state))
    assert code == 1 and "a JSON object was expected, not list" in err


def test_demo_refuses_a_state_file_that_is_not_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(b"\xff\xfe\x00")
    code, err = run(capsys, "demo", "--state-file", str(state))
    assert code == 1 and err.startswith(f"igw: error: cannot read the state file {state}: 'utf-8' codec")


def test_demo_refuses_a_log_dir_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(capsys, "demo", "--log-dir", str(blocker))
    assert code == 1 and err.startswith("igw: error: cannot prepare the test bed: ") and str(blocker) in err
