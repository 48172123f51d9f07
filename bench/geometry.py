"""Neighbours and the map: their quality on the demo's decoder directions, and their cost at 2^20 features.

Section ``demo``: the demo dictionary's unit decoder directions laid out by each candidate map
method and setting (UMAP as before this change: n_neighbors 15, min_dist 0.1; UMAP with other
settings; t-SNE), each measured by ``analysis.geometry.map_quality`` (of each feature's 10 nearest
decoder neighbours, the share among its 10 nearest map points; how often map neighbours share a
k-means cluster, beside chance).

Section ``wide``: 2^20 directions grown from the demo's (each a random demo direction plus noise,
``--noise``; no real 2^20-feature dictionary exists here), then the neighbour search the analysis
runs (``find_neighbours``: FAISS inverted file, probing until the sampled recall reaches 0.95 or the
budget ends) and the map (``map_table``: k-means, a 32,768-feature t-SNE, the rest placed), each
timed, with the recall and the map's quality. Targets at 2^20: neighbours and map <= 15 min, recall
>= 0.95.

Usage: python bench/geometry.py [--only demo,wide] [--features 1048576] [--noise 0.5]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch
from safetensors.torch import load_file

from lexica.analysis import geometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "runs/demo/dictionaries/topk-resid_post.15-8x-k32/final/sae_weights.safetensors")


def demo_directions(path: str) -> torch.Tensor:
    return geometry.unit_directions(load_file(path)["W_dec"].float())


def demo_section(directions: torch.Tensor) -> None:
    _, clusters = geometry.spherical_kmeans(directions, round((len(directions) / 2) ** 0.5))
    clusters = clusters.numpy()
    neighbours, cosines, _, _ = geometry.find_neighbours(directions, 49)
    candidates = [("umap", {"neighbours": 15, "min_dist": 0.1}, "before"),
                  ("umap", {"neighbours": 5, "min_dist": 0.0}, ""), ("umap", {"neighbours": 30, "min_dist": 0.0}, ""),
                  ("tsne", {"perplexity": 10}, ""), ("tsne", {"perplexity": 30}, "chosen")]
    print(f"demo: {len(directions):,} decoder directions, {clusters.max() + 1} k-means clusters")
    print("| method | settings | neighbours kept (of 10) | cluster agreement | chance | s | |")
    print("|---|---|---:|---:|---:|---:|---|")
    for method, settings, note in candidates:
        started = time.perf_counter()
        layout = geometry.map_layout(directions, method=method, known=(neighbours, cosines), **settings)
        seconds = time.perf_counter() - started
        quality = geometry.map_quality(directions, layout, clusters)
        shown = ", ".join(f"{key} {value}" for key, value in settings.items())
        print(f"| {method} | {shown} | {quality['neighbours_kept']:.3f} | {quality['cluster_agreement']:.3f} | "
              f"{quality['cluster_chance']:.3f} | {seconds:.0f} | {note} |", flush=True)
    print(f"(map neighbours sharing a cluster, for comparison in decoder space: "
          f"{quality['cluster_agreement_decoder']:.3f})")


def grown(directions: torch.Tensor, features: int, noise: float, seed: int = 0) -> torch.Tensor:
    """``features`` unit directions, each a random demo direction plus Gaussian noise of norm ~``noise``."""
    rng = np.random.default_rng(seed)
    base = directions.numpy()
    out = np.empty((features, base.shape[1]), np.float32)
    for start in range(0, features, 65536):
        stop = min(start + 65536, features)
        block = base[rng.integers(0, len(base), stop - start)]
        block = block + rng.normal(0, noise / np.sqrt(base.shape[1]), block.shape).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return torch.from_numpy(out)


def wide_section(directions: torch.Tensor, features: int, noise: float, budget: float) -> None:
    wide = grown(directions, features, noise)
    started = time.perf_counter()
    neighbours, cosines, exact, recall = geometry.find_neighbours(wide, 10, budget_seconds=budget)
    neighbour_seconds = time.perf_counter() - started
    started = time.perf_counter()
    table = geometry.map_table(wide, known=(neighbours, cosines))
    map_seconds = time.perf_counter() - started
    layout = np.stack([table["x"].to_numpy(), table["y"].to_numpy()], axis=1)
    quality = geometry.map_quality(wide, layout, table["cluster"].to_numpy())
    print(f"\nwide: {features:,} directions grown from the demo's (noise {noise})")
    print("| step | s | result |")
    print("|---|---:|---|")
    print(f"| neighbours ({'exact' if exact else 'FAISS inverted file'}) | {neighbour_seconds:.0f} | sampled recall "
          f"{recall:.3f} |")
    print(f"| map (k-means, t-SNE of 32,768, placement) | {map_seconds:.0f} | neighbours kept "
          f"{quality['neighbours_kept']:.3f}, cluster agreement {quality['cluster_agreement']:.3f} (chance "
          f"{quality['cluster_chance']:.3f}) |")
    print(f"| both | {neighbour_seconds + map_seconds:.0f} | target <= 900 s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="demo,wide")
    parser.add_argument("--dictionary", default=DEMO, help="sae_weights.safetensors of the demo dictionary")
    parser.add_argument("--features", type=int, default=1 << 20)
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm of a grown direction (1 = its own)")
    parser.add_argument("--budget", type=float, default=400.0, help="the neighbour search's time budget, seconds")
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(os.cpu_count() or 1)
    load_at_start = os.getloadavg()[0]
    directions = demo_directions(args.dictionary)
    if "demo" in only:
        demo_section(directions)
    if "wide" in only:
        wide_section(directions, args.features, args.noise, args.budget)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak resident memory {peak_gb:.1f} GB; load average (1 min) at start {load_at_start:.2f}, at end "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
