"""Upstream's own example, end to end: the real Envoy with envoyproxy/ratelimit's example Envoy config
(../shared/compat/envoyproxy-ratelimit/examples/envoy-proxy.yaml, addresses rewritten to loopback) in
front of our service loaded with upstream's example.yaml. Each route must deny exactly where upstream's
documentation of the example says it does."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from igw.procs import VENV_BIN, ManagedProcess, free_port, http_ok
from tests.helpers import ServiceFactory
from tests.ratelimit.envoy_front import ok_backend
from tests.ratelimit.rls_client import avoid_window_edges


class Gateway(NamedTuple):
    url: str
    admin_url: str

    def rls_calls_completed(self) -> int:
        with urllib.request.urlopen(f"{self.admin_url}/stats?filter=^cluster\\.ratelimit\\.upstream_rq_completed$",
                                    timeout=5) as response:
            text = response.read().decode()
        return int(text.split(":")[1]) if ":" in text else 0

    def wait_rls_calls_completed(self, n: int, timeout_s: float = 10.0) -> None:
        """Stream-end usage reports leave Envoy after the response; wait for them rather than for a fixed time."""
        deadline = time.monotonic() + timeout_s
        while self.rls_calls_completed() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"Envoy completed {self.rls_calls_completed()} rate-limit calls, expected {n}")
            time.sleep(0.02)


@pytest.fixture
def upstream_backend() -> Iterator[int]:
    with ok_backend() as port:
        yield port


def _rewrite(config: dict, rls_port: int, backend_port: int, admin_port: int, listener_port: int) -> dict:
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                address["address"] = "127.0.0.1"
                address["port_value"] = rls_port if cluster["name"] == "ratelimit" else backend_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listener_port)
    return config


@pytest.fixture
def gateway(
    services: ServiceFactory, shared_dir: Path, redis_url: str, tmp_path: Path, upstream_backend: int, log_dir: Path
) -> Iterator[Gateway]:
    examples = shared_dir / "compat" / "envoyproxy-ratelimit" / "examples"
    config_dir = tmp_path / "rl"
    config_dir.mkdir()
    (config_dir / "example.yaml").write_text((examples / "example.yaml").read_text())
    rls = services.ratelimit(config_dir, redis_url)
    admin, listener = free_port(), free_port()
    envoy_config = _rewrite(yaml.safe_load((examples / "envoy-proxy.yaml").read_text()),
                            rls.grpc_port, upstream_backend, admin, listener)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_config))
    envoy = ManagedProcess(
        "envoy-upstream-example",
        [str(VENV_BIN / "envoy"), "-c", str(path), "--service-cluster", "proxy", "--concurrency", "1",
         "--base-id", str(listener), "-l", "warning"],
        log_dir=log_dir,
    ).start()
    try:
        envoy.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
        yield Gateway(f"http://127.0.0.1:{listener}", f"http://127.0.0.1:{admin}")
    finally:
        envoy.stop()


def statuses(gateway: Gateway, path: str, n: int, headers: dict[str, str] | None = None,
             rls_calls_per_request: int = 0) -> list[int]:
    """Every limit in the example is per minute: start well clear of a minute boundary so one window holds the run.
    With rls_calls_per_request, each request waits for that many more completed rate-limit calls first."""
    avoid_window_edges(minute_margin_s=3.0)
    out = []
    completed = gateway.rls_calls_completed()
    for _ in range(n):
        request = urllib.request.Request(gateway.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                out.append(response.status)
        except urllib.error.HTTPError as exc:
            out.append(exc.code)
        if rls_calls_per_request:
            completed += rls_calls_per_request
            gateway.wait_rls_calls_completed(completed)
    return out


def test_source_and_destination_cluster_limit(gateway: Gateway) -> None:
    assert statuses(gateway, "/test", 2) == [200, 429]


def test_header_default_limit(gateway: Gateway) -> None:
    assert statuses(gateway, "/header", 3, {"foo": "f1"}) == [200, 200, 429]


def test_nested_value_override(gateway: Gateway) -> None:
    assert statuses(gateway, "/twoheader", 4, {"foo": "f2", "bar": "b"}) == [200, 200, 200, 429]


def test_named_limit_of_zero_denies_at_once(gateway: Gateway) -> None:
    assert statuses(gateway, "/twoheader", 1, {"foo": "f3", "bar": "banned"}) == [429]


def test_shadow_mode_limit_never_denies(gateway: Gateway) -> None:
    assert statuses(gateway, "/twoheader", 5, {"foo": "f4", "baz": "shady"}) == [200] * 5


def test_replaces_lifts_the_replaced_named_limit(gateway: Gateway) -> None:
    # bar=bkthomps alone allows 1/min (named "bkthomps")...
    assert statuses(gateway, "/twoheader", 2, {"foo": "f5", "bar": "bkthomps"}) == [200, 429]
    # ...but category=account (4/min) and proxy->bkthomps (2/min) both replace it: 2 pass, then 429.
    headers = {"foo": "f6", "bar": "bkthomps", "source_cluster": "proxy", "destination_cluster": "bkthomps",
               "category": "account"}
    assert statuses(gateway, "/fiveheader", 3, headers) == [200, 200, 429]


def test_detailed_metric_limit(gateway: Gateway) -> None:
    assert statuses(gateway, "/unspec", 3, {"unspec": "u1"}) == [200, 200, 429]


def test_quota_mode_denies_when_every_quota_descriptor_is_exhausted(gateway: Gateway) -> None:
    assert statuses(gateway, "/quota", 3) == [200, 200, 429]


def test_check_only_descriptor_with_usage_reported_at_stream_end(gateway: Gateway) -> None:
    # hits_addend 0 checks without counting; the +1 is sent when each response completes.
    assert statuses(gateway, "/tokenquota", 4, rls_calls_per_request=2) == [200, 200, 200, 429]
