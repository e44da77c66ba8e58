"""Load and validate a quota policy file: YAML text -> spec.Policy, or every problem as "file:line: path: what".

Pure: the caller reads the file. Three passes, each reporting all it finds before stopping:
1. YAML is walked as a node graph (as ratelimit_svc/config.py does) to keep each value's line and to
   catch duplicate keys, which PyYAML would otherwise let the last one win silently (a duplicate model).
2. The committed JSON Schema (config/policy/policy.schema.json, the one editors use) checks shapes,
   types, ranges and unknown fields.
3. Cross-references the schema cannot express: aliases (no clashes, no loops), overrides naming real
   models the tenant may call, tiers, dedicated gateways, and shares (a model whose every tenant has
   share 0 could never be called).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ext_proc.records import TIERS
from igw.policy import spec

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SCHEMA_PATH = REPO_ROOT / "config" / "policy" / "policy.schema.json"
# Past this the rate-limit config (one entry per tenant and model it may call), the routes and istiod's
# push size grow beyond what one policy should carry: split models across gateways/policies instead.
MAX_MODELS = 10_000
MAX_TENANTS = 2_000
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# A Service's name is a DNS-1035 label: the API server refuses one starting with a digit.
SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# The replica watcher publishes counts under a Service's igw.ai/model label and the rate-limit service reads
# them under the canonical model name, so a per_replica model's name must be a label value as it is.
LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# Services `igw render istio` creates in the services namespace: a model Service of the same name would replace one.
OUR_SERVICES = {"ext_proc service": "ext-proc", "rate-limit service": "ratelimit",
                "replica watcher": "replica-watcher"}
# Shares are weights; past this their sum loses precision or overflows and every limit of a model becomes 0.
MAX_SHARE = 1_000_000
# A Kubernetes resource quantity without a sign (a negative request or limit is refused by the API server anyway).
QUANTITY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                      r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?$")
_SUFFIX_SCALE = {"": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
                 "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
                 "P": Fraction(10**15), "E": Fraction(10**18), **{f"{p}i": Fraction(1024 ** (i + 1))
                                                                   for i, p in enumerate("KMGTPE")}}
NATIVE_RESOURCES = ("cpu", "memory", "ephemeral-storage")
# Label keys (node selectors, toleration keys) and the names of extended resources: [prefix/]name.
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"^({_DNS_SUBDOMAIN}/)?{_NAME}$")
EXTENDED_RESOURCE = re.compile(rf"^{_DNS_SUBDOMAIN}/{_NAME}$")
# Values reached again through YAML aliases: a few anchors reused are fine, an expansion bomb is not.
MAX_ALIAS_EXPANSION = 1_000_000

Path_ = tuple[str | int, ...]
Allowed = dict[str, tuple[str, ...]]  # tenant -> canonical models it may call

try:  # libyaml's composer is ~10x faster on large policies and keeps the same marks
    _LOADER: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _LOADER = yaml.SafeLoader


@dataclass(frozen=True, slots=True)
class Problem:
    line: int | None
    path: str
    message: str

    def render(self, file: str) -> str:
        where = file if self.line is None else f"{file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(ValueError):
    """The policy is invalid; `problems` holds every one found, the message lists them one per line."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.path))
        super().__init__("\n".join(p.render(file) for p in self.problems))


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


@cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _is_integer(_checker: Any, instance: Any) -> bool:
    # jsonschema counts 10.0 as an integer; the rate-limit config and Kubernetes do not.
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictIntegers = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return _StrictIntegers(schema())


# --------------------------------------------------------------------------------------- pass 1: YAML


