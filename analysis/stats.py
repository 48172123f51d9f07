"""The feature-statistics pass (docs/analysis.md): one read of the store through the dictionary that keeps,
per feature, its firing count, activation sum, maximum and histogram, its top activations and a
uniform sample of the tokens it fires on.

Every piece of the state merges exactly, so the result is identical whatever the number of workers
and whichever parts each one reads:

- counts and histograms are integers; the activation sum is integer too: each float32 activation is
  an integer multiple of a power of two, summed per feature in one int64 accumulator per band of
  eight binary exponents, so no sum depends on the order of its additions;
- top examples are the first N under a total order (activation descending, then doc_id, position);
- samples are the N firing tokens with the smallest hash priority of (feature, doc_id, position): a
  uniform sample that needs no random state and merges by keeping the N smallest again.

Both kept sets live in flat arrays sorted by one packed int64 key (feature in the high bits), so a
merge is one ``argsort``; new candidates are first filtered against each feature's current N-th key
and buffered, then merged in bulk.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from lexica.analysis import atlas
from lexica.analysis.config import AnalysisConfig
from lexica.models import resolve_device
from lexica.progress import Progress
from lexica.store import ActivationStore, CommitRecord
from lexica.train.architectures import SparseCode

# float32 biased exponents (0..255) grouped in bands of 8: within a band every value is an integer
# number of the band's unit below 2^31, so an int64 accumulator absorbs 2^32 of them exactly.
SUM_BAND_BITS = 8
SUM_BANDS = 256 // SUM_BAND_BITS
# Candidates are merged into the kept sets once the buffer holds this many, or as many as are kept.
MERGE_AT_LEAST = 1 << 16
# A Ray task reads about 1 / (workers × this) of the store: small enough to balance uneven parts,
# large enough that merging its partial state costs little next to computing it.
TASKS_PER_WORKER = 4
TOP_VALUE_MASK = 0x7FFFFFFF  # float32 bits of a positive value, stored inverted so larger sorts first

_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN, _FEATURE_SALT = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93)


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose outputs look independent and uniform."""
    values = values ^ (values >> np.uint64(30))
    values = values * _MIX_1
    values = values ^ (values >> np.uint64(27))
    values = values * _MIX_2
    return values ^ (values >> np.uint64(31))


def feature_bits(d_sae: int) -> int:
    return max(1, (d_sae - 1).bit_length())


def priority_bits(d_sae: int) -> int:
    """Bits of a sample priority: what is left of a non-negative int64 after the feature id."""
    return 63 - feature_bits(d_sae)


def token_hashes(doc_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix64(doc_ids.astype(np.uint64) * _GOLDEN + positions.astype(np.uint64))


def _priorities_from_token_hashes(token_hash: np.ndarray, features: np.ndarray, d_sae: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        mixed = _mix64(token_hash ^ (features.astype(np.uint64) * _FEATURE_SALT))
    return (mixed >> np.uint64(64 - priority_bits(d_sae))).astype(np.int64)


def sample_priority(features: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray, d_sae: int) -> np.ndarray:
    """Sampling priority (int64 ≥ 0) of each (feature, doc_id, position): a feature's sample is its
    firing tokens with the smallest priorities (ties: lower doc_id, then lower position)."""
    return _priorities_from_token_hashes(token_hashes(np.asarray(doc_ids), np.asarray(positions)),
                                         np.asarray(features), d_sae)


# ---------------------------------------------------------------- kept sets: first N per feature


def _first_per_feature(feature_shift: int, limit: int, sorted_prefix: int, keys: np.ndarray, doc_ids: np.ndarray,
                       positions: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """The first ``limit`` entries of each feature under (key, doc_id, position), sorted that way.

    The first ``sorted_prefix`` entries (what was kept before) are already in that order: only the
    rest is sorted, and a stable sort of the two runs merges them in linear time. Keys carry the
    feature in their high bits, so that sort groups and orders; only runs of equal keys (equal
    activations, e.g. repeated text) are then re-sorted by doc_id and position."""
    order = np.r_[np.arange(sorted_prefix), sorted_prefix + np.argsort(keys[sorted_prefix:])]
    order = order[np.argsort(keys[order], kind="stable")]
    sorted_keys = keys[order]
    tied = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(tied):
        slots = np.union1d(tied, tied + 1)  # every member of a run of equal keys
        members = order[slots]
        order[slots] = members[np.lexsort((positions[members], doc_ids[members], keys[members]))]
    features = sorted_keys >> feature_shift
    indexes = np.arange(len(features))
    starts = np.flatnonzero(np.r_[True, features[1:] != features[:-1]]) if len(features) else indexes
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(features)]))
    keep = order[indexes - group_start < limit]
    return (keys[keep], doc_ids[keep], positions[keep], *(column[keep] for column in columns))


