"""The browser's word search: which features each word leads to, in shards a query loads one of.

A feature's words are its top tokens (the tokens its top examples fire on), its first promoted
logit tokens, and the tokens within :data:`SEARCH_WINDOW` of each top example; each stripped and
lower-cased. A word's weight in a feature counts how often it appears there, top tokens counting
:data:`TOP_TOKEN_WEIGHT` times and promoted tokens :data:`PROMOTED_WEIGHT` times; a feature keeps
its :data:`WORDS_PER_FEATURE` heaviest words.

The index maps a word to its features, heaviest first, at most :data:`POSTINGS_PER_WORD` of them
(with the full count). Words are sharded by their first :data:`KEY_CHARACTERS` characters, so
every word a query can match as a prefix lies in the one shard of the query's own first
characters; the shard count grows with the index so a shard stays near :data:`SHARD_BYTES`.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lexica.analysis.site_data import fnv1a

SEARCH_WINDOW = 3
WORDS_PER_FEATURE = 32
TOP_TOKEN_WEIGHT = 4
PROMOTED_WEIGHT = 2
PROMOTED_WORDS = 5
POSTINGS_PER_WORD = 500
KEY_CHARACTERS = 3
SHARD_BYTES = 1 << 18  # a shard's expected compressed size; a query loads one (keys are not split, so some hold more)


def search_key(word: str) -> str:
    return word[:KEY_CHARACTERS]


def shard_of(word: str, shards: int) -> int:
    return fnv1a(search_key(word)) % shards


def normalised(strings: pa.Array) -> pa.Array:
    return pc.utf8_lower(pc.utf8_trim_whitespace(pc.fill_null(strings, "")))


class WordIndex:
    """Collects (word, feature, weight) block by block, then writes the shards."""

    def __init__(self):
        self.word_ids: dict[str, int] = {}
        self.pending: list[pa.Table] = []  # this block's (feature, word, weight) rows
        self.kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (word id, feature, weight) of past blocks

    def add(self, features: np.ndarray, words: pa.Array, weights: np.ndarray) -> None:
        """Weighted words of some features; a feature's words may come in several calls of one block."""
        table = pa.table({"feature": pa.array(features, pa.int32()), "word": normalised(words),
                          "weight": pa.array(weights, pa.int32())})
        table = table.filter(pc.not_equal(table["word"], ""))
        if table.num_rows:
            self.pending.append(table)

    def close_block(self) -> None:
        """Sum each (feature, word) of the block added so far and keep each feature's heaviest words."""
        if not self.pending:
            return
        table, self.pending = pa.concat_tables(self.pending), []
        table = table.group_by(["feature", "word"]).aggregate([("weight", "sum")])
        table = table.sort_by([("feature", "ascending"), ("weight_sum", "descending"), ("word", "ascending")])
        features = table["feature"].to_numpy()
        starts = np.flatnonzero(np.diff(features, prepend=-1))
        rank = np.arange(len(features)) - np.repeat(starts, np.diff(np.append(starts, len(features))))
        kept = table.filter(pa.array(rank < WORDS_PER_FEATURE))
        encoded = pc.dictionary_encode(kept["word"]).combine_chunks()
        local_ids = np.array([self.word_ids.setdefault(word, len(self.word_ids))
                              for word in encoded.dictionary.to_pylist()], dtype=np.int32)
        self.kept.append((local_ids[encoded.indices.to_numpy()], kept["feature"].to_numpy().astype(np.int32),
                           kept["weight_sum"].to_numpy().astype(np.int32)))

    def shards(self, density: np.ndarray) -> tuple[int, list[dict]]:
        """(shard count, each shard's document: ``words``, ``features`` per word, ``count`` per word)."""
        self.close_block()
        words = list(self.word_ids)
        if self.kept:
            word_id, feature, weight = (np.concatenate(column) for column in zip(*self.kept, strict=True))
        else:
            word_id = feature = weight = np.empty(0, np.int32)
        self.kept = []
        # Heaviest first; among equals the denser feature (more to see), then the lower id.
        order = np.lexsort((feature, -density[feature] if len(feature) else feature, -weight, word_id))
        word_id, feature = word_id[order], feature[order]
        starts = np.searchsorted(word_id, np.arange(len(words) + 1))
        counts = np.diff(starts)
        kept = np.minimum(counts, POSTINGS_PER_WORD)
        # ~3 bytes per posting and ~12 per word once compressed (measured on the demo and synthetic atlases).
        estimate = 3 * int(kept.sum()) + 12 * len(words)
        shard_count = 1 << max(0, math.ceil(math.log2(max(1, estimate / SHARD_BYTES))))
        documents = [{"words": [], "features": [], "count": []} for _ in range(shard_count)]
        for index, word in enumerate(words):
            document = documents[shard_of(word, shard_count)]
            document["words"].append(word)
            document["features"].append(feature[starts[index]:starts[index] + kept[index]].tolist())
            document["count"].append(int(counts[index]))
        return shard_count, documents
