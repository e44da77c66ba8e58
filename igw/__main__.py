"""`python -m igw`: the same as the `igw` command."""

import sys

from igw.cli import main

sys.exit(main())