class _Plain:
    """Node graph -> plain values, remembering the line of every path and reporting duplicate keys."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.key_lines: dict[Path_, int] = {}
        self.problems: list[Problem] = []
        self._constructor = yaml.SafeLoader("")  # per load: its cache keeps every node it constructed
        self._seen: set[int] = set()  # nodes converted once; converting one again is an alias expansion
        self._open: set[int] = set()  # collections being converted: meeting one again is a recursive alias
        self._expanded = 0
        self.dropped: set[str] = set()  # paths whose value pass 1 dropped: pass 2 would only repeat the problem

    def convert(self, node: yaml.Node, path: Path_) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if id(node) in self._seen:
            self._expanded += 1
            if self._expanded > MAX_ALIAS_EXPANSION:
                raise PolicyError(self.file, [Problem(node.start_mark.line + 1, dotted(path),
                                                      f"YAML aliases expand to more than {MAX_ALIAS_EXPANSION} "
                                                      "values (an alias expansion bomb?)")])
        self._seen.add(id(node))
        if isinstance(node, yaml.CollectionNode):
            if id(node) in self._open:
                # At the alias (the key holding it), not at the anchor the node's own mark points to.
                self._drop(self.key_lines.get(path, node.start_mark.line + 1), path,
                           "recursive YAML alias (a value that contains itself)")
                return None
            self._open.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self._open.discard(id(node))
        if node.tag == "tag:yaml.org,2002:timestamp":  # a date would not be a string for the schema either
            return node.value
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError:
            self._drop(node.start_mark.line + 1, path, f"unsupported YAML tag {node.tag!r}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self._drop(node.start_mark.line + 1, path, f"{node.value!r} is not a finite number")
            return None
        return value

    def _drop(self, line: int, path: Path_, message: str) -> None:
        self.problems.append(Problem(line, dotted(path), message))
        self.dropped.add(dotted(path))

    def _collection(self, node: yaml.CollectionNode, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._drop(key_node.start_mark.line + 1, path, "YAML merge keys ('<<') are not supported: "
                                   "write the fields out (anchors and aliases are fine)")
                    continue
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<non-scalar>"
                    self.problems.append(Problem(key_node.start_mark.line + 1, dotted(path),
                                                 f"key {shown!r} is not a string (quote it)"))
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in out:
                    first = self.key_lines[(*path, key)]
                    self.problems.append(Problem(line, dotted((*path, key)),
                                                 f"duplicate {_what(path)} {key!r} (first defined at line {first})"))
                    continue
                self.key_lines[(*path, key)] = line
                out[key] = self.convert(value_node, (*path, key))
            return out
        return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]

    def line(self, path: Path_) -> int | None:
        while path:
            if path in self.key_lines:
                return self.key_lines[path]
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def _what(path: Path_) -> str:
    names = {("models",): "model", ("tenants",): "tenant", ("aliases",): "alias",
             ("dedicated_gateways",): "gateway"}
    return names.get(tuple(path), "key")


def _parse(file: str, text: str) -> tuple[Any, _Plain]:
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise PolicyError(file, [Problem(mark.line + 1 if mark else None, "",
                                         f"not valid YAML: {exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError(file, [Problem(None, "", f"not valid YAML: {exc}")]) from None
    if node is None:
        raise PolicyError(file, [Problem(None, "", "the file is empty")])
    if isinstance(node, yaml.MappingNode):
        key, models = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == "models"),
                           (None, None))
        if key is not None and isinstance(models, yaml.MappingNode) and len(models.value) > MAX_MODELS:
            raise PolicyError(file, [Problem(key.start_mark.line + 1, "models",
                                             f"{len(models.value)} models; one policy holds at most {MAX_MODELS} "
                                             "(split the models across dedicated gateways and policies)")])
    plain = _Plain(file)
    return plain.convert(node, ()), plain


# ------------------------------------------------------------------------------------- pass 2: schema


def _schema_problems(data: Any, plain: _Plain) -> list[Problem]:
    problems = []
    for error in _validator().iter_errors(data):
        problems.extend(_explain(error, plain))
    return problems


def _explain(error: jsonschema.ValidationError, plain: _Plain) -> Iterator[Problem]:
    path: Path_ = tuple(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        allowed = ", ".join(sorted(known))
        for key in error.instance:
            if key not in known:
                yield Problem(plain.line((*path, key)), dotted((*path, key)),
                              f"unknown field {key!r} (allowed: {allowed})")
        return
    if "propertyNames" in error.schema_path:  # a bad key: point at the key itself
        name = str(error.instance)
        parent = path[-1] if path else ""
        yield Problem(plain.line((*path, name)), dotted((*path, name)),
                      f"invalid name {name!r}{_NAME_HINTS.get(str(parent), f': {error.message}')}")
        return
    if kind == "not" and path and path[0] == "models":
        yield Problem(plain.line(path), dotted(path), "give either per_replica or limit, not both")
        return
    if kind == "required":
        yield Problem(plain.line(path), dotted(path), error.message.replace("is a required property",
                                                                         "is required"))
        return
    if kind == "pattern" and path[:2] == ("services", "tls"):
        hint = (_NAME_HINTS["dedicated_gateways"][2:] if path[-1] in ("server_secret", "gateway_secret")
                else "write one SAN, without spaces or commas")
        yield Problem(plain.line(path), dotted(path), f"{error.instance!r} is not a valid {path[-1]}: {hint}")
        return
    if kind == "pattern" and path and path[-1] == "istio_revision":
        yield Problem(plain.line(path), dotted(path), f"{error.instance!r} is not a valid Istio revision: use the "
                                                      "revision or revision tag as istioctl names it (lowercase "
                                                      "letters, digits, '-', at most 63)")
        return
    if kind == "enum" and path and path[-1] == "enforcement":
        yield Problem(plain.line(path), dotted(path), f"unknown enforcement {error.instance!r} "
                                                      f"(use one of: {', '.join(spec.ENFORCEMENTS)})")
        return
    if kind == "pattern":
        yield Problem(plain.line(path), dotted(path), f"{error.instance!r} does not match {error.validator_value}")
        return
    if kind in ("maxProperties", "minProperties") and path and path[-2:-1] == ("overrides",):
        yield Problem(plain.line(path), dotted(path), "an override sets exactly one of limit, share, unlimited")
        return
    if kind == "type" and isinstance(error.instance, str) and _looks_numeric(error.instance):
        yield Problem(plain.line(path), dotted(path), f"{error.message} (YAML 1.1 reads {error.instance} as text: "
                                                      "write the digits out, or a dot and a signed exponent, "
                                                      "e.g. 1.0e+3)")
        return
    yield Problem(plain.line(path), dotted(path), error.message)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_TENANT_HINT = ": use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
_MODEL_HINT = ": use up to 128 letters, digits or . _ : / @ -, starting with a letter or digit"
_NAME_HINTS = {"tenants": _TENANT_HINT, "models": _MODEL_HINT, "aliases": _MODEL_HINT, "overrides": _MODEL_HINT,
               "dedicated_gateways": ": use a DNS label (lowercase letters, digits, '-', at most 63)"}


# --------------------------------------------------------------------------------- pass 3: meaning


def quantity(text: str) -> Fraction | None:
    """A Kubernetes quantity's value (exactly: '2500m' > '2' must compare right), None when it is not one."""
    match = QUANTITY.match(text)
    if match is None:
        return None
    suffix = match["suffix"] or ""
    scale = Fraction(10) ** int(suffix[1:]) if suffix[:1] in ("e", "E") else _SUFFIX_SCALE[suffix]
    return Fraction(Decimal(match["number"])) * scale


