"""`python -m ratelimit_svc`: run the rate-limit service in the foreground."""

from __future__ import annotations

import sys

from igw.runtime import run_async, run_workers, setup_logging
from ratelimit_svc.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        return run_workers(settings.workers, ["-m", "ratelimit_svc", *argv])
    from ratelimit_svc.server import serve

    return run_async(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
