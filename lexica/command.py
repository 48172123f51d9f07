"""Running one command's ``main`` the same way everywhere: one-line errors and one exit-code table.

The ``lexica`` command and the pipeline (which runs several stages in one process) both call a
stage's ``main`` through :func:`run_main`, so an error prints and exits identically in both.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from lexica.errors import EXIT_INTERRUPTED, LexicaError, one_line

VERBOSE_ENV = "LEXICA_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure_logging() -> None:
    """Lexica's own messages at INFO; the libraries' (Ray, transformers, urllib3) only when verbose."""
    level = logging.DEBUG if verbose() else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose():
        # Ray's loggers are quieted where Ray is started (lexica.cluster): it reconfigures them on import.
        for noisy in ("urllib3", "filelock", "fsspec", "botocore", "s3fs", "asyncio", "httpx", "httpx2", "httpcore",
                      "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """``main(argv)``'s exit code; a :class:`LexicaError` becomes one line on stderr and its code."""
    try:
        return int(main(argv) or 0)
    except LexicaError as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted: committed work is kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
