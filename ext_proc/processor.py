"""One HTTP request's walk through the ext_proc phases: authenticate, resolve the model, check, shape.

A `RequestProcessor` lives for one gRPC stream (one HTTP request). It turns each ProcessingRequest into
the matching ProcessingResponse and raises `ProtocolError` for misuse. It does no network I/O itself:
tenants, keys and models come through the `Lookups` protocol (cache.Directory in the service), and
the decisions themselves are the pure functions of apikeys/routes/shaping/decisions.

Body handling: Envoy sends request headers only. When a request needs its body (model named in the
JSON body, or a model registered with inspect_body) the headers response asks for it with a
mode_override: BUFFERED when it fits in `max_buffer_bytes`, else STREAMED (counted and scanned chunk by
chunk, never held). Requests whose size is unknown (no content-length) are STREAMED so the tenant's
max body size still holds. Nothing else costs an extra message. A body that must be read as JSON but
was sent content-encoded (anything but `identity`) is refused with 415 in the headers answer: the
processor reads bodies as sent and decompresses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc import decisions as d
from ext_proc import metrics
from ext_proc import responses as r
from ext_proc.apikeys import KeyHasher, MalformedAuthorization, credential_from, digests_match
from ext_proc.cache import Unavailable
from ext_proc.jsonscan import JsonStructureError, JsonStructureScanner
from ext_proc.records import MODEL_NAME, MODEL_VERSION, ApiKey, Model, Tenant
from ext_proc.routes import (
    BodyError,
    Route,
    check_model_named_once,
    content_type_allowed,
    media_type,
    model_from_document,
    parse_json_body,
    resolve_path,
    unnormalised_path,
)
from ext_proc.shaping import (
    RequestHead,
    applied_codings,
    model_headers,
    new_request_id,
    parse_content_length,
    read_request_head,
    removals,
    tenant_headers,
    usable_request_id,
)

log = logging.getLogger("ext_proc.requests")


class ProtocolError(Exception):
    """The peer broke the ext_proc protocol (e.g. a body before headers); ends the stream with a gRPC error."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Lookups(Protocol):
    generation: int  # changes whenever cached Redis state may have changed

    async def api_key(self, digest: str) -> ApiKey | None: ...
    async def tenant(self, tenant_id: str) -> Tenant | None: ...
    async def model(self, name: str) -> Model | None: ...


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    key_secret: bytes
    max_buffer_bytes: int
    forward_credentials: bool = False


@dataclass(frozen=True, slots=True)
class _Memo:
    """The headers answer of an allowed request, reusable by identical requests (same key digest, path,
    method, content type, forged-header names...) while the lookups' generation and the TTL hold."""

    generation: int
    until: float
    key_expires_at: float
    tenant: Tenant
    model: str | None
    plan_kind: str | None
    plan_mode: int
    plan_route: Route | None
    plan_json: bool
    plan_buffered: bool
    response: pb.ProcessingResponse


@dataclass(frozen=True, slots=True)
class _BodyMemo:
    """The body answer of an allowed model-in-body request: the canonical model and the routing headers."""

    generation: int
    until: float
    model: str
    response: pb.ProcessingResponse


class ProcessorShared:
    """State shared by every stream of one process: the key hasher and the memo of headers answers.

    The memo is what makes the cached-tenant path cheap: a repeat of a request shape skips the lookups,
    path parsing and response building, and redoes only what differs per request (body size, key
    expiry). Any invalidation message changes the lookups' generation, which retires every entry.
    """

    def __init__(self, config: ProcessorConfig, memo_ttl: float, max_entries: int = 50_000) -> None:
        self.hasher = KeyHasher(config.key_secret)
        self.memo: dict[tuple[object, ...], _Memo] = {}
        self.memo_ttl = memo_ttl
        self.max_entries = max_entries
        # (tenant id, model named in the body, version) -> the allowed body answer, as for `memo`
        self.body_memo: dict[tuple[str, str, str | None], _BodyMemo] = {}

    def remember_body(self, key: tuple[str, str, str | None], generation: int, model: str) -> _BodyMemo:
        if len(self.body_memo) >= self.max_entries:
            self.body_memo.clear()
        memo = self.body_memo[key] = _BodyMemo(generation, time.monotonic() + self.memo_ttl, model,
                                               r.request_body_response(model_headers(model, key[2]),
                                                                       clear_route_cache=True))
        return memo

    def remember(self, key: tuple[object, ...], memo: _Memo) -> None:
        if len(self.memo) >= self.max_entries:
            self.memo.clear()
        self.memo[key] = memo


