"""``lexica train``: fit a sparse dictionary on an activation store (config file and/or flags)."""

from __future__ import annotations

import argparse

from lexica.config import add_knob_flags, apply_overrides, from_dict, stage_section
from lexica.train.config import TrainConfig, describe_defaults, resolve_sources

FLAGS = {"store": "store", "hook": "hook", "run": "run", "name": "name", "arch": "architecture", "width": "width",
         "k": "k", "batch_size": "batch_size", "tokens": "tokens", "lr": "lr", "seed": "seed", "device": "device",
         "workers": "workers", "shards": "shards", "cpus_per_worker": "cpus_per_worker", "sweep": "sweep"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lexica train", description="Fit a sparse dictionary on an activation store; it is exported to "
        "<run>/dictionaries/<name>/final/ (SAELens layout) and evaluated on held-out text.",
        epilog="Without --run, the dictionary goes into the run that holds --store.")
    from lexica.cluster import local_resources

    add_knob_flags(parser, TrainConfig, "train", FLAGS,
                   notes={"workers": describe_defaults(local_resources()),
                          "cpus_per_worker": describe_defaults(local_resources())})
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values = stage_section(args.config, "train") if args.config else {}
    apply_overrides(TrainConfig, values, args, FLAGS, args.set)
    return resolve_sources(from_dict(TrainConfig, values, "train"))


def main(argv: list[str]) -> int:
    config = resolve_config(build_parser().parse_args(argv))
    from lexica.train.fit import fit

    summary = fit(config)
    if "sweep" in summary:
        print(f"sweep {summary['sweep']}: {len(summary['dictionaries'])} dictionaries from one read of the store "
              f"(checkpoints: {summary['folder']})")
    for one in summary.get("dictionaries", [summary]):
        print_summary(one)
    return 0


def print_summary(summary: dict) -> None:
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