def _last_kept_key(keys: np.ndarray, feature_shift: int, limit: int, d_sae: int) -> np.ndarray:
    """Per feature, the key of its ``limit``-th kept entry, or -1 while it holds fewer."""
    counts = np.bincount(keys >> feature_shift, minlength=d_sae)
    full = np.flatnonzero(counts == limit)
    last = np.full(d_sae, -1, dtype=np.int64)
    last[full] = keys[np.cumsum(counts)[full] - 1]
    return last


def _top_keys(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Packed (feature, activation descending) keys; positive float32 bits order like the values."""
    return (features.astype(np.int64) << 32) | (TOP_VALUE_MASK - values.view(np.int32)).astype(np.int64)


def _top_values(keys: np.ndarray) -> np.ndarray:
    return (TOP_VALUE_MASK - (keys & 0xFFFFFFFF)).astype(np.int32).view(np.float32)


def _dense_rows(keys: np.ndarray, feature_shift: int, width: int, d_sae: int, fill,
                column: np.ndarray) -> np.ndarray:
    """Sorted flat entries of a kept set as a [d_sae, width] array, each feature's row left-aligned."""
    features = keys >> feature_shift
    counts = np.bincount(features, minlength=d_sae)
    ranks = np.arange(len(keys)) - np.repeat(np.cumsum(counts) - counts, counts)
    dense = np.full((d_sae, width), fill, dtype=column.dtype)
    dense[features, ranks] = column
    return dense


# ---------------------------------------------------------------- the result


@dataclass
class FeatureStatistics:
    """Per-feature statistics of ``tokens`` store tokens. Example arrays are [d_sae, N], each feature's
    entries left-aligned in order (top: activation descending; samples: priority ascending), padded
    with activation 0, doc_id -1, position -1 beyond its ``*_count``."""

    tokens: int
    d_sae: int
    fires: np.ndarray  # int64 [d_sae] tokens with activation > 0
    activation_sum: np.ndarray  # float64 [d_sae] (exact sum, rounded once)
    max_activation: np.ndarray  # float32 [d_sae], 0 where it never fired
    histogram: np.ndarray  # int64 [d_sae, atlas.HISTOGRAM_BINS]
    top_count: np.ndarray  # int32 [d_sae]
    top_activation: np.ndarray  # float32 [d_sae, top_examples]
    top_doc_id: np.ndarray  # int64
    top_position: np.ndarray  # int32
    sample_count: np.ndarray  # int32 [d_sae]
    sample_activation: np.ndarray  # float32 [d_sae, samples]
    sample_doc_id: np.ndarray  # int64
    sample_position: np.ndarray  # int32
    sample_priority: np.ndarray  # int64, -1 as padding

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean activation over the tokens each feature fired on (0 where it never fired)."""
        return (self.activation_sum / np.maximum(self.fires, 1)).astype(np.float32)

    @property
    def density(self) -> np.ndarray:
        return self.fires / max(self.tokens, 1)

    def features_table(self) -> pa.Table:
        offsets = pa.array(np.arange(self.d_sae + 1, dtype=np.int32) * atlas.HISTOGRAM_BINS)
        histogram = pa.ListArray.from_arrays(offsets, pa.array(self.histogram.reshape(-1), pa.int64()))
        columns = [pa.array(np.arange(self.d_sae, dtype=np.int32)), pa.array(self.fires, pa.int64()),
                   pa.array(self.density, pa.float64()), pa.array(self.max_activation, pa.float32()),
                   pa.array(self.mean_activation, pa.float32()), histogram]
        return pa.Table.from_arrays(columns, schema=atlas.FEATURES_SCHEMA)

    def examples_table(self, bands: int, per_band: int) -> pa.Table:
        """The examples to show: every top example (kind "top", band -1, rank by activation), then
        per feature its samples sorted by activation, cut into ``bands`` equal-count bands (band 0
        lowest) with ``per_band`` examples spread evenly inside each (kind "quantile", rank running
        band by band). Rows are ordered by feature, top before quantile, then rank."""
        top_features, top_ranks = np.nonzero(np.arange(self.top_activation.shape[1]) < self.top_count[:, None])
        top = {"feature": top_features, "rank": top_ranks, "band": np.full(len(top_features), -1),
               "activation": self.top_activation[top_features, top_ranks],
               "doc_id": self.top_doc_id[top_features, top_ranks],
               "position": self.top_position[top_features, top_ranks]}
        quantile = self._quantile_examples(bands, per_band)
        kinds = np.r_[np.zeros(len(top_features), np.int8), np.ones(len(quantile["feature"]), np.int8)]
        columns = {name: np.concatenate([top[name], quantile[name]]) for name in top}
        order = np.lexsort((columns["rank"], kinds, columns["feature"]))
        kind_names = pa.DictionaryArray.from_arrays(pa.array(kinds[order]), pa.array(["top", "quantile"]))
        return pa.table({
            "feature": pa.array(columns["feature"][order], pa.int32()),
            "kind": kind_names.cast(pa.string()),
            "rank": pa.array(columns["rank"][order], pa.int32()),
            "band": pa.array(columns["band"][order], pa.int8()),
            "activation": pa.array(columns["activation"][order], pa.float32()),
            "doc_id": pa.array(columns["doc_id"][order], pa.int64()),
            "position": pa.array(columns["position"][order], pa.int32()),
        })

    def _quantile_examples(self, bands: int, per_band: int) -> dict[str, np.ndarray]:
        width = self.sample_activation.shape[1]
        counts = self.sample_count.astype(np.int64)
        padding = np.arange(width) >= counts[:, None]
        # Each feature's samples by activation (ties: doc_id, position); padding sorts last.
        order = np.lexsort((self.sample_position, self.sample_doc_id, self.sample_activation, padding), axis=1)
        band_index = np.arange(bands)[None, :, None]
        band_start = band_index * counts[:, None, None] // bands
        band_size = (band_index + 1) * counts[:, None, None] // bands - band_start
        slot = np.arange(per_band)[None, None, :]
        # Up to per_band evenly spaced members of each band (all of them when it holds fewer).
        offset = np.where(band_size <= per_band, slot, (2 * slot + 1) * band_size // (2 * max(per_band, 1)))
        chosen = np.broadcast_to(slot < band_size, (self.d_sae, bands, per_band))
        features, band, _ = np.nonzero(chosen)
        sorted_slot = (band_start + offset)[chosen]
        column = order[features, sorted_slot]
        ranks = np.cumsum(chosen.reshape(self.d_sae, -1), axis=1).reshape(chosen.shape)[chosen] - 1
        return {"feature": features, "rank": ranks, "band": band,
                "activation": self.sample_activation[features, column],
                "doc_id": self.sample_doc_id[features, column],
                "position": self.sample_position[features, column]}


# ---------------------------------------------------------------- the accumulator


def _joined(kept: tuple[np.ndarray, ...], pending: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """Kept entries and buffered candidates, column by column, in one array each."""
    return [np.concatenate(column) for column in zip(kept, *pending, strict=True)]


class StatisticsAccumulator:
    """The statistics of the tokens added so far; partial states of disjoint tokens merge exactly."""

    def __init__(self, d_sae: int, top_examples: int, samples: int):
        self.d_sae, self.top_examples, self.samples = d_sae, top_examples, samples
        self.sample_shift = priority_bits(d_sae)
        self.tokens = 0
        self.fires = torch.zeros(d_sae, dtype=torch.int64)
        self.sum_units = torch.zeros(d_sae * SUM_BANDS, dtype=torch.int64)
        self.max_activation = torch.zeros(d_sae, dtype=torch.float32)
        self.histogram = torch.zeros(d_sae * atlas.HISTOGRAM_BINS, dtype=torch.int64)
        self.top = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32))
        self.sample = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32))
        self._top_pending: list[tuple[np.ndarray, ...]] = []
        self._sample_pending: list[tuple[np.ndarray, ...]] = []
        self._top_pending_entries = self._sample_pending_entries = 0
        # Candidate filters: a feature's N-th kept activation / priority once it holds N, else the
        # loosest value. Ties pass: doc_id and position may still let them in.
        self._top_floor = torch.zeros(d_sae, dtype=torch.float32)
        self._sample_ceiling = np.full(d_sae, np.iinfo(np.int64).max, dtype=np.int64)

    def add(self, doc_ids: np.ndarray, positions: np.ndarray, code: SparseCode) -> None:
        """Count one encoded batch: ``code`` holds the rows of ``doc_ids``/``positions`` in order."""
        values, indices = code.values.detach().cpu(), code.indices.detach().cpu()
        width = values.shape[1]
        self.tokens += len(doc_ids)
        flat_values = values.reshape(-1)
        active = (flat_values > 0).nonzero().squeeze(1)
        if not len(active):
            return
        activations = flat_values[active].float()
        features = indices.reshape(-1)[active]
        rows = active // width

        self.fires.index_add_(0, features, torch.ones_like(features))
        self.max_activation.scatter_reduce_(0, features, activations, "amax")
        # value = significand · 2^(exponent − 150), subnormals with exponent 1 and no implicit bit
        bits = activations.view(torch.int32)
        biased_exponent = (bits >> 23) & 0xFF
        significand = (bits & 0x7FFFFF) | ((biased_exponent > 0).to(torch.int32) << 23)
        exponent = biased_exponent.clamp_min(1).to(torch.int64)
        units = significand.to(torch.int64) << (exponent % SUM_BAND_BITS)
        self.sum_units.index_add_(0, features * SUM_BANDS + exponent // SUM_BAND_BITS, units)
        activations_np = activations.numpy()
        bins = torch.from_numpy(atlas.histogram_bin(activations_np))
        self.histogram.index_add_(0, features * atlas.HISTOGRAM_BINS + bins, torch.ones_like(features))

        features_np, rows_np = features.numpy(), rows.numpy()
        is_top = (activations >= self._top_floor[features]).numpy()
        top_rows = rows_np[is_top]
        if len(top_rows):
            self._top_pending.append((_top_keys(features_np[is_top], activations_np[is_top]),
                                      doc_ids[top_rows], positions[top_rows]))
            self._top_pending_entries += len(top_rows)
        if self.samples:
            priorities = _priorities_from_token_hashes(token_hashes(doc_ids, positions)[rows_np], features_np,
                                                       self.d_sae)
            is_sample = priorities <= self._sample_ceiling[features_np]
            sample_rows = rows_np[is_sample]
            if len(sample_rows):
                keys = (features_np[is_sample].astype(np.int64) << self.sample_shift) | priorities[is_sample]
                self._sample_pending.append((keys, doc_ids[sample_rows], positions[sample_rows],
                                             activations_np[is_sample]))
                self._sample_pending_entries += len(sample_rows)
        self.flush(when_at_least=MERGE_AT_LEAST)

    def flush(self, when_at_least: int | None = None) -> None:
        """Merge buffered candidates into the kept sets and tighten the candidate filters; with
        ``when_at_least``, only a buffer holding that many candidates and as many as its set keeps
        (so each kept entry is re-sorted a bounded number of times)."""
        def due(pending: int, kept: int) -> bool:
            return pending > 0 and (when_at_least is None or pending >= max(when_at_least, kept))

        if due(self._top_pending_entries, len(self.top[0])):
            self.top = _first_per_feature(32, self.top_examples, len(self.top[0]),
                                          *_joined(self.top, self._top_pending))
            last = _last_kept_key(self.top[0], 32, self.top_examples, self.d_sae)
            floor = np.where(last >= 0, _top_values(np.maximum(last, 0)), np.float32(0))
            self._top_floor = torch.from_numpy(floor.astype(np.float32))
            self._top_pending, self._top_pending_entries = [], 0
        if due(self._sample_pending_entries, len(self.sample[0])):
            self.sample = _first_per_feature(self.sample_shift, self.samples, len(self.sample[0]),
                                             *_joined(self.sample, self._sample_pending))
            last = _last_kept_key(self.sample[0], self.sample_shift, self.samples, self.d_sae)
            priority_mask = (1 << self.sample_shift) - 1
            self._sample_ceiling = np.where(last >= 0, last & priority_mask, np.iinfo(np.int64).max)
            self._sample_pending, self._sample_pending_entries = [], 0

    def state(self) -> dict[str, np.ndarray]:
        """The partial state as plain numpy arrays (what a Ray task returns)."""
        self.flush()
        return {"tokens": np.int64(self.tokens), "fires": self.fires.numpy(), "sum_units": self.sum_units.numpy(),
                "max_activation": self.max_activation.numpy(), "histogram": self.histogram.numpy(),
                "top_key": self.top[0], "top_doc_id": self.top[1], "top_position": self.top[2],
                "sample_key": self.sample[0], "sample_doc_id": self.sample[1], "sample_position": self.sample[2],
                "sample_activation": self.sample[3]}

    def merge(self, state: dict[str, np.ndarray]) -> None:
        """Add another accumulator's :meth:`state` (of other tokens)."""
        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(state[name]))  # a copy: states from Ray are read-only

        self.tokens += int(state["tokens"])
        self.fires += tensor("fires")
        self.sum_units += tensor("sum_units")
        self.histogram += tensor("histogram")
        torch.maximum(self.max_activation, tensor("max_activation"), out=self.max_activation)
        self._top_pending.append((state["top_key"], state["top_doc_id"], state["top_position"]))
        self._top_pending_entries += len(state["top_key"])
        if self.samples:
            self._sample_pending.append((state["sample_key"], state["sample_doc_id"], state["sample_position"],
                                         state["sample_activation"]))
            self._sample_pending_entries += len(state["sample_key"])
        self.flush()

    def result(self) -> FeatureStatistics:
        self.flush()
        d_sae = self.d_sae
        units = self.sum_units.numpy().reshape(d_sae, SUM_BANDS).astype(np.float64)
        band_exponents = np.arange(SUM_BANDS) * SUM_BAND_BITS - 150  # float32: value = significand·2^(e−150)
        activation_sum = np.ldexp(units, band_exponents).sum(axis=1)
        top_key, top_doc, top_position = self.top
        sample_key, sample_doc, sample_position, sample_activation = self.sample
        sample_shift = self.sample_shift
        return FeatureStatistics(
            tokens=self.tokens, d_sae=d_sae, fires=self.fires.numpy().copy(), activation_sum=activation_sum,
            max_activation=self.max_activation.numpy().copy(),
            histogram=self.histogram.numpy().reshape(d_sae, atlas.HISTOGRAM_BINS).copy(),
            top_count=np.bincount(top_key >> 32, minlength=d_sae).astype(np.int32),
            top_activation=_dense_rows(top_key, 32, self.top_examples, d_sae, 0, _top_values(top_key)),
            top_doc_id=_dense_rows(top_key, 32, self.top_examples, d_sae, -1, top_doc),
            top_position=_dense_rows(top_key, 32, self.top_examples, d_sae, -1, top_position),
            sample_count=np.bincount(sample_key >> sample_shift, minlength=d_sae).astype(np.int32),
            sample_activation=_dense_rows(sample_key, sample_shift, self.samples, d_sae, 0, sample_activation),
            sample_doc_id=_dense_rows(sample_key, sample_shift, self.samples, d_sae, -1, sample_doc),
            sample_position=_dense_rows(sample_key, sample_shift, self.samples, d_sae, -1, sample_position),
            sample_priority=_dense_rows(sample_key, sample_shift, self.samples, d_sae, -1,
                                        sample_key & ((1 << sample_shift) - 1)))


