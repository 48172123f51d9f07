"""How features relate: nearest neighbours by decoder cosine, clusters, and a 2-D map.

Neighbours are exact (blocked matrix products, on the GPU when the analysis has one) up to
``exact_neighbours_up_to`` features and at any width on a GPU. Beyond, on a CPU, FAISS searches an
inverted-file index (k-means cells of the unit directions, inner product): it probes more cells,
doubling, until the recall measured against exact search on a sample of features reaches the
target, or until the whole search would overrun its time budget; the recall reached is recorded.

The map is t-SNE (openTSNE) of the decoder directions by cosine, or UMAP: on the demo's directions
t-SNE keeps 3.4x as many of each feature's nearest decoder neighbours among its nearest map points
(``map_quality``; docs/analysis.md has the figures). Beyond ``map_sample`` features the layout is
made for a seeded sample and every other feature is placed among its nearest sampled features (a
weighted mean of their positions), which keeps the cost near-linear. :func:`map_quality` measures a map:
how many of a feature's nearest decoder neighbours stay among its nearest points in 2-D, and how
often 2-D neighbours share a cluster.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import pyarrow as pa
import torch

log = logging.getLogger(__name__)

RECALL_SAMPLE = 512  # features whose exact neighbours measure an approximate search
FIRST_PROBES = 8
PLACEMENT_NEIGHBOURS = 8  # sampled features a feature outside the map's sample is placed among
QUALITY_NEIGHBOURS = 10
KMEANS_RESTARTS = 5


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
    """Exact neighbours on the directions' own device; results on the CPU."""
    ids = torch.arange(len(directions), device=directions.device)
    neighbours, cosines = [], []
    for start in range(0, len(directions), chunk):
        found, values = _best_among(directions[start:start + chunk], ids[start:start + chunk], directions, ids,
                                    count + 1)
        neighbours.append(found[:, :count].cpu())
        cosines.append(values[:, :count].cpu())
    return torch.cat(neighbours), torch.cat(cosines)


def _faiss():
    import faiss

    return faiss


