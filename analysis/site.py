"""The feature browser: the atlas as chunked data files and three page templates that render them.

``<analysis folder>/site/`` holds

- ``index.html`` (search and a paged list of features), ``feature.html`` (one template for every
  feature: ``feature.html#<id>``), ``map.html`` (the 2-D map, when ``map.parquet`` exists) and
  ``concepts.html`` (with the map);
- ``assets/``: the stylesheet and the page scripts;
- ``data/meta.js``: the dictionary's facts and how the data is laid out;
- ``data/vocab.js``: the string of every token id the atlas shows, once;
- ``data/features/<c>.js``: the records of features ``c * 1024 .. c * 1024 + 1023``;
- ``data/summaries/<c>.js``: density, maximum, top tokens and cluster of 2,048 features each, for
  lists (search results, the index, the map's hover);
- ``data/search/<s>.js``: the word index, sharded (``analysis.site_search``);
- ``data/map.js``: every mapped feature's position and cluster;
- ``concepts.html`` and ``data/concepts.js``: the features grouped by map cluster, each cluster named
  by the words its explanations share (``analysis.site_concepts``);
- ``data/order-<by>.js``: the first 10,000 feature ids by density, by max activation, rarest, and best
  explained (detection AUC).

The file count grows with features / 1,024 (plus the search shards), never with the features
themselves; ``analysis.site_data`` says how each file is encoded. The site opens from disk.

Every string from the corpus or the tokenizer is untrusted. It reaches a data file only inside
base64, and the page scripts put it into the page with ``textContent`` and ``createElement``,
never by parsing HTML. A Content-Security-Policy forbids inline scripts on every page as well.

Tables are read a block of features at a time (``site_data.feature_blocks``), so memory holds one
block of contexts plus a few numbers and words per feature, whatever the width.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lexica import storage
from lexica.analysis import atlas
from lexica.analysis.site_concepts import concepts_document
from lexica.analysis.site_data import (
    data_script,
    feature_blocks,
    feature_record,
    flat_values,
    levels,
    list_offsets,
    packed,
    packed_json,
    significant,
)
from lexica.analysis.site_search import (
    POSTINGS_PER_WORD,
    PROMOTED_WEIGHT,
    PROMOTED_WORDS,
    SEARCH_WINDOW,
    TOP_TOKEN_WEIGHT,
    WordIndex,
)
from lexica.progress import Progress

SITE_FOLDER = "site"
BUILT_FROM = "built-from.json"  # the explanation and score parts a site shows (see site_is_stale)
ASSET_FILES = ("site.css", "common.js", "index.js", "feature.js", "map.js", "concepts.js")
FEATURES_PER_CHUNK = 1024
FEATURES_PER_SUMMARY = 2048
TOP_TOKENS = 5  # a feature's most frequent example tokens, shown in lists
CHIP_TOKENS = 3  # ...of which a neighbour's entry shows this many
ORDERED_FEATURES = 10000  # features listed in each other order of the index (densest, strongest, rarest)
LOGIT_COLUMNS = ["feature", "promoted_ids", "promoted_tokens", "promoted_values", "suppressed_ids", "suppressed_tokens",
                 "suppressed_values"]
COMPRESSION_THREADS = 2
FILES_PER_WRITE = 64  # files handed to the file system in one fsspec pipe() call (concurrent on S3)

# Scripts only from the site's own files; `file:` beside 'self' because some browsers give a page
# opened from disk an opaque origin that 'self' does not match. No inline script or handler runs.
PAGE_POLICY = ("default-src 'none'; style-src 'self' file:; img-src 'self' file: data:; "
               "script-src 'self' file:; connect-src 'self'")


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


class _Writer:
    """Files go out in batches through fsspec; ``index.html`` is written last by the caller."""

    def __init__(self, fs, folder: str):
        self.fs, self.folder, self.pending, self.files, self.bytes = fs, folder, {}, 0, 0

    def add(self, relative_path: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        self.pending[storage.join(self.folder, relative_path)] = data
        self.bytes += len(data)
        if len(self.pending) >= FILES_PER_WRITE:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.fs.pipe(self.pending)
            self.files += len(self.pending)
            self.pending = {}


class _Features:
    """The per-feature numbers every pass needs, as arrays indexed by feature id."""

    def __init__(self, fs, folder: str):
        table = storage.open_parquet(fs, storage.join(folder, "features.parquet")).read(
            columns=["feature", "fires", "density", "max_activation", "mean_activation"], use_threads=False)
        ids = table["feature"].to_numpy().astype(np.int64)
        self.count = int(ids.max()) + 1 if len(ids) else 0
        self.present = np.zeros(self.count, dtype=bool)
        self.present[ids] = True
        self.fires = np.zeros(self.count, np.int64)
        self.density = np.zeros(self.count, np.float64)
        self.max_activation = np.zeros(self.count, np.float32)
        self.mean_activation = np.zeros(self.count, np.float32)
        self.fires[ids] = table["fires"].to_numpy()
        self.density[ids] = table["density"].to_numpy()
        self.max_activation[ids] = table["max_activation"].to_numpy()
        self.mean_activation[ids] = table["mean_activation"].to_numpy()
        self.top_tokens = np.full((self.count, TOP_TOKENS), -1, dtype=np.int32)


def _sorted_contexts(block: pa.Table) -> pa.Table:
    """A block's context rows by feature, top examples first, then quantile samples band by band."""
    order = pc.if_else(pc.equal(block["kind"], "top"), 0, 1)
    return block.append_column("order", order).sort_by(
        [("feature", "ascending"), ("order", "ascending"), ("band", "ascending"), ("rank", "ascending")])


