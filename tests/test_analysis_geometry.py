"""Neighbours, clusters, map and logit effects of decoder directions, against direct computations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lexica.analysis import atlas, geometry
from lexica.analysis.logits import logit_effects, readout_from_model


def clustered_directions(groups: int = 24, per_group: int = 20, d: int = 48, noise: float = 0.25, seed: int = 0):
    """Unit vectors scattered around ``groups`` random centres: planted neighbourhoods."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(groups, d, generator=generator), dim=1)
    scatter = noise * torch.randn(groups * per_group, d, generator=generator) / d ** 0.5
    points = centres.repeat_interleave(per_group, 0) + scatter
    order = torch.randperm(len(points), generator=generator)
    labels = torch.arange(groups).repeat_interleave(per_group)[order]
    return geometry.unit_directions(points[order] * torch.rand(len(points), 1, generator=generator).add(0.5)), labels


def test_exact_neighbours_equal_a_full_sort():
    W_dec = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    directions = geometry.unit_directions(W_dec)
    neighbours, cosines, exact, recall = geometry.find_neighbours(directions, 7)
    assert exact and recall == 1.0
    similarity = directions @ directions.T
    similarity.fill_diagonal_(-2)
    expected = similarity.argsort(dim=1, descending=True)[:, :7]
    assert torch.equal(neighbours, expected)
    assert torch.allclose(cosines, similarity.gather(1, expected), atol=1e-6)
    table = geometry.neighbour_table(neighbours, cosines, 5)
    assert table.schema.equals(atlas.NEIGHBOURS_SCHEMA)
    assert table.column("neighbours").to_pylist()[3] == expected[3, :5].tolist()


def test_approximate_neighbours_find_planted_neighbourhoods():
    directions, _ = clustered_directions()
    truth, _, _, _ = geometry.find_neighbours(directions, 10)
    found, cosines, exact, recall = geometry.find_neighbours(directions, 10, exact_up_to=100)
    assert not exact
    assert (found >= 0).all() and not (found == torch.arange(len(found)).unsqueeze(1)).any()
    overlap = geometry.overlap(truth.numpy(), found.numpy())
    assert overlap > 0.95
    assert recall == pytest.approx(overlap, abs=0.05)  # the sampled recall it reports is the true one
    # Cosines reported are the true ones, most similar first.
    assert torch.allclose(cosines, (directions.unsqueeze(1) * directions[found]).sum(-1), atol=1e-5)
    assert (cosines[:, :-1] >= cosines[:, 1:]).all()


def test_approximate_search_probes_until_its_recall_target_or_budget():
    # Directions with no structure are the hardest case: few probed cells find few true neighbours.
    directions = geometry.unit_directions(torch.randn(4000, 32, generator=torch.Generator().manual_seed(3)))
    truth, _, _, _ = geometry.find_neighbours(directions, 10)
    found, _, _, recall = geometry.find_neighbours(directions, 10, exact_up_to=100, recall_target=0.95)
    assert recall >= 0.95 and geometry.overlap(truth.numpy(), found.numpy()) >= 0.93
    _, _, _, hurried = geometry.find_neighbours(directions, 10, exact_up_to=100, recall_target=0.95,
                                                budget_seconds=1e-6)
    assert hurried < 0.9  # the budget stopped it at the first probe count, and it says what it reached


def test_clusters_and_map_keep_planted_groups_together():
    directions, labels = clustered_directions(groups=6, per_group=30)
    _, assignment = geometry.spherical_kmeans(directions, 6, seed=0)
    # Each planted group lands in one cluster (k-means on well-separated groups).
    for group in range(6):
        assert len(set(assignment[labels == group].tolist())) == 1
    neighbours, cosines, _, _ = geometry.find_neighbours(directions, 14)
    table = geometry.map_table(directions, clusters=6, known=(neighbours, cosines))
    assert table.schema.equals(atlas.MAP_SCHEMA)
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    assert np.isfinite(xy).all()
    distances = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    same = labels.numpy()[:, None] == labels.numpy()[None]
    assert distances[same].mean() * 3 < distances[~same].mean()
    again = geometry.map_table(directions, clusters=6, known=(neighbours, cosines))
    assert again.equals(table)  # seeded: the same map every time
    quality = geometry.map_quality(directions, xy, table.column("cluster").to_numpy())
    assert quality["cluster_agreement"] > 0.95 and quality["cluster_chance"] < 0.2
    assert quality["neighbours_kept"] > 0.3  # within a tight group the order of the 10 nearest is noise


def test_a_sampled_map_places_the_rest_beside_their_group():
    directions, labels = clustered_directions(groups=8, per_group=60)
    table = geometry.map_table(directions, clusters=8, sample=160)  # a third laid out by UMAP, the rest placed
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    assert np.isfinite(xy).all()
    centres = np.stack([xy[labels.numpy() == group].mean(axis=0) for group in range(8)])
    nearest_centre = np.linalg.norm(xy[:, None] - centres[None], axis=-1).argmin(axis=1)
    assert (nearest_centre == labels.numpy()).mean() > 0.95
    assert geometry.map_quality(directions, xy, table.column("cluster").to_numpy())["cluster_agreement"] > 0.9


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_logit_effects_follow_the_heads_reading_of_each_direction(tiny_models, architecture):
    folder = tiny_models[architecture]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    readout = readout_from_model(model)
    W_dec = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 3
    table = logit_effects(W_dec, readout, tokenizer, top=6, chunk_features=2)
    assert table.schema.equals(atlas.LOGITS_SCHEMA)
    norm = model.model.norm if architecture == "llama" else model.transformer.ln_f
    with torch.no_grad():
        # What the head makes of a residual that is only the direction, less what it makes of nothing.
        baseline = model.lm_head(norm.bias) if getattr(norm, "bias", None) is not None else 0
        direct = model.lm_head(norm(W_dec)) - baseline
    for row, expected in zip(table.to_pylist(), direct, strict=True):
        assert row["promoted_ids"] == expected.topk(6).indices.tolist()
        assert row["suppressed_ids"] == expected.topk(6, largest=False).indices.tolist()
        assert row["promoted_tokens"][0] == tokenizer.decode([row["promoted_ids"][0]])
    values = np.array(table.column("promoted_values").to_pylist())
    assert (np.diff(values, axis=1) <= 0).all()
    assert isinstance(table.column("feature"), pa.ChunkedArray)