def _as_array(directions: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(directions.detach().cpu().numpy(), dtype=np.float32)


def _without_self(ids: np.ndarray, values: np.ndarray, own: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Search results of ``count + 1`` with each query's own id dropped (else its last result)."""
    keep = ids != own[:, None]
    keep[keep.sum(axis=1) > count, -1] = False  # its own id was not found: drop the weakest instead
    return ids[keep].reshape(len(ids), count), values[keep].reshape(len(ids), count)


def exact_sample(data: np.ndarray, queries: np.ndarray, count: int) -> np.ndarray:
    """The exact ``count`` nearest neighbours (inner product) of the rows ``queries`` of ``data``."""
    faiss = _faiss()
    _, truth = faiss.knn(data[queries], data, count + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _without_self(truth, truth.astype(np.float32), queries, count)[0]


def overlap(truth: np.ndarray, found: np.ndarray) -> float:
    """Share of each row of ``truth`` found in the same row of ``found`` (recall), over all rows."""
    if truth.size == 0:
        return 1.0
    hits = sum(len(set(row.tolist()) & set(other.tolist())) for row, other in zip(truth, found, strict=True))
    return hits / truth.size


def ivf_neighbours(data: np.ndarray, count: int, recall_target: float = 0.95, budget_seconds: float = 400.0,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(ids, cosines, recall measured on a sample, cells probed) of an inverted-file search."""
    faiss = _faiss()
    features, width = data.shape
    cells = int(min(max(16, 4 * math.sqrt(features)), features // 39 or 1))  # FAISS wants ~39 points per cell
    rng = np.random.default_rng(seed)
    quantizer = faiss.IndexFlatIP(width)
    index = faiss.IndexIVFFlat(quantizer, width, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    training = data[np.sort(rng.choice(features, min(features, 64 * cells), replace=False))]
    index.train(training)
    index.add(data)
    queries = np.sort(rng.choice(features, min(features, RECALL_SAMPLE), replace=False))
    truth = exact_sample(data, queries, count)
    probes, recall = FIRST_PROBES, 0.0
    while True:
        index.nprobe = min(probes, cells)
        started = time.perf_counter()
        _, found = index.search(data[queries], count + 1)
        whole_search = (time.perf_counter() - started) * features / len(queries)
        found, _ = _without_self(found, found.astype(np.float32), queries, count)
        recall = overlap(truth, found)
        log.info("neighbours: %d of %d cells probed, sampled recall %.3f, whole search ~%.0f s",
                 index.nprobe, cells, recall, whole_search)
        if recall >= recall_target or index.nprobe >= cells or whole_search * 2 > budget_seconds:
            break
        probes *= 2
    if recall < recall_target:
        log.warning("neighbours: sampled recall %.3f is below the target %.2f; probing more cells would take over "
                    "the %.0f s budget (a GPU searches exactly)", recall, recall_target, budget_seconds)
    ids = np.empty((features, count), np.int64)
    cosines = np.empty((features, count), np.float32)
    for start in range(0, features, 65536):
        block = np.arange(start, min(start + 65536, features))
        values, found = index.search(data[block], count + 1)
        ids[block], cosines[block] = _without_self(found, values, block, count)
    return ids, cosines, recall, int(index.nprobe)


def find_neighbours(directions: torch.Tensor, count: int, exact_up_to: int = 32768, recall_target: float = 0.95,
                    budget_seconds: float = 400.0) -> tuple[torch.Tensor, torch.Tensor, bool, float]:
    """(neighbour ids [F, count] (-1 where none was found), cosines, whether the search was exact, its recall)."""
    count = min(count, len(directions) - 1)
    if count < 1:
        return torch.zeros(len(directions), 0, dtype=torch.long), torch.zeros(len(directions), 0), True, 1.0
    exact = len(directions) <= exact_up_to or directions.is_cuda
    with torch.no_grad():
        if exact:
            return (*exact_neighbours(directions, count), True, 1.0)
    ids, cosines, recall, _ = ivf_neighbours(_as_array(directions), count, recall_target, budget_seconds)
    return torch.from_numpy(ids), torch.from_numpy(cosines), False, recall


def neighbour_table(neighbours: torch.Tensor, cosines: torch.Tensor, count: int) -> pa.Table:
    """``atlas.NEIGHBOURS_SCHEMA`` rows: each feature's first ``count`` neighbours (flat arrays, no per-row objects)."""
    neighbours, cosines = neighbours[:, :count].numpy(), cosines[:, :count].numpy()
    valid = neighbours >= 0  # an approximate search may find fewer than asked for
    offsets = np.zeros(len(neighbours) + 1, np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    offsets = pa.array(offsets)
    return pa.table({"feature": pa.array(np.arange(len(neighbours), dtype=np.int32)),
                     "neighbours": pa.ListArray.from_arrays(offsets, pa.array(neighbours[valid].astype(np.int32))),
                     "cosines": pa.ListArray.from_arrays(offsets, pa.array(cosines[valid].astype(np.float32)))})


def spherical_kmeans(directions: torch.Tensor, clusters: int, iterations: int = 20,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [clusters, d], assignment [F]) of unit vectors by cosine (FAISS k-means, trained on at most
    256 points per cluster, then every direction assigned); deterministic for a seed."""
    faiss = _faiss()
    data = _as_array(directions)
    clusters = max(1, min(clusters, len(data)))
    # Restarts (keeping the tightest) guard against a poor start; at large widths one run costs enough.
    kmeans = faiss.Kmeans(data.shape[1], clusters, niter=iterations, spherical=True, seed=seed,
                          nredo=KMEANS_RESTARTS if len(data) <= 65536 else 1, max_points_per_centroid=256,
                          min_points_per_centroid=1, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kmeans.train(data)
    _, assignment = kmeans.index.search(data, 1)
    return torch.from_numpy(kmeans.centroids.copy()), torch.from_numpy(assignment[:, 0].astype(np.int64))


def _umap(data: np.ndarray, neighbours: int, seed: int, min_dist: float,
          known: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    import umap

    count = len(data)
    neighbours = min(neighbours, count - 1)
    precomputed = (None, None, None)
    if known is not None and known[0].shape[1] >= neighbours - 1 and bool((known[0] >= 0).all()):
        # UMAP counts a point as its own first neighbour, at distance 0.
        ids = np.concatenate([np.arange(count)[:, None], known[0][:, :neighbours - 1]], axis=1)
        distances = np.concatenate([np.zeros((count, 1)), 1 - known[1][:, :neighbours - 1]], axis=1)
        precomputed = (ids, distances.astype("float32"), None)
    reducer = umap.UMAP(n_neighbors=neighbours, n_components=2, metric="cosine", random_state=seed,
                        min_dist=min_dist, init="spectral" if count > neighbours + 1 else "random",
                        precomputed_knn=precomputed)
    with warnings.catch_warnings():
        # A seed makes UMAP single-threaded (it says so), and precomputed neighbours disable transform(): both intended.
        warnings.simplefilter("ignore", UserWarning)
        return reducer.fit_transform(data).astype("float32")


def _tsne(data: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from openTSNE import TSNE

    perplexity = max(1.0, min(perplexity, (len(data) - 1) / 3))  # t-SNE needs 3 x perplexity neighbours
    # One thread: the layout is then the same on every run (openTSNE's parallel sums are not ordered).
    embedding = TSNE(perplexity=perplexity, metric="cosine", n_jobs=1, random_state=seed, verbose=False).fit(data)
    return np.asarray(embedding, dtype=np.float32)


def map_layout(directions: torch.Tensor, seed: int = 0, neighbours: int = 15, min_dist: float = 0.1,
               sample: int = 32768, known: tuple[torch.Tensor, torch.Tensor] | None = None,
               method: str = "tsne", perplexity: float = 30.0) -> np.ndarray:
    """[F, 2] map coordinates of the decoder directions: cosine t-SNE (``method`` "tsne") or UMAP
    ("umap", ``neighbours`` and ``min_dist``); beyond ``sample`` features, a seeded sample laid out
    and the rest placed among their nearest sampled features.

    ``known`` (neighbour ids, cosines of every feature) from :func:`find_neighbours` spares UMAP its own search.
    """
    data = _as_array(directions)
    count = len(data)
    if count < 4:  # the layouts need a few points; so few features are simply spread on a line
        return np.stack([np.arange(count, dtype="float32"), np.zeros(count, dtype="float32")], axis=1)

    def laid_out(points: np.ndarray, known_arrays) -> np.ndarray:
        if method == "tsne":
            return _tsne(points, perplexity, seed)
        return _umap(points, neighbours, seed, min_dist, known_arrays)

    if count <= sample:
        return laid_out(data, (known[0].numpy(), known[1].numpy()) if known is not None else None)
    chosen = np.sort(np.random.default_rng(seed).choice(count, sample, replace=False))
    sampled = data[chosen]
    known_sample = None
    if method == "umap":
        ids, cosines = exact_neighbours(torch.from_numpy(sampled), neighbours - 1)
        known_sample = (ids.numpy(), cosines.numpy())
    layout = np.empty((count, 2), np.float32)
    layout[chosen] = laid_out(sampled, known_sample)
    rest = np.setdiff1d(np.arange(count), chosen)
    found, values = _placement_search(sampled, data[rest], seed)
    weights = np.maximum(values, 0) ** 4 + 1e-12  # the closest sampled features dominate
    weights /= weights.sum(axis=1, keepdims=True)
    layout[rest] = np.einsum("nk,nkd->nd", weights, layout[chosen][found])
    return layout


def _placement_search(sampled: np.ndarray, queries: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's :data:`PLACEMENT_NEIGHBOURS` nearest sampled directions (an inverted file over the sample)."""
    faiss = _faiss()
    cells = max(1, int(math.sqrt(len(sampled))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(sampled.shape[1]), sampled.shape[1], cells,
                               faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(sampled)
    index.add(sampled)
    index.nprobe = max(1, cells // 8)
    values, found = index.search(queries, PLACEMENT_NEIGHBOURS)
    missing = found < 0  # a probe found fewer than asked for: repeat the best
    found = np.where(missing, found[:, :1], found)
    values = np.where(missing, values[:, :1], values)
    return found, values


def map_table(directions: torch.Tensor, clusters: int | None = None, seed: int = 0,
              known: tuple[torch.Tensor, torch.Tensor] | None = None, neighbours: int = 15, min_dist: float = 0.1,
              sample: int = 32768, method: str = "tsne", perplexity: float = 30.0) -> pa.Table:
    """``atlas.MAP_SCHEMA`` rows: map position and k-means cluster of every (unit) decoder direction."""
    clusters = clusters or max(1, round(math.sqrt(len(directions) / 2)))
    with torch.no_grad():
        _, assignment = spherical_kmeans(directions.cpu(), clusters, seed=seed)
    coordinates = map_layout(directions.cpu(), seed=seed, neighbours=neighbours, min_dist=min_dist, sample=sample,
                             known=known, method=method, perplexity=perplexity)
    return pa.table({"feature": pa.array(np.arange(len(directions), dtype=np.int32)),
                     "x": pa.array(coordinates[:, 0], pa.float32()), "y": pa.array(coordinates[:, 1], pa.float32()),
                     "cluster": pa.array(assignment.numpy().astype("int32"), pa.int32())})


def map_quality(directions: torch.Tensor, layout: np.ndarray, clusters: np.ndarray, sample: int = 1000,
                seed: int = 0) -> dict[str, float]:
    """How well a map shows its directions, on a seeded sample of features:

    - ``neighbours_kept``: of each feature's 10 nearest decoder neighbours (cosine), the share that
      are among its 10 nearest points on the map (1 is perfect; a random map scores ~10 / F);
    - ``cluster_agreement``: the share of its 10 nearest map points in its own cluster, beside
      ``cluster_chance`` (the share expected if positions ignored clusters) and
      ``cluster_agreement_decoder`` (the same share among its 10 nearest decoder neighbours).
    """
    faiss = _faiss()
    data = _as_array(directions)
    points = np.ascontiguousarray(layout, dtype=np.float32)
    count = len(data)
    k = min(QUALITY_NEIGHBOURS, count - 1)
    if k < 1:
        return {"neighbours_kept": 1.0, "cluster_agreement": 1.0, "cluster_chance": 1.0,
                "cluster_agreement_decoder": 1.0}
    queries = np.sort(np.random.default_rng(seed).choice(count, min(sample, count), replace=False))
    decoder = exact_sample(data, queries, k)
    _, on_map = faiss.knn(points[queries], points, k + 1)
    on_map, _ = _without_self(on_map, on_map.astype(np.float32), queries, k)
    kept = overlap(decoder, on_map)
    own = clusters[queries][:, None]
    shares = np.bincount(clusters) / count
    return {"neighbours_kept": round(float(kept), 4),
            "cluster_agreement": round(float((clusters[on_map] == own).mean()), 4),
            "cluster_chance": round(float((shares ** 2).sum()), 4),
            "cluster_agreement_decoder": round(float((clusters[decoder] == own).mean()), 4)}
