"""EndpointSlices → ready replicas per model. Pure: no I/O, no clock; the watcher feeds it API objects.

Which slices belong to which model is decided by labels the EndpointSlice controller copies from the
Service onto every slice it manages:

    igw.ai/model          the model name as clients send it (after aliases); required
    igw.ai/model-version  the version served by this Service; optional ("" = unversioned)

So one labels the Service (`metadata.labels`), never the slices. Several Services may carry the same
model label (one per version, or a canary); their slices are merged. Label values are limited to 63
characters of [A-Za-z0-9._-]; counts are read under the canonical name, so a per-replica model's canonical
name must itself be a valid label value (the policy loader refuses one that is not; an alias cannot help).

Counting rules, per model:
- An endpoint is identified by its `targetRef` (`namespace/name`, normally the Pod) or, without one, by
  its first address. The same endpoint listed in several slices (slice rebalancing, dual-stack IPv4 +
  IPv6 slices of one Service) counts once; it is ready if any listing says so.
- Ready means `conditions.ready` is true or absent (the API says absent = unknown = ready),
  `conditions.terminating` is not true and `conditions.serving` is not false. A serving but terminating
  pod is draining and must not earn its model more quota; a ready but not serving one belongs to a
  Service with publishNotReadyAddresses (ready is forced true there) and is not up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MODEL_LABEL = "igw.ai/model"
VERSION_LABEL = "igw.ai/model-version"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

SliceKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class SliceSummary:
    """What counting needs from one EndpointSlice: its model, version and (identity, ready) endpoints."""

    model: str
    version: str
    endpoints: tuple[tuple[str, bool], ...]


@dataclass(frozen=True)
class ModelReplicas:
    """The counted state of one model, without the publishing metadata (time, publisher)."""

    model: str
    ready: int
    versions: dict[str, int] = field(default_factory=dict)
    replicas: tuple[str, ...] = ()


def slice_key(obj: Mapping[str, Any]) -> SliceKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def endpoint_identity(endpoint: Mapping[str, Any], slice_namespace: str) -> str | None:
    ref = endpoint.get("targetRef") or {}
    name = ref.get("name")
    if name:
        return f"{ref.get('namespace') or slice_namespace}/{name}"
    addresses = endpoint.get("addresses") or []
    return str(addresses[0]) if addresses else None


def endpoint_ready(endpoint: Mapping[str, Any]) -> bool:
    conditions = endpoint.get("conditions") or {}
    if conditions.get("terminating") is True:
        return False
    # A Service with publishNotReadyAddresses gets ready=true for every pod; serving keeps the pod's own
    # readiness (for other Services serving=false implies ready=false anyway).
    return conditions.get("ready") is not False and conditions.get("serving") is not False


def summarize(obj: Mapping[str, Any], model_label: str = MODEL_LABEL,
              version_label: str = VERSION_LABEL) -> SliceSummary | None:
    """None when the slice carries no model label (it is not ours to count)."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    model = labels.get(model_label)
    if not model:
        return None
    namespace = str(meta.get("namespace") or "")
    endpoints: list[tuple[str, bool]] = []
    for endpoint in obj.get("endpoints") or ():
        identity = endpoint_identity(endpoint, namespace)
        if identity is not None:
            endpoints.append((identity, endpoint_ready(endpoint)))
    return SliceSummary(str(model), str(labels.get(version_label) or ""), tuple(endpoints))


def count_model(model: str, slices: Iterable[SliceSummary]) -> ModelReplicas:
    """Merge the slices of one model into its ready count, per-version counts and ready identities."""
    ready_version: dict[str, str] = {}
    for summary in sorted(slices, key=lambda s: s.version):
        for identity, ready in summary.endpoints:
            if ready and identity not in ready_version:
                ready_version[identity] = summary.version
    versions: dict[str, int] = {}
    for version in ready_version.values():
        versions[version] = versions.get(version, 0) + 1
    return ModelReplicas(model, len(ready_version), versions, tuple(sorted(ready_version)))


def count_slices(objs: Iterable[Mapping[str, Any]], model_label: str = MODEL_LABEL,
                 version_label: str = VERSION_LABEL) -> dict[str, ModelReplicas]:
    """One-shot counting of a full list of EndpointSlice objects."""
    index = SliceIndex(model_label, version_label)
    index.replace_all(objs)
    return {model: index.count(model) for model in index.models()}


class SliceIndex:
    """The live set of slices, grouped by model so an event recounts only the models it touches.

    `apply` and `replace_all` return the models whose inputs changed; whether their counts changed
    is the publisher's question (it compares with what it last wrote).
    """

    def __init__(self, model_label: str = MODEL_LABEL, version_label: str = VERSION_LABEL) -> None:
        self.model_label = model_label
        self.version_label = version_label
        self._slices: dict[SliceKey, SliceSummary] = {}
        self._by_model: dict[str, dict[SliceKey, SliceSummary]] = {}

    def __len__(self) -> int:
        return len(self._slices)

    def models(self) -> list[str]:
        return list(self._by_model)

    def has_model(self, model: str) -> bool:
        return model in self._by_model

    def count(self, model: str) -> ModelReplicas:
        return count_model(model, self._by_model.get(model, {}).values())

    def _remove(self, key: SliceKey) -> str | None:
        old = self._slices.pop(key, None)
        if old is None:
            return None
        group = self._by_model[old.model]
        del group[key]
        if not group:
            del self._by_model[old.model]
        return old.model

    def _put(self, key: SliceKey, summary: SliceSummary) -> None:
        self._slices[key] = summary
        self._by_model.setdefault(summary.model, {})[key] = summary

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> set[str]:
        """Apply one watch event (ADDED, MODIFIED or DELETED); other types change nothing."""
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return set()
        key = slice_key(obj)
        touched: set[str] = set()
        old_model = self._remove(key)
        if old_model is not None:
            touched.add(old_model)
        if event_type != "DELETED":
            summary = summarize(obj, self.model_label, self.version_label)
            if summary is not None:
                self._put(key, summary)
                touched.add(summary.model)
        return touched

    def replace_all(self, objs: Iterable[Mapping[str, Any]]) -> set[str]:
        """Replace everything with a fresh list; returns every model seen before or after."""
        touched = set(self._by_model)
        self._slices.clear()
        self._by_model.clear()
        for obj in objs:
            summary = summarize(obj, self.model_label, self.version_label)
            if summary is not None:
                self._put(slice_key(obj), summary)
        touched.update(self._by_model)
        return touched