def _first_pass(contexts: pa.Table, logits: pa.Table | None, features: _Features, vocabulary: _Vocabulary,
                words: WordIndex, explained: pa.Table) -> None:
    """First pass over one block: the tokens it shows, each feature's top tokens, and its search words
    (with the words of its explanation, if it has one)."""
    if explained.num_rows:
        split = pc.utf8_split_whitespace(pc.fill_null(explained["explanation"], ""))
        owners = np.repeat(explained["feature"].to_numpy(), pc.list_value_length(split).to_numpy())
        words.add(owners, pc.utf8_trim(pc.list_flatten(split), characters=EXPLANATION_PUNCTUATION),
                  np.full(len(owners), EXPLANATION_WEIGHT))
    vocabulary.add(flat_values(contexts["token_ids"]).to_numpy(zero_copy_only=False),
                   flat_values(contexts["tokens"]))
    if logits is not None:
        for side in ("promoted", "suppressed"):
            vocabulary.add(flat_values(logits[f"{side}_ids"]).to_numpy(zero_copy_only=False),
                           flat_values(logits[f"{side}_tokens"]))
    top = contexts.filter(pc.equal(contexts["kind"], "top"))
    if top.num_rows:
        offsets = list_offsets(top["token_ids"])
        lengths = np.diff(offsets)
        has_tokens = lengths > 0
        row_feature = top["feature"].to_numpy().astype(np.int64)
        centre = np.clip(top["center"].to_numpy().astype(np.int64), 0, np.maximum(lengths - 1, 0))
        flat_ids = flat_values(top["token_ids"]).to_numpy()
        flat_tokens = flat_values(top["tokens"])
        at_centre = (offsets[:-1] + centre)[has_tokens]
        centre_features = row_feature[has_tokens]
        _rank_top_tokens(centre_features, vocabulary.of(flat_ids[at_centre]), features.top_tokens)
        words.add(centre_features, flat_tokens.take(pa.array(at_centre)),
                  np.full(len(at_centre), TOP_TOKEN_WEIGHT))
        window = np.arange(-SEARCH_WINDOW, SEARCH_WINDOW + 1)
        positions = centre[:, None] + window[None, :]
        inside = (positions >= 0) & (positions < lengths[:, None]) & (window[None, :] != 0)
        taken = (offsets[:-1, None] + positions)[inside]
        words.add(np.broadcast_to(row_feature[:, None], positions.shape)[inside],
                  flat_tokens.take(pa.array(taken)), np.ones(len(taken), np.int32))
    if logits is not None and logits.num_rows:
        offsets = list_offsets(logits["promoted_tokens"])
        rank = np.arange(offsets[-1]) - np.repeat(offsets[:-1], np.diff(offsets))
        first = rank < PROMOTED_WORDS
        owners = np.repeat(logits["feature"].to_numpy(), np.diff(offsets))
        words.add(owners[first], flat_values(logits["promoted_tokens"]).filter(pa.array(first)),
                  np.full(int(first.sum()), PROMOTED_WEIGHT))
    words.close_block()


def _rank_top_tokens(row_features: np.ndarray, token_ids: np.ndarray, top_tokens: np.ndarray) -> None:
    """Each feature's most frequent example tokens (ties: the lower index) into ``top_tokens``."""
    if not len(row_features):
        return
    keys, counts = np.unique((row_features.astype(np.int64) << 32) | token_ids.astype(np.int64), return_counts=True)
    order = np.lexsort((keys, -counts, keys >> 32))
    keys = keys[order]
    pairs = np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1)
    starts = np.flatnonzero(np.diff(pairs[:, 0], prepend=-1))
    rank = np.arange(len(pairs)) - np.repeat(starts, np.diff(np.append(starts, len(pairs))))
    kept = rank < top_tokens.shape[1]
    top_tokens[pairs[kept, 0], rank[kept]] = pairs[kept, 1]


