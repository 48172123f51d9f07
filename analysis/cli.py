"""``python -m analysis SUBCOMMAND``: features (the atlas), steer, monitor, browse."""

from __future__ import annotations

import argparse
import logging
import sys

from analysis.config import AnalysisConfig
from harvest.config import ConfigError, add_knob_flags, apply_overrides, from_dict, stage_section

SUBCOMMANDS = {
    "features": "statistics, contexts, logit effects, neighbours, map and the HTML site of a dictionary",
    "steer": "generate with features clamped; baseline and steered text side by side",
    "monitor": "which watched features fire on given texts, where and how strongly",
    "browse": "serve a dictionary's feature browser on 127.0.0.1",
}
FLAGS = {"run": "run", "dictionary": "dictionary", "store": "store", "model": "model", "device": "device",
         "workers": "workers", "max_tokens": "max_tokens"}


def features_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis features",
                                     description="Build the feature atlas of a dictionary: " + SUBCOMMANDS["features"])
    add_knob_flags(parser, AnalysisConfig, "analysis", FLAGS)
    return parser


def resolve_config(args: argparse.Namespace) -> AnalysisConfig:
    values = stage_section(args.config, "analysis") if args.config else {}
    apply_overrides(AnalysisConfig, values, args, FLAGS, args.set)
    return from_dict(AnalysisConfig, values, "analysis").validate()


def features_main(argv: list[str]) -> int:
    from analysis.features import build_atlas

    summary = build_atlas(resolve_config(features_parser().parse_args(argv)))
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings"].items())
    print(f"atlas of {summary['dictionary']} ({summary['d_sae']} features, {summary['tokens']:,} tokens, "
          f"{summary['dead_features']} never fired): {summary['folder']}\n  {timings}")
    if summary.get("site"):
        print(f"  feature browser: {summary['site']}\n  serve it: python -m analysis browse --run "
              f"{summary['config']['run']} --dictionary {summary['dictionary']}")
    return 0


def usage() -> str:
    lines = ["usage: python -m analysis SUBCOMMAND [options]   (SUBCOMMAND --help for its options)", ""]
    lines += [f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(usage(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command, rest = argv[0], argv[1:]
    if command == "steer":
        from analysis.steering import main as steer_main

        return steer_main(rest)
    if command == "monitor":
        from analysis.monitor import main as monitor_main

        return monitor_main(rest)
    if command == "browse":
        from analysis.browse import main as browse_main

        return browse_main(rest)
    from analysis.sources import AnalysisError
    from harvest.storage import StorageError
    from harvest.store import StoreError

    try:
        return features_main(rest)
    except (ConfigError, StoreError, StorageError, AnalysisError, FileNotFoundError) as error:
        print("error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip()), file=sys.stderr)
        return 2
