"""Apply our EnvoyFilters to a gateway-like Envoy config, the way istiod patches its gateway config.

Used to prove that what the EnvoyFilters inject forms a config the real Envoy accepts
(`envoy --mode validate`): the EnvoyFilter CRD keeps patch values as free-form objects, so its schema
cannot. Only the operations our filters use are implemented (HTTP_FILTER INSERT_BEFORE, CLUSTER ADD,
VIRTUAL_HOST MERGE, NETWORK_FILTER MERGE on the HTTP connection manager), each failing loudly when its
match finds nothing, as a patch that silently applies nowhere would be a bug.

The base stands in for what Istio generates for a gateway: one HTTP listener on the gateway's target
port whose HCM ends in the router, a route configuration named http.<port> with one virtual host per
Gateway host ("<host>:<port>") routing on x-igw-model to each model's outbound cluster, and those
clusters; and, as in Istio's gateway bootstrap, an ADS stream to istiod over the static `xds-grpc`
cluster, which is where SDS secrets with `sds_config: {ads: {}}` (our services.tls certificates) come
from: without it Envoy refuses such a secret config. Pure: returns a bootstrap dict.
"""

from __future__ import annotations

import copy
from typing import Any

from igw import envoy_config
from igw.envoy_config import HCM_TYPE
from igw.policy import spec
from igw.policy.istio import GATEWAY_CONTAINER_PORT, HCM_FILTER

Obj = dict[str, Any]


class PatchError(ValueError):
    pass


XDS_CLUSTER = "xds-grpc"  # Istio's name for the cluster of the proxy's ADS stream
XDS_SOCKET = "./etc/istio/proxy/XDS"  # istio-agent's local xDS proxy


def _xds_cluster() -> Obj:
    return {
        "name": XDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": XDS_SOCKET}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": envoy_config.HTTP_OPTIONS_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}},
    }


def _outbound(model: spec.Model) -> str:
    return f"outbound|{model.port}||{model.host}"


def base_gateway(models: list[spec.Model], hosts: tuple[str, ...], port: int) -> Obj:
    routes = [{"name": f"model-{m.name}",
               "match": {"prefix": "/", "headers": [{"name": envoy_config.MODEL_HEADER,
                                                      "string_match": {"exact": m.name}}]},
               "route": {"cluster": _outbound(m), "timeout": "30s"}} for m in models]
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": f"outbound_0.0.0.0_{GATEWAY_CONTAINER_PORT}",
        "route_config": {"name": f"http.{port}", "virtual_hosts": [
            {"name": f"{host}:{port}", "domains": [host], "routes": copy.deepcopy(routes)} for host in hosts]},
        "http_filters": [envoy_config.router_filter()],
    }
    clusters = [envoy_config.model_cluster(m.name, [envoy_config.Endpoint(m.host, m.port)], discovery="STRICT_DNS")
                | {"name": _outbound(m)} for m in models]
    for cluster in clusters:
        cluster["load_assignment"]["cluster_name"] = cluster["name"]
    return {
        "node": {"id": "router~gateway-check", "cluster": "istio-ingressgateway"},
        "static_resources": {
            "listeners": [{
                "name": f"0.0.0.0_{GATEWAY_CONTAINER_PORT}",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": GATEWAY_CONTAINER_PORT}},
                "filter_chains": [{"filters": [{"name": HCM_FILTER, "typed_config": hcm}]}],
            }],
            "clusters": [*clusters, _xds_cluster()],
        },
        "dynamic_resources": {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]}},
    }


def _merge(target: Obj, value: Obj) -> None:
    """Protobuf merge semantics as istiod applies MERGE: maps merge, lists append, scalars replace."""
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(target.get(key), dict):
            _merge(target[key], item)
        elif isinstance(item, list) and isinstance(target.get(key), list):
            target[key].extend(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(item)


def _hcms(config: Obj) -> list[Obj]:
    return [f["typed_config"] for listener in config["static_resources"]["listeners"]
            for chain in listener["filter_chains"] for f in chain["filters"] if f["name"] == HCM_FILTER]


def apply_envoy_filter(config: Obj, envoy_filter: Obj) -> Obj:
    """A patched copy of `config`."""
    config = copy.deepcopy(config)
    for i, patch in enumerate(envoy_filter["spec"]["configPatches"]):
        apply_to, match, op = patch["applyTo"], patch.get("match", {}), patch["patch"]["operation"]
        value = copy.deepcopy(patch["patch"].get("value", {}))
        where = f"{envoy_filter['metadata']['name']} patch {i} ({apply_to} {op})"
        if match.get("context") not in ("GATEWAY", None):
            raise PatchError(f"{where}: context {match.get('context')} does not apply to a gateway")
        applied = 0
        if apply_to == "HTTP_FILTER" and op == "INSERT_BEFORE":
            sub = match["listener"]["filterChain"]["filter"]["subFilter"]["name"]
            for hcm in _hcms(config):
                names = [f["name"] for f in hcm["http_filters"]]
                if sub in names:
                    hcm["http_filters"].insert(names.index(sub), value)
                    applied += 1
        elif apply_to == "CLUSTER" and op == "ADD":
            config["static_resources"]["clusters"].append(value)
            applied = 1
        elif apply_to == "VIRTUAL_HOST" and op == "MERGE":
            rc = match["routeConfiguration"]
            for hcm in _hcms(config):
                if hcm["route_config"]["name"] != f"http.{rc['portNumber']}":
                    continue
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    if vhost["name"] == rc["vhost"]["name"]:
                        _merge(vhost, value)
                        applied += 1
        elif apply_to == "NETWORK_FILTER" and op == "MERGE":
            for hcm in _hcms(config):
                _merge(hcm, value["typed_config"])
                applied += 1
        else:
            raise PatchError(f"{where}: operation not modelled here")
        if not applied:
            raise PatchError(f"{where}: matched nothing in the gateway config")
    return config


def gateway_bootstrap(policy: spec.Policy, envoy_filters: list[Obj], hosts: tuple[str, ...], port: int) -> Obj:
    config = base_gateway(list(policy.models.values()), hosts, port)
    for envoy_filter in envoy_filters:
        config = apply_envoy_filter(config, envoy_filter)
    return config