EXPLANATION_PUNCTUATION = ".,;:!?\"'()[]{}«»“”‘’"
EXPLANATION_WEIGHT = 3  # a word of the feature's explanation, in the search index
SUMMARY_EXPLANATION = 48  # characters of an explanation shown in lists (the page shows all of it)


def _annotation_stores(fs, folder: str):
    from lexica.analysis.explain import ExplanationStore
    from lexica.analysis.score import scores_store

    return ExplanationStore(folder, fs=fs), scores_store(folder, fs=fs)


def _part_names(explanations, scores) -> dict[str, list[str]]:
    return {"explanations": [path.rsplit("/", 1)[-1] for path in explanations.parts()],
            "scores": [path.rsplit("/", 1)[-1] for path in scores.parts()]}


def site_is_stale(analysis_folder_url: str, storage_options: dict | None = None) -> bool:
    """Whether the atlas has a site that lacks explanations or scores committed since it was built
    (``lexica explain``/``score`` rebuild it then: a run killed before its rebuild leaves one)."""
    fs, folder = storage.url_to_fs(analysis_folder_url, storage_options)
    site = storage.join(folder, SITE_FOLDER)
    if not storage.exists(fs, storage.join(site, "index.html")):
        return False
    try:
        built_from = json.loads(fs.cat_file(storage.join(site, BUILT_FROM)))
    except (FileNotFoundError, ValueError):
        return True
    return built_from != _part_names(*_annotation_stores(fs, folder))


class _Explanations:
    """The atlas's explanations (``lexica explain``), newest per feature, and the scores of those
    explanations (``lexica score``), sliced a block at a time."""

    def __init__(self, fs, folder: str):
        explanations, scores = _annotation_stores(fs, folder)
        # Listed before reading: a part committed in between makes the site look stale, never current.
        self.parts = _part_names(explanations, scores)
        self.table = explanations.latest()
        self.features = self.table["feature"].to_numpy().astype(np.int64)
        scores = scores.latest()
        current = dict(zip(self.table["feature"].to_pylist(), self.table["explanation"].to_pylist(), strict=True))
        # A score counts only for the explanation it scored (a feature explained again is unscored).
        self.scores = {row["feature"]: row for row in scores.to_pylist()
                       if current.get(row["feature"]) == row["explanation"]}

    def block(self, first: int, size: int = FEATURES_PER_CHUNK) -> pa.Table:
        start, stop = np.searchsorted(self.features, [first, first + size])
        return self.table.slice(int(start), int(stop - start))

    def texts(self, first: int, size: int) -> list[str]:
        """Explanation (or "") of each feature of ``[first, first + size)``."""
        block = self.block(first, size)
        texts = [""] * size
        for feature, text in zip(block["feature"].to_pylist(), block["explanation"].to_pylist(), strict=True):
            texts[feature - first] = text or ""
        return texts

    def score(self, feature: int) -> dict | None:
        """A feature page's scores: ``d``/``f`` detection/fuzzing [accuracy, F1, AUC], ``bd``/``bf`` the
        baseline's, ``n`` [positives, negatives, hard negatives], ``by`` the scorer."""
        row = self.scores.get(feature)
        if row is None:
            return None

        def triple(prefix: str, test: str) -> list[float | None]:
            return [None if row[f"{prefix}{test}_{metric}"] is None or math.isnan(row[f"{prefix}{test}_{metric}"])
                    else round(float(row[f"{prefix}{test}_{metric}"]), 3) for metric in ("accuracy", "f1", "auc")]

        return {"d": triple("", "detection"), "f": triple("", "fuzzing"), "bd": triple("baseline_", "detection"),
                "bf": triple("baseline_", "fuzzing"), "n": [row["positives"], row["negatives"], row["hard_negatives"]],
                "by": row["scorer"]}

    def summary_scores(self, first: int, size: int, test: str) -> list[float | None]:
        """``test``'s AUC (2 decimals, None if unscored) of each feature of ``[first, first + size)``."""
        values: list[float | None] = [None] * size
        for feature in range(first, first + size):
            row = self.scores.get(feature)
            value = row[f"{test}_auc"] if row else None
            if value is not None and not math.isnan(value):
                values[feature - first] = round(float(value), 2)
        return values