def _resource_kind(name: str) -> str | None:
    """native, extended or hugepages (the last two cannot be overcommitted); None for a name Kubernetes refuses."""
    if name in NATIVE_RESOURCES:
        return "native"
    if name.startswith("hugepages-"):
        return "hugepages" if quantity(name.removeprefix("hugepages-")) is not None else None
    if EXTENDED_RESOURCE.match(name) and len(name.split("/", 1)[0]) <= 253:  # a DNS subdomain prefix
        domain = name.split("/", 1)[0]
        if domain != "kubernetes.io" and not domain.endswith(".kubernetes.io"):
            return "extended"
    return None


def _service(data: dict[str, Any], replicas: int, cpu: str, memory: str) -> spec.ServiceSpec:
    n = data.get("replicas", replicas)
    return spec.ServiceSpec(replicas=n, max_replicas=max(n, data.get("max_replicas", max(n, 10))),
                            cpu=data.get("cpu", cpu), memory=data.get("memory", memory))


class _Checker:
    def __init__(self, data: dict[str, Any], plain: _Plain) -> None:
        self.data = data
        self.plain = plain
        self.problems: list[Problem] = []

    def problem(self, path: Path_, message: str) -> None:
        self.problems.append(Problem(self.plain.line(path), dotted(path), message))

    def resources(self, data: dict[str, Any], path: Path_) -> tuple[dict[str, str], dict[str, str]]:
        """requests, limits as quantity strings, after the checks the API server would make at apply time
        (where the error would name a Deployment, not the policy line)."""
        found: dict[str, dict[str, str]] = {}
        values: dict[str, dict[str, Fraction]] = {}
        for side in ("requests", "limits"):
            found[side], values[side] = {}, {}
            for name, raw in data.get(side, {}).items():
                rpath: Path_ = (*path, side, name)
                text = str(raw)
                found[side][name] = text
                kind = _resource_kind(name)
                if kind is None:
                    self.problem(rpath, f"unknown resource {name!r}: use cpu, memory, ephemeral-storage, "
                                        "hugepages-<size>, or an extended resource as domain/name "
                                        "(e.g. nvidia.com/gpu)")
                    continue
                value = quantity(text)
                if value is None:
                    self.problem(rpath, f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 512Mi, 8Gi, 1G)")
                    continue
                if kind == "extended" and value.denominator != 1:
                    self.problem(rpath, f"{text!r}: extended resources are counted in whole units")
                    continue
                values[side][name] = value
        for name, request in values["requests"].items():
            rpath = (*path, "requests", name)
            limit = values["limits"].get(name)
            overcommittable = _resource_kind(name) == "native"
            if limit is None:
                if not overcommittable and name not in found["limits"]:
                    self.problem(rpath, f"extended resources need a limit equal to the request: set limits.{name}: "
                                        f"{found['requests'][name]} (or only the limit)")
            elif not overcommittable and request != limit:
                self.problem(rpath, f"request {found['requests'][name]} differs from the limit "
                                    f"{found['limits'][name]}: Kubernetes cannot overcommit extended resources, so "
                                    "requests must equal limits")
            elif request > limit:
                self.problem(rpath, f"request {found['requests'][name]} is above the limit {found['limits'][name]}")
        return found["requests"], found["limits"]

    def tolerations(self, data: list[dict[str, Any]], path: Path_) -> tuple[spec.Toleration, ...]:
        out = []
        for i, t in enumerate(data):
            tpath: Path_ = (*path, i)
            key, operator, effect = t.get("key", ""), t.get("operator", "Equal"), t.get("effect", "")
            if key and not LABEL_KEY.match(key):
                self.problem((*tpath, "key"), f"{key!r} is not a taint key ([prefix/]name, as a label key)")
            if not key and operator != "Exists":
                self.problem(tpath, "a toleration without a key matches every taint and needs operator: Exists")
            if operator == "Exists" and t.get("value"):
                self.problem((*tpath, "value"), "operator Exists matches any value: drop the value or use "
                                                "operator Equal")
            if "toleration_seconds" in t and effect != "NoExecute":
                self.problem((*tpath, "toleration_seconds"), "only a NoExecute toleration has toleration_seconds "
                                                             f"(effect is {effect or 'unset'})")
            out.append(spec.Toleration(key=key, operator=operator, value=t.get("value", ""), effect=effect,
                                       seconds=t.get("toleration_seconds")))
        return tuple(out)

    def placement(self, data: dict[str, Any], path: Path_, default: spec.Placement) -> spec.Placement:
        """A deployment's resources, node selector and tolerations; each one it leaves out is the default's."""
        requests, limits = (self.resources(data["resources"], (*path, "resources")) if "resources" in data
                            else (default.requests, default.limits))
        selector = data.get("node_selector")
        for key, value in (selector or {}).items():
            if not LABEL_KEY.match(key):
                self.problem((*path, "node_selector", key), f"{key!r} is not a label key ([prefix/]name: letters, "
                                                            "digits, '-', '_', '.', at most 63 after the prefix)")
            elif value and not LABEL_VALUE.match(value):
                self.problem((*path, "node_selector", key), f"{value!r} is not a label value (at most 63 letters, "
                                                            "digits, '-', '_', '.')")
        tolerations = (self.tolerations(data["tolerations"], (*path, "tolerations")) if "tolerations" in data
                       else default.tolerations)
        return spec.Placement(requests=requests, limits=limits,
                              node_selector=dict(selector) if selector is not None else dict(default.node_selector),
                              tolerations=tolerations)

    def models(self) -> dict[str, spec.Model]:
        out = {}
        default_placement = self.placement(self.data.get("defaults", {}).get("deployment", {}),
                                           ("defaults", "deployment"), spec.Placement())
        services: dict[tuple[str, str], str] = {}
        for name, m in self.data["models"].items():
            path: Path_ = ("models", name)
            service = m.get("service", name)
            if "service" not in m and not DNS_LABEL.match(name):
                self.problem(path, f"model name {name!r} is not a DNS label: set `service` to its Service's name")
            elif not SERVICE_NAME.match(service):
                self.problem(path, f"Service name {service!r} must start with a letter (a Kubernetes Service name "
                                   "is a DNS-1035 label): set `service` to one that does")
            if m.get("per_replica") is not None and not LABEL_VALUE.match(name):
                self.problem(path, f"per_replica model {name!r}: its replica counts are published under its "
                                   "Services' igw.ai/model label, which must equal the model name, and label values "
                                   "are at most 63 letters, digits, '.', '_' or '-' (rename the model; keep the "
                                   "old name as an alias)")
            clash = services.setdefault((m["namespace"], service), name)
            if clash != name:
                self.problem(path, f"models {clash!r} and {name!r} both use Service {m['namespace']}/{service}")
            if m.get("per_replica") is None and ("min" in m or "max" in m):
                self.problem(path, "min and max apply only with per_replica")
            if "max" in m and m["max"] < m.get("min", 0):
                self.problem((*path, "max"), f"max ({m['max']}) is below min ({m.get('min', 0)})")
            pool = m.get("connection_pool", {})
            dep = m.get("deployment")
            out[name] = spec.Model(
                name=name, namespace=m["namespace"], service=service, port=m.get("port", spec.DEFAULT_MODEL_PORT),
                per_replica=m.get("per_replica"), limit=m.get("limit"), min=m.get("min", 0), max=m.get("max"),
                aliases=tuple(m.get("aliases", ())), inspect_body=m.get("inspect_body", False),
                shadow_mode=m.get("shadow_mode", False),
                connection_pool=spec.ConnectionPool(pool.get("max_connections", 1024),
                                                    pool.get("max_pending_requests", 1024),
                                                    pool.get("max_requests", 1024)),
                deployment=None if dep is None else spec.Deployment(
                    image=dep["image"], args=tuple(dep.get("args", ())), replicas=dep.get("replicas", 1),
                    container_port=dep.get("container_port", m.get("port", spec.DEFAULT_MODEL_PORT)),
                    prewarm_path=dep.get("prewarm_path", spec.DEFAULT_PREWARM_PATH),
                    startup_seconds=dep.get("startup_seconds", 600),
                    placement=self.placement(dep, (*path, "deployment"), default_placement)),
                line=self.plain.line(path) or 0,
            )
        return out

    def aliases(self, models: dict[str, spec.Model]) -> dict[str, str]:
        targets: dict[str, str] = {}
        where: dict[str, Path_] = {}
        for model in models.values():
            for i, alias in enumerate(model.aliases):
                path: Path_ = ("models", model.name, "aliases", i)
                if alias in models:
                    self.problem(path, f"alias {alias!r} of model {model.name!r} is itself a model "
                                       f"(alias loop: {model.name} -> {alias} -> ...)")
                elif alias in targets:
                    self.problem(path, f"alias {alias!r} is already an alias of {targets[alias]!r} "
                                       f"({dotted(where[alias])})")
                else:
                    targets[alias], where[alias] = model.name, path
        for alias, target in self.data.get("aliases", {}).items():
            path = ("aliases", alias)
            if alias in models:
                self.problem(path, f"{alias!r} is a model and cannot also be an alias")
            elif alias in targets:
                self.problem(path, f"alias {alias!r} is already an alias of {targets[alias]!r} "
                                   f"({dotted(where[alias])})")
            else:
                targets[alias], where[alias] = target, path
        resolved: dict[str, str] = {}
        for alias in targets:
            chain = [alias]
            current = targets[alias]
            while current not in models:
                if current in chain:
                    loop = " -> ".join([*chain[chain.index(current):], current])
                    self.problem(where[alias], f"alias loop: {loop}")
                    break
                if current not in targets:
                    self.problem(where[alias], f"alias {alias!r} names {current!r}, which is neither a model "
                                               "nor an alias")
                    break
                chain.append(current)
                current = targets[current]
            else:
                resolved[alias] = current
        return resolved

    def tenants(self, models: dict[str, spec.Model], aliases: dict[str, str],
                gateways: dict[str, spec.DedicatedGateway]) -> tuple[dict[str, spec.Tenant], Allowed]:
        out: dict[str, spec.Tenant] = {}
        allowed: dict[str, tuple[str, ...]] = {}
        names = list(models)
        for tid, t in self.data["tenants"].items():
            path: Path_ = ("tenants", tid)
            tier = TIERS.get(t["tier"])
            explicit = [k for k in ("max_body_bytes", "timeout_ms", "priority") if k in t]
            if tier is None and len(explicit) < 3:
                self.problem((*path, "tier"), f"unknown tier {t['tier']!r}: use one of {', '.join(TIERS)} or set "
                                              "max_body_bytes, timeout_ms and priority")
            tier = tier or TIERS["free"]  # only read where all three values are explicit
            globs = tuple(t.get("models", ("*",)))
            regex = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
            mine = tuple(n for n in names if regex.match(n))
            if not mine:
                self.problem((*path, "models"), f"{list(globs)} match no model of this policy")
            allowed[tid] = mine
            mine_set = set(mine)
            overrides = {}
            for model, o in t.get("overrides", {}).items():
                opath: Path_ = (*path, "overrides", model)
                if model not in models:
                    hint = f" (an alias of {aliases[model]!r}: use the model name)" if model in aliases else ""
                    self.problem(opath, f"no model {model!r} in this policy{hint}")
                elif model not in mine_set:
                    self.problem(opath, f"tenant {tid!r} may not call {model!r} (its models: {list(globs)})")
                overrides[model] = spec.Override(limit=o.get("limit"), share=o.get("share"),
                                                 unlimited=o.get("unlimited", False))
            gateway = t.get("gateway")
            if gateway is not None and gateway not in gateways:
                known = ", ".join(gateways) or "none defined"
                self.problem((*path, "gateway"), f"no dedicated gateway {gateway!r} (dedicated_gateways: {known})")
            out[tid] = spec.Tenant(
                id=tid, department=t["department"], tier=t["tier"], models=globs, limit=t.get("limit"),
                share=float(t.get("share", 1)), overrides=overrides, shadow_mode=t.get("shadow_mode", False),
                gateway=gateway,
                max_body_bytes=t.get("max_body_bytes", tier.max_body_bytes),
                timeout_ms=t.get("timeout_ms", tier.timeout_ms), priority=t.get("priority", tier.priority),
                line=self.plain.line(path) or 0,
            )
        return out, allowed

    def shares(self, tenants: dict[str, spec.Tenant], allowed: dict[str, tuple[str, ...]],
               models: dict[str, spec.Model]) -> None:
        """A model whose every sharing tenant has share 0 could be called by nobody: name it."""
        for tenant in tenants.values():
            weights: list[tuple[Path_, float | None]] = [(("tenants", tenant.id, "share"), tenant.share)]
            weights += [(("tenants", tenant.id, "overrides", m, "share"), o.share) for m, o in tenant.overrides.items()]
            for path, share in weights:
                if share is not None and share > MAX_SHARE:
                    self.problem(path, f"share {share:g} is too large: shares are weights, at most {MAX_SHARE}")
        if tenants and all(t.share == 0 and not any(_grants(o) for o in t.overrides.values())
                           for t in tenants.values()):
            self.problem(("tenants",), "every tenant has share 0: no tenant could call any model "
                                       "(give at least one tenant a share > 0)")
            return
        totals: dict[str, float] = {}
        sharers: dict[str, list[str]] = {}
        fixed: set[str] = set()  # models some tenant may call through a fixed limit or unlimited
        for tenant in tenants.values():
            for model in allowed.get(tenant.id, ()):
                share = share_of(tenant, model)
                if share is None:
                    if _grants(tenant.overrides[model]):
                        fixed.add(model)
                    continue
                totals[model] = totals.get(model, 0.0) + share
                sharers.setdefault(model, []).append(tenant.id)
        for model, total in totals.items():
            if total == 0 and model not in fixed:
                who = ", ".join(sharers[model][:5]) + (" ..." if len(sharers[model]) > 5 else "")
                self.problem(("models", model), f"every tenant allowed model {model!r} has share 0 ({who}): "
                                                "nobody could call it (give one a share > 0)")


