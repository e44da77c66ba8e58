"""The demo model server: a real (small) numpy model behind KServe v2 HTTP, as the bed's upstream."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from igw.demo_model import CLASSES, FEATURES, InferenceError, load_model, parse_request
from igw.procs import ManagedProcess, free_port, port_open, python_module


def _request(shape: list[int], data: list[float], datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}


def test_the_model_answers_probabilities_that_sum_to_one_and_their_argmax() -> None:
    model = load_model("m")
    probs, labels = model.predict(np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES))
    assert probs.shape == (2, CLASSES)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert labels.tolist() == probs.argmax(axis=1).tolist()


def test_replicas_of_a_model_agree_and_two_models_differ() -> None:
    x = np.ones((1, FEATURES))
    assert np.array_equal(load_model("a").predict(x)[0], load_model("a").predict(x)[0])
    assert not np.allclose(load_model("a").predict(x)[0], load_model("b").predict(x)[0])


def test_a_flat_tensor_is_one_row_of_the_batch() -> None:
    batch, request_id = parse_request({**_request([FEATURES], [1, 2, 3, 4]), "id": "r1"})
    assert batch.shape == (1, FEATURES) and request_id == "r1"


@pytest.mark.parametrize(("body", "message"), [
    ([], "must be a JSON object"),
    ({"inputs": []}, "exactly one tensor"),
    (_request([2, 4], [1, 2, 3]), "has 3 values, shape [2, 4] needs 8"),
    (_request([1, 3], [1, 2, 3]), "must be [batch, 4]"),
    (_request([1, 4], [1, 2, 3, 4], "BYTES"), "unsupported datatype 'BYTES'"),
    (_request([1, 4], ["a", "b", "c", "d"]), "input data is not FP32"),
])
def test_a_bad_request_is_refused_with_the_reason(body: object, message: str) -> None:
    with pytest.raises(InferenceError) as refused:
        parse_request(body)
    assert message in str(refused.value)


@pytest.fixture
def server(log_dir: Path) -> Iterator[tuple[ManagedProcess, str]]:
    port = free_port()
    proc = ManagedProcess(f"model-test-{port}", python_module(
        "igw.model_server", "--model", "m", "--port", str(port), "--replica", "m-r0", "--load-delay", "0.6s"),
        log_dir=log_dir).start()
    proc.wait_ready(lambda: port_open("127.0.0.1", port), 15, "listening")
    yield proc, f"http://127.0.0.1:{port}"
    proc.stop()


def test_ready_only_once_the_model_is_loaded_and_unready_on_sigusr1(server: tuple[ManagedProcess, str]) -> None:
    proc, base = server
    with httpx.Client(timeout=2) as client:
        assert client.get(f"{base}/v2/health/live").status_code == 200
        assert client.get(f"{base}/v2/health/ready").status_code == 503
        deadline = time.monotonic() + 15  # the model loads after the port opens
        while client.get(f"{base}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.05)
        proc.signal(signal.SIGUSR1)
        assert _ready_becomes(client, base, 503), "still ready after SIGUSR1"
        proc.signal(signal.SIGUSR2)
        assert _ready_becomes(client, base, 200), "still unready after SIGUSR2"


def _ready_becomes(client: httpx.Client, base: str, status: int, timeout: float = 10) -> bool:
    """A signal is handled asynchronously: on a loaded machine the next probe may come first."""
    deadline = time.monotonic() + timeout
    while client.get(f"{base}/v2/health/ready").status_code != status:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_infer_names_the_replica_and_echoes_the_gateway_headers(server: tuple[ManagedProcess, str]) -> None:
    _, base = server
    with httpx.Client(timeout=2) as client:
        deadline = time.monotonic() + 15  # the model loads after the port opens
        while client.get(f"{base}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = client.post(f"{base}/v2/models/m/infer", json=_request([1, 4], [1, 0, 0, 1]),
                               headers={"x-igw-tenant": "t1", "x-igw-model": "m", "other": "x"})
        assert response.status_code == 200
        assert response.headers["x-igw-replica"] == "m-r0"
        body = response.json()
        assert body["parameters"]["replica"] == "m-r0"
        assert body["parameters"]["received_headers"] == {"x-igw-tenant": "t1", "x-igw-model": "m"}
        expected = load_model("m").predict(np.array([[1, 0, 0, 1]], dtype=np.float32))[0]
        assert np.allclose(body["outputs"][0]["data"], expected.ravel(), atol=1e-5)
        assert client.post(f"{base}/v2/models/other/infer", json=_request([1, 4], [1, 2, 3, 4])).status_code == 404
        bad = client.post(f"{base}/v2/models/m/infer", content=b"{not json")
        assert bad.status_code == 400 and "not JSON" in bad.json()["error"]
        assert client.get(f"{base}/v2/models/m").json()["inputs"][0]["shape"] == [-1, FEATURES]


def test_an_openai_style_call_is_served_only_when_the_gateway_header_names_the_model(
        server: tuple[ManagedProcess, str]) -> None:
    _, base = server
    body = {"model": "some-alias", **_request([1, 4], [1, 0, 0, 1])}
    with httpx.Client(timeout=2) as client:
        deadline = time.monotonic() + 15  # the model loads after the port opens
        while client.get(f"{base}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        served = client.post(f"{base}/v1/chat/completions", json=body, headers={"x-igw-model": "m"})
        refused = client.post(f"{base}/v1/chat/completions", json=body, headers={"x-igw-model": "other"})
        unnamed = client.post(f"{base}/v1/chat/completions", json=body)
    assert served.status_code == 200 and served.json()["model_name"] == "m"
    assert served.headers["x-igw-replica"] == "m-r0"
    assert refused.status_code == 404 and "'other'" in refused.json()["error"]
    assert unnamed.status_code == 404
