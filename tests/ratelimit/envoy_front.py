"""Envoy 1.40 in front of the rate-limit service for tests that claim gateway behaviour: one listener whose
single route calls the service through Envoy's rate-limit filter, then a tiny local backend answering 200."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from igw.procs import VENV_BIN, ManagedProcess, free_port, http_ok


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def ok_backend() -> Iterator[int]:
    """A backend answering every GET with 200; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def front_config(*, rls_port: int, backend_port: int, admin: int, listener: int, domain: str,
                 rate_limits: list[dict[str, Any]], rls_transport_socket: dict[str, Any] | None = None,
                 access_log_format: str | None = None, access_log: Path | None = None) -> dict[str, Any]:
    ratelimit = _cluster("ratelimit", rls_port)
    ratelimit["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    if rls_transport_socket is not None:
        ratelimit["transport_socket"] = rls_transport_socket
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "in",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"}, "route": {"cluster": "backend", "rate_limits": rate_limits}}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.ratelimit", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": domain, "failure_mode_deny": True, "timeout": "2s",
                "rate_limit_service": {"transport_api_version": "V3",
                                       "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}}}}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if access_log is not None:
        manager["access_log"] = [{"name": "file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log),
            "log_format": {"text_format_source": {"inline_string": access_log_format or "%RESPONSE_CODE%\n"}}}}]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "in",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
                           "filter_chains": [{"filters": [{"name": "hcm", "typed_config": manager}]}]}],
            "clusters": [ratelimit, _cluster("backend", backend_port)]},
    }


@dataclass(frozen=True)
class Front:
    url: str  # the listener, e.g. http://127.0.0.1:PORT


@contextmanager
def envoy_front(tmp_path: Path, log_dir: Path, name: str, *, rls_port: int, backend_port: int,
                **options: Any) -> Iterator[Front]:
    """Run Envoy with front_config(...) until the block ends; options go to front_config."""
    admin, listener = free_port(), free_port()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(front_config(rls_port=rls_port, backend_port=backend_port, admin=admin,
                                                listener=listener, **options)))
    envoy = ManagedProcess(name, [str(VENV_BIN / "envoy"), "-c", str(path), "--concurrency", "1",
                                  "--base-id", str(listener), "-l", "warning"], log_dir=log_dir).start()
    try:
        envoy.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "ready")
        yield Front(f"http://127.0.0.1:{listener}")
    finally:
        envoy.stop()
