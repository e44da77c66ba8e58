"""Policy -> Istio and Kubernetes manifests for a cluster whose gateway is Istio's ingress gateway.

Pure: returns objects as dicts, grouped into files. What the gateway runs comes from
igw/envoy_config.py's builders, embedded as they are (never re-typed here), so the filters, timeouts,
failure modes, rate-limit actions, gRPC clusters and access log are those the local test bed runs
(tests/istio/test_drift.py holds both to that):

- EnvoyFilter (context GATEWAY, the gateway's workload selector): ext_proc and the rate-limit filter
  inserted before the router, in that order; the [tenant], [tenant, model], [model] rate-limit
  actions merged into our virtual hosts (routes Istio generates carry none, so the virtual host's
  apply); a STRICT_DNS cluster per gRPC service, named by its Service's FQDN and pointing at a
  headless Service, so Envoy balances HTTP/2 streams over every pod (a ClusterIP would pin each
  connection to one pod) and health-checks each; the JSON access log merged into the HTTP connection
  manager (a separate EnvoyFilter, so it can be left out); the test bed's local_reply_config merged into
  it too (in the filters' EnvoyFilter), so the gateway's own replies are JSON errors. With
  `enforcement: quota_push` (per gateway) the rate_limit_quota filter (igw/envoy_quota.py, bucket ids
  carrying the gateway's name) takes the rate-limit filter's place, its RLQS server being the rate-limit
  service's cluster, and the virtual hosts get no rate-limit actions: Envoy then enforces the budgets the
  service pushes.
- VirtualService routes on x-igw-model (set by ext_proc to the canonical name) to each model's
  Service, with the test bed's route timeout and retry policy. Routes are split across several
  VirtualServices when one would grow past ROUTES_BYTES: Istio merges VirtualServices bound to the
  same gateway host, and the header matches are disjoint, so order does not matter.
- DestinationRule per model (one host each: Istio has no other way to set a host's traffic policy):
  LEAST_REQUEST, the test bed's outlier detection and connect timeout, connection-pool limits.
- Tenants with `gateway:` are served only by their dedicated gateway: its routes match their
  x-igw-tenant, and the shared gateway's routes exclude them (withoutHeaders).
- NetworkPolicies: model pods (labelled igw.ai/model) and the gRPC ports of ext_proc and the rate-limit
  service accept connections from the gateways' pods only. Model pods have no sidecar and trust the
  x-igw-* headers ext_proc sets, so a caller reaching them past the gateway could forge them.
- Model pods stop without cutting requests: a preStop sleep keeps them serving until istiod has pushed
  the gateways an EDS update without them, and their grace period (like a dedicated gateway's drain)
  covers the longest request a tenant may make (route timeout, tier and tenant timeouts).
- ext_proc and the rate-limit service stop without failing calls either: on SIGTERM they drain
  (--drain-seconds: NOT_SERVING while still serving) until the gateways' active health checks have taken
  them out of rotation, and their grace period covers that drain and the calls still in flight.
- services.tls: ext_proc and the rate-limit service serve gRPC over TLS (mutual by default) from a
  mounted Secret, and every gateway's clusters to them carry an UpstreamTlsContext whose certificates
  come from Istio's gateway SDS (envoy_config.upstream_tls_sds_socket); the HTTP admin port (probes)
  stays plain.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ext_proc.records import TIERS
from igw import envoy_config
from igw.envoy_config import DEFAULT_TIMEOUTS, HCM_TYPE, MODEL_HEADER, TENANT_HEADER, Endpoint
from igw.envoy_quota import RLQS_HEALTH_SERVICE
from igw.policy import ratelimit, spec

Obj = dict[str, Any]

EXT_PROC_GRPC_PORT = 9002
EXT_PROC_HTTP_PORT = 9003
RATELIMIT_GRPC_PORT = 8081
RATELIMIT_HTTP_PORT = 8080
WATCHER_HTTP_PORT = 8080
RATELIMIT_CONFIG_DIR = "/etc/igw/ratelimit"
TLS_DIR = "/etc/igw/tls"  # services.tls: where ext_proc and the rate-limit service mount server_secret
GATEWAY_CONTAINER_PORT = 8080
ROUTES_BYTES = 256 * 1024  # one VirtualService's routes; far below the 1 MiB object limit
HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
LABEL_PART = "app.kubernetes.io/part-of"
MODEL_LABEL = "igw.ai/model"  # the replica watcher's selector (igw/replica_counting.MODEL_LABEL)
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server
# How long a stopping pod keeps serving after Kubernetes marks it terminating: istiod must push the gateways
# an EDS update without it (debounced, slower on a large mesh) before the server closes its port.
PRESTOP_SLEEP_SECONDS = 10
MODELS_NETWORK_POLICY = "igw-models-from-gateways"
DRAIN_MARGIN_SECONDS = 5  # on top of the longest request a stopping pod or gateway lets finish
SERVICE_DRAIN_MARGIN_SECONDS = 2  # on top of the gateways' health-check detection time (a probe late on a busy proxy)

try:
    _DUMPER: type = yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _DUMPER = yaml.SafeDumper


@dataclass(frozen=True)
class ServiceNames:
    """In-cluster names of our services; the Envoy cluster names are their Services' FQDNs."""

    namespace: str

    def fqdn(self, service: str) -> str:
        return f"{service}.{self.namespace}.svc.cluster.local"

    @property
    def ext_proc_cluster(self) -> str:
        return self.fqdn("ext-proc")

    @property
    def ratelimit_cluster(self) -> str:
        return self.fqdn("ratelimit")