# ---------------------------------------------------------------- reading and encoding the store


def dictionary_module(dictionary) -> torch.nn.Module:
    """The encoder of an opened :class:`analysis.sources.Dictionary`, or a dictionary module itself."""
    return getattr(dictionary, "module", dictionary)


def on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself when it lives on the CPU, else a CPU copy (what Ray ships to its tasks),
    so the caller's module stays where it is."""
    return module if all(p.device.type == "cpu" for p in module.parameters()) else copy.deepcopy(module).cpu()


def parts_to_read(store: ActivationStore, max_tokens: int | None) -> list[tuple[CommitRecord, int]]:
    """Committed parts in shard order with how many of their leading rows count (``max_tokens``)."""
    remaining = max_tokens if max_tokens is not None else sum(commit.rows for commit in store.commits())
    parts = []
    for commit in store.commits():
        if commit.rows and remaining > 0:
            parts.append((commit, min(commit.rows, remaining)))
            remaining -= parts[-1][1]
    return parts


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the bookkeeping ops on this thread alone: each is small, and waking the intra-op thread
    pool for every one costs more than the op itself once other processes load the CPUs (measured
    here: 3-6x slower bookkeeping on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def statistics_of_parts(store: ActivationStore, dictionary: torch.nn.Module, parts: list[tuple[CommitRecord, int]],
                        config: AnalysisConfig,
                        on_rows: Callable[[int], None] | None = None) -> StatisticsAccumulator:
    """The statistics of the given parts' leading rows: the work of one task (or of workers=0)."""
    device = resolve_device(config.device)
    dictionary = dictionary.to(device)
    accumulator = StatisticsAccumulator(dictionary.d_sae, config.top_examples, config.samples)
    with torch.inference_mode():
        for commit, rows in parts:
            done = 0
            for batch in store.iter_batches(config.batch_rows, shards=[commit.shard]):
                take = min(len(batch.doc_id), rows - done)
                code = dictionary.encode(batch.activation[:take].to(device, non_blocking=True).float())
                with _one_thread():
                    accumulator.add(batch.doc_id[:take].numpy(), batch.position[:take].numpy(), code)
                done += take
                if on_rows is not None:
                    on_rows(take)
                if done >= rows:
                    break
    return accumulator


def _statistics_task(store_url: str, storage_options: dict, dictionary: torch.nn.Module,
                     parts: list[tuple[CommitRecord, int]], config: AnalysisConfig) -> dict[str, np.ndarray]:
    torch.set_num_threads(max(1, round(config.cpus_per_worker)))
    return statistics_of_parts(ActivationStore(store_url, storage_options), dictionary, parts, config).state()


def task_groups(parts: list[tuple[CommitRecord, int]], workers: int) -> list[list[tuple[CommitRecord, int]]]:
    """Consecutive parts grouped into tasks of about 1 / (workers × TASKS_PER_WORKER) of the rows."""
    target = sum(rows for _, rows in parts) / max(1, workers * TASKS_PER_WORKER)
    groups: list[list[tuple[CommitRecord, int]]] = [[]]
    grouped_rows = 0
    for part in parts:
        if groups[-1] and grouped_rows + part[1] / 2 > target:
            groups.append([])
            grouped_rows = 0
        groups[-1].append(part)
        grouped_rows += part[1]
    return [group for group in groups if group]


def compute_statistics(store: ActivationStore, dictionary, config: AnalysisConfig) -> FeatureStatistics:
    """Feature statistics of the store's committed tokens (the first ``config.max_tokens`` in shard
    order); Ray tasks when ``config.workers > 0``, else in this process; the same result either way."""
    config = config.sized()
    module = dictionary_module(dictionary)
    parts = parts_to_read(store, config.max_tokens)
    total = sum(rows for _, rows in parts)
    progress = Progress("statistics", total, "tokens")
    done = 0

    def count(rows: int) -> None:
        nonlocal done
        done += rows
        progress.update(done, done)

    if config.workers == 0:
        accumulator = statistics_of_parts(store, module, parts, config, on_rows=count)
    else:
        accumulator = StatisticsAccumulator(module.d_sae, config.top_examples, config.samples)
        _run_tasks(store, module, task_groups(parts, config.workers), config, accumulator, count)
    progress.update(done, done, final=True)
    return accumulator.result()


def _run_tasks(store: ActivationStore, module: torch.nn.Module, groups: list, config: AnalysisConfig,
               accumulator: StatisticsAccumulator, count: Callable[[int], None]) -> None:
    """At most ``config.workers`` tasks in flight; each partial is merged as soon as it arrives."""
    import ray

    from lexica.cluster import ensure_ray, wants_gpus

    ensure_ray(config.ray_address)
    uses_gpu = wants_gpus(config.device)
    task = ray.remote(_statistics_task).options(num_cpus=config.cpus_per_worker, num_gpus=1 if uses_gpu else 0)
    dictionary_ref = ray.put(on_cpu(module))
    waiting = list(groups)
    running: dict = {}
    try:
        while waiting or running:
            while waiting and len(running) < config.workers:
                group = waiting.pop(0)
                running[task.remote(store.url, store.storage_options, dictionary_ref, group, config)] = group
            (finished,), _ = ray.wait(list(running), num_returns=1)
            group = running.pop(finished)
            accumulator.merge(ray.get(finished))
            count(sum(rows for _, rows in group))
    finally:
        for unfinished in running:
            ray.cancel(unfinished)
