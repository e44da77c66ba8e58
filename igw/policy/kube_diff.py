"""`igw policy diff --kube`: what `kubectl apply` of the rendered manifests would change in a cluster.

The comparison is pure: a rendered object matches the live one when every field we render has the same
value live (fields the API server or controllers add, such as status, uids, defaults, are ignored, as
`kubectl apply` ignores them), and so is the replica count of a Deployment an HPA of the same set scales: the
HPA owns it, so a scaled Deployment is not drift. Only reading the live objects is I/O, through the official
`kubernetes` client's REST layer (kubeconfig, in-cluster account, or a plain URL such as `kubectl proxy`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
Fetch = Callable[[str], Obj | None]  # API path -> object, None when it does not exist

# kind -> resource plural, for the kinds the renderer emits (an unknown kind is an error, not a guess).
PLURALS = {
    "Namespace": "namespaces", "Service": "services", "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts", "Deployment": "deployments",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers", "PodDisruptionBudget": "poddisruptionbudgets",
    "Role": "roles", "RoleBinding": "rolebindings", "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings", "Gateway": "gateways", "VirtualService": "virtualservices",
    "DestinationRule": "destinationrules", "EnvoyFilter": "envoyfilters", "Telemetry": "telemetries",
    "NetworkPolicy": "networkpolicies",
}
IGNORED_TOP = {"apiVersion", "kind", "status"}
IGNORED_METADATA = {"annotations"}  # kubectl keeps its last-applied annotation there


def api_path(obj: Obj) -> str:
    kind = obj["kind"]
    if kind not in PLURALS:
        raise ValueError(f"{kind}: no API path known for this kind")
    api_version = obj["apiVersion"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = obj["metadata"].get("namespace")
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{scope}/{PLURALS[kind]}/{obj['metadata']['name']}"


def object_name(obj: Obj) -> str:
    namespace = obj["metadata"].get("namespace")
    return f"{obj['kind']}/{namespace + '/' if namespace else ''}{obj['metadata']['name']}"


def differences(wanted: Any, live: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(path, live value, wanted value) for every rendered field whose live value differs."""
    if isinstance(wanted, dict):
        if not isinstance(live, dict):
            return [(path or ".", live, wanted)]
        out: list[tuple[str, Any, Any]] = []
        for key, value in wanted.items():
            if (not path and key in IGNORED_TOP) or (path == "metadata" and key in IGNORED_METADATA):
                continue
            out += differences(value, live.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(wanted, list):
        if not isinstance(live, list) or len(live) != len(wanted):
            return [(path, live, wanted)]
        out = []
        for i, (w, v) in enumerate(zip(wanted, live, strict=True)):
            out += differences(w, v, f"{path}[{i}]")
        return out
    if _same_scalar(wanted, live):
        return []
    return [(path, live, wanted)]


def _same_scalar(wanted: Any, live: Any) -> bool:
    if wanted == live:
        return True
    # The API server normalises quantities and int-or-string fields ("500m" vs "0.5", 8080 vs "8080").
    return wanted is not None and live is not None and str(wanted) == str(live)


@dataclass(frozen=True)
class KubeDiff:
    missing: list[str]
    changed: list[tuple[str, list[tuple[str, Any, Any]]]]
    same: int

    @property
    def empty(self) -> bool:
        return not self.missing and not self.changed

    def lines(self, limit_per_object: int = 10) -> list[str]:
        out = [f"+ {name} (not in the cluster)" for name in self.missing]
        for name, diffs in self.changed:
            out.append(f"~ {name}")
            for path, live, wanted in diffs[:limit_per_object]:
                out.append(f"    {path}: {_short(live)} -> {_short(wanted)}")
            if len(diffs) > limit_per_object:
                out.append(f"    ... and {len(diffs) - limit_per_object} more")
        out.append(f"= {self.same} object(s) unchanged")
        return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def hpa_targets(objects: Iterable[Obj]) -> set[tuple[str | None, str]]:
    """(namespace, name) of every Deployment an HPA among the objects scales."""
    return {(o["metadata"].get("namespace"), o["spec"]["scaleTargetRef"]["name"]) for o in objects
            if o["kind"] == "HorizontalPodAutoscaler" and o["spec"]["scaleTargetRef"].get("kind") == "Deployment"}


def _without_hpa_replicas(obj: Obj, scaled: set[tuple[str | None, str]]) -> Obj:
    """The object as far as we own it: an HPA-scaled Deployment's replica count is the HPA's (the renderer omits
    it; manifests rendered before that, or by hand, may still carry one)."""
    if obj["kind"] != "Deployment" or (obj["metadata"].get("namespace"), obj["metadata"]["name"]) not in scaled:
        return obj
    return {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "replicas"}}


def compare(objects: Iterable[Obj], fetch: Fetch) -> KubeDiff:
    missing: list[str] = []
    changed: list[tuple[str, list[tuple[str, Any, Any]]]] = []
    same = 0
    objects = list(objects)
    scaled = hpa_targets(objects)
    for obj in objects:
        live = fetch(api_path(obj))
        if live is None:
            missing.append(object_name(obj))
            continue
        diffs = differences(_without_hpa_replicas(obj, scaled), live)
        if diffs:
            changed.append((object_name(obj), diffs))
        else:
            same += 1
    return KubeDiff(missing, changed, same)


def kube_fetcher(*, kubeconfig: str | None = None, context: str | None = None, api_server: str | None = None,
                 in_cluster: bool = False) -> Fetch:
    """A GET on the API server with the client's auth; 404 means "not there"."""
    from kubernetes import client, config

    if api_server:
        configuration = client.Configuration()
        configuration.host = api_server
    elif in_cluster:
        config.load_incluster_config()
        configuration = client.Configuration.get_default_copy()
    else:
        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    api = client.ApiClient(configuration)

    def fetch(path: str) -> Obj | None:
        method, url, headers, body, post = api.param_serialize(
            "GET", path, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        response = api.call_api(method, url, headers, body, post, _request_timeout=10)
        response.read()
        if response.status == 404:
            return None
        if not 200 <= response.status < 300:
            raise RuntimeError(f"GET {path}: HTTP {response.status}: {response.data[:200]!r}")
        return json.loads(response.data)

    return fetch