class _Vocabulary:
    """Every token id the site shows, numbered densely (0, 1, ...) in the order first met, with its string.

    Records store these indices, 16-bit when there are at most 65,536 of them: an atlas uses a
    fraction of a large model vocabulary, and small numbers compress better.
    """

    def __init__(self):
        self.index = np.full(0, -1, dtype=np.int64)  # model token id -> site index (-1: not met yet)
        self.model_ids: list[int] = []
        self.strings: list[str] = []

    def add(self, ids: np.ndarray, strings: pa.Array) -> None:
        if not len(ids):
            return
        ids = ids.astype(np.int64)
        if ids.min() < 0:
            raise ValueError(f"token id {int(ids.min())} in the atlas tables; ids are expected to be >= 0")
        if ids.max() >= len(self.index):
            self.index = np.concatenate([self.index, np.full(int(ids.max()) + 1 - len(self.index), -1, np.int64)])
        new = np.flatnonzero(self.index[ids] < 0)
        if not len(new):
            return
        distinct, first = np.unique(ids[new], return_index=True)
        self.index[distinct] = np.arange(len(self.strings), len(self.strings) + len(distinct))
        self.model_ids.extend(distinct.tolist())
        self.strings.extend(text or "" for text in strings.take(pa.array(new[first])).to_pylist())

    def of(self, ids: np.ndarray) -> np.ndarray:
        return self.index[ids.astype(np.int64)]

    @property
    def id_type(self) -> str:
        return "<u2" if len(self.strings) <= 1 << 16 else "<i4"

    def document(self) -> dict:
        return {"ids": self.model_ids, "text": self.strings}


def _doc_number(value: int) -> int | str:
    return value if abs(value) < 2**53 else str(value)  # JSON numbers beyond 2^53 lose digits in a browser


class _ChunkBuilder:
    """Second pass: the records of one block of features."""

    def __init__(self, features: _Features, layout: dict | None, vocabulary: _Vocabulary, explanations: _Explanations,
                 labels: dict[int, list] | None = None):
        self.features, self.layout, self.vocabulary, self.explanations = features, layout, vocabulary, explanations
        self.labels = labels or {}
        self.density = significant(features.density)
        self.maximum = significant(features.max_activation)
        self.mean = significant(features.mean_activation)

    def records(self, first: int, histograms: pa.Table, contexts: pa.Table, logits: pa.Table | None,
                neighbours: pa.Table | None) -> list[bytes]:
        """Each feature's uncompressed record (empty for an id the atlas does not hold)."""
        features, vocabulary = self.features, self.vocabulary
        ids = np.arange(first, min(first + FEATURES_PER_CHUNK, features.count))
        histogram_rows = self._rows(histograms, ids)
        histogram_offsets = list_offsets(histograms["histogram"])
        histogram_counts = flat_values(histograms["histogram"]).to_numpy(zero_copy_only=False)

        contexts = _sorted_contexts(contexts)
        context_rows = self._ranges(contexts, ids)
        token_offsets = list_offsets(contexts["token_ids"])
        flat_ids = flat_values(contexts["token_ids"]).to_numpy(zero_copy_only=False)
        site_ids = vocabulary.of(flat_ids).astype(vocabulary.id_type)
        flat_numbers = flat_values(contexts["values"]).to_numpy(zero_copy_only=False)
        row_maximum = features.max_activation[contexts["feature"].to_numpy().astype(np.int64)]
        token_levels = levels(flat_numbers, np.repeat(row_maximum, np.diff(token_offsets)))
        bands, docs, positions, centres = (contexts[name].to_numpy().tolist()
                                           for name in ("band", "doc_id", "position", "center"))
        activations = significant(contexts["activation"].to_numpy())
        context_lengths = np.diff(token_offsets).tolist()
        logit_lists = self._lists(logits, ids, ("promoted_ids", "promoted_values", "suppressed_ids",
                                                "suppressed_values"), id_columns=(0, 2))
        neighbour_lists = self._lists(neighbours, ids, ("neighbours", "cosines"), id_columns=())
        explained = self.explanations.texts(first, len(ids))

        records = []
        for index, feature in enumerate(ids.tolist()):
            if not features.present[feature]:
                records.append(b"")
                continue
            start, stop = context_rows[index]
            head = {"f": feature, "n": int(features.fires[feature]), "d": self.density[feature],
                    "mx": self.maximum[feature], "mn": self.mean[feature],
                    "h": self._histogram(histogram_rows[index], histogram_offsets, histogram_counts),
                    "c": [[bands[i], activations[i], _doc_number(docs[i]), positions[i], centres[i],
                           context_lengths[i]] for i in range(start, stop)]}
            if logit_lists is not None:
                promoted_ids, promoted_values, suppressed_ids, suppressed_values = (
                    column[index] for column in logit_lists)
                head["p"] = [promoted_ids, promoted_values]
                head["s"] = [suppressed_ids, suppressed_values]
            if neighbour_lists is not None:
                others, cosines = (column[index] for column in neighbour_lists)
                kept = [i for i, other in enumerate(others) if 0 <= other < features.count]
                head["nb"] = [[others[i] for i in kept], [round(cosines[i], 3) for i in kept],
                              [[t for t in features.top_tokens[others[i], :CHIP_TOKENS].tolist() if t >= 0]
                               for i in kept]]
            if explained[index]:
                head["x"] = explained[index]
                if (scores := self.explanations.score(feature)) is not None:
                    head["sc"] = scores
            if feature in self.labels:
                head["lb"] = self.labels[feature]
            if self.layout is not None and self.layout["mapped"][feature]:
                head["m"] = [round(float(self.layout["x"][feature]), 4), round(float(self.layout["y"][feature]), 4),
                             int(self.layout["cluster"][feature])]
            token_start, token_stop = token_offsets[start], token_offsets[stop]
            records.append(feature_record(head, site_ids[token_start:token_stop],
                                          token_levels[token_start:token_stop]))
        return records

    @staticmethod
    def _ranges(table: pa.Table, ids: np.ndarray) -> list[tuple[int, int]]:
        features = table["feature"].to_numpy()
        starts = np.searchsorted(features, ids, side="left")
        stops = np.searchsorted(features, ids, side="right")
        return list(zip(starts.tolist(), stops.tolist(), strict=True))

    @staticmethod
    def _rows(table: pa.Table, ids: np.ndarray) -> list[int]:
        """Row of each feature in a table with one row per feature (-1 when it has none)."""
        features = table["feature"].to_numpy()
        if not len(features):
            return [-1] * len(ids)
        found = np.searchsorted(features, ids)
        clipped = np.minimum(found, len(features) - 1)
        return np.where((found < len(features)) & (features[clipped] == ids), found, -1).tolist()

    def _lists(self, table: pa.Table | None, ids: np.ndarray, columns: tuple[str, ...],
               id_columns: tuple[int, ...]) -> list[list] | None:
        """Per feature of ``ids``, the list in each of ``columns`` (token ids as site indices, floats rounded)."""
        if table is None:
            return None
        rows = self._rows(table, ids)
        per_column = []
        for position, name in enumerate(columns):
            offsets = list_offsets(table[name])
            values = flat_values(table[name]).to_numpy(zero_copy_only=False)
            if position in id_columns:
                values = self.vocabulary.of(values).tolist()
            elif values.dtype.kind == "f":
                values = significant(values)
            else:
                values = values.tolist()
            per_column.append([values[offsets[row]:offsets[row + 1]] if row >= 0 else [] for row in rows])
        return per_column

    @staticmethod
    def _histogram(row: int, offsets: np.ndarray, counts: np.ndarray) -> list:
        if row < 0:
            return [0, []]
        counts = counts[offsets[row]:offsets[row + 1]]
        occupied = np.flatnonzero(counts)
        if not len(occupied):
            return [0, []]
        return [int(occupied[0]), counts[occupied[0]:occupied[-1] + 1].tolist()]