def _meta(name: str, namespace: str | None = None, labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {LABEL_PART: "igw", **(labels or {})}
    if annotations:
        meta["annotations"] = annotations
    return meta


# ------------------------------------------------------------------------------------- EnvoyFilters


# spec.ENFORCEMENTS -> the test bed's rate_limit_mode (envoy_config.RATE_LIMIT_MODES).
RATE_LIMIT_MODE = {"per_request": "rls", "quota_push": "rlqs"}


def gateway_http_filters(names: ServiceNames, enforcement: str = spec.DEFAULT_ENFORCEMENT,
                         gateway_name: str = envoy_config.GATEWAY_NAME) -> list[Obj]:
    """The filters the EnvoyFilter inserts before Istio's router: the builders' own, router excluded. With
    quota_push the RLQS server is the rate-limit service's cluster (the same process serves both on its
    gRPC port) and `gateway_name` is the static `gw` part of every bucket id."""
    return [f for f in envoy_config.http_filters(names.ext_proc_cluster, names.ratelimit_cluster, DEFAULT_TIMEOUTS,
                                                 rate_limit_mode=RATE_LIMIT_MODE[enforcement],
                                                 gateway_name=gateway_name)
            if f["name"] != ROUTER_FILTER]


def gateway_upstream_tls(cluster: str, tls: spec.ServicesTls) -> envoy_config.UpstreamTlsSds:
    """The gateway's TLS to one of our services: certificates from the gateway_secret in the gateway's own
    namespace, served by Istio's gateway SDS (credentialName's convention), the Service's FQDN as SNI and SAN."""
    return envoy_config.UpstreamTlsSds(
        server_name=cluster, validation_secret=f"kubernetes://{tls.gateway_secret}-cacert",
        certificate_secret=f"kubernetes://{tls.gateway_secret}" if tls.mutual else "")


def gateway_clusters(names: ServiceNames, tls: spec.ServicesTls | None = None,
                     enforcement: str = spec.DEFAULT_ENFORCEMENT) -> list[Obj]:
    # With quota_push the rate-limit cluster health-checks the RLQS service, as the test bed's RLQS cluster does.
    limiter_health = RLQS_HEALTH_SERVICE if enforcement == "quota_push" else ""
    return [
        envoy_config.service_cluster(
            cluster, [Endpoint(cluster, port)], discovery="STRICT_DNS", timeouts=DEFAULT_TIMEOUTS,
            tls=None if tls is None else gateway_upstream_tls(cluster, tls), grpc_health_service=health)
        for cluster, port, health in ((names.ext_proc_cluster, EXT_PROC_GRPC_PORT, ""),
                                      (names.ratelimit_cluster, RATELIMIT_GRPC_PORT, limiter_health))
    ]


def _filter_chain_match(sub_filter: str | None = None) -> Obj:
    filt: Obj = {"name": HCM_FILTER}
    if sub_filter:
        filt["subFilter"] = {"name": sub_filter}
    return {"context": "GATEWAY", "listener": {"filterChain": {"filter": filt}}}


def gateway_envoy_filter(name: str, namespace: str, selector: dict[str, str], hosts: tuple[str, ...], port: int,
                         names: ServiceNames, tls: spec.ServicesTls | None = None,
                         enforcement: str = spec.DEFAULT_ENFORCEMENT,
                         gateway_name: str = envoy_config.GATEWAY_NAME) -> Obj:
    patches: list[Obj] = [
        # Each INSERT_BEFORE router lands just before the router: ext_proc, then the rate-limit (per_request)
        # or rate-limit quota (quota_push) filter, then router.
        {"applyTo": "HTTP_FILTER", "match": _filter_chain_match(ROUTER_FILTER),
         "patch": {"operation": "INSERT_BEFORE", "value": f}}
        for f in gateway_http_filters(names, enforcement, gateway_name)
    ]
    # The replies Envoy makes itself as JSON errors, as on the test bed; they belong with ext_proc, whose
    # failures they answer and whose own refusals they let through.
    patches.append({"applyTo": "NETWORK_FILTER", "match": _filter_chain_match(),
                    "patch": {"operation": "MERGE", "value": {"typed_config": {
                        "@type": HCM_TYPE, "local_reply_config": envoy_config.local_reply_config()}}}})
    patches += [{"applyTo": "CLUSTER", "match": {"context": "GATEWAY"}, "patch": {"operation": "ADD", "value": c}}
                for c in gateway_clusters(names, tls, enforcement)]
    if enforcement == "quota_push":
        # The quota filter builds its bucket ids from the x-igw-* headers itself: no route actions to send.
        return _envoy_filter(name, namespace, selector, patches)
    patches += [
        {"applyTo": "VIRTUAL_HOST",
         "match": {"context": "GATEWAY",
                   "routeConfiguration": {"portNumber": port, "vhost": {"name": f"{host}:{port}"}}},
         "patch": {"operation": "MERGE", "value": {"rate_limits": envoy_config.route_rate_limits()}}}
        for host in hosts
    ]
    return _envoy_filter(name, namespace, selector, patches)


def _envoy_filter(name: str, namespace: str, selector: dict[str, str], patches: list[Obj]) -> Obj:
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": _meta(name, namespace),
            "spec": {"workloadSelector": {"labels": dict(selector)}, "configPatches": patches}}


