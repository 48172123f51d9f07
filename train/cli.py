"""``python -m train``: fit a sparse dictionary on an activation store (config file and/or flags)."""

from __future__ import annotations

import argparse
import logging
import sys

from harvest import storage
from harvest.config import ConfigError, add_knob_flags, apply_overrides, from_dict, stage_section
from train.config import TrainConfig

FLAGS = {"store": "store", "hook": "hook", "out": "run", "name": "name", "arch": "architecture", "width": "width",
         "k": "k", "batch_size": "batch_size", "tokens": "tokens", "lr": "lr", "seed": "seed", "device": "device"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train",
                                     description="Fit a sparse dictionary on an activation store.")
    add_knob_flags(parser, TrainConfig, "train", FLAGS)
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values = stage_section(args.config, "train") if args.config else {}
    apply_overrides(TrainConfig, values, args, FLAGS, args.set)
    config = from_dict(TrainConfig, values, "train")
    if not config.store and not config.hook:
        config.hook = harvested_hook(config)
    return config


def harvested_hook(config: TrainConfig) -> str:
    """The hook the run's harvest used (run.yaml records it, with 'middle' resolved)."""
    import yaml

    fs, run_path = storage.url_to_fs(config.run, config.storage_options)
    path = storage.join(run_path, "run.yaml")
    if not storage.exists(fs, path):
        raise ConfigError(f"{config.run} has no run.yaml; give --store or --hook")
    with fs.open(path, "rb") as handle:
        hook = ((yaml.safe_load(handle) or {}).get("harvest") or {}).get("hook")
    if not hook:
        raise ConfigError(f"{config.run}/run.yaml records no harvest hook; give --store or --hook")
    return hook


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The one subcommand; everything else is the flag-only training command as before.
    if argv[:1] == ["plot"]:
        from train.plot import main as plot_main

        return plot_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from harvest.storage import StorageError
    from harvest.store import StoreError

    try:
        config = resolve_config(build_parser().parse_args(argv))
        from train.loop import fit

        summary = fit(config)
    except (ConfigError, StoreError, StorageError, ValueError) as error:
        print("error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip()), file=sys.stderr)
        return 2
    final = summary["final"]
    print(f"dictionary {summary['name']}: {summary['steps']} steps, FVU {final.get('fvu', float('nan')):.4f}, "
          f"L0 {final.get('l0', float('nan')):.1f}, dead {final.get('dead_fraction', 0):.2%}\n"
          f"  exported (SAELens layout): {summary['folder']}/final")
    evaluation = summary.get("evaluation") or {}
    if evaluation:
        print(f"  held-out ({evaluation['tokens']} tokens): CE clean {evaluation['ce_clean']:.4f}, spliced "
              f"{evaluation['ce_spliced']:.4f} (ΔCE {evaluation['delta_ce']:+.4f}), zero-ablated "
              f"{evaluation['ce_zero']:.4f}; CE recovered {evaluation['ce_recovered']:.1%}, KL {evaluation['kl']:.4f}, "
              f"FVU {evaluation['fvu']:.4f}, L0 {evaluation['l0']:.1f}")
    print(f"  curves and feature density: {summary['plot']}")
    return 0
