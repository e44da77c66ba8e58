"""Parse envoyproxy/ratelimit YAML config files into an immutable lookup tree.

Pure logic, no I/O beyond the text handed in: the loader reads files, this module decides what they
mean. The rules follow upstream's config loader (strict key validation, composite keys, units,
`unlimited`/`replaces`/`shadow_mode`/wildcards/`share_threshold`), and errors name the file, the line,
the domain/descriptor path and the reason, using upstream's wording for the reason so an operator
who knows upstream's messages recognises them.

YAML is walked as a node graph rather than loaded into Python objects: it keeps each scalar's text
(upstream's YAML library turns `value: 123` into the string "123"), its resolved type (to reject a
float where upstream does) and its line number for error messages.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

# Unit names as in envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit, with their proto numbers.
UNITS: dict[str, int] = {"SECOND": 1, "MINUTE": 2, "HOUR": 3, "DAY": 4, "MONTH": 5, "YEAR": 6, "WEEK": 7}
UNIT_SECONDS: dict[int, int] = {1: 1, 2: 60, 3: 3600, 4: 86400, 5: 30 * 86400, 6: 365 * 86400, 7: 7 * 86400}
UNIT_NAMES: dict[int, str] = {v: k for k, v in UNITS.items()}

UPSTREAM_KEYS = frozenset(
    {
        "domain", "key", "value", "descriptors", "rate_limit", "unit", "requests_per_unit", "unlimited",
        "shadow_mode", "name", "replaces", "detailed_metric", "value_to_metric", "share_threshold",
        "quota_mode", "metadata",
    }
)
# Keys whose value is free-form user data that upstream passes through without key validation.
OPAQUE_KEYS = frozenset({"metadata"})
# Our extensions (adaptive quotas, algorithm choice); they only appear inside `rate_limit`.
EXTENSION_KEYS = frozenset(
    {"algorithm", "burst", "requests_per_unit_per_replica", "model", "model_key", "min", "max", "share", "share_key"}
)
VALID_KEYS = UPSTREAM_KEYS | EXTENSION_KEYS
FLOAT_KEYS = frozenset({"share"})

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
FLOAT = "tag:yaml.org,2002:float"
TIMESTAMP = "tag:yaml.org,2002:timestamp"
MERGE = "tag:yaml.org,2002:merge"
UINT32_MAX = 2**32 - 1
# libyaml's composer when PyYAML has it (10x faster on the 1 MB configs of 1,000 models); same node graph.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """A config file upstream would reject; the message names file, line, path and reason."""

    def __init__(self, file: str, reason: str, *, path: str = "", line: int | None = None) -> None:
        self.file = file
        self.reason = reason
        self.path = path
        self.line = line
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {path}: {reason}" if path else f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Adaptive:
    """Adaptive-quota settings of a limit (our extension; see README "Adaptive quotas")."""

    per_replica: int
    model: str | None  # fixed model name, or None to take it from the descriptor entry `model_key`
    model_key: str
    min: int
    max: int | None
    share: float
    share_key: str


@dataclass(frozen=True, slots=True)
class RateLimit:
    full_key: str  # stats key, e.g. "domain.key1_value1.subkey1"
    requests_per_unit: int
    unit: int  # proto enum number; 0 when unlimited
    unlimited: bool = False
    shadow_mode: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    detailed_metric: bool = False
    quota_mode: bool = False
    metadata: MappingProxyType[str, Any] | None = None
    algorithm: str = "fixed_window"
    burst: int | None = None  # gcra bucket size; None means requests_per_unit
    adaptive: Adaptive | None = None

    @property
    def window_seconds(self) -> int:
        return UNIT_SECONDS.get(self.unit, 1)


@dataclass(slots=True)
class Node:
    """One level of a domain's descriptor tree."""

    limit: RateLimit | None = None
    children: dict[str, Node] = field(default_factory=dict)  # "key_value" or "key"
    wildcards: list[tuple[str, str, Node]] = field(default_factory=list)  # (key, pattern, node), config order
    key: str = ""
    segment: str = ""  # this level's part of the stats key: "key" or "key_value"
    pattern: str = ""  # the configured value when it contains "*"
    share_threshold: bool = False
    value_to_metric: bool = False
    _regex: re.Pattern[str] | None = None

    def match_wildcard(self, key: str, value: str) -> Node | None:
        for wkey, pattern, node in self.wildcards:
            if wkey == key and wildcard_matches(pattern, value, node):
                return node
        return None


