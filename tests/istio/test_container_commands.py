"""The services' Deployments run commands our own programs accept: each rendered container's args and its
plain environment go through the parser of the program it starts, as the container would at start-up.
(The rate-limit Deployment once passed `--merge-domain-config` without the value its flag then required,
and schema checks cannot see that.)"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from ext_proc.settings import build_parser as ext_proc_parser
from igw.cli import build_parser as igw_parser
from ratelimit_svc.settings import build_parser as ratelimit_parser
from tests.istio.test_services_tls import DEMO_TEXT, MUTUAL, render

POLICIES = {"demo": DEMO_TEXT, "services-tls": MUTUAL}


def containers(text: str) -> list[dict[str, Any]]:
    return [container for o in render(text)["10-services.yaml"] if o["kind"] == "Deployment"
            for container in o["spec"]["template"]["spec"]["containers"]]


def parsed(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The container's command as its program parses it, with the container's literal env values set (values
    from Secrets stand for themselves here: only their presence matters to the parser)."""
    for entry in container.get("env", []):
        monkeypatch.setenv(entry["name"], entry.get("value", "from-a-secret"))
    command = container["args"]
    assert command[:2] == ["python", "-m"], command
    module, args = command[2], command[3:]
    if module == "ratelimit_svc":
        _, env = ratelimit_parser()
        return env.parse(args)
    if module == "ext_proc":
        _, env = ext_proc_parser()
        return env.parse(args)
    if module == "igw.cli":
        return igw_parser().parse_args(args)
    raise AssertionError(f"no parser known for {module}")


@pytest.mark.parametrize("policy", POLICIES)
def test_every_service_container_command_is_accepted_by_its_program(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = containers(POLICIES[policy])
    assert {c["args"][2] for c in found} == {"ratelimit_svc", "ext_proc", "igw.cli"}
    for container in found:
        with monkeypatch.context() as patch:
            parsed(container, patch)  # SystemExit (exit 2, the reason on stderr) if a flag or value is refused


def test_the_rate_limit_deployment_merges_domains_across_its_config_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    (ratelimit,) = [c for c in containers(DEMO_TEXT) if c["args"][2] == "ratelimit_svc"]
    assert parsed(ratelimit, monkeypatch).merge_domain_config is True
