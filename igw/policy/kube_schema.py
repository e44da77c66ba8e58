"""Validate rendered manifests as the API server would, before they reach a cluster.

- Istio kinds: the openAPIV3Schema of the object's CRD version, from Istio's CRD file
  (../shared/schemas/istio/customresourcedefinitions.gen.yaml). Kubernetes prunes fields a structural
  schema does not list (unless x-kubernetes-preserve-unknown-fields), so a misspelled field would be
  dropped silently; here every such field is an error: `additionalProperties: false` is added wherever
  properties are listed and unknown fields are not preserved (EnvoyFilter patch values are preserved,
  which is why envoy --mode validate checks those). CEL rules (x-kubernetes-validations) are not run.
- Core kinds: kubernetes-validate's bundled strict schemas (offline), one cached validator per kind.
- Every object: name and label syntax, and the 1 MiB size limit of a Kubernetes object.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from igw.policy.load import REPO_ROOT

MAX_OBJECT_BYTES = 1024 * 1024
KUBERNETES_VERSION = "1.33.0"
CRD_FILE = "schemas/istio/customresourcedefinitions.gen.yaml"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # a Service's name: no leading digit
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_NAMED_KINDS = {"Namespace", "Service"}  # their names must be DNS labels, not subdomains

try:
    _LOADER: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _LOADER = yaml.SafeLoader


@dataclass(frozen=True)
class Invalid:
    kind: str
    name: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.kind}/{self.name}{where}: {self.message}"


def shared_dir() -> Path:
    return Path(os.environ.get("IGW_SHARED_DIR") or REPO_ROOT.parent / "shared")


def strict(schema: Any) -> Any:
    """A copy in which fields the schema does not list are errors, as pruning would silently drop them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k not in ("enum", "required", "default", "example") else v for k, v in schema.items()}
    if ("properties" in out and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out):
        out["additionalProperties"] = False
    return out


_OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@cache
def _crd_validators(crd_path: str) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
    with open(crd_path) as fh:
        for crd in yaml.load_all(fh, Loader=_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served"):
                    continue
                schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                schema.setdefault("properties", {})
                schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                             "metadata": _OBJECT_META})
                schema["additionalProperties"] = False
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


@cache
def _core_registry() -> tuple[Path, Any]:
    import importlib.resources

    from referencing import Registry, Resource

    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    directory = Path(str(root)) / f"v{KUBERNETES_VERSION}-local-strict"
    definitions = Resource.from_contents(json.loads((directory / "_definitions.json").read_text()))
    return directory, definitions @ Registry()


@cache
def _core_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    try:
        directory, registry = _core_registry()
    except ModuleNotFoundError:
        raise RuntimeError("validating Kubernetes core kinds needs kubernetes-validate: "
                           "pip install -e '.[dev]'") from None
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = directory / f"{kind.lower()}-{group}.json"
    if not path.exists():
        return None
    schema = json.loads(path.read_text())
    from referencing import Resource

    return jsonschema.Draft202012Validator(schema, registry=Resource.from_contents(schema) @ registry)


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path)


def _metadata_problems(obj: dict[str, Any]) -> list[tuple[str, str]]:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    problems = []
    pattern, limit = (DNS_LABEL, 63) if obj.get("kind") in LABEL_NAMED_KINDS else (DNS_SUBDOMAIN, 253)
    if obj.get("kind") == "Service" and obj.get("apiVersion") == "v1":
        pattern = DNS_1035_LABEL
    if not pattern.match(name) or len(name) > limit:
        problems.append(("metadata.name", f"invalid name {name!r} for a {obj.get('kind')}"))
    namespace = meta.get("namespace")
    if namespace is not None and not DNS_LABEL.match(str(namespace)):
        problems.append(("metadata.namespace", f"invalid namespace {namespace!r}"))
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if len(label) > 63 or not LABEL_KEY_NAME.match(label) or (prefix and not DNS_SUBDOMAIN.match(prefix)):
            problems.append((f"metadata.labels.{key}", "invalid label key"))
        if len(str(value)) > 63 or not LABEL_VALUE.match(str(value)):
            problems.append((f"metadata.labels.{key}", f"invalid label value {value!r}"))
    return problems


def validate_object(obj: dict[str, Any], crd_path: Path | None = None) -> list[Invalid]:
    """Every problem with one object (empty: it would be accepted as written, nothing pruned)."""
    kind = str(obj.get("kind", "?"))
    name = str((obj.get("metadata") or {}).get("name", "?"))
    api_version = str(obj.get("apiVersion", ""))
    out = [Invalid(kind, name, p, m) for p, m in _metadata_problems(obj)]
    size = len(json.dumps(obj, separators=(",", ":")))
    if size > MAX_OBJECT_BYTES:
        out.append(Invalid(kind, name, "", f"{size} bytes: over Kubernetes' {MAX_OBJECT_BYTES}-byte object limit"))
    crds = _crd_validators(str(crd_path or shared_dir() / CRD_FILE))
    validator: Any = crds.get((api_version, kind))
    if validator is None and not any(k == kind for _, k in crds):
        validator = _core_validator(api_version, kind)
    if validator is None:
        out.append(Invalid(kind, name, "", f"no schema for {api_version} {kind}"))
        return out
    for error in validator.iter_errors(obj):
        message = error.message
        if error.validator == "additionalProperties":
            message = "unknown field(s): " + message.split("(")[-1].rstrip(")")
        out.append(Invalid(kind, name, _path(error), message.splitlines()[0][:300]))
    return out


def validate_objects(objects: list[dict[str, Any]], crd_path: Path | None = None) -> list[Invalid]:
    return [problem for obj in objects for problem in validate_object(obj, crd_path)]


def duplicate_objects(objects: list[dict[str, Any]]) -> list[Invalid]:
    """Two objects of one kind, namespace and name: `kubectl apply` keeps the last and drops the first silently."""
    seen: set[tuple[str, str, str, str]] = set()
    out = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        kind, name, namespace = str(obj.get("kind", "?")), str(meta.get("name", "?")), str(meta.get("namespace", ""))
        key = (group, kind, namespace, name)
        if key in seen:
            where = f"{namespace}/{name}" if namespace else name
            out.append(Invalid(kind, name, "", f"{where} is rendered twice (the second would overwrite the first)"))
        seen.add(key)
    return out
