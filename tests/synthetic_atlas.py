"""A synthetic feature atlas with the exact table schemas of ``analysis.atlas``, for site tests and benchmarks.

Tokens are drawn from a made-up vocabulary in which every feature has its own theme word (``w<id>``
style words are avoided so that a search for one word finds few features); with ``payloads`` the
tables also carry hostile corpus strings (script tags, event handlers, ``&amp;``) and whitespace
tokens, so a browser test can prove they are shown as text and never run.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def _vocabulary(themes: int, payloads: bool) -> list[str]:
    filler = [" the", " of", " and", " a", " to", " in", " is", " was", ".", ",", " model", " data",
              " layer", " token", " it", " that", " for", " on", " with", " as"]
    words = [f" {theme_word(theme)}" for theme in range(themes)]
    extra = list(WHITESPACE_TOKENS) + (list(PAYLOADS) if payloads else [])
    return filler + extra + words


FILLER_COUNT = 20
BLOCK_FEATURES = 16384  # features generated and written at a time (one row group each)


def write_synthetic_atlas(folder: str, features: int = 64, contexts_per_feature: int = 40,
                          tokens_per_context: int = 25, payloads: bool = True, seed: int = 0,
                          bands: int = 4, logit_tokens: int = 10, neighbours: int = 10,
                          with_logits: bool = True, with_neighbours: bool = True, with_map: bool = True,
                          themes: int | None = None, storage_options: dict | None = None) -> dict:
    """Write features/contexts/logits/neighbours/map tables and summary.json into ``folder``.

    ``themes`` bounds the theme words (feature f fires on word f % themes), as a real tokenizer's
    vocabulary bounds a real atlas's; by default every feature has its own. Tables are generated
    and written :data:`BLOCK_FEATURES` features at a time, so a million features fit in memory.
    Returns facts the tests check against: ``theme`` (feature -> its example word, for up to
    65,536 features), ``payloads`` and ``payload_features``.
    """
    from lexica import storage

    themes = themes or features
    vocabulary = pa.array(_vocabulary(themes, payloads), type=pa.string())
    folder = folder.rstrip("/")
    fs, path = storage.url_to_fs(folder, storage_options)
    fs.makedirs(path, exist_ok=True)
    names = ["features", "contexts"] + (["logits"] if with_logits else []) + (
        ["neighbours"] if with_neighbours and features > 1 else []) + (["map"] if with_map else [])
    handles = {name: fs.open(storage.join(path, f"{name}.parquet"), "wb") for name in names}
    writers = {name: pq.ParquetWriter(handles[name], atlas.TABLES[name], compression="zstd") for name in names}
    clusters = max(1, int(np.sqrt(features / 2)))
    cluster_centres = np.random.default_rng(seed).uniform(-10, 10, (clusters, 2))
    try:
        for first in range(0, features, BLOCK_FEATURES):
            rng = np.random.default_rng([seed, first])
            block = _block(rng, first, min(first + BLOCK_FEATURES, features), features, themes, vocabulary,
                           contexts_per_feature, tokens_per_context, payloads, bands, logit_tokens, neighbours,
                           cluster_centres)
            for name in names:
                writers[name].write_table(block[name].cast(atlas.TABLES[name]))
    finally:
        for name in names:
            writers[name].close()
            handles[name].close()
    dictionary_name = "synthetic <b>dictionary</b>" if payloads else "synthetic"
    atlas.write_summary(folder, {
        "dictionary": dictionary_name, "store": "memory://store", "model": "synthetic-model",
        "hook": "blocks.3.hook_resid_post", "d_sae": features, "tokens": TOKENS_COUNTED,
        "histogram_edges": [float(edge) for edge in atlas.HISTOGRAM_EDGES],
    }, storage_options)
    return {"theme": {feature: theme_word(feature % themes) for feature in range(min(features, 65536))},
            "payloads": PAYLOADS, "payload_features": [f for f in PAYLOAD_FEATURES if f < features]}


TOKENS_COUNTED = 10_000_000


def _block(rng, first: int, last: int, features: int, themes: int, vocabulary: pa.Array, contexts_per_feature: int,
           tokens_per_context: int, payloads: bool, bands: int, logit_tokens: int, neighbours: int,
           cluster_centres: np.ndarray) -> dict[str, pa.Table]:
    """The tables' rows of features [first, last)."""
    count = last - first
    special_start = FILLER_COUNT
    special_count = len(WHITESPACE_TOKENS) + (len(PAYLOADS) if payloads else 0)
    theme_start = special_start + special_count
    feature_ids = np.arange(first, last, dtype=np.int32)
    theme_of = theme_start + feature_ids.astype(np.int64) % themes
    tables = {}

    # features.parquet: heavy-tailed densities, a histogram that sums to `fires`.
    fires = np.maximum(1, (rng.pareto(1.2, count) * 200).astype(np.int64))
    max_activation = rng.uniform(1.0, 30.0, count).astype(np.float32)
    mean_activation = (max_activation * rng.uniform(0.1, 0.4, count)).astype(np.float32)
    centres = np.clip(atlas.histogram_bin(mean_activation), 0, atlas.HISTOGRAM_BINS - 1)
    bins = np.arange(atlas.HISTOGRAM_BINS)
    top_bins = atlas.histogram_bin(max_activation)
    shape = np.exp(-0.5 * ((bins[None, :] - centres[:, None]) / 3.0) ** 2) * (bins[None, :] <= top_bins[:, None])
    histogram = np.floor(shape / shape.sum(axis=1, keepdims=True) * fires[:, None]).astype(np.int64)
    histogram[np.arange(count), centres] += fires - histogram.sum(axis=1)
    histogram_offsets = np.arange(0, count * atlas.HISTOGRAM_BINS + 1, atlas.HISTOGRAM_BINS, dtype=np.int32)
    tables["features"] = pa.table({
        "feature": feature_ids, "fires": fires, "density": fires / TOKENS_COUNTED,
        "max_activation": max_activation, "mean_activation": mean_activation,
        "histogram": pa.ListArray.from_arrays(histogram_offsets, pa.array(histogram.reshape(-1))),
    })

    # contexts.parquet: `top` examples then `quantile` samples band by band.
    quantile_per_feature = (contexts_per_feature // 2) // bands * bands
    top_per_feature = contexts_per_feature - quantile_per_feature
    rows = count * contexts_per_feature
    row_local = np.repeat(np.arange(count), contexts_per_feature)
    slot = np.tile(np.arange(contexts_per_feature, dtype=np.int32), count)
    is_top = slot < top_per_feature
    rank = np.where(is_top, slot, slot - top_per_feature).astype(np.int32)
    band = np.where(is_top, -1, rank // max(quantile_per_feature // bands, 1)).astype(np.int8)
    feature_max = max_activation[row_local]
    activation = np.where(is_top, feature_max * (1.0 - 0.02 * rank),
                          feature_max * (band + rng.uniform(0.05, 0.95, rows)) / bands).astype(np.float32)
    centre = rng.integers(tokens_per_context // 2, tokens_per_context, rows).astype(np.int32)

    token_ids = rng.integers(0, FILLER_COUNT, (rows, tokens_per_context), dtype=np.int32)
    # A third of the other tokens are other features' theme words (so context words vary).
    others = rng.random((rows, tokens_per_context)) < 0.3
    token_ids[others] = theme_start + rng.integers(0, themes, others.sum())
    token_ids[np.arange(rows), centre] = theme_of[row_local]
    whitespace = rng.random((rows, tokens_per_context)) < 0.05
    token_ids[whitespace] = special_start + rng.integers(0, len(WHITESPACE_TOKENS), whitespace.sum())
    if payloads:
        for feature in PAYLOAD_FEATURES:
            if not first <= feature < last:
                continue
            row_first = (feature - first) * contexts_per_feature
            for offset, _ in enumerate(PAYLOADS):
                payload_id = special_start + len(WHITESPACE_TOKENS) + offset
                row = row_first + offset % top_per_feature
                token_ids[row, centre[row]] = payload_id  # an example token (index top tokens)
                token_ids[row_first + top_per_feature - 1, offset] = payload_id  # plain context tokens
                token_ids[row_first + contexts_per_feature - 1, offset] = payload_id  # a quantile sample
    values = np.zeros((rows, tokens_per_context), dtype=np.float32)
    nearby = np.clip(centre[:, None] + np.arange(-3, 3)[None, :], 0, tokens_per_context - 1)
    spill = (rng.random(nearby.shape) < 0.4) * rng.uniform(0.05, 0.6, nearby.shape) * activation[:, None]
    np.maximum.at(values, (np.arange(rows)[:, None].repeat(nearby.shape[1], axis=1), nearby), spill)
    values[np.arange(rows), centre] = activation

    offsets = np.arange(0, rows * tokens_per_context + 1, tokens_per_context, dtype=np.int32)
    flat_ids = token_ids.reshape(-1)
    tables["contexts"] = pa.table({
        "feature": feature_ids[row_local], "kind": pa.array(np.where(is_top, "top", "quantile")),
        "rank": rank, "band": band, "activation": activation,
        "doc_id": rng.integers(0, 100_000, rows).astype(np.int64),
        "position": rng.integers(0, 2048, rows).astype(np.int32),
        "token_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
        "tokens": pa.ListArray.from_arrays(offsets, vocabulary.take(pa.array(flat_ids))),
        "values": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
        "center": centre,
    })

    size = len(vocabulary)
    logit_offsets = np.arange(0, count * logit_tokens + 1, logit_tokens, dtype=np.int32)
    promoted = rng.integers(0, size, (count, logit_tokens)).astype(np.int32)
    promoted[:, 0] = theme_of
    suppressed = rng.integers(0, size, (count, logit_tokens)).astype(np.int32)
    if payloads:
        for feature in PAYLOAD_FEATURES:
            if first <= feature < last:
                ids = special_start + len(WHITESPACE_TOKENS) + np.arange(len(PAYLOADS))
                promoted[feature - first, 1:1 + len(PAYLOADS)] = ids[: logit_tokens - 1]
                suppressed[feature - first, : len(PAYLOADS)] = ids[:logit_tokens]
    promoted_values = -np.sort(-rng.uniform(0.1, 3.0, (count, logit_tokens)), axis=1).astype(np.float32)
    suppressed_values = np.sort(-rng.uniform(0.1, 3.0, (count, logit_tokens)), axis=1).astype(np.float32)

    def lists(values: np.ndarray, offsets: np.ndarray = logit_offsets) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))

    def token_lists(ids: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(logit_offsets, vocabulary.take(pa.array(ids.reshape(-1))))

    tables["logits"] = pa.table({
        "feature": feature_ids, "promoted_ids": lists(promoted), "promoted_tokens": token_lists(promoted),
        "promoted_values": lists(promoted_values), "suppressed_ids": lists(suppressed),
        "suppressed_tokens": token_lists(suppressed), "suppressed_values": lists(suppressed_values),
    })

    if features > 1:
        neighbour_count = min(neighbours, features - 1)
        # Random other features (shift by 1..features-1 so a feature is never its own neighbour).
        shifts = rng.integers(1, features, (count, neighbour_count))
        neighbour_ids = ((feature_ids[:, None].astype(np.int64) + shifts) % features).astype(np.int32)
        cosines = -np.sort(-rng.uniform(0.05, 0.9, (count, neighbour_count)), axis=1).astype(np.float32)
        neighbour_offsets = np.arange(0, count * neighbour_count + 1, neighbour_count, dtype=np.int32)
        tables["neighbours"] = pa.table({"feature": feature_ids, "neighbours": lists(neighbour_ids, neighbour_offsets),
                                         "cosines": lists(cosines, neighbour_offsets)})

    cluster = rng.integers(0, len(cluster_centres), count).astype(np.int32)
    xy = (cluster_centres[cluster] + rng.normal(0, 1.0, (count, 2))).astype(np.float32)
    tables["map"] = pa.table({"feature": feature_ids, "x": xy[:, 0], "y": xy[:, 1], "cluster": cluster})
    return tables