def wildcard_matches(pattern: str, value: str, node: Node) -> bool:
    star = pattern.find("*")
    if star == len(pattern) - 1:  # the common "prefix*" form: no regex needed
        return value.startswith(pattern[:-1])
    if node._regex is None:
        node._regex = re.compile("".join(".*" if part == "*" else re.escape(part)
                                         for part in re.split(r"(\*)", pattern)), re.DOTALL)
    return node._regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    root: Node


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    domains: MappingProxyType[str, Domain]
    files: tuple[str, ...] = ()
    # (domain, entries) -> Match or None, filled by lookup.find_limit; lives and dies with this config.
    lookups: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    def limit_count(self) -> int:
        def count(node: Node) -> int:
            own = 1 if node.limit is not None else 0
            return own + sum(count(k) for k in node.children.values())  # wildcard nodes are children too

        return sum(count(d.root) for d in self.domains.values())

    def describe(self) -> list[tuple[str, str]]:
        """(stats key, human summary) of every limit, for the CLI and for compat tests."""
        out: list[tuple[str, str]] = []

        def walk(node: Node) -> None:
            if node.limit is not None:
                out.append((node.limit.full_key, describe_limit(node.limit)))
            for child in node.children.values():
                walk(child)

        for domain in self.domains.values():
            walk(domain.root)
        return sorted(out)


def describe_limit(limit: RateLimit) -> str:
    """One line an operator can check a limit against: an adaptive limit's requests_per_unit is only a
    placeholder (0), so its per-replica rate, share and bounds are what it says instead."""
    if limit.unlimited:
        text = "unlimited"
    else:
        unit = UNIT_NAMES.get(limit.unit, "?").lower()
        a = limit.adaptive
        if a is None:
            text = f"{limit.requests_per_unit}/{unit}"
        else:
            text = f"{a.per_replica}/{unit} per ready replica of {a.model or '<' + a.model_key + '>'}"
            text += f", share {a.share:g}, min {a.min}" + (f", max {a.max}" if a.max is not None else "")
    if limit.algorithm != "fixed_window":
        text += f" ({limit.algorithm})"
    return text + (" shadow" if limit.shadow_mode else "")


# ---------------------------------------------------------------------------------------------
# YAML node helpers


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _first_document(file: str, text: str) -> yaml.Node | None:
    try:
        for document in yaml.compose_all(text, Loader=_LOADER):
            return document  # upstream reads only the first document
        return None
    except yaml.YAMLError as exc:
        raise ConfigError(file, f"error loading config file: {_yaml_message(exc)}") from None


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        return f"{where}{exc.problem or exc.context}"
    return str(exc)


def _flatten(file: str, node: yaml.MappingNode) -> None:
    """Expand YAML merge keys (`<<: *anchor`) in place, as upstream's YAML library does when it decodes a
    map: the merged keys come first, so the map's own keys win. Idempotent, so a node reached through
    several aliases is flattened once in effect."""
    if not any(key.tag == MERGE for key, _ in node.value):
        return
    try:
        _CONSTRUCTOR.flatten_mapping(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or node.start_mark
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, f"error loading config file: invalid merge key: {problem}",
                          line=mark.line + 1) from None


