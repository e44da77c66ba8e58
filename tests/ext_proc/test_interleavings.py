"""The processor in process, through the `Lookups` protocol (its only view of Redis state), where an exact
interleaving matters: operator changes that land mid-request, odd sequences from Envoy. End-to-end
invalidation through Redis pub/sub is covered by test_memo.py and test_cache.py."""

from __future__ import annotations

import asyncio
import json

from ext_proc.apikeys import key_digest
from ext_proc.processor import ProcessorConfig, ProcessorShared, RequestProcessor
from ext_proc.records import ApiKey, Model, Tenant
from tests.ext_proc.helpers import Mode, denial, request_body, request_headers

SECRET = b"memo-race-secret"
KEY = "igw_abcdefabcdef_memo-race-key"
CONFIG = ProcessorConfig(SECRET, 64 * 1024)
REQUEST_ID = [("x-request-id", "race-1")]


def _tenant(models: tuple[str, ...]) -> Tenant:
    return Tenant("acme", "research", "standard", models, 1_000_000, 30_000, 1)


class Lookups:
    """Tenants, keys and models held in memory; `change()` does what an invalidation message does."""

    def __init__(self) -> None:
        self.generation = 0
        digest = key_digest(SECRET, KEY)
        self.keys = {digest: ApiKey("abcdefabcdef", "acme", 0, 0, 0, digest)}
        self.tenants = {"acme": _tenant(("llama-*",))}
        self.models = {"llama-3-8b": Model("llama-3-8b"), "mistral": Model("mistral")}

    def change(self, models: tuple[str, ...]) -> None:
        self.tenants["acme"] = _tenant(models)
        self.generation += 1

    async def api_key(self, digest: str) -> ApiKey | None:
        return self.keys.get(digest)

    async def tenant(self, tenant_id: str) -> Tenant | None:
        return self.tenants.get(tenant_id)

    async def model(self, name: str) -> Model | None:
        return self.models.get(name)


def body_call(body: bytes) -> tuple[object, object]:
    return (request_headers("/v1/chat/completions", key=KEY, content_length=len(body), extra=REQUEST_ID),
            request_body(body))


def test_a_body_answer_built_from_a_tenant_read_before_a_change_is_not_remembered_as_fresh() -> None:
    async def run() -> int:
        lookups, shared = Lookups(), ProcessorShared(CONFIG, memo_ttl=30)
        body = json.dumps({"model": "llama-3-8b"}).encode()
        headers, chunk = body_call(body)
        in_flight = RequestProcessor(CONFIG, lookups, shared)
        await in_flight.handle(headers)  # the tenant may call llama-* when this request starts
        lookups.change(("mistral",))  # ... and no longer by the time its body arrives
        await in_flight.handle(chunk)
        later = RequestProcessor(CONFIG, lookups, shared)
        await later.handle(headers)
        _, answer = await later.handle(chunk)
        return denial(answer).status

    assert asyncio.run(run()) == 403


def test_an_invalid_content_length_is_refused_even_after_the_same_shape_was_allowed() -> None:
    async def run() -> int:
        lookups, shared = Lookups(), ProcessorShared(CONFIG, memo_ttl=30)
        good = request_headers("/v2/models/llama-3-8b/infer", key=KEY, content_length=10, extra=REQUEST_ID)
        await RequestProcessor(CONFIG, lookups, shared).handle(good)
        bad = request_headers("/v2/models/llama-3-8b/infer", key=KEY, content_length=None,
                              extra=[*REQUEST_ID, ("content-length", "x")])
        _, answer = await RequestProcessor(CONFIG, lookups, shared).handle(bad)
        return denial(answer).status

    assert asyncio.run(run()) == 400


def test_in_observability_mode_phases_after_a_refusal_are_not_protocol_errors() -> None:
    async def run() -> str:
        processor = RequestProcessor(CONFIG, Lookups(), ProcessorShared(CONFIG, memo_ttl=30))
        refused = request_headers(key=None)
        refused.observability_mode = True
        await processor.handle(refused)  # 401, which Envoy does not apply in observability mode
        chunk = request_body(b"{}")
        chunk.observability_mode = True
        phase, _ = await processor.handle(chunk)
        return phase

    assert asyncio.run(run()) == "request_body"


def test_a_body_that_must_be_read_is_refused_clearly_when_envoy_streams_full_duplex() -> None:
    async def run() -> tuple[int, str]:
        processor = RequestProcessor(CONFIG, Lookups(), ProcessorShared(CONFIG, memo_ttl=30))
        body = json.dumps({"model": "llama-3-8b"}).encode()
        headers = request_headers("/v1/chat/completions", key=KEY, content_length=len(body), extra=REQUEST_ID,
                                  announced_body_mode=Mode.FULL_DUPLEX_STREAMED)
        _, answer = await processor.handle(headers)
        refusal = denial(answer)
        return refusal.status, refusal.code

    assert asyncio.run(run()) == (500, "gateway_misconfigured")


def test_a_request_without_a_body_plan_still_streams_full_duplex() -> None:
    async def run() -> bytes:
        processor = RequestProcessor(CONFIG, Lookups(), ProcessorShared(CONFIG, memo_ttl=30))
        await processor.handle(request_headers(key=KEY, content_length=5, extra=REQUEST_ID,
                                               announced_body_mode=Mode.FULL_DUPLEX_STREAMED))
        _, answer = await processor.handle(request_body(b"hello"))
        return answer.request_body.response.body_mutation.streamed_response.body

    assert asyncio.run(run()) == b"hello"
