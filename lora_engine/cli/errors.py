"""The command line's one error type: ``UsageError``, which every subcommand raises for bad input.

It lives apart from ``cli.main`` so that subcommand modules can import it without importing the dispatcher
that imports them.
"""


class UsageError(Exception):
    """A problem with the command's input (a path, a file, a mismatch, a missing optional package) that one line
    on stderr explains; ``lora-engine`` prints it and exits with status 2."""