def _orderings(features: _Features, explanations: _Explanations) -> dict[str, np.ndarray]:
    """The first :data:`ORDERED_FEATURES` feature ids by density, by max activation, rarest that fired,
    and best explained (detection AUC of scored features) (ties: the lower id), for the index's other
    listings."""
    ids = np.flatnonzero(features.present)
    fired = ids[features.fires[ids] > 0]
    scored = np.array(sorted(feature for feature, row in explanations.scores.items()
                             if row["detection_auc"] is not None and not math.isnan(row["detection_auc"])
                             and feature < features.count), dtype=np.int64)
    auc = np.array([explanations.scores[feature]["detection_auc"] for feature in scored.tolist()])
    return {"density": ids[np.lexsort((ids, -features.density[ids]))][:ORDERED_FEATURES],
            "max": ids[np.lexsort((ids, -features.max_activation[ids]))][:ORDERED_FEATURES],
            "rare": fired[np.lexsort((fired, features.density[fired]))][:ORDERED_FEATURES],
            "score": scored[np.lexsort((scored, -auc))][:ORDERED_FEATURES] if len(scored) else scored}


def _read_labels(fs, folder: str) -> dict[int, list] | None:
    """Each feature's [[label, count], ...] from ``labels.parquet`` (``analysis.label_field``), if any."""
    path = storage.join(folder, "labels.parquet")
    if not storage.exists(fs, path):
        return None
    table = storage.open_parquet(fs, path).read(use_threads=False)
    return {feature: [[label, count] for label, count in zip(labels, counts, strict=True)]
            for feature, labels, counts in zip(table["feature"].to_pylist(), table["labels"].to_pylist(),
                                               table["counts"].to_pylist(), strict=True)}


def _read_layout(fs, folder: str, count: int) -> dict | None:
    path = storage.join(folder, "map.parquet")
    if not storage.exists(fs, path):
        return None
    table = storage.open_parquet(fs, path).read(use_threads=False)
    ids = table["feature"].to_numpy().astype(np.int64)
    keep = (ids >= 0) & (ids < count)
    layout = {"mapped": np.zeros(count, bool), "x": np.zeros(count, np.float32), "y": np.zeros(count, np.float32),
              "cluster": np.zeros(count, np.int32)}
    layout["mapped"][ids[keep]] = True
    for name in ("x", "y", "cluster"):
        layout[name][ids[keep]] = table[name].to_numpy()[keep]
    return layout


