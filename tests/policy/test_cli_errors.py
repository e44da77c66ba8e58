"""`igw policy` / `igw render istio` on bad arguments and bad targets: exit 2 or 1 with one clear line, never a
traceback, and nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from igw.cli import main
from igw.policy.load import MAX_MODELS, MAX_TENANTS
from igw.procs import REPO_ROOT
from tests.policy.helpers import BASE

DEMO = REPO_ROOT / "config" / "policy" / "demo.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize(("flag", "value"), [("--models", MAX_MODELS + 1), ("--tenants", MAX_TENANTS + 1)])
def test_generate_refuses_counts_past_what_a_policy_holds_as_an_argument_error(capsys, flag: str, value: int) -> None:
    code, _, err = run(capsys, "policy", "generate", flag, str(value))
    assert code == 2 and f"argument {flag}" in err and "at most" in err


def test_generate_into_a_missing_directory_is_one_clear_line(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "policy", "generate", "--models", "5", "--tenants", "2",
                       "--out", str(tmp_path / "no" / "p.yaml"))
    assert code == 1 and err.startswith("igw: error: cannot write ") and len(err.splitlines()) == 1


def test_render_into_a_path_that_is_a_file_is_one_clear_line(capsys, tmp_path: Path, shared_dir: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(target))
    assert code == 1 and err.startswith("igw: error: cannot write ") and target.read_text() == "x"


def test_render_refuses_objects_that_would_overwrite_each_other(capsys, tmp_path: Path, shared_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from igw.policy import istio

    render = istio.render

    def twice(policy):  # type: ignore[no-untyped-def]
        files = render(policy)
        files["30-models.yaml"] = files["30-models.yaml"] * 2
        return files

    monkeypatch.setattr(istio, "render", twice)
    policy = tmp_path / "p.yaml"
    policy.write_text(BASE)
    code, _, err = run(capsys, "render", "istio", "--policy", str(policy), "--out", str(tmp_path / "out"))
    assert code == 1 and "rendered twice" in err and not (tmp_path / "out").exists()


def test_a_bad_redis_url_is_an_argument_error(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--redis-url", "localhost:6379", "policy", "diff", str(DEMO),
                       "--rate-limit-config-dir", str(tmp_path))
    assert code == 2 and "--redis-url" in err


def test_diff_with_nothing_to_compare_is_an_argument_error(capsys) -> None:
    code, _, err = run(capsys, "policy", "diff", str(DEMO))
    assert code == 2 and "--rate-limit-config-dir" in err


def test_diff_says_when_the_live_rate_limit_file_does_not_load(capsys, tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "igw.yaml").write_text("domain: igw\ndescriptors:\n  - key: tenant\n    rate_limit: {unit: sec")
    code, out, _ = run(capsys, "--redis-url", redis_url, "policy", "diff", str(DEMO),
                       "--rate-limit-config-dir", str(tmp_path))
    assert code == 0 and "! the live rate-limit config does not load" in out.splitlines()[0]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_diff_against_a_rate_limit_dir_that_is_not_a_directory_names_the_path(
        capsys, tmp_path: Path, redis_url: str, kind: str) -> None:
    target = tmp_path / "limits"
    if kind == "file":
        target.write_text("domain: igw\n")
    code, out, err = run(capsys, "--redis-url", redis_url, "policy", "diff", str(DEMO),
                         "--rate-limit-config-dir", str(target))
    what = "is not a directory" if kind == "file" else "does not exist"
    assert code == 1 and out == "" and f"rate-limit config directory {target} {what}" in err


@pytest.mark.parametrize("argv", [["policy", "apply", str(DEMO), "--rate-limit-config-dir", ""],
                                  ["policy", "validate", ""],
                                  ["render", "istio", "--policy", str(DEMO), "--out", ""]],
                         ids=["apply into ''", "validate ''", "render into ''"])
def test_an_empty_path_is_an_argument_error_not_the_current_directory(capsys, argv: list[str], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "--redis-url", "redis://127.0.0.1:1/0", *argv)
    assert code == 2 and "empty path" in err and list(tmp_path.iterdir()) == []


def test_apply_beside_a_file_that_is_not_text_applies_nothing(capsys, tmp_path: Path, redis_url: str) -> None:
    import redis

    (tmp_path / "other.yaml").write_bytes(b"\xff\xfe domain: other\n")
    code, out, err = run(capsys, "--redis-url", redis_url, "policy", "apply", str(DEMO),
                         "--rate-limit-config-dir", str(tmp_path))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"nothing applied: the rate-limit config would not load in {tmp_path}: other.yaml: not UTF-8 text" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.yaml"]
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


def test_render_leaves_a_yaml_file_that_is_not_text_alone(capsys, tmp_path: Path, shared_dir: Path) -> None:
    (tmp_path / "notes.yaml").write_bytes(b"\xff\xfe")
    code, _, err = run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "notes.yaml").read_bytes() == b"\xff\xfe"


def test_render_check_counts_a_rendered_file_that_is_not_text_as_out_of_date(capsys, tmp_path: Path,
                                                                              shared_dir: Path) -> None:
    assert run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(tmp_path))[0] == 0
    (tmp_path / "30-models.yaml").write_bytes(b"\xff\xfe")
    code, _, err = run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(tmp_path), "--check")
    assert code == 1 and "is out of date: 30-models.yaml" in err


@pytest.mark.parametrize("url", ["localhost:8001", "http://127.0.0.1:99999"], ids=["no scheme", "bad port"])
def test_a_malformed_api_server_url_is_an_argument_error(capsys, url: str) -> None:
    code, _, err = run(capsys, "policy", "diff", str(DEMO), "--kube", "--api-server", url)
    assert code == 2 and "argument --api-server: " in err and url in err


def test_render_over_a_directory_of_a_file_name_writes_nothing(capsys, tmp_path: Path, shared_dir: Path) -> None:
    assert run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(tmp_path))[0] == 0
    before = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    (tmp_path / "30-models.yaml").unlink()
    (tmp_path / "30-models.yaml").mkdir()
    (tmp_path / "00-namespaces.yaml").write_text("# edited by hand\n")
    code, _, err = run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(tmp_path))
    assert code == 1 and f"cannot write {tmp_path / '30-models.yaml'}: not a regular file" in err
    assert (tmp_path / "00-namespaces.yaml").read_text() == "# edited by hand\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_render_that_fails_half_way_leaves_the_previous_files_whole(capsys, tmp_path: Path,
                                                                    shared_dir: Path) -> None:
    assert run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(tmp_path))[0] == 0
    (tmp_path / "00-namespaces.yaml").write_text("# previous render\n")
    (tmp_path / ".30-models.yaml.tmp").mkdir()  # the temporary of one file cannot be written
    code, _, err = run(capsys, "render", "istio", "--policy", str(DEMO), "--out", str(tmp_path))
    assert code == 1 and "cannot write" in err
    assert (tmp_path / "00-namespaces.yaml").read_text() == "# previous render\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [".30-models.yaml.tmp"]