class _BodyPlan:
    """What to do with the request body: `kind` is 'model' (find the model in it), 'inspect' (check
    JSON) or 'count' (enforce the size only). `generation`: the lookups' generation when `tenant` was
    read, so an answer built from it is never remembered as fresh after an invalidation."""

    __slots__ = ("buffer", "generation", "json", "kind", "limit", "mode", "received", "route", "scanner", "tenant",
                 "version")

    def __init__(self, kind: str, tenant: Tenant, route: Route, mode: int, *, json: bool, buffered: bool,
                 generation: int) -> None:
        self.kind = kind
        self.generation = generation
        self.tenant = tenant
        self.route = route
        self.mode = mode
        self.limit = tenant.max_body_bytes
        self.received = 0
        self.json = json
        self.buffer: bytearray | None = bytearray() if buffered and json else None
        self.scanner = JsonStructureScanner() if json and not buffered else None
        self.version = route.version


_PHASES = frozenset(r.CONTINUE)


def _compressed_json(content_encoding: str) -> d.Denial | None:
    """A JSON body the processor must read but that was sent compressed: refused at the headers phase, before
    Envoy sends any of it. The processor decompresses nothing: a few compressed kilobytes can expand far past
    the sizes the gateway enforces. Bodies it does not read keep their encoding: the model server may
    decompress them."""
    codings = applied_codings(content_encoding)
    return d.unsupported_content_encoding(codings) if codings else None


