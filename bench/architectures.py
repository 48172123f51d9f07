"""The quality table: every architecture trained by ``lexica train`` on the same store at equal
tokens, each measured as Lexica measures its exports (held-out evaluation: FVU, L0, CE recovered,
KL; dead = latents that fired on none of the first 65,536 tokens of the store).

Runs the demo's ``train:`` section (examples/demo.yaml: 4,608 latents, k 32, batch 2,048, 1M
tokens) with the architecture, optimiser and options each row names, into the demo run, so the
demo (``make demo``) must have harvested first.

Usage: python bench/architectures.py [--run runs/demo] [--rows topk,batchtopk,...] [--eval-tokens 16384]
A row is ARCHITECTURE[:OPTION=VALUE...], e.g. ``relu:resample_every=50`` or ``topk:optimizer=signsgd``;
options that are train knobs go to --set, the others to train.extra.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from lexica.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROWS = "topk,batchtopk,matryoshka,jumprelu,relu"
KNOBS = {field for field in TrainConfig.__dataclass_fields__}


def train(run: str, row: str, eval_tokens: int) -> tuple[str, float]:
    architecture, *options = row.split(":")
    name = "bench-" + row.replace(":", "-").replace("=", "")
    command = [sys.executable, "-m", "lexica", "train", "--config", os.path.join(REPO, "examples", "demo.yaml"),
               "--run", run, "--arch", architecture, "--name", name, "--set", f"eval_tokens={eval_tokens}"]
    for option in options:
        key, value = option.split("=", 1)
        command += ["--set", f"{key}={value}" if key in KNOBS else f"extra.{key}={value}"]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO)
    return name, time.monotonic() - started


def row_results(run: str, name: str) -> dict:
    folder = os.path.join(run, "dictionaries", name)
    with open(os.path.join(folder, "evaluation.json")) as handle:
        evaluation = json.load(handle)
    with open(os.path.join(folder, "feature_density.json")) as handle:
        density = json.load(handle)
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        final = json.loads(handle.read().splitlines()[-1])
    return {**evaluation, "dead": sum(1 for value in density if value == 0) / len(density),
            "training_fvu": final.get("fvu"), "resampled": final.get("resampled", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=os.path.join(REPO, "runs", "demo"))
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    results = []
    for row in [row.strip() for row in args.rows.split(",") if row.strip()]:
        name, seconds = train(args.run, row, args.eval_tokens)
        results.append((row, seconds, row_results(args.run, name)))
    print(f"\nrun {args.run}; each row trained by lexica train with examples/demo.yaml's train section; "
          f"held-out evaluation on {args.eval_tokens:,} tokens\n")
    print("| row | FVU (held-out) | L0 | dead | CE recovered | ΔCE | KL | training FVU | resampled | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, seconds, result in results:
        print(f"| {row} | {result['fvu']:.4f} | {result['l0']:.1f} | {result['dead']:.1%} | "
              f"{result['ce_recovered']:.1%} | {result['delta_ce']:+.3f} | {result['kl']:.3f} | "
              f"{result['training_fvu']:.4f} | {result['resampled']} | {seconds:.0f} |")
    print(f"\nload average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
