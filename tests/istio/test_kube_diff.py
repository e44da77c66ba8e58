"""`igw policy diff --kube`: rendered manifests against live objects served by a real HTTP API peer."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from igw.policy import istio
from igw.policy.kube_diff import api_path, compare, differences, kube_fetcher
from igw.policy.load import load_policy_file

DEMO = Path(__file__).resolve().parents[2] / "config" / "policy" / "demo.yaml"


def rendered() -> list[dict]:
    return [o for objs in istio.render(load_policy_file(DEMO)).values() for o in objs]


def live_version(obj: dict) -> dict:
    """What an API server returns: our fields plus server-set ones."""
    live = copy.deepcopy(obj)
    live["metadata"].update(uid="1234", resourceVersion="99", annotations={"kubectl.kubernetes.io/x": "y"})
    live["status"] = {"observedGeneration": 1}
    if live["kind"] == "Deployment":
        live["spec"]["progressDeadlineSeconds"] = 600  # a defaulted field we never render
    return live


@pytest.fixture
def api_server() -> Iterator[tuple[str, dict[str, dict]]]:
    objects: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            obj = objects.get(self.path)
            body = json.dumps(obj if obj is not None else {"kind": "Status", "code": 404}).encode()
            self.send_response(200 if obj is not None else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", objects
    server.shutdown()


def test_api_paths_follow_group_version_namespace_and_plural() -> None:
    paths = {api_path(o) for o in rendered()}
    assert "/api/v1/namespaces/models" in paths
    assert any(p.startswith("/apis/networking.istio.io/v1alpha3/namespaces/istio-system/envoyfilters/") for p in paths)
    assert any(p.startswith("/apis/apps/v1/namespaces/igw-system/deployments/") for p in paths)


def test_server_set_fields_are_not_differences() -> None:
    for obj in rendered():
        assert differences(obj, live_version(obj)) == [], obj["kind"]


def deployment(name: str) -> dict:
    return next(o for o in rendered() if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def test_a_changed_rendered_field_is_reported_with_both_values() -> None:
    obj = deployment("replica-watcher")  # no HPA: its replica count is the policy's
    live = live_version(obj)
    live["spec"]["replicas"] = 7
    assert differences(obj, live) == [("spec.replicas", 7, obj["spec"]["replicas"])]


def test_a_deployment_scaled_by_its_hpa_is_not_drift(api_server: tuple[str, dict[str, dict]]) -> None:
    url, objects = api_server
    for obj in rendered():
        objects[api_path(obj)] = live_version(obj)
    objects[api_path(deployment("ext-proc"))]["spec"]["replicas"] = 7  # the HPA scaled it out
    assert compare(rendered(), kube_fetcher(api_server=url)).empty


def test_a_replica_count_rendered_for_an_hpa_target_is_not_compared() -> None:
    # Manifests from before the HPA owned the count (or written by hand) still carry spec.replicas.
    obj = deployment("ext-proc")
    obj["spec"]["replicas"] = 2
    live = live_version(obj)
    live["spec"]["replicas"] = 7
    hpa = next(o for o in rendered() if o["kind"] == "HorizontalPodAutoscaler"
               and o["spec"]["scaleTargetRef"]["name"] == "ext-proc")
    fetched = {api_path(obj): live, api_path(hpa): live_version(hpa)}
    result = compare([obj, hpa], fetched.get)
    assert result.empty and result.same == 2
    assert not compare([obj], fetched.get).empty  # without its HPA the count is the manifest's


def test_cluster_in_sync_has_no_differences(api_server: tuple[str, dict[str, dict]]) -> None:
    url, objects = api_server
    for obj in rendered():
        objects[api_path(obj)] = live_version(obj)
    result = compare(rendered(), kube_fetcher(api_server=url))
    assert result.empty and result.same == len(rendered())


def test_missing_and_changed_objects_are_listed(api_server: tuple[str, dict[str, dict]]) -> None:
    url, objects = api_server
    objs = rendered()
    for obj in objs[1:]:
        objects[api_path(obj)] = live_version(obj)
    gateway = next(o for o in objs if o["kind"] == "Gateway")
    objects[api_path(gateway)]["spec"]["servers"][0]["port"]["number"] = 8081
    result = compare(objs, kube_fetcher(api_server=url))
    lines = result.lines()
    assert lines[0].startswith("+ ") and "not in the cluster" in lines[0]
    assert any(line.startswith("~ Gateway/") for line in lines)
    assert any("spec.servers[0].port.number: 8081 -> 80" in line for line in lines)


def test_cli_diff_against_the_cluster_exits_1_with_exit_code(api_server: tuple[str, dict[str, dict]]) -> None:
    url, _ = api_server
    proc = subprocess.run([sys.executable, "-m", "igw.cli", "policy", "diff", str(DEMO), "--kube",
                           "--api-server", url, "--exit-code"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout.count("not in the cluster") == len(rendered())


def test_cli_diff_needs_something_to_compare() -> None:
    proc = subprocess.run([sys.executable, "-m", "igw.cli", "policy", "diff", str(DEMO)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nothing to compare" in proc.stderr  # a bad argument (cli.py)


def test_cli_reports_an_unreachable_cluster_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "igw.cli", "policy", "diff", str(DEMO), "--kube",
                           "--api-server", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("igw: error: cannot read the cluster")
