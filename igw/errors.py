"""The CLI's one-line failure, in its own module so that `python -m igw.cli` (where igw.cli runs as
__main__) and the command modules importing it share one class."""


class CommandError(Exception):
    """A failure the user should see as one clear line (exit code 1)."""
