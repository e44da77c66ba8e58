"""`python -m ext_proc`: run the external processor in the foreground."""

from __future__ import annotations

import sys

from ext_proc.settings import parse_settings
from igw.runtime import service_main


def main(argv: list[str] | None = None) -> int:
    from ext_proc.server import serve

    return service_main("ext_proc", parse_settings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