class RequestProcessor:
    __slots__ = ("_generation_at_start", "_key_expires_at", "announced_body_mode", "announced_response_body_mode",
                 "clock", "config", "done", "late_body_expected", "lookups", "model", "plan", "request_id",
                 "seen_request_headers", "shared", "tenant")

    def __init__(
        self, config: ProcessorConfig, lookups: Lookups, shared: ProcessorShared, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.lookups = lookups
        self.shared = shared
        self._generation_at_start = 0
        self._key_expires_at = 0.0
        self.clock = clock
        self.seen_request_headers = False
        self.done = False  # an ImmediateResponse was sent: the request is over
        # ... from a STREAMED body chunk: Envoy sends chunks as they arrive, so later ones may be on their way
        self.late_body_expected = False
        self.plan: _BodyPlan | None = None
        self.request_id: str | None = None
        self.tenant: Tenant | None = None
        self.model: str | None = None
        self.announced_body_mode = r.BODY_NONE
        self.announced_response_body_mode = r.BODY_NONE

    async def handle(self, request: pb.ProcessingRequest) -> tuple[str, pb.ProcessingResponse | None]:
        """(phase, response) for one message; response None: nothing to send (Envoy reads no answer)."""
        phase = request.WhichOneof("request")
        if phase is None:
            raise ProtocolError(
                "unknown_phase",
                "ProcessingRequest has no phase this processor knows (expected one of request_headers, "
                "request_body, request_trailers, response_headers, response_body, response_trailers)",
            )
        if self.done:
            if request.observability_mode:  # Envoy did not apply the refusal and goes on; nothing is read
                return phase, r.CONTINUE[phase]
            if self.late_body_expected and phase in ("request_body", "request_trailers"):
                return phase, None  # sent before Envoy read the refusal, which ends the request: not misuse
            raise ProtocolError("after_immediate_response",
                                f"{phase} received after the request was answered with an ImmediateResponse")
        if request.HasField("protocol_config"):
            self.announced_body_mode = request.protocol_config.request_body_mode
            self.announced_response_body_mode = request.protocol_config.response_body_mode
        if phase == "request_headers":
            if self.seen_request_headers:
                raise ProtocolError("duplicate_headers", "request_headers received twice on one stream")
            self.seen_request_headers = True
            return phase, await self._request_headers(request.request_headers)
        if phase == "request_body":
            if not self.seen_request_headers:
                raise ProtocolError("body_before_headers", "request_body received before request_headers")
            return phase, await self._request_body(request.request_body)
        if phase == "request_trailers":
            if not self.seen_request_headers:
                raise ProtocolError("trailers_before_headers", "request_trailers received before request_headers")
            return phase, await self._request_trailers()
        if phase == "response_body" and self.announced_response_body_mode == r.BODY_FULL_DUPLEX:
            # Envoy forwards only what the processor sends back in this mode.
            body = request.response_body
            return phase, r.streamed_body_response(phase, body.body, body.end_of_stream)
        return phase, r.CONTINUE[phase]

    # --- request headers -------------------------------------------------------------------------------

    async def _request_headers(self, message: pb.HttpHeaders) -> pb.ProcessingResponse:
        head = read_request_head(message.headers.headers)
        id_given = usable_request_id(head.request_id)
        self.request_id = head.request_id if id_given else new_request_id()
        if head.repeated_credential is not None:
            return self._deny(d.repeated_credential(head.repeated_credential))
        try:
            key = credential_from(head.authorization, head.x_api_key)
        except MalformedAuthorization as exc:
            return self._deny(d.MALFORMED_AUTHORIZATION if exc.header == "authorization" else d.MALFORMED_API_KEY)
        if key is None:
            return self._deny(d.MISSING_KEY)
        digest = self.shared.hasher.digest(key)
        try:
            length = parse_content_length(head.content_length)
        except ValueError:
            length = -1  # refused below, once the caller is known
        has_body = not message.end_of_stream and length != 0
        # Everything the headers answer depends on besides Redis state (tracked by the generation).
        memo_key = (digest, head.method, head.path, head.content_type, tuple(head.spoofable), id_given, has_body,
                    self.announced_body_mode,
                    head.authorization is not None, head.x_api_key is not None,
                    length is None, length is not None and length <= self.config.max_buffer_bytes)
        shared = self.shared
        memo = shared.memo.get(memo_key) if length != -1 else None  # a bad length is refused below
        if memo is not None and memo.generation == self.lookups.generation and memo.until > time.monotonic() \
                and not (memo.key_expires_at and memo.key_expires_at <= self.clock()):
            return self._replay(memo, length, head.content_encoding)
        response = await self._decide_headers(head, digest, length, has_body, id_given)
        if not self.done and id_given and length != -1 and self.tenant is not None:
            shared.remember(memo_key, _Memo(
                self._generation_at_start, time.monotonic() + shared.memo_ttl, self._key_expires_at, self.tenant,
                self.model, self.plan.kind if self.plan else None, self.plan.mode if self.plan else 0,
                self.plan.route if self.plan else None, self.plan.json if self.plan else False,
                self.plan.buffer is not None if self.plan else False, response))
        return response

    def _replay(self, memo: _Memo, length: int | None, content_encoding: str | None) -> pb.ProcessingResponse:
        """The answer an identical earlier request got, with the per-request checks redone (content-encoding is
        not in the memo key: only a request whose JSON body is read depends on it)."""
        tenant = memo.tenant
        self.tenant = tenant
        self.model = memo.model
        if length is not None and length > tenant.max_body_bytes:
            return self._deny(d.body_too_large(tenant.max_body_bytes))
        if content_encoding is not None and memo.plan_json:
            denial = _compressed_json(content_encoding)
            if denial is not None:
                return self._deny(denial)
        if memo.plan_kind is not None:
            self.plan = _BodyPlan(memo.plan_kind, tenant, memo.plan_route, memo.plan_mode,  # type: ignore[arg-type]
                                  json=memo.plan_json, buffered=memo.plan_buffered, generation=memo.generation)
        else:
            self._allow()
        return memo.response

    async def _decide_headers(
        self, head: RequestHead, digest: str, length: int | None, has_body: bool, id_given: bool
    ) -> pb.ProcessingResponse:
        self._generation_at_start = self.lookups.generation
        try:
            record = await self.lookups.api_key(digest)
            if record is None or not digests_match(record.digest, digest):
                return self._deny(d.UNKNOWN_KEY)
            if record.revoked_at:
                return self._deny(d.REVOKED_KEY)
            if record.expired(self.clock()):
                return self._deny(d.EXPIRED_KEY)
            self._key_expires_at = record.expires_at
            tenant = await self.lookups.tenant(record.tenant)
            if tenant is None:
                return self._deny(d.ORPHAN_KEY)
            self.tenant = tenant
            if not tenant.active:
                return self._deny(d.TENANT_SUSPENDED)
            if unnormalised_path(head.path):
                return self._deny(d.INVALID_PATH)
            route = resolve_path(head.method, head.path)
            if route is None:
                return self._deny(d.NO_API_AT_PATH)
            model: Model | None = None
            if route.model is not None:
                if not MODEL_NAME.match(route.model) or (
                    route.version is not None and not MODEL_VERSION.match(route.version)
                ):
                    return self._deny(d.INVALID_MODEL_NAME)
                denial_or_model = await self._resolve_model(tenant, route.model)
                if isinstance(denial_or_model, d.Denial):
                    return self._deny(denial_or_model)
                model = denial_or_model
        except Unavailable:
            return self._deny(d.BACKEND_UNAVAILABLE)

        if length == -1:
            return self._deny(d.INVALID_CONTENT_LENGTH)
        if route.inference:
            if head.method != "POST":
                return self._deny(d.METHOD_NOT_ALLOWED)
            if has_body and not content_type_allowed(head.content_type, route.content_types):
                return self._deny(d.unsupported_media_type(route.content_types))
        if length is not None and length > tenant.max_body_bytes:
            return self._deny(d.body_too_large(tenant.max_body_bytes))

        plan_or_denial = self._body_plan(route, model, tenant, head.content_type, length, has_body)
        if isinstance(plan_or_denial, d.Denial):
            return self._deny(plan_or_denial)
        plan = plan_or_denial
        if plan is not None and plan.json and head.content_encoding is not None:
            denial = _compressed_json(head.content_encoding)
            if denial is not None:
                return self._deny(denial)
        if plan is not None and self.announced_body_mode == r.BODY_FULL_DUPLEX:
            log.error("the ext_proc filter sends bodies FULL_DUPLEX_STREAMED, where Envoy ignores the body mode this "
                      "request needs (%s); configure request_body_mode NONE with allow_mode_override", plan.kind)
            return self._deny(d.FULL_DUPLEX_BODY)

        set_headers = tenant_headers(tenant, None if id_given else self.request_id)
        if model is not None:
            self.model = model.name
            set_headers += model_headers(model.name, route.version)
        remove = removals(head, forward_credentials=self.config.forward_credentials)
        body_mode: int | None = None
        if plan is not None:
            self.plan = plan
            if plan.mode != self.announced_body_mode:
                body_mode = plan.mode
        else:
            self._allow()
            if self.announced_body_mode != r.BODY_NONE:
                body_mode = r.BODY_NONE  # Envoy would send a body we do not need: spare the messages
        return r.request_headers_response(set_headers, remove, clear_route_cache=True, request_body_mode=body_mode)

    async def _resolve_model(self, tenant: Tenant, name: str) -> Model | d.Denial:
        model = await self.lookups.model(name)
        if model is None:
            return d.model_not_found(name)
        self.model = model.name
        if not tenant.allows_model(model.name):
            return d.model_not_allowed(name)
        return model

    def _body_plan(
        self, route: Route, model: Model | None, tenant: Tenant, content_type: str | None,
        length: int | None, has_body: bool,
    ) -> _BodyPlan | d.Denial | None:
        if not has_body:
            return d.BODY_REQUIRED if route.model_in_body else None
        max_buffer = self.config.max_buffer_bytes
        generation = self._generation_at_start
        is_json = media_type(content_type) != "application/octet-stream"
        if route.model_in_body:
            if length is not None and length > max_buffer:
                # STREAMED would forward the headers before the model is known, so routing could not use it.
                return d.body_too_large_to_inspect(max_buffer)
            # Size unknown (chunked): under BUFFERED, a body over Envoy's buffer limit gets Envoy's own text/plain
            # 413; BUFFERED_PARTIAL hands over the first part instead, refused here with a JSON 413.
            mode = r.BODY_BUFFERED if length is not None else r.BODY_BUFFERED_PARTIAL
            return _BodyPlan("model", tenant, route, mode, json=True, buffered=True, generation=generation)
        if model is not None and model.inspect_body:
            fits = length is not None and length <= max_buffer
            mode = r.BODY_BUFFERED if fits else r.BODY_STREAMED
            return _BodyPlan("inspect", tenant, route, mode, json=is_json, buffered=fits, generation=generation)
        if length is None:
            return _BodyPlan("count", tenant, route, r.BODY_STREAMED, json=False, buffered=False,
                             generation=generation)
        return None

    # --- request body and trailers ---------------------------------------------------------------------

    async def _request_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        plan = self.plan
        if plan is None:
            if self.announced_body_mode == r.BODY_FULL_DUPLEX:
                return r.streamed_body_response("request_body", body.body, body.end_of_stream)
            return r.CONTINUE_REQUEST_BODY
        chunk = body.body
        plan.received += len(chunk)
        self.late_body_expected = plan.mode == r.BODY_STREAMED  # for a refusal below
        if plan.received > plan.limit:
            return self._deny(d.body_too_large(plan.limit))
        final = body.end_of_stream or plan.mode in (r.BODY_BUFFERED, r.BODY_BUFFERED_PARTIAL)
        if plan.buffer is not None:
            if len(plan.buffer) + len(chunk) > self.config.max_buffer_bytes:
                return self._deny(d.body_too_large_to_inspect(self.config.max_buffer_bytes))
            # BUFFERED_PARTIAL without end_of_stream: trailers follow the body, or Envoy's buffer filled up, which
            # (kept >= max_buffer_bytes) leaves a part over the limit, refused above, or exactly at it: cut.
            cut = not body.end_of_stream and plan.mode == r.BODY_BUFFERED_PARTIAL \
                and len(chunk) >= self.config.max_buffer_bytes
            if final and not plan.buffer:
                return await self._finish_body(plan, chunk, cut=cut)  # the usual BUFFERED case: one message, no copy
            plan.buffer += chunk
        elif plan.scanner is not None:
            try:
                plan.scanner.feed(chunk)
            except JsonStructureError:
                return self._deny(d.INVALID_JSON)
        if final:
            return await self._finish_body(plan)
        return r.CONTINUE_REQUEST_BODY

    async def _request_trailers(self) -> pb.ProcessingResponse:
        plan = self.plan
        if plan is not None:
            response = await self._finish_body(plan)
            if response.HasField("immediate_response"):
                return response
        return r.CONTINUE_REQUEST_TRAILERS

    async def _finish_body(
        self, plan: _BodyPlan, whole_body: bytes | None = None, *, cut: bool = False
    ) -> pb.ProcessingResponse:
        """`cut`: the body may end past what was received, so a parse failure means too large to read."""
        self.plan = None
        if plan.scanner is not None:
            try:
                plan.scanner.finish()
            except JsonStructureError:
                return self._deny(d.INVALID_JSON)
        if plan.buffer is None:
            self._allow()
            return r.CONTINUE_REQUEST_BODY
        try:
            body = whole_body if whole_body is not None else bytes(plan.buffer)
            if not body and plan.kind == "model":
                return self._deny(d.BODY_REQUIRED)  # a chunked upload of nothing: as with content-length 0
            document = parse_json_body(body) if plan.json else None
            if plan.kind != "model":
                self._allow()
                return r.CONTINUE_REQUEST_BODY
            name = model_from_document(document)
            check_model_named_once(body)
        except BodyError as exc:
            if exc.reason == "invalid_json":
                return self._deny(d.body_too_large_to_inspect(self.config.max_buffer_bytes) if cut else d.INVALID_JSON)
            return self._deny(d.REPEATED_MODEL if exc.reason == "repeated_model" else d.MISSING_MODEL)
        memo_key = (plan.tenant.id, name, plan.version)
        memo = self.shared.body_memo.get(memo_key)
        if memo is not None and memo.generation == self.lookups.generation and memo.until > time.monotonic():
            self.model = memo.model
            self._allow()
            return memo.response
        if not MODEL_NAME.match(name):
            return self._deny(d.INVALID_MODEL_NAME)
        generation = plan.generation  # when plan.tenant was read: older than now means not fresh
        try:
            resolved = await self._resolve_model(plan.tenant, name)
        except Unavailable:
            return self._deny(d.BACKEND_UNAVAILABLE)
        if isinstance(resolved, d.Denial):
            return self._deny(resolved)
        self._allow()
        return self.shared.remember_body(memo_key, generation, resolved.name).response

    # --- outcomes --------------------------------------------------------------------------------------

    def _deny(self, denial: d.Denial) -> pb.ProcessingResponse:
        self.done = True
        self.plan = None
        tenant = self.tenant.id if self.tenant is not None else metrics.NO_TENANT
        model = self.model or metrics.NO_MODEL
        metrics.count_request(tenant, model, denial.decision)
        metrics.count_denial(denial.reason)
        log.info(
            "denied %d %s request_id=%s tenant=%s model=%s", denial.status, denial.reason, self.request_id,
            tenant, model,
            extra={"fields": {"request_id": self.request_id, "tenant": tenant, "model": model,
                              "decision": denial.decision, "reason": denial.reason}},
        )
        return r.immediate_response(denial, self.request_id)

    def _allow(self) -> None:
        tenant = self.tenant.id if self.tenant is not None else metrics.NO_TENANT
        model = self.model or metrics.NO_MODEL
        metrics.count_request(tenant, model, d.ALLOWED)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "allowed request_id=%s tenant=%s model=%s", self.request_id, tenant, model,
                extra={"fields": {"request_id": self.request_id, "tenant": tenant, "model": model,
                                  "decision": d.ALLOWED}},
            )
