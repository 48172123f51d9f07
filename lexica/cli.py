"""The ``lexica`` command (also ``python -m lexica``): one subcommand per stage and tool.

Every subcommand takes ``--config FILE`` (a pipeline YAML; its section for that stage), ``--run URL``
(the run folder) and ``--set KEY=VALUE``; errors print as one line with the exit codes of
:mod:`lexica.errors`. Subcommands import their stage only when chosen, so ``lexica --help`` is quick.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import NamedTuple

from lexica.command import VERBOSE_ENV, configure_logging, run_main


class Command(NamedTuple):
    module: str
    function: str
    summary: str


COMMANDS = {
    "harvest": Command("lexica.harvest.cli", "main", "harvest a model's activations over a corpus into a store"),
    "verify": Command("lexica.harvest.cli", "verify_main", "check a store's parts against their commit records"),
    "train": Command("lexica.train.cli", "main", "fit a sparse dictionary on an activation store"),
    "import-sae": Command("lexica.train.interop", "main", "register a SAELens-format dictionary as one of a run's"),
    "plot": Command("lexica.train.plot", "main", "draw a dictionary's training curves and feature density"),
    "analysis": Command("lexica.analysis.cli", "main", "analysis features: build a dictionary's feature atlas"),
    "steer": Command("lexica.analysis.steering", "main", "generate text with features clamped, beside the baseline"),
    "monitor": Command("lexica.analysis.monitor", "main", "report where watched features fire on given texts"),
    "browse": Command("lexica.analysis.browse", "main",
                      "serve a dictionary's feature browser on 127.0.0.1 (test your text, steering)"),
    "explain": Command("lexica.analysis.explain", "main", "explain features with an explainer model, stored with the "
                                                          "atlas"),
    "score": Command("lexica.analysis.score", "main", "score explanations: detection and fuzzing on held-out examples, "
                                                      "against a baseline"),
    "pipeline": Command("lexica.deploy.pipeline", "main", "harvest, train and analysis in order in one process"),
    "submit": Command("lexica.deploy.submit", "main", "run the pipeline (or some stages) as a job on a Ray cluster"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("lexica")
    except PackageNotFoundError:
        return "unknown (not installed)"


def usage() -> str:
    lines = ["usage: lexica [--verbose] COMMAND [options]    (lexica COMMAND --help lists its options)", "",
             "Map the concepts inside a language model: harvest activations, fit sparse dictionaries,",
             "build and browse a feature atlas.", "", "commands:"]
    lines += [f"  {name:<9} {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "options:", "  --verbose  show Ray's and the libraries' own log output",
              "  --version  print the version", "",
              "docs: README.md and docs/ (configuration, command line, store format, architecture)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0] in ("-v", "--verbose"):
        os.environ[VERBOSE_ENV] = "1"  # read by the stages' logging and Ray start-up (and their workers)
        argv.pop(0)
    if argv[:1] == ["--version"]:
        print(f"lexica {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lexica: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    configure_logging()
    command = COMMANDS[name]
    return run_main(getattr(importlib.import_module(command.module), command.function), rest)


if __name__ == "__main__":
    sys.exit(main())