def _map_file(layout: dict) -> tuple[bytes, dict]:
    """Positions quantised to 16 bits over the map's extent (a pixel of a 65k-wide canvas)."""
    ids = np.flatnonzero(layout["mapped"]).astype(np.int32)
    x, y = layout["x"][ids].astype(np.float64), layout["y"][ids].astype(np.float64)
    extent = [float(x.min(initial=0)), float(x.max(initial=1)), float(y.min(initial=0)), float(y.max(initial=1))]

    def quantised(values: np.ndarray, low: float, high: float) -> np.ndarray:
        return np.round((values - low) / max(high - low, 1e-12) * 65535).astype("<u2")

    body = b"".join((ids.astype("<i4").tobytes(), quantised(x, *extent[:2]).tobytes(),
                     quantised(y, *extent[2:]).tobytes(),
                     np.clip(layout["cluster"][ids], 0, 65535).astype("<u2").tobytes()))
    return data_script("map", "bin", packed(body)), {"points": len(ids), "extent": extent}


def _facts(summary: dict) -> list[list[str]]:
    facts = []
    for key in ("model", "hook", "target_hook", "d_sae", "tokens", "store"):
        value = summary.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            facts.append([key, f"{value:,}" if isinstance(value, int) else str(value)])
    return facts


def _page(title: str, body_class: str, body: str, scripts: tuple[str, ...]) -> str:
    script_tags = "".join(f'<script src="{name}"></script>' for name in ("assets/common.js", "data/meta.js",
                                                                           *scripts))
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{PAGE_POLICY}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="assets/site.css"></head>'
            f'<body class="{body_class}">{body}<noscript><p>The atlas pages need JavaScript.</p></noscript>'
            f'{script_tags}</body></html>\n')


def _nav(has_map: bool) -> str:
    map_link = '<a href="map.html">map</a><a href="concepts.html">concepts</a>' if has_map else ""
    return f'<nav class="bar"><a href="index.html">Lexica atlas</a>{map_link}<span id="dictionary"></span></nav>'


def _index_page(name: str, has_map: bool) -> str:
    body = (f'{_nav(has_map)}<main><h1 id="title"></h1><p class="summary" id="facts"></p>'
            '<div class="controls"><input id="search" type="search" autocomplete="off" spellcheck="false" '
            'placeholder="Search: feature id, token or context word (prefix)" aria-label="search features">'
            '<label>list <select id="order" aria-label="list features by"><option value="id">by id</option>'
            '<option value="density">densest first</option><option value="max">strongest first (max act.)</option>'
            '<option value="rare">rarest that fired</option><option value="score">best explained (detection AUC)'
            '</option></select></label>'
            '<span id="status" role="status"></span></div>'
            '<section id="live-text" hidden><h2>Test your text</h2>'
            '<textarea id="text" rows="3" spellcheck="false" placeholder="Type text to see the features that fire on '
            'each token" aria-label="text to analyse"></textarea><div class="controls">'
            '<label>highlight feature <input id="watch" type="number" min="0" step="1"></label>'
            '<button id="analyse" type="button">Show features</button><span id="text-status" role="status"></span>'
            '</div><div id="text-tokens" class="ctx"></div><div id="token-features"></div></section>'
            '<table id="features"><thead><tr><th>feature</th><th>density</th><th>max act.</th>'
            '<th>top tokens</th><th>explanation</th><th title="detection / fuzzing AUC of the explanation">score</th>'
            '<th>matched</th><th>cluster</th></tr></thead><tbody></tbody>'
            '</table>'
            '<div class="pager"><button id="previous" type="button">← previous</button><span id="page"></span>'
            '<button id="next" type="button">next →</button></div></main>')
    return _page(f"{name} · Lexica atlas", "index-page", body, ("assets/index.js",))


def _feature_page(name: str, has_map: bool) -> str:
    body = (f'{_nav(has_map)}<main id="feature"><p class="empty" id="loading">Loading…</p></main>')
    return _page(f"Feature · {name} · Lexica atlas", "feature-page", body, ("assets/feature.js",))


def _concepts_page(name: str) -> str:
    body = (f'{_nav(True)}<main><h1>Concepts</h1><p class="summary" id="concepts-facts"></p>'
            '<div class="controls"><input id="filter" type="search" autocomplete="off" spellcheck="false" '
            'placeholder="Filter: a word of the concepts or their explanations" aria-label="filter concepts">'
            '<span id="status" role="status"></span></div><div id="concepts"></div></main>')
    return _page(f"Concepts · {name} · Lexica atlas", "concepts-page", body, ("assets/concepts.js",))


