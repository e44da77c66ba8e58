"""The launcher brings a whole bed up and down, reports deaths, and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from igw.launcher import BedOptions, Death, GatewayBed
from igw.procs import VENV_BIN, ProcessError

INFER_BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1.0, -1.0, 2.0]}]}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _all_pids(state: dict[str, Any]) -> list[int]:
    pids = list(state["pids"].values())
    assert len(pids) == 1 + 1 + 2 * len(state["services"]["ext_proc"]) + sum(map(len, state["models"].values()))
    return pids


def _infer(state: dict[str, Any], model: str, client: httpx.Client) -> httpx.Response:
    return client.post(f"{state['gateway_url']}/v2/models/{model}/infer", json=INFER_BODY,
                       headers={"authorization": f"Bearer {state['tenant']['api_key']}"})


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayBed]:
    """Two replicas of every service and model: failure tests need a survivor."""
    deaths: list[Death] = []
    log_dir = tmp_path_factory.mktemp("bed")
    # A quota the tests never reach: these tests are about processes and routing, not about 429s.
    quota = tmp_path_factory.mktemp("quota")
    (quota / "igw.yaml").write_text(
        "domain: igw\ndescriptors:\n  - key: tenant\n    rate_limit: {unit: second, requests_per_unit: 100000}\n")
    options = BedOptions(replicas=2, model_replicas=2, log_dir=log_dir, rate_limit_config=quota)
    with GatewayBed(options, on_death=deaths.append) as running:
        yield running


def test_start_returns_urls_ports_models_and_the_demo_key(bed: GatewayBed) -> None:
    state = bed.state
    assert state["gateway_url"].startswith("http://127.0.0.1:")
    assert state["redis_url"].startswith("redis://127.0.0.1:")
    assert state["demo_models"] == ["demo-linear", "demo-logistic"]
    assert len(state["services"]["ext_proc"]) == 2 and len(state["services"]["ratelimit"]) == 2
    assert state["tenant"]["tenant_id"] == "demo" and state["tenant"]["api_key"]


def test_a_request_with_the_demo_key_reaches_the_model_through_envoy(bed: GatewayBed) -> None:
    with httpx.Client(timeout=5) as client:
        response = _infer(bed.state, "demo-linear", client)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "demo-linear"
    assert body["parameters"]["received_headers"]["x-igw-tenant"] == "demo"
    assert response.headers["x-igw-replica"] in {r["name"] for r in bed.state["models"]["demo-linear"]}


def test_every_request_leaves_one_json_access_log_line(bed: GatewayBed) -> None:
    request_id = f"launcher-test-{time.time_ns()}"
    with httpx.Client(timeout=5) as client:
        client.post(f"{bed.state['gateway_url']}/v2/models/demo-linear/infer", json=INFER_BODY,
                    headers={"authorization": f"Bearer {bed.state['tenant']['api_key']}", "x-request-id": request_id})
    log = Path(bed.state["access_log"])

    def line() -> dict[str, Any] | None:
        for text in log.read_text().splitlines():
            entry = json.loads(text)
            if entry["request_id"] == request_id:
                return entry
        return None

    _wait(lambda: line() is not None, 3, "the access log line")
    entry = line()
    assert entry is not None
    assert (entry["tenant"], entry["model"], entry["status"]) == ("demo", "demo-linear", 200)
    assert entry["upstream_cluster"] == "model-demo-linear"
    assert entry["ratelimit_limit"]


def test_a_killed_replica_is_reported_with_exit_code_and_log_tail(bed: GatewayBed) -> None:
    bed.kill("model-demo-logistic-1")
    death = bed.wait_for_death("model-demo-logistic-1", 5)
    assert death.exit_code == -signal.SIGKILL
    assert "model-demo-logistic-1" in death.log_tail  # its startup line names the replica
    bed.restart("model-demo-logistic-1")
    assert bed.procs["model-demo-logistic-1"].alive()


def test_a_dead_ext_proc_replica_receives_no_traffic(bed: GatewayBed) -> None:
    bed.kill("ext_proc-1")
    ext_proc_1 = f"127.0.0.1:{bed.state['services']['ext_proc'][1]['grpc_port']}"
    _wait(lambda: bed.envoy_host_health()["ext_proc"][ext_proc_1] != "healthy", 5, "Envoy to see ext_proc-1 down")
    with httpx.Client(timeout=5) as client:
        codes = [_infer(bed.state, "demo-linear", client).status_code for _ in range(8)]
    bed.restart("ext_proc-1")
    assert codes == [200] * 8


def test_an_unready_model_replica_receives_no_traffic(bed: GatewayBed) -> None:
    replicas = bed.state["models"]["demo-linear"]
    bed.set_model_ready(replicas[0]["name"], False)
    address = f"127.0.0.1:{replicas[0]['port']}"
    try:
        _wait(lambda: bed.envoy_host_health()["model-demo-linear"][address] != "healthy", 5, "replica unready")
        with httpx.Client(timeout=5) as client:
            answers = [_infer(bed.state, "demo-linear", client) for _ in range(6)]
    finally:
        bed.set_model_ready(replicas[0]["name"], True)
    assert {r.status_code for r in answers} == {200}
    assert {r.headers["x-igw-replica"] for r in answers} == {replicas[1]["name"]}


def test_a_restarted_redis_is_seeded_again_and_its_new_key_works(bed: GatewayBed) -> None:
    old_key = bed.state["tenant"]["api_key"]
    bed.kill("redis")
    bed.wait_for_death("redis", 5)
    bed.restart("redis")
    assert bed.state["tenant"]["api_key"] != old_key
    with httpx.Client(timeout=5) as client:
        _wait(lambda: _infer(bed.state, "demo-linear", client).status_code == 200, 10, "the new key to work")


def test_stop_leaves_no_process_running(tmp_path: Path) -> None:
    bed = GatewayBed(BedOptions(models=("only",), log_dir=tmp_path, state_file=tmp_path / "state.json"))
    state = bed.start()
    pids = _all_pids(state)
    assert json.loads((tmp_path / "state.json").read_text())["gateway_url"] == state["gateway_url"]
    bed.stop()
    assert [p for p in pids if _alive(p)] == []
    assert not (tmp_path / "state.json").exists()


def test_a_component_that_cannot_start_fails_start_with_its_log_tail(tmp_path: Path) -> None:
    bad = tmp_path / "ratelimit"
    bad.mkdir()
    (bad / "igw.yaml").write_text("domain: igw\ndescriptors:\n  - key: tenant\n    ratelimit: {}\n")
    bed = GatewayBed(BedOptions(rate_limit_config=bad, log_dir=tmp_path / "logs", ready_timeout=3))
    with pytest.raises(ProcessError, match="ratelimit-0") as failure:
        bed.start()
    assert "unknown key 'ratelimit'" in str(failure.value)  # the log tail says why
    assert [name for name, proc in bed.procs.items() if proc.alive()] == []


def test_igw_up_reports_a_dying_component_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    state_file, out = tmp_path / "state.json", tmp_path / "igw-up.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            [str(VENV_BIN / "igw"), "up", "--free-ports", "--models", "m1", "--state-file", str(state_file),
             "--log-dir", str(tmp_path / "logs")],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        _wait(lambda: state_file.exists() or proc.poll() is not None, 30, "the state file")
        assert proc.poll() is None, out.read_text()
        state = json.loads(state_file.read_text())
        pids = _all_pids(state)
        assert all(_alive(p) for p in pids)
        os.kill(state["pids"]["model-m1-0"], signal.SIGKILL)
        _wait(lambda: "model-m1-0 died" in out.read_text(), 5, "the death report")
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = out.read_text()
    assert proc.returncode == 0, output
    assert "igw test bed" in output and state["gateway_url"] in output
    assert "model-m1-0 died (exit code -9); last log lines:" in output
    assert "model m1 loaded" in output.split("model-m1-0 died", 1)[1]  # the tail of its log follows
    assert [p for p in pids if _alive(p)] == []
    assert not state_file.exists()


def test_children_die_with_a_killed_igw_up(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    proc = subprocess.Popen(
        [str(VENV_BIN / "igw"), "up", "--free-ports", "--models", "m1", "--state-file", str(state_file),
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: state_file.exists() or proc.poll() is not None, 30, "the state file")
        pids = _all_pids(json.loads(state_file.read_text()))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    _wait(lambda: not any(_alive(p) for p in pids), 10, "the children to exit after their parent died")


def test_an_added_model_replica_gets_traffic_and_is_published_and_a_removed_one_is_gone(bed: GatewayBed) -> None:
    import redis

    from igw.replicas import decode_state, replica_key

    client = redis.Redis.from_url(bed.state["redis_url"])

    def published() -> int:
        state = decode_state("demo-linear", client.hgetall(replica_key("demo-linear")))
        return state.ready if state else -1

    assert published() == 2
    (name,) = bed.add_model_replica("demo-linear")
    assert published() == 3 and name == "model-demo-linear-2"
    assert [r["name"] for r in bed.state["models"]["demo-linear"]][-1] == name
    with httpx.Client(timeout=5) as client_http:
        seen = {_infer(bed.state, "demo-linear", client_http).headers["x-igw-replica"] for _ in range(9)}
    assert name in seen
    pid = bed.procs[name].pid
    assert bed.remove_model_replica("demo-linear") == [name]
    assert published() == 2 and name not in bed.procs and not _alive(pid)
    assert len(bed.state["models"]["demo-linear"]) == 2
    client.close()


def test_adding_more_model_replicas_than_envoy_declares_is_refused(bed: GatewayBed) -> None:
    with pytest.raises(ValueError, match="Envoy declares 6 \\(max_model_replicas\\): cannot add 5"):
        bed.add_model_replica("demo-linear", 5)