def access_log_envoy_filter(name: str, namespace: str, selector: dict[str, str]) -> Obj:
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": _meta(name, namespace),
            "spec": {"workloadSelector": {"labels": dict(selector)}, "configPatches": [{
                "applyTo": "NETWORK_FILTER", "match": _filter_chain_match(),
                "patch": {"operation": "MERGE", "value": {"typed_config": {
                    "@type": HCM_TYPE, "access_log": envoy_config.access_log("/dev/stdout")}}},
            }]}}


# -------------------------------------------------------------------------------- network policies


def gateway_peers(policy: spec.Policy) -> list[Obj]:
    """Every gateway's pods (the shared one's and each dedicated one's) as NetworkPolicy peers: namespace and
    pod labels both, so a pod elsewhere that copies a gateway's labels is still not one."""
    gateways = [(policy.gateway.namespace, policy.gateway.selector),
                *((gw.namespace, gw.selector) for gw in policy.dedicated_gateways.values())]
    return [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}},
             "podSelector": {"matchLabels": dict(selector)}} for ns, selector in gateways]


def _tcp_ports(*ports: int) -> list[Obj]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _network_policy(name: str, namespace: str, pod_selector: Obj, ingress: list[Obj]) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, namespace),
            "spec": {"podSelector": pod_selector, "policyTypes": ["Ingress"], "ingress": ingress}}


def service_network_policy(name: str, namespace: str, labels: dict[str, str], grpc_port: int, admin_port: int,
                           peers: list[Obj]) -> Obj:
    """Only the gateways may open gRPC streams to ext_proc or the rate-limit service: another caller could probe
    API keys, read tenants' remaining quota or spend it. The admin port stays open to all: it answers probes
    and /metrics only, and a scraper's namespace is the operator's choice."""
    return _network_policy(name, namespace, {"matchLabels": dict(labels)},
                           [{"from": peers, "ports": _tcp_ports(grpc_port)}, {"ports": _tcp_ports(admin_port)}])


def model_network_policies(policy: spec.Policy) -> list[Obj]:
    """One per model namespace: model pods (labelled igw.ai/model) accept connections from the gateways only.
    They run without sidecars and trust the x-igw-* headers ext_proc sets, so any pod reaching them directly
    would bypass authentication and rate limits, and could forge those headers."""
    peers = gateway_peers(policy)
    selector = {"matchExpressions": [{"key": MODEL_LABEL, "operator": "Exists"}]}
    # namespace -> its models' container ports; None once one model there has no rendered Deployment: a model
    # deployed elsewhere may listen on any port behind its Service, so then only the callers are restricted.
    ports: dict[str, set[int] | None] = {}
    for m in policy.models.values():
        known = ports.setdefault(m.namespace, set())
        if known is not None:
            ports[m.namespace] = None if m.deployment is None else known | {m.deployment.container_port}
    out = []
    for ns, known in sorted(ports.items()):
        rule: Obj = {"from": peers}
        if known is not None:
            rule["ports"] = _tcp_ports(*sorted(known))
        out.append(_network_policy(MODELS_NETWORK_POLICY, ns, selector, [rule]))
    return out


# ------------------------------------------------------------------------------ gateways and routes


def _gateway(name: str, namespace: str, selector: dict[str, str], hosts: tuple[str, ...], port: int) -> Obj:
    return {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": _meta(name, namespace),
            "spec": {"selector": dict(selector),
                     "servers": [{"port": {"number": port, "name": "http", "protocol": "HTTP"}, "hosts": list(hosts)}]}}


def _tenant_regex(tenants: list[str]) -> str:
    return "^(" + "|".join(re.escape(t) for t in sorted(tenants)) + ")$"


def model_http_route(model: spec.Model, *, only_tenants: list[str] | None = None,
                     not_tenants: list[str] | None = None) -> Obj:
    """The test bed's model route (envoy_config.model_route) in VirtualService terms."""
    local = envoy_config.model_route(model.name)["route"]
    retry = local["retry_policy"]
    match: Obj = {"headers": {MODEL_HEADER: {"exact": model.name}}}
    if only_tenants:
        match["headers"][TENANT_HEADER] = {"regex": _tenant_regex(only_tenants)}
    if not_tenants:
        match["withoutHeaders"] = {TENANT_HEADER: {"regex": _tenant_regex(not_tenants)}}
    return {
        "name": f"model-{model.name}",
        "match": [match],
        "route": [{"destination": {"host": model.host, "port": {"number": model.port}}}],
        "timeout": local["timeout"],
        "retries": {"attempts": retry["num_retries"], "retryOn": retry["retry_on"],
                    "retryIgnorePreviousHosts": True},
    }


