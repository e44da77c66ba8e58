"""`python -m ext_proc`: run the external processor in the foreground."""

from __future__ import annotations

import sys

from ext_proc.settings import parse_settings
from igw.runtime import run_async, run_workers, setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        return run_workers(settings.workers, ["-m", "ext_proc", *argv])
    from ext_proc.server import serve

    return run_async(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    sys.exit(main())
