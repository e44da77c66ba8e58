"""A minimal gateway for quota-push tests: the real Envoy with the rate_limit_quota filter (built by
igw.envoy_quota, as the test bed and Istio use it) answering 200 itself, and an open-loop load
generator that offers a fixed rate and counts what Envoy admitted."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from igw.envoy_config import HCM_TYPE, router_filter, service_cluster
from igw.envoy_quota import RLQS_CLUSTER, RLQS_HEALTH_SERVICE, rate_limit_quota_filter
from igw.gateway_client import Request, offer_many
from igw.procs import VENV_BIN, ManagedProcess, free_port, http_ok
from igw.topology import Endpoint


def quota_bootstrap(gateway: str, listen_port: int, admin_port: int, rlqs_port: int) -> dict:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "quota",
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
        }]},
        "http_filters": [rate_limit_quota_filter(gateway), router_filter()],
    }
    return {
        "node": {"id": gateway, "cluster": "quota-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "gw",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [service_cluster(RLQS_CLUSTER, [Endpoint("127.0.0.1", rlqs_port)],
                                         grpc_health_service=RLQS_HEALTH_SERVICE)],
        },
    }


@dataclass
class QuotaGateway:
    proc: ManagedProcess
    url: str
    admin: str

    def stop(self) -> None:
        self.proc.stop()


def start_gateway(name: str, rlqs_port: int, work: Path, log_dir: Path) -> QuotaGateway:
    listen, admin = free_port(), free_port()
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(quota_bootstrap(name, listen, admin, rlqs_port), sort_keys=False))
    proc = ManagedProcess(name, [str(VENV_BIN / "envoy"), "-c", str(path), "--concurrency", "1",
                                 "--base-id", str(listen), "-l", "warning"], log_dir=log_dir).start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
    return QuotaGateway(proc, f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}")


def offer_load(targets: list[tuple[str, dict[str, str]]], rate: float, seconds: float,
               bin_s: float = 1.0) -> list[Counter[tuple[int, int]]]:
    """Offer `rate` requests/s to each target for `seconds` (open loop, igw.gateway_client); per target,
    (bin of send time, status) -> count."""
    start = time.time()
    requests = [Request("GET", url, headers) for url, headers in targets]
    per_target = offer_many(requests, rate=rate, seconds=seconds, timeout=5)
    return [Counter((int((r.sent_at - start) / bin_s), r.status) for r in results) for results in per_target]


def admitted_per_bin(bins: Counter[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for (b, status), count in bins.items():
        if status == 200:
            out[b] = out.get(b, 0) + count
        else:
            out.setdefault(b, 0)
    return dict(sorted(out.items()))


def statuses(bins: Counter[tuple[int, int]]) -> Counter[int]:
    out: Counter[int] = Counter()
    for (_, status), count in bins.items():
        out[status] += count
    return out
