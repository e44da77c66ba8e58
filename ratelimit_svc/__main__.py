"""`python -m ratelimit_svc`: run the rate-limit service in the foreground."""

from __future__ import annotations

import sys

from igw.runtime import service_main, setup_logging
from ratelimit_svc.settings import Settings, parse_settings


def main(argv: list[str] | None = None) -> int:
    from ratelimit_svc.server import serve

    argv = sys.argv[1:] if argv is None else argv
    settings = parse_settings(argv)
    if settings.workers > 1 and settings.prometheus is not None:
        return _supervise(settings, argv)
    return service_main("ratelimit_svc", lambda _argv: settings, serve, argv)


def _supervise(settings: Settings, argv: list[str]) -> int:
    """--workers N with USE_PROMETHEUS: the supervisor also answers on PROMETHEUS_ADDR, with the sum of the
    workers' counts, as one upstream process would (igw/workers.py)."""
    from igw.workers import MergedEndpoint, run_workers
    from ratelimit_svc import upstream_prometheus

    prom = settings.prometheus
    assert prom is not None
    setup_logging(settings.log_level, settings.log_format)
    endpoint = MergedEndpoint("PROMETHEUS_ADDR", prom.host, prom.port, prom.path, upstream_prometheus.WORKER_PORT_ENV,
                              upstream_prometheus.WORKER_PATH, upstream_prometheus.merged_exposition)
    return run_workers(settings.workers, ["-m", "ratelimit_svc", *argv], settings.host, settings.http_port, [endpoint])


if __name__ == "__main__":
    sys.exit(main())
