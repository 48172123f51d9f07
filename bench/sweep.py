"""A sweep against separate jobs: N dictionaries trained by one ``lexica train`` with
``train.sweep`` (one read of the store) and by N ``lexica train`` commands, on the demo's
``train:`` section (examples/demo.yaml), each timed end to end (job start, training, export,
evaluation) with the store bytes its workers read (``store_bytes_read`` of metrics.jsonl); then
the quality table of the sweep's dictionaries beside the separate ones'.

The demo (``make demo``) must have harvested first.

Usage: python bench/sweep.py [--run runs/demo] [--variants topk,batchtopk,matryoshka,jumprelu]
                             [--eval-tokens 8192] [--tokens N]
A variant is ARCHITECTURE[:KNOB=VALUE...], e.g. ``topk:k=64`` (train knobs; others go to extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

from lexica.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS = set(TrainConfig.__dataclass_fields__)


def variant_knobs(text: str, name: str) -> dict:
    architecture, *options = text.split(":")
    knobs: dict = {"architecture": architecture, "name": name}
    for option in options:
        key, value = option.split("=", 1)
        value = yaml.safe_load(value)
        if key in KNOBS:
            knobs[key] = value
        else:
            knobs.setdefault("extra", {})[key] = value
    return knobs


def lexica_train(run: str, settings: list[str]) -> float:
    command = [sys.executable, "-m", "lexica", "train", "--config", os.path.join(REPO, "examples", "demo.yaml"),
               "--run", run, *settings]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def results(run: str, name: str) -> dict:
    folder = os.path.join(run, "dictionaries", name)
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        final = json.loads(handle.read().splitlines()[-1])
    with open(os.path.join(folder, "feature_density.json")) as handle:
        density = json.load(handle)
    evaluation = {}
    if os.path.exists(os.path.join(folder, "evaluation.json")):
        with open(os.path.join(folder, "evaluation.json")) as handle:
            evaluation = json.load(handle)
    return {"final": final, "evaluation": evaluation, "dead": sum(1 for value in density if value == 0) / len(density)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=os.path.join(REPO, "runs", "demo"))
    parser.add_argument("--variants", default="topk,batchtopk,matryoshka,jumprelu")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: the demo's)")
    args = parser.parse_args()
    variants = [text.strip() for text in args.variants.split(",") if text.strip()]
    stamp = time.strftime("%H%M%S")
    common = ["--set", f"eval_tokens={args.eval_tokens}"] + (["--tokens", str(args.tokens)] if args.tokens else [])
    load_at_start = os.getloadavg()[0]

    separate = []
    for index, text in enumerate(variants):
        knobs = variant_knobs(text, f"bench-alone-{stamp}-{index}-{text.replace(':', '-').replace('=', '')}")
        settings = [item for key, value in knobs.items() if key != "extra"
                    for item in ("--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}")]
        settings += [item for key, value in knobs.get("extra", {}).items()
                     for item in ("--set", f"extra.{key}={json.dumps(value)}")]
        seconds = lexica_train(args.run, common + settings)
        separate.append((text, knobs["name"], seconds))
        print(f"alone {text}: {seconds:.0f} s", flush=True)

    sweep = [variant_knobs(text, f"bench-sweep-{stamp}-{index}-{text.replace(':', '-').replace('=', '')}")
             for index, text in enumerate(variants)]
    sweep_seconds = lexica_train(args.run, common + ["--set", f"name=bench-sweep-{stamp}",
                                                     "--sweep", json.dumps(sweep)])
    print(f"sweep of {len(variants)}: {sweep_seconds:.0f} s", flush=True)

    alone_seconds = sum(seconds for _, _, seconds in separate)
    alone_bytes = sum(results(args.run, name)["final"]["store_bytes_read"] for _, name, _ in separate)
    sweep_bytes = results(args.run, sweep[0]["name"])["final"]["store_bytes_read"]
    tokens = results(args.run, sweep[0]["name"])["final"]["tokens"]
    print(f"\nrun {args.run}; examples/demo.yaml's train section, {tokens:,} tokens per dictionary, held-out "
          f"evaluation on {args.eval_tokens:,} tokens\n")
    print(f"| {len(variants)} dictionaries | wall seconds (start, train, export, evaluate) | store bytes read |")
    print("|---|---:|---:|")
    print(f"| {len(variants)} separate jobs | {alone_seconds:.0f} | {alone_bytes / 1e6:,.1f} MB |")
    print(f"| one sweep | {sweep_seconds:.0f} | {sweep_bytes / 1e6:,.1f} MB |")
    print(f"| sweep speed-up | **{alone_seconds / sweep_seconds:.2f}x** | "
          f"{alone_bytes / max(sweep_bytes, 1):.2f}x less |")
    print("\n| variant | how | FVU (held-out) | L0 | dead | CE recovered | KL | training FVU | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (text, name, seconds), knobs in zip(separate, sweep, strict=True):
        for how, result_name, shown in (("alone", name, f"{seconds:.0f}"), ("sweep", knobs["name"], "(shared)")):
            result = results(args.run, result_name)
            evaluation = result["evaluation"] or {"fvu": float("nan"), "l0": float("nan"),
                                                  "ce_recovered": float("nan"), "kl": float("nan")}
            print(f"| {text} | {how} | {evaluation['fvu']:.4f} | {evaluation['l0']:.1f} | {result['dead']:.1%} | "
                  f"{evaluation['ce_recovered']:.1%} | {evaluation['kl']:.3f} | {result['final']['fvu']:.4f} | "
                  f"{shown} |")
    print(f"\nload average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