def _map_page(name: str) -> str:
    body = ('<nav class="bar"><a href="index.html">index</a><span class="hint">decoder directions in 2-D, coloured '
            'by cluster; scroll to zoom, drag to pan, click a point to open its feature</span>'
            '<button id="reset" type="button">reset view</button></nav>'
            '<div id="stage"><canvas id="map"></canvas><div id="tooltip" hidden></div></div>')
    return _page(f"Map · {name} · Lexica atlas", "map-page", body, ("assets/map.js",))


def build_site(analysis_folder_url: str, storage_options: dict | None = None) -> str:
    """Write ``<analysis folder>/site/`` from the atlas tables; returns the URL (or path) of its index.html.

    Locally the site is built in a hidden sibling folder and renamed into place, so ``site/`` is
    either the previous site or the finished new one. On object storage (no rename) the old site is
    removed first and ``index.html`` is written last: a site without it is one still being built.
    """
    summary = atlas.read_summary(analysis_folder_url, storage_options)
    fs, analysis_folder = storage.url_to_fs(analysis_folder_url, storage_options)
    for name in ("features", "contexts"):
        if not storage.exists(fs, storage.join(analysis_folder, f"{name}.parquet")):
            raise atlas.AtlasMissingError(f"{analysis_folder_url} has no {name}.parquet; run `lexica analysis "
                                          "features` first")
    final_folder = storage.join(analysis_folder, SITE_FOLDER)
    local = storage.is_local(fs)
    build_folder = storage.join(analysis_folder, f".site-build-{uuid.uuid4().hex[:8]}") if local else final_folder
    if not local and storage.exists(fs, final_folder):
        fs.rm(final_folder, recursive=True)
    if local:
        for sub in ("data/features", "data/summaries", "data/search", "assets"):
            fs.makedirs(storage.join(build_folder, sub), exist_ok=True)
    try:
        writer = _Writer(fs, build_folder)
        facts = _write_site(fs, analysis_folder, summary, writer)
        writer.flush()
        writer.add("index.html", _index_page(str(summary.get("dictionary", "atlas")), facts["has_map"]))
        writer.flush()
    except BaseException:
        if local:
            shutil.rmtree(build_folder, ignore_errors=True)
        raise
    if local:
        _swap_into_place(build_folder, final_folder)
    return storage.to_url(fs, storage.join(final_folder, "index.html"))


def _optional_path(fs, folder: str, name: str) -> str | None:
    path = storage.join(folder, f"{name}.parquet")
    return path if storage.exists(fs, path) else None


