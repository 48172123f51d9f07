"""How features relate: nearest neighbours by decoder cosine, clusters, and a 2-D map.

Neighbours are exact (blocked matrix products) up to a size, approximate beyond: features are
grouped by spherical k-means and each group searches only the groups whose centroids lie nearest
its own, which keeps the work near F·sqrt(F)·d instead of F²·d.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch


def unit_directions(W_dec: torch.Tensor) -> torch.Tensor:
    directions = W_dec.detach().float()
    return directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _best_among(queries: torch.Tensor, query_ids: torch.Tensor, candidates: torch.Tensor, candidate_ids: torch.Tensor,
                count: int) -> tuple[torch.Tensor, torch.Tensor]:
    similarity = queries @ candidates.T
    similarity[query_ids.unsqueeze(1) == candidate_ids.unsqueeze(0)] = -math.inf  # a feature is not its own neighbour
    best = similarity.topk(min(count, candidates.shape[0]), dim=1)
    return candidate_ids[best.indices], best.values


def exact_neighbours(directions: torch.Tensor, count: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(len(directions))
    found = [_best_among(directions[start:start + chunk], ids[start:start + chunk], directions, ids, count + 1)
             for start in range(0, len(directions), chunk)]
    neighbours = torch.cat([f[0] for f in found])[:, :count]
    cosines = torch.cat([f[1] for f in found])[:, :count]
    return neighbours, cosines


def spherical_kmeans(directions: torch.Tensor, clusters: int, iterations: int = 20,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [clusters, d], assignment [F]) of unit vectors by cosine; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    clusters = max(1, min(clusters, len(directions)))
    centroids = directions[torch.randperm(len(directions), generator=generator)[:clusters]].clone()
    assignment = torch.zeros(len(directions), dtype=torch.long)
    for _ in range(iterations):
        assignment = torch.cat([(directions[start:start + 8192] @ centroids.T).argmax(dim=1)
                                for start in range(0, len(directions), 8192)])
        sums = torch.zeros_like(centroids).index_add_(0, assignment, directions)
        sizes = torch.bincount(assignment, minlength=clusters)
        empty = sizes == 0
        if empty.any():  # reseed an empty cluster on a random feature rather than lose it
            sums[empty] = directions[torch.randint(len(directions), (int(empty.sum()),), generator=generator)]
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return centroids, assignment


def approximate_neighbours(directions: torch.Tensor, count: int, probes: int = 8,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    groups = max(1, round(math.sqrt(len(directions))))
    centroids, assignment = spherical_kmeans(directions, groups, iterations=10, seed=seed)
    nearest_groups = (centroids @ centroids.T).topk(min(probes, groups), dim=1).indices
    members = [torch.nonzero(assignment == group).flatten() for group in range(groups)]
    neighbours = torch.full((len(directions), count), -1, dtype=torch.long)
    cosines = torch.full((len(directions), count), -math.inf)
    for group in range(groups):
        query_ids = members[group]
        if len(query_ids) == 0:
            continue
        candidate_ids = torch.cat([members[g] for g in nearest_groups[group].tolist()])
        found, values = _best_among(directions[query_ids], query_ids, directions[candidate_ids], candidate_ids,
                                    count + 1)
        width = min(count, found.shape[1])
        neighbours[query_ids, :width] = found[:, :width]
        cosines[query_ids, :width] = values[:, :width]
    return neighbours, cosines


def find_neighbours(directions: torch.Tensor, count: int, exact_up_to: int = 32768,
                    probes: int = 32) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(neighbour ids [F, count] (-1 where none was found), cosines, whether the search was exact)."""
    count = min(count, len(directions) - 1)
    exact = len(directions) <= exact_up_to
    with torch.no_grad():
        if count < 1:
            return torch.zeros(len(directions), 0, dtype=torch.long), torch.zeros(len(directions), 0), True
        if exact:
            return (*exact_neighbours(directions, count), True)
        return (*approximate_neighbours(directions, count, probes=probes), False)


