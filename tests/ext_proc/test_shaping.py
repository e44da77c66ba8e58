"""Model resolution from paths, aliases, and the trusted headers set on allowed requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ext_proc.conftest import World
from tests.ext_proc.helpers import ExtProcClient, allowed_headers, request_headers
from tests.helpers import Service


@pytest.mark.parametrize(("path", "model", "version"), [
    ("/v1/models/llama-3-8b:predict", "llama-3-8b", None),
    ("/v2/models/llama-3-70b/infer", "llama-3-70b", None),
    ("/v2/models/llama-3-8b/versions/3/infer", "llama-3-8b", "3"),
    ("/v2/models/llama/infer?trace=1", "llama-3-8b", None),
], ids=["kserve v1 predict", "kserve v2 infer", "kserve v2 with a version", "an alias resolves to its model"])
def test_model_header_comes_from_the_path(
    client: ExtProcClient, world: World, path: str, model: str, version: str | None
) -> None:
    allowed = allowed_headers(client.one(request_headers(path, key=world.acme_key)))
    assert allowed.set["x-igw-model"] == model
    assert allowed.set.get("x-igw-model-version") == version
    assert allowed.clear_route_cache, "Envoy must re-pick the route on the new x-igw-model"
    assert allowed.mode_override is None, "headers-only unless the body is needed"


def test_tenant_headers_are_set_for_rate_limit_descriptors(client: ExtProcClient, world: World) -> None:
    allowed = allowed_headers(client.one(request_headers(key=world.acme_key)))
    assert {k: allowed.set[k] for k in ("x-igw-tenant", "x-igw-department", "x-igw-tier", "x-igw-priority",
                                        "x-envoy-upstream-rq-timeout-ms")} == {
        "x-igw-tenant": "acme", "x-igw-department": "research", "x-igw-tier": "standard",
        "x-igw-priority": "2", "x-envoy-upstream-rq-timeout-ms": "45000"}


def test_forged_tenant_header_is_removed_and_overwritten(client: ExtProcClient, world: World) -> None:
    forged = [("x-igw-tenant", "initech"), ("x-igw-department", "sales"), ("x-igw-model", "mistral-7b"),
              ("x-igw-anything", "1"), ("x-envoy-upstream-rq-timeout-ms", "999999"), ("x-envoy-retry-on", "5xx")]
    allowed = allowed_headers(client.one(request_headers(key=world.acme_key, extra=forged)))
    assert set(allowed.remove) >= {name for name, _ in forged}
    # Envoy applies removals first, then sets with overwrite: only our values survive.
    assert allowed.set["x-igw-tenant"] == "acme"
    assert allowed.set["x-igw-department"] == "research"
    assert allowed.set["x-igw-model"] == "llama-3-8b"
    assert allowed.set["x-envoy-upstream-rq-timeout-ms"] == "45000"


def test_forged_tenant_header_is_stripped_even_for_a_path_without_model(
    client: ExtProcClient, world: World
) -> None:
    message = request_headers("/v1/models", method="GET", key=world.initech_key, end_of_stream=True,
                              content_length=None, extra=[("x-igw-tenant", "acme"), ("x-igw-model", "llama-3-8b")])
    allowed = allowed_headers(client.one(message))
    assert {"x-igw-tenant", "x-igw-model"} <= set(allowed.remove)
    assert allowed.set["x-igw-tenant"] == "initech" and "x-igw-model" not in allowed.set


def test_credentials_are_not_forwarded_upstream(client: ExtProcClient, world: World) -> None:
    allowed = allowed_headers(client.one(request_headers(key=world.acme_key)))
    assert "authorization" in allowed.remove


def test_request_id_is_kept(client: ExtProcClient, world: World) -> None:
    message = request_headers(key=world.acme_key, extra=[("x-request-id", "abc-123")])
    assert "x-request-id" not in allowed_headers(client.one(message)).set


def test_request_id_is_created_when_missing(client: ExtProcClient, world: World) -> None:
    request_id = allowed_headers(client.one(request_headers(key=world.acme_key))).set["x-request-id"]
    assert len(request_id) == 36


def test_tier_defaults_apply_when_tenant_gives_none(client: ExtProcClient, world: World) -> None:
    allowed = allowed_headers(client.one(request_headers("/v2/models/mistral-7b/infer", key=world.initech_key)))
    assert (allowed.set["x-igw-tier"], allowed.set["x-envoy-upstream-rq-timeout-ms"],
            allowed.set["x-igw-priority"]) == ("free", "30000", "0")


def test_logs_never_contain_the_key(client: ExtProcClient, world: World, processor: Service) -> None:
    client.one(request_headers("/v2/models/nope/infer", key=world.acme_key))
    client.one(request_headers(key=world.acme_key + "x"))
    log_text = Path(processor.proc.log_path).read_text()
    assert "denied" in log_text
    assert world.acme_key not in log_text and world.acme_key[:20] not in log_text