def _validate_keys(file: str, node: yaml.Node, *, in_rate_limit: bool = False) -> None:
    """Upstream's strict key check: every mapping key anywhere must be a known string key. Our extension
    keys are known only directly inside `rate_limit`: anywhere else they would be ignored silently."""
    if isinstance(node, yaml.MappingNode):
        _flatten(file, node)
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != STR:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<non-scalar>"
                raise ConfigError(file, f"config error, key is not of type string: {shown}", line=_line(key_node))
            if key_node.value not in UPSTREAM_KEYS and not (in_rate_limit and key_node.value in EXTENSION_KEYS):
                raise ConfigError(file, f"config error, unknown key '{key_node.value}'", line=_line(key_node))
            if key_node.value in OPAQUE_KEYS:
                continue
            if key_node.value in FLOAT_KEYS and isinstance(value_node, yaml.ScalarNode) and value_node.tag == FLOAT:
                continue  # our extension: a share weight may be fractional (upstream's keys never are)
            _validate_value(file, value_node, in_rate_limit=key_node.value == "rate_limit")
    else:
        _validate_value(file, node)


def _validate_value(file: str, node: yaml.Node, *, in_rate_limit: bool = False) -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if not isinstance(item, yaml.MappingNode):
                shown = item.value if isinstance(item, yaml.ScalarNode) else "<list>"
                raise ConfigError(
                    file, f"config error, yaml file contains list of type other than map: {shown}", line=_line(item)
                )
            _validate_keys(file, item)
    elif isinstance(node, yaml.MappingNode):
        _validate_keys(file, node, in_rate_limit=in_rate_limit)
    elif isinstance(node, yaml.ScalarNode) and node.tag not in (STR, INT, BOOL, NULL, TIMESTAMP):
        raise ConfigError(file, f"error checking config: unsupported value {node.value!r}", line=_line(node))


def _mapping(file: str, node: yaml.Node | None, what: str) -> dict[str, yaml.Node]:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == NULL):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(file, f"error loading config file: {what} must be a map", line=_line(node))
    return {k.value: v for k, v in node.value}


def _string(file: str, node: yaml.Node | None, field_name: str) -> str:
    if node is None:
        return ""
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(file, f"error loading config file: '{field_name}' must be a string", line=_line(node))
    return "" if node.tag == NULL else node.value


def _bool(file: str, node: yaml.Node | None, field_name: str) -> bool:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == NULL):
        return False
    if not isinstance(node, yaml.ScalarNode) or node.tag != BOOL:
        raise ConfigError(file, f"error loading config file: '{field_name}' must be true or false", line=_line(node))
    return node.value.lower() in ("true", "yes", "on", "y")


def _number(file: str, node: yaml.Node | None, field_name: str, *, allow_float: bool = False) -> float | None:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == NULL):
        return None
    ok_tags = (INT, FLOAT) if allow_float else (INT,)
    if not isinstance(node, yaml.ScalarNode) or node.tag not in ok_tags:
        kind = "a number" if allow_float else "an integer"
        raise ConfigError(file, f"error loading config file: '{field_name}' must be {kind}", line=_line(node))
    return _CONSTRUCTOR.construct_yaml_int(node) if node.tag == INT else float(node.value)


def _uint32(file: str, node: yaml.Node | None, field_name: str) -> int | None:
    value = _number(file, node, field_name)
    if value is None:
        return None
    if not 0 <= value <= UINT32_MAX:
        raise ConfigError(
            file, f"error loading config file: '{field_name}' must be between 0 and {UINT32_MAX}", line=_line(node)
        )
    return int(value)


_CONSTRUCTOR = yaml.SafeLoader("")


_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


def _plain(file: str, node: yaml.Node) -> Any:
    """Free-form data (metadata) as plain values a protobuf Struct can carry: dates stay the text they
    were written as, and a tag that is not plain data is a config error naming its line (a constructor
    error escaping from here would take the config watcher down with it)."""
    if isinstance(node, yaml.MappingNode):
        _flatten(file, node)
        return {str(_plain(file, key)): _plain(file, value) for key, value in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_plain(file, item) for item in node.value]
    if node.tag == _TIMESTAMP:
        return node.value
    if node.tag not in _PLAIN_TAGS:
        raise ConfigError(file, f"error loading config file: unsupported value {node.tag!r} in metadata",
                          line=_line(node))
    try:
        return _CONSTRUCTOR.construct_object(node)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(file, f"error loading config file: invalid value in metadata: {exc}",
                          line=_line(node)) from None


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------
# Building the tree


