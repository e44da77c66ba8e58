"""Which model a request targets, from its path (and, for OpenAI-style calls, its JSON body).

Pure: no I/O. Three API shapes are recognised:
- KServe v1: `/v1/models/{m}:predict` (and `:explain`) runs the model; `GET /v1/models/{m}` reads metadata.
- KServe v2 (Open Inference Protocol): `/v2/models/{m}[/versions/{v}]/infer` runs the model;
  `/v2/models/{m}[/versions/{v}][/ready]` reads metadata.
- OpenAI style: any other `POST /v1/...` names its model in the JSON body (`"model": "..."`).
Other `/v1/...` and `/v2/...` calls (model lists, server health) name no model; anything else is no API.

The gateway authorises one reading of a request and the model server acts on the request as sent, so
anything two readers could take differently is refused rather than guessed at: paths with empty, `.` or
`..` segments (Envoy forwards them as sent unless its HCM normalises paths, and a model server that
resolves them could reach a model other than the one authorised), and a JSON body naming "model" twice
(the gateway would take the last, a first-wins parser on the model server the first).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

import orjson

from ext_proc.jsonscan import BOM

Api = Literal["kserve-v1", "kserve-v2", "openai"]

JSON_TYPES: tuple[str, ...] = ("application/json",)
V2_TYPES: tuple[str, ...] = ("application/json", "application/octet-stream")


@dataclass(frozen=True, slots=True)
class Route:
    api: Api
    model: str | None = None  # named in the path (before aliases)
    version: str | None = None
    inference: bool = False  # runs the model: POST with a body of one of `content_types`
    model_in_body: bool = False
    content_types: tuple[str, ...] = JSON_TYPES


OPENAI_NO_MODEL = Route("openai")
V2_NO_MODEL = Route("kserve-v2")


def unnormalised_path(raw_path: str) -> bool:
    """True when the path (query aside) has an empty, `.` or `..` segment, as sent or once percent-decoded
    (a server may decode `%2e` or `%2F` before it resolves segments). A trailing slash is not one."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = unquote(path)
    elif "/." not in path and "//" not in path:
        return False
    segments = path.split("/")
    return any(s in ("", ".", "..") for s in segments[1:-1]) or segments[-1] in (".", "..")


def resolve_path(method: str, raw_path: str) -> Route | None:
    """The route a path belongs to, or None when it is no API of ours (answered 404)."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if path.startswith("/v2/"):
        return _kserve_v2(path[4:])
    if path.startswith("/v1/"):
        rest = path[4:]
        if rest.startswith("models/") and "/" not in rest[7:] and rest[7:]:
            name = rest[7:]
            for verb in (":predict", ":explain"):
                if name.endswith(verb) and len(name) > len(verb):
                    return Route("kserve-v1", unquote(name[: -len(verb)]), inference=True)
            return Route("kserve-v1", unquote(name))
        if method == "POST":
            return Route("openai", inference=True, model_in_body=True)
        return OPENAI_NO_MODEL
    return None


def _kserve_v2(rest: str) -> Route | None:
    parts = rest.split("/")
    if parts[0] != "models" or len(parts) < 2 or not parts[1]:
        return V2_NO_MODEL if parts[0] != "models" else None
    model, version, tail = unquote(parts[1]), None, parts[2:]
    if len(tail) >= 2 and tail[0] == "versions" and tail[1]:
        version, tail = unquote(tail[1]), tail[2:]
    if tail == ["infer"]:
        return Route("kserve-v2", model, version, inference=True, content_types=V2_TYPES)
    if tail in ([], ["ready"]):
        return Route("kserve-v2", model, version)
    return None


def media_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def content_type_allowed(content_type: str | None, allowed: tuple[str, ...]) -> bool:
    """JSON calls also accept structured `+json` types (e.g. application/vnd.foo+json)."""
    kind = media_type(content_type)
    if kind is None:
        return False
    return kind in allowed or ("application/json" in allowed and kind.endswith("+json"))


class BodyError(ValueError):
    """The body is not what the route needs: `reason` is 'invalid_json', 'missing_model' or 'repeated_model'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_json_body(body: bytes) -> object:
    """Strict RFC 8259 (no NaN/Infinity), and ~10x faster than the json module on the request path. A
    leading UTF-8 byte order mark is ignored, as RFC 8259 allows and Python's json.loads(bytes) does (so
    do most Python model servers): some clients (.NET, PowerShell) send one."""
    try:
        return orjson.loads(memoryview(body)[len(BOM):] if body.startswith(BOM) else body)
    except orjson.JSONDecodeError:
        raise BodyError("invalid_json") from None


def model_from_document(document: object) -> str:
    if not isinstance(document, dict):
        raise BodyError("missing_model")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise BodyError("missing_model")
    return model


# A JSON string that decodes to "model", each letter as itself or as a \u escape.
_MODEL_KEY = re.compile(rb'"(?:m|\\u006[dD])(?:o|\\u006[fF])(?:d|\\u0064)(?:e|\\u0065)(?:l|\\u006[cC])"')


def check_model_named_once(body: bytes) -> None:
    """Raises BodyError('repeated_model') when the top-level object of `body` (already parsed: a JSON
    object) has the key "model" more than once. The parser keeps the last value; a model server whose
    parser keeps the first would run a model the gateway never authorised. Two C-speed scans settle
    almost every body; only one that holds "model" twice anywhere is parsed again, keeping duplicates."""
    if b"\\u" not in body:
        if body.count(b'"model"') < 2:
            return
    elif len(_MODEL_KEY.findall(body)) < 2:
        return
    top: list[tuple[str, object]] = []

    def keep(pairs: list[tuple[str, object]]) -> None:
        nonlocal top
        top = pairs  # objects close inside out: the top-level one is the last

    try:
        json.loads(body, object_pairs_hook=keep)
    except (RecursionError, ValueError):  # deeper than this parser goes (orjson: 1024), or not JSON to it
        raise BodyError("invalid_json") from None
    if sum(1 for key, _ in top if key == "model") > 1:
        raise BodyError("repeated_model")
