"""A synthetic feature atlas with the exact table schemas of ``analysis.atlas``, for site tests and benchmarks.

Tokens are drawn from a made-up vocabulary in which every feature has its own theme word (``w<id>``
style words are avoided so that a search for one word finds few features); with ``payloads`` the
tables also carry hostile corpus strings (script tags, event handlers, ``&amp;``) and whitespace
tokens, so a browser test can prove they are shown as text and never run.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lexica.analysis import atlas

PAYLOADS = (
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=1">',
    '"><svg onload=window.__pwned=1>',
    "</script>",
    "&amp;",
)
WHITESPACE_TOKENS = ("\n", "\t", " ", "\n\n", "\r\n")
# Features whose top contexts, example tokens and logit tokens carry the payloads.
PAYLOAD_FEATURES = (1, 2)
SYLLABLES = ("ka", "lo", "mi", "ra", "tu", "ve", "no", "si", "pe", "zu", "do", "fa", "gi", "ho", "ju", "ba")


def theme_word(feature: int) -> str:
    """The word a feature fires on: unique per feature (a base-16 spelling of its id in syllables)."""
    digits = [SYLLABLES[(feature >> shift) & 15] for shift in (12, 8, 4, 0)]
    return "".join(digits) + "x"


def _vocabulary(features: int, payloads: bool) -> list[str]:
    filler = [" the", " of", " and", " a", " to", " in", " is", " was", ".", ",", " model", " data",
              " layer", " token", " it", " that", " for", " on", " with", " as"]
    words = [f" {theme_word(feature)}" for feature in range(features)]
    extra = list(WHITESPACE_TOKENS) + (list(PAYLOADS) if payloads else [])
    return filler + extra + words


def write_synthetic_atlas(folder: str, features: int = 64, contexts_per_feature: int = 40,
                          tokens_per_context: int = 25, payloads: bool = True, seed: int = 0,
                          bands: int = 4, logit_tokens: int = 10, neighbours: int = 10,
                          with_logits: bool = True, with_neighbours: bool = True, with_map: bool = True,
                          storage_options: dict | None = None) -> dict:
    """Write features/contexts/logits/neighbours/map tables and summary.json into ``folder``.

    Returns facts the tests check against: ``theme`` (feature -> its example word), ``payloads``
    and ``payload_features``.
    """
    rng = np.random.default_rng(seed)
    vocabulary = _vocabulary(features, payloads)
    filler_count = 20
    special_start = filler_count
    special_count = len(WHITESPACE_TOKENS) + (len(PAYLOADS) if payloads else 0)
    theme_start = special_start + special_count
    feature_ids = np.arange(features, dtype=np.int32)

    # features.parquet: heavy-tailed densities, a histogram that sums to `fires`.
    fires = np.maximum(1, (rng.pareto(1.2, features) * 200).astype(np.int64))
    tokens_counted = 10_000_000
    max_activation = rng.uniform(1.0, 30.0, features).astype(np.float32)
    mean_activation = (max_activation * rng.uniform(0.1, 0.4, features)).astype(np.float32)
    centres = np.clip(atlas.histogram_bin(mean_activation), 0, atlas.HISTOGRAM_BINS - 1)
    bins = np.arange(atlas.HISTOGRAM_BINS)
    top_bins = atlas.histogram_bin(max_activation)
    shape = np.exp(-0.5 * ((bins[None, :] - centres[:, None]) / 3.0) ** 2) * (bins[None, :] <= top_bins[:, None])
    histogram = np.floor(shape / shape.sum(axis=1, keepdims=True) * fires[:, None]).astype(np.int64)
    histogram[np.arange(features), centres] += fires - histogram.sum(axis=1)
    features_table = pa.table({
        "feature": feature_ids, "fires": fires, "density": fires / tokens_counted,
        "max_activation": max_activation, "mean_activation": mean_activation,
        "histogram": pa.array(list(histogram), type=pa.list_(pa.int64())),
    })

    # contexts.parquet: `top` examples then `quantile` samples band by band.
    quantile_per_feature = (contexts_per_feature // 2) // bands * bands
    top_per_feature = contexts_per_feature - quantile_per_feature
    rows = features * contexts_per_feature
    row_feature = np.repeat(feature_ids, contexts_per_feature)
    slot = np.tile(np.arange(contexts_per_feature, dtype=np.int32), features)
    is_top = slot < top_per_feature
    rank = np.where(is_top, slot, slot - top_per_feature).astype(np.int32)
    band = np.where(is_top, -1, rank // max(quantile_per_feature // bands, 1)).astype(np.int8)
    feature_max = max_activation[row_feature]
    activation = np.where(is_top, feature_max * (1.0 - 0.02 * rank),
                          feature_max * (band + rng.uniform(0.05, 0.95, rows)) / bands).astype(np.float32)
    centre = rng.integers(tokens_per_context // 2, tokens_per_context, rows).astype(np.int32)

    token_ids = rng.integers(0, filler_count, (rows, tokens_per_context))
    # A third of the other tokens are other features' theme words (so context words vary).
    others = rng.random((rows, tokens_per_context)) < 0.3
    token_ids[others] = theme_start + rng.integers(0, features, others.sum())
    token_ids[np.arange(rows), centre] = theme_start + row_feature
    whitespace = rng.random((rows, tokens_per_context)) < 0.05
    token_ids[whitespace] = special_start + rng.integers(0, len(WHITESPACE_TOKENS), whitespace.sum())
    if payloads:
        for feature in PAYLOAD_FEATURES:
            if feature >= features:
                continue
            first = feature * contexts_per_feature
            for offset, _ in enumerate(PAYLOADS):
                payload_id = special_start + len(WHITESPACE_TOKENS) + offset
                row = first + offset % top_per_feature
                token_ids[row, centre[row]] = payload_id  # an example token (index top tokens)
                token_ids[first + top_per_feature - 1, offset] = payload_id  # plain context tokens
                token_ids[first + contexts_per_feature - 1, offset] = payload_id  # a quantile sample
    values = np.zeros((rows, tokens_per_context), dtype=np.float32)
    values[np.arange(rows), centre] = activation
    nearby = np.clip(centre[:, None] + np.arange(-3, 3)[None, :], 0, tokens_per_context - 1)
    spill = (rng.random(nearby.shape) < 0.4) * rng.uniform(0.05, 0.6, nearby.shape) * activation[:, None]
    np.maximum.at(values, (np.arange(rows)[:, None].repeat(nearby.shape[1], axis=1), nearby), spill)
    values[np.arange(rows), centre] = activation

    offsets = np.arange(0, rows * tokens_per_context + 1, tokens_per_context, dtype=np.int32)
    vocabulary_array = pa.array(vocabulary, type=pa.string())
    flat_ids = token_ids.reshape(-1).astype(np.int32)
    contexts_table = pa.table({
        "feature": row_feature, "kind": pa.array(np.where(is_top, "top", "quantile")),
        "rank": rank, "band": band, "activation": activation,
        "doc_id": rng.integers(0, 100_000, rows).astype(np.int64),
        "position": rng.integers(0, 2048, rows).astype(np.int32),
        "token_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
        "tokens": pa.ListArray.from_arrays(offsets, vocabulary_array.take(pa.array(flat_ids))),
        "values": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
        "center": centre,
    })

    folder = folder.rstrip("/")
    atlas.write_table(folder, "features", features_table, storage_options)
    atlas.write_table(folder, "contexts", contexts_table, storage_options)

    if with_logits:
        promoted = rng.integers(0, len(vocabulary), (features, logit_tokens)).astype(np.int32)
        promoted[:, 0] = theme_start + feature_ids
        suppressed = rng.integers(0, len(vocabulary), (features, logit_tokens)).astype(np.int32)
        if payloads:
            for feature in PAYLOAD_FEATURES:
                if feature < features:
                    ids = special_start + len(WHITESPACE_TOKENS) + np.arange(len(PAYLOADS))
                    promoted[feature, 1:1 + len(PAYLOADS)] = ids[: logit_tokens - 1]
                    suppressed[feature, : len(PAYLOADS)] = ids[:logit_tokens]
        logit_offsets = np.arange(0, features * logit_tokens + 1, logit_tokens, dtype=np.int32)
        promoted_values = -np.sort(-rng.uniform(0.1, 3.0, (features, logit_tokens)), axis=1).astype(np.float32)
        suppressed_values = np.sort(-rng.uniform(0.1, 3.0, (features, logit_tokens)), axis=1).astype(np.float32)

        def token_lists(ids: np.ndarray) -> pa.ListArray:
            return pa.ListArray.from_arrays(logit_offsets, vocabulary_array.take(pa.array(ids.reshape(-1))))

        logits_table = pa.table({
            "feature": feature_ids,
            "promoted_ids": pa.ListArray.from_arrays(logit_offsets, pa.array(promoted.reshape(-1))),
            "promoted_tokens": token_lists(promoted),
            "promoted_values": pa.ListArray.from_arrays(logit_offsets, pa.array(promoted_values.reshape(-1))),
            "suppressed_ids": pa.ListArray.from_arrays(logit_offsets, pa.array(suppressed.reshape(-1))),
            "suppressed_tokens": token_lists(suppressed),
            "suppressed_values": pa.ListArray.from_arrays(logit_offsets, pa.array(suppressed_values.reshape(-1))),
        })
        atlas.write_table(folder, "logits", logits_table, storage_options)

    if with_neighbours and features > 1:
        count = min(neighbours, features - 1)
        # Random other features (shift by 1..features-1 so a feature is never its own neighbour).
        shifts = np.stack([rng.choice(features - 1, count, replace=False) + 1 for _ in range(features)])
        neighbour_ids = ((feature_ids[:, None] + shifts) % features).astype(np.int32)
        cosines = -np.sort(-rng.uniform(0.05, 0.9, (features, count)), axis=1).astype(np.float32)
        neighbour_offsets = np.arange(0, features * count + 1, count, dtype=np.int32)
        neighbours_table = pa.table({
            "feature": feature_ids,
            "neighbours": pa.ListArray.from_arrays(neighbour_offsets, pa.array(neighbour_ids.reshape(-1))),
            "cosines": pa.ListArray.from_arrays(neighbour_offsets, pa.array(cosines.reshape(-1))),
        })
        atlas.write_table(folder, "neighbours", neighbours_table, storage_options)

    if with_map:
        clusters = max(1, int(np.sqrt(features / 2)))
        cluster = rng.integers(0, clusters, features).astype(np.int32)
        centres_xy = rng.uniform(-10, 10, (clusters, 2))
        xy = (centres_xy[cluster] + rng.normal(0, 1.0, (features, 2))).astype(np.float32)
        map_table = pa.table({"feature": feature_ids, "x": xy[:, 0], "y": xy[:, 1], "cluster": cluster})
        atlas.write_table(folder, "map", map_table, storage_options)

    dictionary_name = "synthetic <b>dictionary</b>" if payloads else "synthetic"
    atlas.write_summary(folder, {
        "dictionary": dictionary_name, "store": "memory://store", "model": "synthetic-model",
        "hook": "blocks.3.hook_resid_post", "d_sae": features, "tokens": tokens_counted,
        "histogram_edges": [float(edge) for edge in atlas.HISTOGRAM_EDGES],
    }, storage_options)
    return {"theme": {feature: theme_word(feature) for feature in range(features)},
            "payloads": PAYLOADS, "payload_features": [f for f in PAYLOAD_FEATURES if f < features]}