def _grants(override: spec.Override) -> bool:
    """Whether the override lets its tenant call the model at all (limit 0 and share 0 do not)."""
    return override.unlimited or bool(override.limit) or bool(override.share)


def share_of(tenant: spec.Tenant, model: str) -> float | None:
    """The tenant's weight in the model's capacity; None when an override gives it a fixed limit."""
    override = tenant.overrides.get(model)
    if override is None:
        return tenant.share
    return override.share


def _gateway(data: dict[str, Any]) -> spec.Gateway:
    return spec.Gateway(name=data.get("name", "igw"), namespace=data.get("namespace", "istio-system"),
                        selector=dict(data.get("selector", {"istio": "ingressgateway"})),
                        hosts=tuple(data.get("hosts", ("*",))), port=data.get("port", 80),
                        enforcement=data.get("enforcement", spec.DEFAULT_ENFORCEMENT),
                        istio_revision=data.get("istio_revision"))


def _services_tls(data: dict[str, Any] | None, check: _Checker) -> spec.ServicesTls | None:
    if data is None:
        return None
    mutual = data.get("mutual", True)
    if "client_san" in data and not mutual:
        check.problem(("services", "tls", "client_san"), "client_san applies only with mutual: true (without a "
                                                         "client certificate there is no SAN to check)")
    return spec.ServicesTls(server_secret=data["server_secret"], gateway_secret=data["gateway_secret"],
                            mutual=mutual, client_san=data.get("client_san", ""))


