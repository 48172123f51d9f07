"""``lexica analysis features``: build a dictionary's feature atlas (``steer``, ``monitor`` and
``browse`` are their own ``lexica`` subcommands, and also accepted after ``lexica analysis``)."""

from __future__ import annotations

import argparse
import importlib
import sys

from lexica.analysis.config import AnalysisConfig
from lexica.config import add_knob_flags, apply_overrides, from_dict, stage_section

SUBCOMMANDS = {  # name → (module, what it does)
    "features": ("lexica.analysis.cli", "statistics, contexts, logit effects, neighbours, map and the HTML site "
                                        "of a dictionary"),
    "steer": ("lexica.analysis.steering", "generate with features clamped; baseline and steered text side by side"),
    "monitor": ("lexica.analysis.monitor", "which watched features fire on given texts, where and how strongly"),
    "browse": ("lexica.analysis.browse", "serve a dictionary's feature browser on 127.0.0.1"),
}
FLAGS = {"run": "run", "dictionary": "dictionary", "store": "store", "model": "model", "device": "device",
         "workers": "workers", "max_tokens": "max_tokens"}


def features_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexica analysis features",
                                     description="Build the feature atlas of a dictionary: "
                                                 + SUBCOMMANDS["features"][1])
    from lexica.cluster import local_resources

    resources = local_resources()
    workers = AnalysisConfig().sized_for(resources).workers
    add_knob_flags(parser, AnalysisConfig, "analysis", FLAGS, notes={"workers": (
        f"with this machine's {int(resources['CPU'])} CPUs and {int(resources['GPU'])} GPUs the default is "
        f"{workers} task(s)")})
    return parser


def resolve_config(args: argparse.Namespace) -> AnalysisConfig:
    values = stage_section(args.config, "analysis") if args.config else {}
    apply_overrides(AnalysisConfig, values, args, FLAGS, args.set)
    return from_dict(AnalysisConfig, values, "analysis").validate()


def features_main(argv: list[str]) -> int:
    from lexica.analysis.features import build_atlas

    summary = build_atlas(resolve_config(features_parser().parse_args(argv)))
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings"].items())
    print(f"atlas of {summary['dictionary']} ({summary['d_sae']} features, {summary['tokens']:,} tokens, "
          f"{summary['dead_features']} never fired): {summary['folder']}\n  {timings}")
    if summary.get("site"):
        print(f"  feature browser: {summary['site']}\n  serve it: lexica browse --run "
              f"{summary['config']['run']} --dictionary {summary['dictionary']}")
    return 0


def usage() -> str:
    lines = ["usage: lexica analysis SUBCOMMAND [options]   (SUBCOMMAND --help for its options)", ""]
    lines += [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        asked = argv[:1] in (["-h"], ["--help"])
        print(usage(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    command, rest = argv[0], argv[1:]
    if command == "features":
        return features_main(rest)
    return importlib.import_module(SUBCOMMANDS[command][0]).main(rest)