def _virtual_services(name: str, namespace: str, gateway_ref: str, hosts: tuple[str, ...],
                      routes: list[Obj]) -> list[Obj]:
    chunks: list[list[Obj]] = [[]]
    size = 0
    for route in routes:
        route_size = len(yaml.dump(route, Dumper=_DUMPER))
        if chunks[-1] and size + route_size > ROUTES_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(route)
        size += route_size
    return [{"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
             "metadata": _meta(name if len(chunks) == 1 else f"{name}-{i:03d}", namespace),
             "spec": {"hosts": list(hosts), "gateways": [gateway_ref], "http": chunk}}
            for i, chunk in enumerate(chunks) if chunk]


def _model_idle_timeout(cluster: Obj) -> str:
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    return str(options["common_http_protocol_options"]["idle_timeout"])


def destination_rule(model: spec.Model) -> Obj:
    """Traffic policy of a model's Service, from the test bed's model cluster (envoy_config.model_cluster)."""
    local = envoy_config.model_cluster(model.name, [Endpoint(model.host, model.port)], discovery="STRICT_DNS")
    od = local["outlier_detection"]
    pool = model.connection_pool
    return {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": _meta(model.service, model.namespace, {MODEL_LABEL: _label_value(model.name)}),
        "spec": {"host": model.host, "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_REQUEST"},
            "connectionPool": {
                "tcp": {"maxConnections": pool.max_connections, "connectTimeout": local["connect_timeout"]},
                "http": {"http1MaxPendingRequests": pool.max_pending_requests, "http2MaxRequests": pool.max_requests,
                         "maxRetries": local["circuit_breakers"]["thresholds"][0]["max_retries"],
                         # The gateway closes idle model connections before the model server's keep-alive
                         # timeout does (uvicorn: 5 s), as the bed's cluster: see envoy_config.Timeouts.
                         "idleTimeout": _model_idle_timeout(local)},
            },
            "outlierDetection": {
                "splitExternalLocalOriginErrors": od["split_external_local_origin_errors"],
                "consecutiveLocalOriginFailures": od["consecutive_local_origin_failure"],
                "consecutiveGatewayErrors": od["consecutive_gateway_failure"],
                "consecutive5xxErrors": od["consecutive_5xx"],
                "interval": od["interval"],
                "baseEjectionTime": od["base_ejection_time"],
                "maxEjectionPercent": od["max_ejection_percent"],
                # Istio's minHealthPercent is Envoy's healthy_panic_threshold: never route to ejected hosts.
                "minHealthPercent": int(local["common_lb_config"]["healthy_panic_threshold"]["value"]),
            },
            # Model pods run without sidecars: plain HTTP.
            "tls": {"mode": "DISABLE"},
        }},
    }


def _label_value(text: str) -> str:
    """Model names allow characters label values do not (':', '/', '@'): replace them."""
    value = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:63]
    return value.strip("._-") or "model"


# ---------------------------------------------------------------------------------- workloads


def _security_context() -> Obj:
    # Everything Pod Security's "restricted" level asks of a container (seccomp included), so the pods are
    # admitted in namespaces that enforce it.
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": 65534, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _http_probe(path: str, port: int, period: int, failures: int) -> Obj:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 1,
            "failureThreshold": failures}


def _deployment(name: str, namespace: str, labels: dict[str, str], replicas: int | None, container: Obj,
                service_account: str | None = None, volumes: list[Obj] | None = None,
                pod_annotations: dict[str, str] | None = None, spread: bool = True,
                grace_seconds: int = 30) -> Obj:
    pod_spec: Obj = {"containers": [container], "terminationGracePeriodSeconds": grace_seconds}
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if volumes:
        pod_spec["volumes"] = volumes
    if spread:
        # Across zones first (a zone outage must not take every replica), then nodes. ScheduleAnyway: a
        # single-zone cluster, or nodes without the label, only lose the preference.
        pod_spec["topologySpreadConstraints"] = [{
            "maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(labels)}}
            for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")]
    template_meta: Obj = {"labels": {LABEL_PART: "igw", **labels}}
    if pod_annotations:
        template_meta["annotations"] = pod_annotations
    # replicas None: an HPA owns the count. Rendering one would make every `kubectl apply` (server-side with
    # --force-conflicts, or a GitOps sync) reset the HPA's scale; the first rollout starts at Kubernetes' default
    # of 1 and the HPA raises it to its minReplicas at its next sync.
    dep_spec: Obj = {} if replicas is None else {"replicas": replicas}
    dep_spec.update({"selector": {"matchLabels": dict(labels)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": {"metadata": template_meta, "spec": pod_spec}})
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, namespace, labels),
            "spec": dep_spec}


def _resources(svc: spec.ServiceSpec) -> Obj:
    return {"requests": {"cpu": svc.cpu, "memory": svc.memory}, "limits": {"memory": svc.memory}}


def _service(name: str, namespace: str, selector: dict[str, str], ports: list[Obj], *, headless: bool = False,
             labels: dict[str, str] | None = None, kind: str | None = None) -> Obj:
    svc_spec: Obj = {"selector": dict(selector), "ports": ports}
    if headless:
        svc_spec["clusterIP"] = "None"
    if kind:
        svc_spec["type"] = kind
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace, labels), "spec": svc_spec}


def _port(name: str, port: int, app_protocol: str, target: int | None = None) -> Obj:
    out: Obj = {"name": name, "port": port, "targetPort": target or port, "protocol": "TCP",
                "appProtocol": app_protocol}
    return out


def _hpa(name: str, namespace: str, low: int, high: int, cpu_percent: int = 70) -> Obj:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(name, namespace),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": low, "maxReplicas": high,
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu_percent}}}]}}


