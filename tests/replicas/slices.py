"""EndpointSlice objects in the exact shape the API server returns them (as in `kubectl get
endpointslice -o json` / watch events): controller-managed, labels copied from the Service."""

from __future__ import annotations

import hashlib
from typing import Any


def _uid(text: str) -> str:
    digest = hashlib.sha1(text.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def endpoint(pod: str, ip: str, *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = False, namespace: str = "models", node: str = "worker-1",
             target: bool = True) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    if ready is not None:
        conditions["ready"] = ready
    conditions["serving"] = ready if serving is None else serving
    if terminating is not None:
        conditions["terminating"] = terminating
    ep: dict[str, Any] = {"addresses": [ip], "conditions": conditions, "nodeName": node, "zone": "zone-a"}
    if target:
        ep["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pod, "uid": _uid(namespace + pod)}
    return ep


def endpoint_slice(name: str, service: str, endpoints: list[dict[str, Any]], *, model: str | None = None,
                   version: str | None = None, namespace: str = "models",
                   address_type: str = "IPv4") -> dict[str, Any]:
    labels = {
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        "kubernetes.io/service-name": service,
        "app.kubernetes.io/name": service,
    }
    if model is not None:
        labels["igw.ai/model"] = model
    if version is not None:
        labels["igw.ai/model-version"] = version
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": f"{service}-",
            "namespace": namespace,
            "uid": _uid(namespace + name),
            "generation": 1,
            "creationTimestamp": "2026-11-02T09:14:07Z",
            "labels": labels,
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-02T09:14:07Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": _uid(namespace + service), "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8000}],
    }


def model_slice(model: str, pods: list[str], *, ready: list[bool] | None = None, version: str | None = None,
                suffix: str = "x1", namespace: str = "models", service: str | None = None) -> dict[str, Any]:
    service = service or (f"{model}-{version}" if version else model)
    flags = ready if ready is not None else [True] * len(pods)
    eps = [endpoint(pod, f"10.244.{i // 250}.{i % 250 + 2}", ready=ok, namespace=namespace)
           for i, (pod, ok) in enumerate(zip(pods, flags, strict=True))]
    return endpoint_slice(f"{service}-{suffix}", service, eps, model=model, version=version, namespace=namespace)
