"""Analysis throughput: the feature-statistics pass against a loop that only encodes, in one process run.

statistics: the same store tokens, counted three ways, interleaved in ``--repeats`` rounds:

(a) plain encode: the tokens already in memory as fp32 tensors of ``--batch-rows``, each batch
    through ``dictionary.encode`` and dropped; no reading, no statistics (the ceiling)
(b) Lexica in process: ``analysis.stats.compute_statistics`` with workers 0: reads the parts,
    encodes, and keeps fires, sums, maxima, histograms, top examples and samples
(c) Lexica on Ray: the same with ``--workers`` tasks of one CPU each, on a local Ray started before
    the rounds (its start-up and the tasks' first imports are not timed)

Prints tokens/s (median and best round) and the ratio to (a) (target: (b) >= 0.8), and checks
that (b) and (c) give identical statistics. Defaults: the demo run's store and TopK dictionary.
site: the feature browser built from synthetic atlases of 2^16, 2^18 and 2^20 features: build time,
bytes per feature, files, peak memory, and in Chromium the time to open a feature page and to run a
search (``bench/site_build.py``, which also runs on its own).

Usage: python bench/analysis.py [--repeats 3] [--workers 2] [--max-tokens N] [--only statistics,site]
       [--site-features 65536,262144,1048576]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from lexica.analysis.config import AnalysisConfig
from lexica.analysis.stats import FeatureStatistics, compute_statistics
from lexica.cluster import ensure_ray
from lexica.store import ActivationStore
from lexica.train.export import load_dictionary

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)

DEMO_STORE = os.path.join(REPO, "runs/demo/activations/resid_post.15")
DEMO_DICTIONARY = os.path.join(REPO, "runs/demo/dictionaries/topk-resid_post.15-8x-k32/final")


def tokens_in_memory(store: ActivationStore, batch_rows: int, max_tokens: int | None) -> list[torch.Tensor]:
    """The tokens the statistics pass counts, in its batches, as fp32 tensors."""
    batches, remaining = [], max_tokens or store.num_rows
    for batch in store.iter_batches(batch_rows):
        if remaining <= 0:
            break
        batches.append(batch.activation[:remaining].float())
        remaining -= len(batches[-1])
    return batches


@torch.inference_mode()
def plain_encode_seconds(dictionary: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    for batch in batches:
        dictionary.encode(batch)
    return time.perf_counter() - started


def identical(first: FeatureStatistics, second: FeatureStatistics) -> bool:
    return all(np.array_equal(value, getattr(second, name)) for name, value in vars(first).items())


def measure_statistics(args: argparse.Namespace, store: ActivationStore, dictionary: torch.nn.Module) -> None:
    batches = tokens_in_memory(store, args.batch_rows, args.max_tokens)
    tokens = sum(len(batch) for batch in batches)
    common = {"batch_rows": args.batch_rows, "max_tokens": args.max_tokens, "device": "cpu"}
    configs = {"(b) Lexica, in process (workers 0)": AnalysisConfig(workers=0, **common)}
    if args.workers:
        configs[f"(c) Lexica, Ray ({args.workers} tasks x 1 CPU)"] = AnalysisConfig(workers=args.workers, **common)
        started = time.perf_counter()
        ensure_ray(None)
        # Untimed: one part per task worker, so each starts and imports torch once.
        warm_up_tokens = sum(commit.rows for commit in store.commits()[:args.workers])
        compute_statistics(store, dictionary, AnalysisConfig(workers=args.workers,
                                                             **{**common, "max_tokens": warm_up_tokens}))
        print(f"Ray started and warmed up in {time.perf_counter() - started:.1f}s", flush=True)
    print(f"statistics pass: {tokens:,} tokens x d_model {store.d_model}, {dictionary.d_sae} features, "
          f"batch_rows {args.batch_rows}, {args.repeats} rounds\n", flush=True)
    seconds: dict[str, list[float]] = {"(a) plain encode, tokens in memory": []}
    seconds.update({name: [] for name in configs})
    results: dict[str, FeatureStatistics] = {}
    for _ in range(args.repeats):
        seconds["(a) plain encode, tokens in memory"].append(plain_encode_seconds(dictionary, batches))
        for name, config in configs.items():
            started = time.perf_counter()
            results[name] = compute_statistics(store, dictionary, config)
            seconds[name].append(time.perf_counter() - started)
    reference = seconds["(a) plain encode, tokens in memory"]
    print("| variant | tokens/s median | best | vs (a), median of rounds |")
    print("|---|---:|---:|---:|")
    for name, spent in seconds.items():
        ratios = [base / own for base, own in zip(reference, spent, strict=True)]
        print(f"| {name} | {tokens / statistics.median(spent):,.0f} | {tokens / min(spent):,.0f} | "
              f"{statistics.median(ratios):.2f} |")
    print("\n(target: (b) >= 0.80 of (a); each round runs (a), (b), (c) back to back)")
    if len(results) == 2:
        print(f"(b) and (c) statistics identical: {'yes' if identical(*results.values()) else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=DEMO_STORE, help="activation store URL")
    parser.add_argument("--dictionary", default=DEMO_DICTIONARY, help="exported dictionary folder")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workers", type=int, default=2, help="Ray tasks of variant (c); 0 skips it")
    parser.add_argument("--batch-rows", type=int, default=AnalysisConfig.batch_rows)
    parser.add_argument("--max-tokens", type=int, default=None, help="count only the first N store tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for (a) and (b)")
    parser.add_argument("--only", default="statistics,site", help="comma list of sections: statistics, site")
    parser.add_argument("--site-features", default="65536,262144,1048576", help="widths of the site section")
    args = parser.parse_args()
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    torch.set_num_threads(args.threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    store = ActivationStore(args.store)
    dictionary = load_dictionary(args.dictionary)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; store {args.store}; "
          f"dictionary {args.dictionary}", flush=True)

    # ---- section 1: statistics pass vs plain encode
    if "statistics" in only:
        measure_statistics(args, store, dictionary)

    # ---- section 2: the feature browser of synthetic atlases at three widths (bench/site_build.py)
    if "site" in only:
        import importlib.util

        # Load the sibling script by its file: bench/ is not a package.
        spec = importlib.util.spec_from_file_location("site_build", os.path.join(BENCH, "site_build.py"))
        site_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(site_build)
        print(flush=True)
        site_build.main(["--features", args.site_features])

    # Another busy process on a small machine distorts 2-thread ATen ops badly.
    print(f"\nload average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs; {time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