class _Builder:
    def __init__(self, merge_domains: bool) -> None:
        self.merge_domains = merge_domains
        self.domains: dict[str, Domain] = {}

    def add_file(self, file: str, text: str) -> None:
        document = _first_document(file, text)
        if document is not None:
            if not isinstance(document, yaml.MappingNode):
                raise ConfigError(file, "error loading config file: the document must be a map", line=_line(document))
            _validate_keys(file, document)
        root = _mapping(file, document, "the document")
        domain = _string(file, root.get("domain"), "domain")
        if not domain:
            raise ConfigError(file, "config file cannot have empty domain")
        existing = self.domains.get(domain)
        if existing is not None and not self.merge_domains:
            raise ConfigError(file, f"duplicate domain '{domain}' in config file", path=domain)
        target = existing.root if existing is not None else Node()
        self._load_descriptors(file, target, domain + ".", root.get("descriptors"))
        if existing is None:
            self.domains[domain] = Domain(domain, target)

    def _load_descriptors(self, file: str, parent: Node, parent_key: str, seq: yaml.Node | None) -> None:
        if seq is None or (isinstance(seq, yaml.ScalarNode) and seq.tag == NULL):
            return
        if not isinstance(seq, yaml.SequenceNode):
            raise ConfigError(file, "error loading config file: 'descriptors' must be a list", line=_line(seq))
        for item in seq.value:
            fields = _mapping(file, item, "a descriptor")
            key = _string(file, fields.get("key"), "key")
            if not key:
                raise ConfigError(file, "descriptor has empty key", path=parent_key.rstrip("."), line=_line(item))
            value = _string(file, fields.get("value"), "value")
            final_key = f"{key}_{value}" if value else key
            full_key = parent_key + final_key
            if final_key in parent.children:
                raise ConfigError(
                    file, f"duplicate descriptor composite key '{full_key}'", path=full_key, line=_line(item)
                )
            node = Node(key=key, segment=final_key)
            node.share_threshold = _bool(file, fields.get("share_threshold"), "share_threshold")
            node.value_to_metric = _bool(file, fields.get("value_to_metric"), "value_to_metric")
            if node.share_threshold and "*" not in final_key:
                raise ConfigError(
                    file,
                    "share_threshold can only be used with wildcard values (containing '*'), "
                    f"but found key '{final_key}'",
                    path=full_key,
                    line=_line(item),
                )
            if "rate_limit" in fields and not _is_null(fields["rate_limit"]):
                node.limit = self._rate_limit(file, full_key, fields)
            self._load_descriptors(file, node, full_key + ".", fields.get("descriptors"))
            parent.children[final_key] = node
            if "*" in value:
                node.pattern = value
                parent.wildcards.append((key, value, node))

    def _rate_limit(self, file: str, full_key: str, fields: dict[str, yaml.Node]) -> RateLimit:
        rl_node = fields["rate_limit"]
        rl = _mapping(file, rl_node, "'rate_limit'")
        line = _line(rl_node)
        unlimited = _bool(file, rl.get("unlimited"), "unlimited")
        unit_text = _string(file, rl.get("unit"), "unit")
        unit = UNITS.get(unit_text.upper(), 0)
        if unlimited:
            if unit:
                raise ConfigError(file, "should not specify rate limit unit when unlimited", path=full_key, line=line)
        elif not unit:
            raise ConfigError(file, f"invalid rate limit unit '{unit_text}'", path=full_key, line=line)
        name = _string(file, rl.get("name"), "name")
        replaces: list[str] = []
        rep_node = rl.get("replaces")
        if rep_node is not None and not _is_null(rep_node):
            if not isinstance(rep_node, yaml.SequenceNode):
                raise ConfigError(file, "error loading config file: 'replaces' must be a list", line=_line(rep_node))
            for entry in rep_node.value:
                entry_name = _string(file, _mapping(file, entry, "a replaces entry").get("name"), "name")
                if not entry_name:
                    raise ConfigError(file, "should not have an empty replaces entry", path=full_key, line=_line(entry))
                if entry_name == name:
                    raise ConfigError(
                        file, "replaces should not contain name of same descriptor", path=full_key, line=_line(entry)
                    )
                replaces.append(entry_name)
        metadata_node = fields.get("metadata")
        metadata = None
        if metadata_node is not None and not _is_null(metadata_node):
            if not isinstance(metadata_node, yaml.MappingNode):
                raise ConfigError(
                    file, "error loading config file: 'metadata' must be a map", line=_line(metadata_node)
                )
            metadata = _freeze(_plain(file, metadata_node))
        algorithm = _string(file, rl.get("algorithm"), "algorithm") or "fixed_window"
        if algorithm not in ("fixed_window", "gcra"):
            raise ConfigError(
                file, f"invalid algorithm '{algorithm}' (expected fixed_window or gcra)", path=full_key, line=line
            )
        burst = _uint32(file, rl.get("burst"), "burst")
        if burst is not None and algorithm != "gcra":
            raise ConfigError(file, "'burst' applies only to algorithm: gcra", path=full_key, line=line)
        if burst == 0:
            raise ConfigError(file, "'burst' must be at least 1", path=full_key, line=line)
        return RateLimit(
            full_key=full_key,
            requests_per_unit=_uint32(file, rl.get("requests_per_unit"), "requests_per_unit") or 0,
            unit=unit,
            unlimited=unlimited,
            shadow_mode=_bool(file, fields.get("shadow_mode"), "shadow_mode"),
            name=name,
            replaces=tuple(replaces),
            detailed_metric=_bool(file, fields.get("detailed_metric"), "detailed_metric"),
            quota_mode=_bool(file, fields.get("quota_mode"), "quota_mode"),
            metadata=metadata,
            algorithm=algorithm,
            burst=burst,
            adaptive=self._adaptive(file, full_key, rl, line, unlimited),
        )

    def _adaptive(
        self, file: str, full_key: str, rl: dict[str, yaml.Node], line: int, unlimited: bool
    ) -> Adaptive | None:
        per_replica = _uint32(file, rl.get("requests_per_unit_per_replica"), "requests_per_unit_per_replica")
        extras = [k for k in ("model", "model_key", "min", "max", "share", "share_key") if k in rl]
        if per_replica is None:
            if extras:
                raise ConfigError(
                    file, f"'{extras[0]}' requires 'requests_per_unit_per_replica'", path=full_key, line=line
                )
            return None
        if unlimited:
            raise ConfigError(file, "an unlimited limit cannot be adaptive", path=full_key, line=line)
        low = _uint32(file, rl.get("min"), "min") or 0
        high = _uint32(file, rl.get("max"), "max")
        if high is not None and high < low:
            raise ConfigError(file, f"'max' ({high}) is below 'min' ({low})", path=full_key, line=line)
        share = _number(file, rl.get("share"), "share", allow_float=True)
        if share is not None and not share > 0:
            raise ConfigError(file, "'share' must be greater than 0", path=full_key, line=line)
        return Adaptive(
            per_replica=per_replica,
            model=_string(file, rl.get("model"), "model") or None,
            model_key=_string(file, rl.get("model_key"), "model_key") or "model",
            min=low,
            max=high,
            share=float(share) if share is not None else 1.0,
            share_key=_string(file, rl.get("share_key"), "share_key"),
        )


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == NULL


def parse_config(files: Iterable[tuple[str, str]], *, merge_domains: bool = False) -> RateLimitConfig:
    """Build a config from (file name, text) pairs, in order; raise ConfigError on the first problem."""
    builder = _Builder(merge_domains)
    names: list[str] = []
    # Building a config allocates millions of short-lived YAML nodes and no reference cycles: the cyclic
    # collector would only rescan them (about a third of the load time of a 1,000-model config).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for name, text in files:
            builder.add_file(name, text)
            names.append(name)
    finally:
        if collecting:
            gc.enable()
    return RateLimitConfig(MappingProxyType(builder.domains), tuple(names))