def _pdb(name: str, namespace: str, labels: dict[str, str]) -> Obj:
    # maxUnavailable 1 (not minAvailable): a drain always progresses, and with 2+ replicas one stays up.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, namespace),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(labels)}}}


def _service_account(name: str, namespace: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, namespace),
            "automountServiceAccountToken": False}


def _container(name: str, image: str, args: list[str], ports: list[tuple[str, int]], svc: spec.ServiceSpec,
               health_port: int, env: list[Obj] | None = None) -> Obj:
    container: Obj = {
        "name": name, "image": image, "args": args,
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        "resources": _resources(svc),
        "securityContext": _security_context(),
        # Readiness follows the dependencies (/healthcheck); startup and liveness only the process (/livez,
        # igw/http_admin.py): a Redis or API-server outage must take pods out of rotation, not restart them.
        "startupProbe": _http_probe("/livez", health_port, 1, 60),
        "readinessProbe": _http_probe("/healthcheck", health_port, 2, 2),
        "livenessProbe": _http_probe("/livez", health_port, 10, 6),
    }
    if env:
        container["env"] = env
    return container


def _tls_volume(tls: spec.ServicesTls) -> Obj:
    # Only the keys used, listed: a Secret missing one (ca.crt with mutual) keeps the pod from starting
    # instead of serving without the client check.
    keys = ["tls.crt", "tls.key", *(["ca.crt"] if tls.mutual else [])]
    return {"name": "tls", "secret": {"secretName": tls.server_secret,
                                      "items": [{"key": k, "path": k} for k in keys]}}


def _tls_env(tls: spec.ServicesTls) -> list[Obj]:
    """The services' gRPC TLS settings (upstream envoyproxy/ratelimit's names, read by both services)."""
    env = [{"name": "GRPC_SERVER_USE_TLS", "value": "true"},
           {"name": "GRPC_SERVER_TLS_CERT", "value": f"{TLS_DIR}/tls.crt"},
           {"name": "GRPC_SERVER_TLS_KEY", "value": f"{TLS_DIR}/tls.key"}]
    if tls.mutual:
        env.append({"name": "GRPC_CLIENT_TLS_CACERT", "value": f"{TLS_DIR}/ca.crt"})
        if tls.client_san:
            env.append({"name": "GRPC_CLIENT_TLS_SAN", "value": tls.client_san})
    return env


def _with_tls(container: Obj, volumes: list[Obj], tls: spec.ServicesTls | None) -> None:
    """Serve the container's gRPC port over TLS; its probes stay on the plain HTTP admin port."""
    if tls is None:
        return
    container.setdefault("env", []).extend(_tls_env(tls))
    container.setdefault("volumeMounts", []).append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    volumes.append(_tls_volume(tls))


