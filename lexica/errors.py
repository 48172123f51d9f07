"""One base class for every error a person can fix, and one table of exit codes for every command.

Each stage raises its own subclass (it names what went wrong: a corpus row, a store part, a knob);
the ``lexica`` command prints any of them as one line and exits with the class's code.
"""

from __future__ import annotations

# The exit-code table (docs/cli.md repeats it): the same meaning in every subcommand.
EXIT_OK = 0
EXIT_FAILED = 1  # the work started and failed (a shard kept failing, a job died); re-running may help
EXIT_BAD_INPUT = 2  # a config value, file, store, model or dictionary is missing or wrong; fix it first
EXIT_INTERRUPTED = 130  # Ctrl-C; what was committed is kept


class LexicaError(Exception):
    """An error with a message meant for the person running Lexica (no traceback needed)."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(LexicaError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class FailedError(LexicaError, RuntimeError):
    """The work ran and failed; what was committed before the failure is kept."""

    exit_code = EXIT_FAILED


def one_line(error: BaseException) -> str:
    """The message on one line, whatever it holds: libraries (transformers, fsspec) embed newlines."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