def estimated_recall(directions: torch.Tensor, neighbours: torch.Tensor, sample: int = 256, seed: int = 0) -> float:
    """Share of the true nearest neighbours an approximate search found, on a sample of features."""
    count = neighbours.shape[1]
    if count == 0:
        return 1.0
    queries = torch.randperm(len(directions), generator=torch.Generator().manual_seed(seed))[:sample]
    ids = torch.arange(len(directions))
    with torch.no_grad():
        truth, _ = _best_among(directions[queries], queries, directions, ids, count)
    found = sum(len(set(t.tolist()) & set(n.tolist())) for t, n in zip(truth, neighbours[queries], strict=True))
    return found / (len(queries) * count)


def neighbour_table(neighbours: torch.Tensor, cosines: torch.Tensor, count: int) -> pa.Table:
    """``atlas.NEIGHBOURS_SCHEMA`` rows: each feature's first ``count`` neighbours."""
    neighbours, cosines = neighbours[:, :count], cosines[:, :count]
    valid = neighbours >= 0  # approximate search may find fewer than asked for in a tiny group
    rows_ids = [row[mask].numpy().astype("int32") for row, mask in zip(neighbours, valid, strict=True)]
    rows_cos = [row[mask].numpy().astype("float32") for row, mask in zip(cosines, valid, strict=True)]
    return pa.table({"feature": pa.array(range(len(neighbours)), pa.int32()),
                     "neighbours": pa.array(rows_ids, pa.list_(pa.int32())),
                     "cosines": pa.array(rows_cos, pa.list_(pa.float32()))})


def map_layout(directions: torch.Tensor, seed: int = 0, neighbours: int = 15,
               known: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """[F, 2] UMAP coordinates of the decoder directions (cosine metric).

    ``known`` (neighbour ids, cosines) from :func:`find_neighbours` spares UMAP its own search.
    """
    import warnings

    count = len(directions)
    data = directions.numpy().astype("float32")
    if count < 4:  # UMAP's spectral start needs a few points; so few features are simply spread on a line
        return np.stack([np.arange(count, dtype="float32"), np.zeros(count, dtype="float32")], axis=1)
    import umap

    neighbours = min(neighbours, count - 1)
    precomputed = (None, None, None)
    if known is not None and known[0].shape[1] >= neighbours - 1 and bool((known[0] >= 0).all()):
        # UMAP counts a point as its own first neighbour, at distance 0.
        ids = np.concatenate([np.arange(count)[:, None], known[0][:, :neighbours - 1].numpy()], axis=1)
        distances = np.concatenate([np.zeros((count, 1)), 1 - known[1][:, :neighbours - 1].numpy()], axis=1)
        precomputed = (ids, distances.astype("float32"), None)
    reducer = umap.UMAP(n_neighbors=neighbours, n_components=2, metric="cosine", random_state=seed, min_dist=0.1,
                        init="spectral" if count > neighbours + 1 else "random", precomputed_knn=precomputed)
    with warnings.catch_warnings():
        # A seed makes UMAP single-threaded (it says so), and precomputed neighbours disable transform(): both intended.
        warnings.simplefilter("ignore", UserWarning)
        return reducer.fit_transform(data).astype("float32")


def map_table(directions: torch.Tensor, clusters: int | None = None, seed: int = 0,
              known: tuple[torch.Tensor, torch.Tensor] | None = None) -> pa.Table:
    """``atlas.MAP_SCHEMA`` rows: UMAP position and k-means cluster of every (unit) decoder direction."""
    clusters = clusters or max(1, round(math.sqrt(len(directions) / 2)))
    with torch.no_grad():
        _, assignment = spherical_kmeans(directions, clusters, seed=seed)
    coordinates = map_layout(directions, seed=seed, known=known)
    return pa.table({"feature": pa.array(range(len(directions)), pa.int32()),
                     "x": pa.array(coordinates[:, 0], pa.float32()), "y": pa.array(coordinates[:, 1], pa.float32()),
                     "cluster": pa.array(assignment.numpy().astype("int32"), pa.int32())})
