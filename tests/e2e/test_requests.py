"""What a client sees through the real Envoy: answers from the right model, refusals with the right
status, trusted headers that a client cannot forge, model-in-body routing and the JSON access log."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from igw.gateway_client import Request, auth, openai_style, send, v2_infer
from igw.launcher import GatewayBed
from tests.e2e.observe import ratelimit_metric


def replicas_of(bed: GatewayBed, model: str) -> set[str]:
    return {r["name"] for r in bed.state["models"][model]}


def one(request: Request) -> Any:
    return send([request], concurrency=1)[0]


@pytest.mark.parametrize("model", ["demo-linear", "demo-logistic"])
def test_valid_key_and_allowed_model_get_200_from_a_replica_of_that_model(
        bed: GatewayBed, key_for: Callable[..., str], model: str) -> None:
    result = one(v2_infer(bed.state["gateway_url"], model, key_for("e2e")))
    assert result.status == 200, result.body
    assert result.headers["x-igw-replica"] in replicas_of(bed, model)
    assert result.json()["model_name"] == model


@pytest.mark.parametrize(("headers", "case"), [
    ({}, "missing key"),
    (auth("igw_000000000000_not-a-real-key-at-all-0000000000000000000"), "unknown key"),
    ({"authorization": "Basic dXNlcjpwYXNz"}, "not a bearer key"),
])
def test_missing_or_bad_key_gets_401_and_never_reaches_a_model(bed: GatewayBed, headers: dict, case: str) -> None:
    request = v2_infer(bed.state["gateway_url"], "demo-linear", None, headers=headers)
    result = one(request)
    assert result.status == 401, (case, result.body)
    assert "x-igw-replica" not in result.headers
    assert "error" in result.json()


def test_a_model_outside_the_tenants_models_gets_403(bed: GatewayBed, key_for: Callable[..., str]) -> None:
    key = key_for("e2e-restricted", models="demo-linear")
    allowed = one(v2_infer(bed.state["gateway_url"], "demo-linear", key))
    forbidden = one(v2_infer(bed.state["gateway_url"], "demo-logistic", key))
    assert allowed.status == 200
    assert forbidden.status == 403 and "x-igw-replica" not in forbidden.headers


def test_an_unknown_model_gets_404(bed: GatewayBed, key_for: Callable[..., str]) -> None:
    result = one(v2_infer(bed.state["gateway_url"], "no-such-model", key_for("e2e")))
    assert result.status == 404 and "x-igw-replica" not in result.headers


def test_a_body_above_the_tenants_limit_gets_413(bed: GatewayBed, key_for: Callable[..., str]) -> None:
    key = key_for("e2e-small-body", max_body_bytes=64 * 1024)
    gateway = bed.state["gateway_url"]
    small = one(v2_infer(gateway, "demo-linear", key))
    large = one(v2_infer(gateway, "demo-linear", key, body=b"x" * (64 * 1024 + 1)))
    assert small.status == 200
    assert large.status == 413 and "x-igw-replica" not in large.headers


def test_a_forged_tenant_header_reaches_neither_the_model_nor_the_rate_limiter(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    gateway = bed.state["gateway_url"]
    # The policy gives tenant `forged` a limit of 0: the real `forged` tenant is always refused...
    assert one(v2_infer(gateway, "demo-linear", key_for("forged"))).status == 429
    before = ratelimit_metric(bed.state, "ratelimit_over_limit_total", key="tenant_forged")
    forged = {"x-igw-tenant": "forged", "x-igw-model": "demo-logistic", "x-igw-tier": "premium"}
    results = send([v2_infer(gateway, "demo-linear", key_for("e2e"), headers=forged) for _ in range(10)])
    # ...so a forged header that reached the rate limiter would be 429 too.
    assert [r.status for r in results] == [200] * 10
    seen = results[0].json()["parameters"]["received_headers"]
    assert (seen["x-igw-tenant"], seen["x-igw-model"], seen["x-igw-tier"]) == ("e2e", "demo-linear", "standard")
    assert {r.headers["x-igw-replica"] for r in results} <= replicas_of(bed, "demo-linear")
    # The forged tenant's over-limit counter never moved.
    assert ratelimit_metric(bed.state, "ratelimit_over_limit_total", key="tenant_forged") == before


@pytest.mark.parametrize(("named", "model"), [("linear", "demo-linear"), ("logistic", "demo-logistic"),
                                              ("demo-linear", "demo-linear")])
def test_a_model_named_only_in_the_json_body_is_routed_to_that_model(
        bed: GatewayBed, key_for: Callable[..., str], named: str, model: str) -> None:
    result = one(openai_style(bed.state["gateway_url"], named, key_for("e2e")))
    assert result.status == 200, result.body
    assert result.headers["x-igw-replica"] in replicas_of(bed, model)
    assert result.json()["parameters"]["received_headers"]["x-igw-model"] == model


def test_a_body_naming_an_unknown_model_gets_404(bed: GatewayBed, key_for: Callable[..., str]) -> None:
    result = one(openai_style(bed.state["gateway_url"], "no-such-model", key_for("e2e")))
    assert result.status == 404


def test_every_access_log_line_is_json_and_names_tenant_model_and_replica(
        bed: GatewayBed, key_for: Callable[..., str]) -> None:
    gateway, key = bed.state["gateway_url"], key_for("e2e")
    ids = {f"e2e-log-{uuid.uuid4()}": model for model in ("demo-linear", "demo-logistic", "demo-linear")}
    results = send([v2_infer(gateway, model, key, headers={"x-request-id": rid}) for rid, model in ids.items()])
    assert [r.status for r in results] == [200] * 3
    lines = _wait_for_lines(Path(bed.state["access_log"]), set(ids))
    for rid, model in ids.items():
        entry = lines[rid]
        assert (entry["tenant"], entry["model"], entry["status"]) == ("e2e", model, 200)
        assert entry["replica"] in replicas_of(bed, model)
        assert entry["upstream_cluster"] == f"model-{model}"


def _wait_for_lines(log: Path, request_ids: set[str], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        entries = [json.loads(text) for text in log.read_text().splitlines()]  # every line must parse
        found = {e["request_id"]: e for e in entries if e["request_id"] in request_ids}
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            assert set(found) == request_ids, f"missing access-log lines for {request_ids - set(found)}"
            return found
        time.sleep(0.05)
