"""`igw replicas set | list | watch` as operators run them."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from igw.cli import main
from igw.procs import VENV_BIN, ManagedProcess, free_port, http_ok
from igw.replicas import replica_key
from tests.replicas.conftest import read_state, wait_for
from tests.replicas.k8s_fake import FakeKubeAPI
from tests.replicas.slices import model_slice


def igw(redis_url: str, *args: str) -> int:
    return main(["--redis-url", redis_url, "replicas", *args])


def test_cli_set_publishes_ready_versions_and_replicas(redis_url: str, rclient: redis.Redis) -> None:
    assert igw(redis_url, "set", "llama", "--replica", "p1", "--replica", "p2", "--version", "v1") == 0
    state = read_state(rclient, "llama")
    assert state is not None
    assert (state.ready, state.versions, state.replicas) == (2, {"v1": 2}, ("p1", "p2"))
    assert state.publisher.startswith("cli/")


def test_cli_set_splits_counts_between_versions(redis_url: str, rclient: redis.Redis) -> None:
    assert igw(redis_url, "set", "llama", "--version", "v1=3", "--version", "v2=1", "--ttl", "1h") == 0
    state = read_state(rclient, "llama")
    assert state is not None and (state.ready, state.versions) == (4, {"v1": 3, "v2": 1})
    assert rclient.ttl(replica_key("llama")) > 3500


@pytest.mark.parametrize(("args", "message"), [
    (["--ready", "2", "--replica", "a"], "--ready 2 but 1 --replica given"),
    (["--ready", "3", "--version", "a=1", "--version", "b=1"], "does not match the version counts"),
    (["--version", "a=1", "--version", "b"], "VERSION=COUNT"),
    (["--replica", "a", "--replica", "a"], "the same identity is given twice"),
    (["--version", "a=1", "--version", "a=2"], "version 'a' is given twice"),
    ([], "give --ready N"),
], ids=["ready disagrees with replicas", "ready disagrees with versions", "mixed version forms",
        "duplicate replica", "duplicate version", "nothing to publish"])
def test_cli_set_rejects_inconsistent_input_with_exit_1(redis_url: str, args: list[str], message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert igw(redis_url, "set", "llama", *args) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["set", "bad name", "--ready", "1"], ["set", "m", "--ready", "-1"],
                                  ["set", "m", "--ready", "1", "--ttl", "0s"], ["list", "--output", "xml"],
                                  ["set", "m", "--replica", ""], ["list", "--stale-after", "9" * 400],
                                  ["watch", "--kubeconfig", "/no/such/kubeconfig", "--http-port", "70000"],
                                  ["watch", "--kubeconfig", "/no/such/kubeconfig", "--log-format", "xml"],
                                  ["watch", "--kubeconfig", "/no/such/kubeconfig", "--selector", ""]],
                         ids=["space in model", "negative count", "ttl under a second", "unknown output",
                              "empty replica identity", "endless stale-after", "admin port out of range",
                              "unknown log format", "empty selector (every EndpointSlice)"])
def test_cli_bad_arguments_exit_2(redis_url: str, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        igw(redis_url, *args)
    assert exc.value.code == 2


def test_cli_unreachable_redis_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert igw(url, "list") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"igw: error: cannot reach Redis at {url}") and err.count("\n") == 1


def test_cli_list_shows_fresh_stale_and_expired_models(redis_url: str, rclient: redis.Redis,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    igw(redis_url, "set", "llama", "--ready", "2", "--publisher", "ops")
    rclient.hset(replica_key("llama"), "updated", "1")  # written long ago
    igw(redis_url, "set", "mistral", "--ready", "1")
    rclient.sadd("igw:replica-models", "phi")  # listed, key expired
    capsys.readouterr()
    assert igw(redis_url, "list", "--output", "json") == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["llama"]["ready"] == 2 and rows["llama"]["stale"] and rows["llama"]["publisher"] == "ops"
    assert rows["mistral"]["stale"] is False and rows["mistral"]["expired"] is False
    assert rows["phi"]["expired"] is True
    assert igw(redis_url, "list") == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["MODEL", "READY", "VERSIONS", "AGE", "TTL", "PUBLISHER", "STATE"]
    assert [line.split()[-1] for line in text[1:]] == ["stale", "fresh", "expired"]


def test_cli_list_with_nothing_published(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert igw(redis_url, "list") == 0
    assert "no replica counts published" in capsys.readouterr().out


def test_cli_watch_runs_as_a_process_publishes_and_stops_on_sigterm(redis_url: str, rclient: redis.Redis,
                                                                   log_dir: Path) -> None:
    port = free_port()
    with FakeKubeAPI() as api:
        api.load([model_slice("llama", ["a", "b"])])
        proc = ManagedProcess("igw-replicas-watch", [str(VENV_BIN / "igw"), "--redis-url", redis_url, "replicas",
                                                     "watch", "--api-server", api.url, "--heartbeat", "1s",
                                                     "--ttl", "3", "--http-port", str(port)],
                              log_dir=log_dir).start()
        try:
            proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/healthcheck"), 15, "healthy")
            wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.ready == 2, what="published")
            api.apply("MODIFIED", model_slice("llama", ["a"]))
            wait_for(lambda: (s := read_state(rclient, "llama")) is not None and s.ready == 1, what="change")
            proc.signal(signal.SIGTERM)
            assert proc.proc is not None and proc.proc.wait(10) == 0
        finally:
            proc.stop()


def test_cli_watch_without_any_kubernetes_configuration_fails_clearly(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-kubeconfig"
    assert igw(redis_url, "watch", "--kubeconfig", str(missing)) == 1
    assert "no Kubernetes API configuration" in capsys.readouterr().err


def test_cli_watch_rejects_a_ttl_shorter_than_two_heartbeats(redis_url: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert igw(redis_url, "watch", "--api-server", "http://127.0.0.1:1", "--heartbeat", "5s", "--ttl", "6") == 1
    assert "at least twice the heartbeat" in capsys.readouterr().err


def test_cli_set_with_a_ttl_over_365_days_exits_2_and_writes_no_count(
        redis_url: str, rclient: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        igw(redis_url, "set", "llama", "--ready", "3", "--ttl", "9000h")
    assert exc.value.code == 2 and "argument --ttl: TTL '9000h' is more than 365 days" in \
        capsys.readouterr().err
    assert not rclient.exists(replica_key("llama"))


def test_cli_watch_names_a_bad_log_level_from_the_environment_in_one_line(
        redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit) as exc:
        igw(redis_url, "watch", "--kubeconfig", "/no/such/kubeconfig")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "environment variable LOG_LEVEL='verbose': invalid log level 'verbose'" in err


def test_cli_unreachable_redis_is_named_without_its_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert igw(f"redis://ops:s3cret@127.0.0.1:{free_port()}/0", "list") == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://ops:***@127.0.0.1:" in err and "s3cret" not in err