def _blocks(fs, path: str | None, columns: list[str], count: int):
    if path is None:  # a table the atlas lacks: no rows for any block
        return ((index, None) for index in range(-(-count // FEATURES_PER_CHUNK)))
    return feature_blocks(fs, path, columns, FEATURES_PER_CHUNK, count)


def _write_site(fs, folder: str, summary: dict, writer: _Writer) -> dict:
    for name in ASSET_FILES:
        writer.add(f"assets/{name}", resources.files("lexica.analysis").joinpath("site_assets", name).read_bytes())
    features = _Features(fs, folder)
    count = features.count
    chunks = -(-count // FEATURES_PER_CHUNK)
    contexts_path = storage.join(folder, "contexts.parquet")
    logits_path = _optional_path(fs, folder, "logits")
    neighbours_path = _optional_path(fs, folder, "neighbours")
    layout = _read_layout(fs, folder, count)
    explanations = _Explanations(fs, folder)
    progress = Progress("site", 2 * chunks, "blocks")

    # Pass 1: the vocabulary, top tokens and search words, block by block.
    vocabulary = _Vocabulary()
    words = WordIndex()
    done = 0
    context_columns = ["feature", "kind", "center", "token_ids", "tokens"]
    for (_, contexts), (_, logits) in zip(feature_blocks(fs, contexts_path, context_columns, FEATURES_PER_CHUNK, count),
                                          _blocks(fs, logits_path, LOGIT_COLUMNS, count), strict=True):
        _first_pass(contexts, logits, features, vocabulary, words, explanations.block(done * FEATURES_PER_CHUNK))
        done += 1
        progress.update(done, 0)  # tokens are counted as records are written
    shard_count, shards = words.shards(features.density)
    for shard, document in enumerate(shards):
        writer.add(f"data/search/{shard}.js", data_script(f"search/{shard}", "json", packed_json(document)))
    shards = None

    for first in range(0, count, FEATURES_PER_SUMMARY):
        last = min(first + FEATURES_PER_SUMMARY, count)
        document = {"first": first, "present": features.present[first:last].astype(int).tolist(),
                    "d": significant(features.density[first:last], 3),
                    "mx": significant(features.max_activation[first:last], 3),
                    "top": [[int(t) for t in row if t >= 0] for row in features.top_tokens[first:last]],
                    "cl": layout["cluster"][first:last].tolist() if layout is not None else None,
                    "ex": [text[:SUMMARY_EXPLANATION] + ("…" if len(text) > SUMMARY_EXPLANATION else "")
                           for text in explanations.texts(first, last - first)],
                    "sd": explanations.summary_scores(first, last - first, "detection"),
                    "sf": explanations.summary_scores(first, last - first, "fuzzing")}
        writer.add(f"data/summaries/{first // FEATURES_PER_SUMMARY}.js",
                   data_script(f"summaries/{first // FEATURES_PER_SUMMARY}", "json", packed_json(document)))

    # Pass 2: feature records, compressed on two threads (zlib lets go of the GIL).
    builder = _ChunkBuilder(features, layout, vocabulary, explanations, _read_labels(fs, folder))
    tokens = 0
    context_columns = ["feature", "kind", "rank", "band", "activation", "doc_id", "position", "token_ids", "values",
                       "center"]
    blocks = zip(feature_blocks(fs, storage.join(folder, "features.parquet"), ["feature", "histogram"],
                                FEATURES_PER_CHUNK, count),
                 feature_blocks(fs, contexts_path, context_columns, FEATURES_PER_CHUNK, count),
                 _blocks(fs, logits_path, [name for name in LOGIT_COLUMNS if not name.endswith("_tokens")], count),
                 _blocks(fs, neighbours_path, ["feature", "neighbours", "cosines"], count), strict=True)
    with ThreadPoolExecutor(COMPRESSION_THREADS) as pool:
        for (chunk, histograms), (_, contexts), (_, logits), (_, neighbours) in blocks:
            records = builder.records(chunk * FEATURES_PER_CHUNK, histograms, contexts, logits, neighbours)
            packed_records = list(pool.map(lambda record: packed(record) if record else "", records, chunksize=64))
            writer.add(f"data/features/{chunk}.js", data_script(f"features/{chunk}", "bin[]", packed_records))
            tokens += len(flat_values(contexts["token_ids"]))
            progress.update(chunks + chunk + 1, tokens)
    progress.update(2 * chunks, tokens, final=True)
    writer.add("data/vocab.js", data_script("vocab", "json", packed_json(vocabulary.document())))

    for name, ids in _orderings(features, explanations).items():
        writer.add(f"data/order-{name}.js", data_script(f"order-{name}", "bin", packed(ids.astype("<i4").tobytes())))

    has_map = layout is not None and bool(layout["mapped"].any())
    map_facts = None
    if has_map:
        map_script, map_facts = _map_file(layout)
        writer.add("data/map.js", map_script)
        writer.add("map.html", _map_page(str(summary.get("dictionary", "atlas"))))
        concepts = concepts_document(
            layout["cluster"], layout["mapped"], features.density,
            dict(zip(explanations.table["feature"].to_pylist(), explanations.table["explanation"].to_pylist(),
                     strict=True)),
            {feature: row["detection_auc"] for feature, row in explanations.scores.items()
             if row["detection_auc"] is not None and not math.isnan(row["detection_auc"])},
            lambda feature: [vocabulary.strings[t] for t in features.top_tokens[feature] if t >= 0])
        writer.add("data/concepts.js", data_script("concepts", "json", packed_json(concepts)))
        writer.add("concepts.html", _concepts_page(str(summary.get("dictionary", "atlas"))))
    name = str(summary.get("dictionary", "atlas"))
    writer.add("feature.html", _feature_page(name, has_map))
    meta = {"dictionary": name, "facts": _facts(summary), "features": count,
            "present": int(features.present.sum()), "per_chunk": FEATURES_PER_CHUNK,
            "per_summary": FEATURES_PER_SUMMARY, "search_shards": shard_count,
            "postings_per_word": POSTINGS_PER_WORD,
            "histogram_edges": [float(edge) for edge in summary.get("histogram_edges") or atlas.HISTOGRAM_EDGES],
            "has_logits": logits_path is not None, "has_neighbours": neighbours_path is not None,
            "has_map": has_map, "map": map_facts, "levels": 255, "explained": explanations.table.num_rows,
            "label_field": (summary.get("config") or {}).get("label_field"),
            "scored": len(explanations.scores),
            "id_bytes": 2 if vocabulary.id_type == "<u2" else 4}
    writer.add("data/meta.js", data_script("meta", "json", packed_json(meta)))
    writer.add(BUILT_FROM, json.dumps(explanations.parts))
    return meta


def _swap_into_place(build_folder: str, final_folder: str) -> None:
    retired = None
    if os.path.exists(final_folder):
        retired = f"{final_folder}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final_folder, retired)
    os.replace(build_folder, final_folder)
    if retired:
        shutil.rmtree(retired, ignore_errors=True)
