"""The two jobs `igw up` does in-process, as compose services: seeding and replica publishing.

`igw up` (igw/launcher.py) seeds three tenants after the services are ready and runs a ReadinessPublisher
so the rate-limit service's adaptive limits (config/testbed/ratelimit) follow the ready model servers.
Compose has no launcher process, so without these jobs its bed would hold one tenant instead of three
(the demo's 403 case and demo-half's share missing) and every adaptive limit would sit at its `min`.

    python compose/bed_jobs.py seed --redis-url U --models a,b      # one-shot; prints tenants and keys as JSON
    python compose/bed_jobs.py publish --redis-url U --models a,b   # until SIGTERM; withdraws on exit

Both take their values from the launcher's own constants and the shared topology;
tests/testbed/test_compose.py seeds a real Redis both ways and compares the records.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from igw import envoy_config, topology
from igw.launcher import PUBLISH_INTERVAL, PUBLISH_PROBE_TIMEOUT
from igw.replicas_publish import ModelServer, ReadinessPublisher

# Written after the first publish round; the publisher's healthcheck waits for it, so Envoy (which
# depends on the publisher being healthy) starts only once the ready replicas are in Redis, as in `igw up`.
PUBLISHED_MARKER = Path("/tmp/igw-replicas-published")
PUBLISHER_NAME = "igw-compose"


def publisher_servers(models: Sequence[str]) -> list[ModelServer]:
    """Every model endpoint of the compose Envoy config, probed by its compose hostname."""
    bed = topology.documented_topology(models, host=envoy_config.compose_hostname)
    return [ModelServer(model, ep.address, f"http://{ep.address}{envoy_config.MODEL_READY_PATH}")
            for model in bed.models for ep in bed.model_endpoints(model)]


def seed(redis_url: str, models: Sequence[str]) -> dict[str, Any]:
    """What `igw up` seeds (igw.testbed_seed.seed_bed, the same function), as JSON for the operator."""
    from igw.testbed_seed import seed_bed

    demo, tenants = seed_bed(redis_url, models)
    return {"tenant": demo, "tenants": tenants}


def publish(redis_url: str, models: Sequence[str], marker: Path = PUBLISHED_MARKER) -> None:
    """Publish ready replicas every PUBLISH_INTERVAL until SIGTERM/SIGINT, then ready 0 (quotas drop at once)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # PID 1 in a container: no default action without a handler
        signal.signal(signum, lambda *_: stop.set())
    publisher = ReadinessPublisher(redis_url, publisher_servers(models), interval=PUBLISH_INTERVAL,
                                   probe_timeout=PUBLISH_PROBE_TIMEOUT, publisher=PUBLISHER_NAME)
    try:
        publisher.poll_once()
        marker.write_text("published\n")
        publisher.start()
        while not stop.wait(1.0):
            pass
    finally:
        marker.unlink(missing_ok=True)
        publisher.stop(withdraw=True)


def _models(text: str) -> list[str]:
    names = [m for m in text.split(",") if m]
    try:
        topology.validate_model_names(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python compose/bed_jobs.py",
                                     description="The test bed's seeding and replica publishing, for compose.")
    parser.add_argument("job", choices=("seed", "publish"))
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--models", type=_models, required=True, help="comma-separated model names")
    args = parser.parse_args(argv)
    import redis

    from ext_proc.store import StoreError
    from igw.replicas_publish import PublishError

    try:
        if args.job == "seed":
            print(json.dumps(seed(args.redis_url, args.models), indent=2))
        else:
            publish(args.redis_url, args.models)
    except (StoreError, PublishError, redis.RedisError, ValueError, OSError) as exc:  # ValueError: RecordError
        print(f"{args.job} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