def load_policy(file: str, text: str) -> spec.Policy:
    """Parse and validate; raise PolicyError listing every problem (file, line, path, what)."""
    data, plain = _parse(file, text)
    problems = list(plain.problems)
    problems += [p for p in _schema_problems(data, plain) if p.path not in plain.dropped]
    if problems:
        raise PolicyError(file, problems)
    if len(data["tenants"]) > MAX_TENANTS:
        raise PolicyError(file, [Problem(plain.line(("tenants",)), "tenants",
                                         f"{len(data['tenants'])} tenants; one policy holds at most {MAX_TENANTS}")])
    check = _Checker(data, plain)
    models = check.models()
    aliases = check.aliases(models)
    gateway = _gateway(data.get("gateway", {}))
    gateways = {
        name: spec.DedicatedGateway(name=name, namespace=g["namespace"], hosts=tuple(g.get("hosts", ("*",))),
                                    port=g.get("port", 80), replicas=g.get("replicas", 2),
                                    max_replicas=max(g.get("replicas", 2), g.get("max_replicas", 5)),
                                    enforcement=g.get("enforcement", gateway.enforcement),
                                    istio_revision=g.get("istio_revision", gateway.istio_revision))
        for name, g in data.get("dedicated_gateways", {}).items()
    }
    tenants, allowed = check.tenants(models, aliases, gateways)
    check.shares(tenants, allowed, models)
    services_namespace = data.get("services", {}).get("namespace", "igw-system")
    for name, svc in OUR_SERVICES.items():
        owner = next((m for m in models.values() if (m.namespace, m.service) == (services_namespace, svc)), None)
        if owner is not None:
            check.problem(("models", owner.name), f"Service {services_namespace}/{svc} is the {name}'s: give the "
                                                  "model another `service` or namespace")
    model_namespaces = {m.namespace for m in models.values()}
    namespace_of: dict[str, str] = {}
    for name, g in gateways.items():
        path = ("dedicated_gateways", name, "namespace")
        if not SERVICE_NAME.match(name):
            check.problem(("dedicated_gateways", name), f"gateway name {name!r} must start with a letter (it names "
                                                        "the gateway's Service, a DNS-1035 label)")
        if g.namespace == gateway.namespace:
            check.problem(path, f"namespace {g.namespace!r} is the shared gateway's; a dedicated gateway needs its own")
        elif g.namespace == services_namespace or g.namespace in model_namespaces:
            whose = "the services'" if g.namespace == services_namespace else "a model"
            check.problem(path, f"namespace {g.namespace!r} is {whose} namespace, labelled istio-injection: "
                                "disabled, so the gateway would get no proxy; a dedicated gateway needs its own")
        elif g.namespace in namespace_of:
            check.problem(path, f"namespace {g.namespace!r} is already dedicated gateway "
                                f"{namespace_of[g.namespace]!r}'s; a dedicated gateway needs its own")
        namespace_of.setdefault(g.namespace, name)
    svc = data.get("services", {})
    tls = _services_tls(svc.get("tls"), check)
    if check.problems:
        raise PolicyError(file, check.problems)
    defaults = data.get("defaults", {})
    return spec.Policy(
        file=file,
        unit=defaults.get("unit", "second"),
        algorithm=defaults.get("algorithm", "fixed_window"),
        tenant_limit=defaults.get("tenant_limit"),
        tenant_model_limit=defaults.get("tenant_model_limit"),
        shadow_mode=defaults.get("shadow_mode", False),
        gateway=gateway,
        dedicated_gateways=gateways,
        services=spec.Services(
            namespace=svc.get("namespace", "igw-system"),
            image=svc.get("image", spec.DEFAULT_IMAGE),
            redis_url=svc.get("redis_url", "redis://redis.igw-system.svc.cluster.local:6379/0"),
            redis_shards=tuple(svc.get("redis_shards", ())),
            ext_proc=_service(svc.get("ext_proc", {}), 2, "500m", "256Mi"),
            ratelimit=_service(svc.get("ratelimit", {}), 2, "500m", "256Mi"),
            replica_watcher=_service(svc.get("replica_watcher", {}), 2, "100m", "128Mi"),
            tls=tls,
        ),
        tenants=tenants,
        models=models,
        aliases=aliases,
        allowed=allowed,
    )


def load_policy_file(path: str | Path) -> spec.Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [Problem(None, "", f"cannot read the file: {exc}")]) from None
    return load_policy(str(path), text)