def service_objects(policy: spec.Policy, config_maps: list[str]) -> list[Obj]:
    """ext_proc, the rate-limit service and the replica watcher, in the services namespace."""
    s = policy.services
    ns = s.namespace
    redis_env = [{"name": "REDIS_URL", "value": s.redis_url}]
    peers = gateway_peers(policy)
    objects: list[Obj] = []

    ext_labels = {"app": "ext-proc"}
    ext_container = _container(
        "ext-proc", s.image,
        ["python", "-m", "ext_proc", "--host", "0.0.0.0", "--grpc-port", str(EXT_PROC_GRPC_PORT),
         "--http-port", str(EXT_PROC_HTTP_PORT), "--drain-seconds", str(service_drain_seconds())],
        [("grpc", EXT_PROC_GRPC_PORT), ("http-admin", EXT_PROC_HTTP_PORT)], s.ext_proc, EXT_PROC_HTTP_PORT,
        [*redis_env, {"name": "IGW_KEY_SECRET", "valueFrom": {"secretKeyRef": {
            "name": "igw-key-secret", "key": "secret"}}}])
    ext_volumes: list[Obj] = []
    _with_tls(ext_container, ext_volumes, s.tls)
    objects += [
        _service_account("ext-proc", ns),
        _deployment("ext-proc", ns, ext_labels, None, ext_container, "ext-proc", ext_volumes,
                    grace_seconds=service_grace_seconds()),
        _service("ext-proc", ns, ext_labels, [_port("grpc", EXT_PROC_GRPC_PORT, "grpc"),
                                              _port("http-admin", EXT_PROC_HTTP_PORT, "http")], headless=True),
        _hpa("ext-proc", ns, s.ext_proc.replicas, s.ext_proc.max_replicas),
        _pdb("ext-proc", ns, ext_labels),
        service_network_policy("ext-proc", ns, ext_labels, EXT_PROC_GRPC_PORT, EXT_PROC_HTTP_PORT, peers),
    ]

    rl_labels = {"app": "ratelimit"}
    volume = {"name": "config", "projected": {"sources": [{"configMap": {"name": n}} for n in config_maps]}}
    rl_container = _container(
        "ratelimit", s.image,
        # Metrics are scraped from /metrics on the admin port: no statsd, which nothing in the pod receives.
        ["python", "-m", "ratelimit_svc", "--config-dir", RATELIMIT_CONFIG_DIR, "--merge-domain-config",
         "--host", "0.0.0.0", "--grpc-port", str(RATELIMIT_GRPC_PORT), "--http-port", str(RATELIMIT_HTTP_PORT),
         "--use-statsd", "false", "--drain-seconds", str(service_drain_seconds())],
        [("grpc", RATELIMIT_GRPC_PORT), ("http-admin", RATELIMIT_HTTP_PORT)], s.ratelimit, RATELIMIT_HTTP_PORT,
        [*redis_env, *([{"name": "REDIS_SHARDS", "value": ",".join(s.redis_shards)}] if s.redis_shards else [])])
    # The directory is watched for changes: a ConfigMap update swaps its symlink and the service reloads.
    rl_container["volumeMounts"] = [{"name": "config", "mountPath": RATELIMIT_CONFIG_DIR, "readOnly": True}]
    rl_volumes = [volume]
    _with_tls(rl_container, rl_volumes, s.tls)
    objects += [
        _service_account("ratelimit", ns),
        _deployment("ratelimit", ns, rl_labels, None, rl_container, "ratelimit", rl_volumes,
                    grace_seconds=service_grace_seconds()),
        _service("ratelimit", ns, rl_labels, [_port("grpc", RATELIMIT_GRPC_PORT, "grpc"),
                                              _port("http-admin", RATELIMIT_HTTP_PORT, "http")], headless=True),
        _hpa("ratelimit", ns, s.ratelimit.replicas, s.ratelimit.max_replicas),
        _pdb("ratelimit", ns, rl_labels),
        service_network_policy("ratelimit", ns, rl_labels, RATELIMIT_GRPC_PORT, RATELIMIT_HTTP_PORT, peers),
    ]

    w_labels = {"app": "replica-watcher"}
    watcher_sa = _service_account("replica-watcher", ns)
    watcher_sa["automountServiceAccountToken"] = True  # it talks to the API server
    objects += [
        watcher_sa,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta("igw-replica-watcher"),
         "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta("igw-replica-watcher"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "igw-replica-watcher"},
         "subjects": [{"kind": "ServiceAccount", "name": "replica-watcher", "namespace": ns}]},
        _deployment("replica-watcher", ns, w_labels, s.replica_watcher.replicas, _container(
            "replica-watcher", s.image,
            ["python", "-m", "igw.cli", "replicas", "watch", "--in-cluster", "--selector", MODEL_LABEL,
             "--http-port", str(WATCHER_HTTP_PORT)],
            [("http-admin", WATCHER_HTTP_PORT)], s.replica_watcher, WATCHER_HTTP_PORT,
            [*redis_env, {"name": "IGW_REPLICAS_PUBLISHER",
                          "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]), "replica-watcher"),
        _service("replica-watcher", ns, w_labels, [_port("http-admin", WATCHER_HTTP_PORT, "http")]),
        _pdb("replica-watcher", ns, w_labels),
    ]
    return objects


def _seconds(duration: str) -> float:
    """An Envoy Duration as envoy_config.duration writes it ('0.5s')."""
    return float(duration.removesuffix("s"))


def service_drain_seconds() -> int:
    """--drain-seconds of ext_proc and the rate-limit service. A terminating pod leaves its headless Service's
    DNS, but a STRICT_DNS cluster keeps a host gone from discovery for as long as its active health checks
    pass, so a gateway sends the pod new calls until the checks have failed it. Envoy takes a NOT_SERVING
    answer at once, but a probe that times out (a pod too busy to answer) counts only towards the unhealthy
    threshold: so interval x threshold, plus one probe's timeout. Read from the cluster the gateways get
    (envoy_config.service_cluster), so a change of interval or threshold there moves the drain with it."""
    cluster = envoy_config.service_cluster("drain", [Endpoint("drain", 1)], discovery="STRICT_DNS")
    (check,) = cluster["health_checks"]
    detection = _seconds(check["interval"]) * check["unhealthy_threshold"] + _seconds(check["timeout"])
    return math.ceil(detection) + SERVICE_DRAIN_MARGIN_SECONDS


def service_grace_seconds() -> int:
    """terminationGracePeriodSeconds of ext_proc and the rate-limit service: the drain, then the calls in
    flight when it ends (Envoy gives the longest, one ext_proc message, at most ext_proc_max_message), plus
    margin for the process's own stop. Shorter, Kubernetes would SIGKILL a pod still answering calls."""
    longest_call = max(DEFAULT_TIMEOUTS.ext_proc_max_message, DEFAULT_TIMEOUTS.ratelimit)
    return service_drain_seconds() + math.ceil(longest_call) + DRAIN_MARGIN_SECONDS


def longest_request_seconds(policy: spec.Policy) -> int:
    """The longest a request may hold a model replica or a gateway: the route timeout, or a tenant's own
    timeout (ext_proc sets x-envoy-upstream-rq-timeout-ms), the policy's tenants' or any tier's (tenants
    created outside the policy get their tier's)."""
    longest_ms = max([int(DEFAULT_TIMEOUTS.route * 1000), *(t.timeout_ms for t in TIERS.values()),
                      *(t.timeout_ms for t in policy.tenants.values())])
    return -(-longest_ms // 1000)


def model_grace_seconds(policy: spec.Policy) -> int:
    """terminationGracePeriodSeconds of a model pod: it covers the preStop sleep and then the requests in flight
    when SIGTERM arrives; a shorter grace would SIGKILL a replica in the middle of an answer."""
    return PRESTOP_SLEEP_SECONDS + longest_request_seconds(policy) + DRAIN_MARGIN_SECONDS


def model_objects(model: spec.Model, grace_seconds: int) -> list[Obj]:
    objects = [destination_rule(model)]
    dep = model.deployment
    if dep is None:
        return objects
    labels = {"app": model.service, MODEL_LABEL: _label_value(model.name)}
    container: Obj = {
        "name": "model", "image": dep.image, "args": list(dep.args),
        "ports": [{"name": "http", "containerPort": dep.container_port, "protocol": "TCP"}],
        "securityContext": _security_context(),
        # Pre-warm hook: the startup probe holds the pod out of the Service (and out of the ready
        # replica count that sizes quotas) until `prewarm_path` answers 200, for up to startup_seconds.
        "startupProbe": _http_probe(dep.prewarm_path, dep.container_port, 2, max(1, dep.startup_seconds // 2)),
        # Then readiness follows the model's own health, at the test bed's health-check interval.
        "readinessProbe": _http_probe(envoy_config.MODEL_READY_PATH, dep.container_port,
                                      max(1, int(DEFAULT_TIMEOUTS.health_interval)), 2),
        "livenessProbe": {"tcpSocket": {"port": dep.container_port}, "periodSeconds": 10, "failureThreshold": 6},
        # Keep serving while the gateways learn the pod is going (it left the EndpointSlice when it turned
        # terminating); only then does SIGTERM make the server close its port and finish what it holds.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
    }
    placement = dep.placement
    resources = {side: dict(values) for side, values in (("requests", placement.requests),
                                                         ("limits", placement.limits)) if values}
    if resources:  # none: BestEffort, as the policy asked (spec.Placement)
        container["resources"] = resources
    deployment = _deployment(model.service, model.namespace, labels, dep.replicas, container,
                             grace_seconds=grace_seconds)
    pod_spec = deployment["spec"]["template"]["spec"]
    if placement.node_selector:
        pod_spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod_spec["tolerations"] = [_toleration(t) for t in placement.tolerations]
    # Model servers never call the API server: no token in the pod (they run as the namespace's default account).
    deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] = False
    objects.append(deployment)
    # The Service carries the model label: EndpointSlices inherit it and the replica watcher selects on it.
    objects.append(_service(model.service, model.namespace, {"app": model.service},
                            [_port("http", model.port, "http", dep.container_port)], labels=labels))
    # A node drain takes one replica at a time, so a model keeps serving while its nodes are replaced.
    objects.append(_pdb(model.service, model.namespace, labels))
    return objects


def _toleration(t: spec.Toleration) -> Obj:
    out: Obj = {"key": t.key} if t.key else {}
    out["operator"] = t.operator
    if t.value:
        out["value"] = t.value
    if t.effect:
        out["effect"] = t.effect
    if t.seconds is not None:
        out["tolerationSeconds"] = t.seconds
    return out


def namespace(name: str, labels: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, labels=labels)}


def dedicated_gateway_objects(policy: spec.Policy, gw: spec.DedicatedGateway, names: ServiceNames) -> list[Obj]:
    """A gateway of its own (Istio's gateway injection template) with the same filters, for its tenants."""
    ns = gw.namespace
    labels = {"istio": gw.name, "app": gw.name}
    container = {"name": "istio-proxy", "image": "auto",  # the injector fills in the proxy
                 "ports": [{"name": "http", "containerPort": GATEWAY_CONTAINER_PORT, "protocol": "TCP"}],
                 "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                     "capabilities": {"drop": ["ALL"]}}}
    # On SIGTERM the proxy drains its listeners, then exits after terminationDrainDuration (Istio's default 5 s
    # would cut inference requests at every rollout or scale-down): let the longest request finish first.
    drain = longest_request_seconds(policy)
    deployment = _deployment(gw.name, ns, labels, None, container, gw.name,  # the HPA's below
                             pod_annotations={"inject.istio.io/templates": "gateway",
                                              "proxy.istio.io/config": f"terminationDrainDuration: {drain}s"},
                             grace_seconds=drain + DRAIN_MARGIN_SECONDS)
    deployment["spec"]["template"]["metadata"]["labels"].update(_injection_labels(gw.istio_revision))
    sa = _service_account(gw.name, ns)
    sa["automountServiceAccountToken"] = True
    tenants = [t.id for t in policy.tenants_of_gateway(gw.name)]
    allowed = {m for t in tenants for m in policy.allowed[t]}
    routes = [model_http_route(m, only_tenants=tenants) for m in policy.models.values() if m.name in allowed]
    return [
        namespace(ns, {"igw.ai/role": "dedicated-gateway"}),
        sa,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(gw.name, ns),
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(gw.name, ns),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": gw.name},
         "subjects": [{"kind": "ServiceAccount", "name": gw.name}]},
        deployment,
        _service(gw.name, ns, labels, [_port("http", gw.port, "http", GATEWAY_CONTAINER_PORT)], kind="LoadBalancer"),
        _hpa(gw.name, ns, gw.replicas, gw.max_replicas, 80),
        _pdb(gw.name, ns, labels),
        _gateway(gw.name, ns, labels_selector(gw), gw.hosts, gw.port),
        *_virtual_services(gw.name, ns, f"{ns}/{gw.name}", gw.hosts, routes),
        gateway_envoy_filter(f"{gw.name}-igw", ns, labels_selector(gw), gw.hosts, gw.port, names,
                             policy.services.tls, gw.enforcement, gw.name),
        access_log_envoy_filter(f"{gw.name}-igw-access-log", ns, labels_selector(gw)),
    ]


def _injection_labels(revision: str | None) -> dict[str, str]:
    """Pod labels that make Istio's injector fill in a dedicated gateway's proxy. sidecar.istio.io/inject needs a
    default revision (or the `default` tag); a revisioned install with neither (canary upgrades) only injects
    pods labelled istio.io/rev with one of its revisions or tags, and then ignores sidecar.istio.io/inject."""
    return {"sidecar.istio.io/inject": "true"} if revision is None else {"istio.io/rev": revision}


def labels_selector(gw: spec.DedicatedGateway) -> dict[str, str]:
    return gw.selector


# ---------------------------------------------------------------------------------------- render


def render(policy: spec.Policy) -> dict[str, list[Obj]]:
    """File name -> objects, for `igw render istio`. Deterministic: same policy, same bytes."""
    names = ServiceNames(policy.services.namespace)
    g = policy.gateway
    shards = ratelimit.render_shards(policy)
    config_maps = []
    cm_objects = []
    for i, (file_name, text) in enumerate(sorted(shards.items())):
        cm_name = f"ratelimit-config-{i:03d}"
        config_maps.append(cm_name)
        cm_objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": _meta(cm_name, policy.services.namespace), "data": {file_name: text}})

    model_namespaces = sorted({m.namespace for m in policy.models.values()})
    namespaces = [namespace(policy.services.namespace, {"istio-injection": "disabled", "igw.ai/role": "services"})]
    namespaces += [namespace(ns, {"istio-injection": "disabled", "igw.ai/role": "models"})
                   for ns in model_namespaces if ns != policy.services.namespace]

    dedicated = sorted({t.id for t in policy.tenants.values() if t.gateway})
    # Every model gets a shared route, also one only dedicated tenants may call: tenants created outside
    # the policy may call any model; the withoutHeaders match keeps dedicated tenants off the shared one.
    routes = [model_http_route(m, not_tenants=dedicated or None) for m in policy.models.values()]
    gateway_objects = [
        _gateway(g.name, policy.services.namespace, g.selector, g.hosts, g.port),
        gateway_envoy_filter("igw-gateway", g.namespace, g.selector, g.hosts, g.port, names, policy.services.tls,
                             g.enforcement, g.name),
        access_log_envoy_filter("igw-gateway-access-log", g.namespace, g.selector),
    ]
    model_grace = model_grace_seconds(policy)
    files = {
        "00-namespaces.yaml": namespaces,
        "10-services.yaml": service_objects(policy, config_maps),
        "11-ratelimit-config.yaml": cm_objects,
        "20-gateway.yaml": gateway_objects,
        "21-virtual-services.yaml": _virtual_services(g.name, policy.services.namespace,
                                                      f"{policy.services.namespace}/{g.name}", g.hosts, routes),
        "30-models.yaml": [*(o for m in policy.models.values() for o in model_objects(m, model_grace)),
                           *model_network_policies(policy)],
    }
    for gw in policy.dedicated_gateways.values():
        files[f"40-dedicated-{gw.name}.yaml"] = dedicated_gateway_objects(policy, gw, names)
    return files


HEADER = ("# Generated by `igw render istio --policy {policy}` from igw/policy/istio.py and igw/envoy_config.py.\n"
          "# Do not edit: tests/istio/test_render.py fails when this file and a fresh render differ.\n")


def dump(objects: list[Obj]) -> str:
    return "".join("---\n" + yaml.dump(o, Dumper=_DUMPER, sort_keys=False, default_flow_style=False, width=120)
                   for o in objects)


def render_text(policy: spec.Policy, policy_name: str | None = None) -> dict[str, str]:
    header = HEADER.format(policy=policy_name or policy.file)
    return {name: header + dump(objects) for name, objects in render(policy).items()}
