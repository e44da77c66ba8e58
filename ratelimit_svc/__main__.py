"""`python -m ratelimit_svc`: run the rate-limit service in the foreground."""

from __future__ import annotations

import sys

from igw.runtime import service_main
from ratelimit_svc.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    from ratelimit_svc.server import serve

    return service_main("ratelimit_svc", parse_settings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
