"""Contexts of the shown examples (docs/analysis.md): for each example token, the neighbouring rows of
its document in the store, their decoded token strings and the feature's activation on each.

Rows of a part are in (doc_id, position) order, so a window is one slice of rows; only parts whose
commit record's doc_id range holds a needed document are read, and every needed row is encoded
once however many windows share it. Parts are independent: Ray tasks take one each when
``workers > 0``, and the result does not depend on which finishes first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from lexica.analysis import atlas
from lexica.analysis.config import AnalysisConfig
from lexica.analysis.sources import AnalysisError, token_strings
from lexica.analysis.stats import dictionary_module, on_cpu
from lexica.models import resolve_device
from lexica.progress import Progress
from lexica.store import ActivationStore, CommitRecord, table_activations

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS = ("feature", "kind", "rank", "band", "activation", "doc_id", "position")


def _expand_ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, index) of every index in the half-open ranges [starts[i], stops[i])."""
    lengths = np.maximum(stops - starts, 0)
    owners = np.repeat(np.arange(len(starts)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owners, starts[owners] + offsets


def window_rows(part_doc_ids: np.ndarray, part_positions: np.ndarray, doc_ids: np.ndarray, lowest: np.ndarray,
                highest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row ranges [start, stop) of a part holding document ``doc_ids[i]``'s positions in
    ``lowest[i]..highest[i]`` (empty where the part lacks the document)."""
    if not len(part_doc_ids):
        empty = np.zeros(len(doc_ids), dtype=np.int64)
        return empty, empty
    # One sorted key over the part, (document ordinal, position), so every window is two searches.
    new_document = np.r_[True, part_doc_ids[1:] != part_doc_ids[:-1]]
    document_ordinal = np.cumsum(new_document) - 1
    span = int(part_positions.max()) + 1
    row_keys = document_ordinal * span + part_positions.astype(np.int64)
    first_row = np.searchsorted(part_doc_ids, doc_ids, side="left")
    present = (first_row < len(part_doc_ids)) & (part_doc_ids[np.minimum(first_row, len(part_doc_ids) - 1)] == doc_ids)
    base = document_ordinal[np.minimum(first_row, len(part_doc_ids) - 1)] * span
    starts = np.searchsorted(row_keys, base + np.clip(lowest, 0, span - 1), side="left")
    stops = np.searchsorted(row_keys, base + np.clip(highest, -1, span - 1), side="right")
    stops = np.where(present & (highest >= 0) & (lowest < span), stops, starts)
    return starts, stops


def feature_values(dictionary: torch.nn.Module, activations: torch.Tensor, rows: np.ndarray, features: np.ndarray,
                   batch_rows: int, device: torch.device) -> np.ndarray:
    """Activation of ``features[i]`` on row ``rows[i]`` of ``activations``; each row encoded once."""
    needed_mask = np.zeros(len(activations), dtype=bool)
    needed_mask[rows] = True
    needed = np.flatnonzero(needed_mask)
    query_keys = (np.cumsum(needed_mask) - 1)[rows] * np.int64(dictionary.d_sae) + features
    entry_keys, entry_values = [], []
    with torch.inference_mode():
        for start in range(0, len(needed), batch_rows):
            chunk = torch.from_numpy(needed[start:start + batch_rows])
            code = dictionary.encode(activations[chunk].to(device).float())
            # Latents in id order within each row: the (row, latent) keys then come out sorted.
            indices, order = code.indices.cpu().sort(dim=1)
            values = code.values.cpu().gather(1, order)
            active = values > 0
            local_rows = torch.arange(start, start + len(chunk)).unsqueeze(1).expand_as(indices)[active]
            entry_keys.append((local_rows * dictionary.d_sae + indices[active]).numpy())
            entry_values.append(values[active].float().numpy())
    keys = np.concatenate(entry_keys) if entry_keys else np.empty(0, np.int64)
    values = np.concatenate(entry_values) if entry_values else np.empty(0, np.float32)
    if not len(keys):
        return np.zeros(len(query_keys), dtype=np.float32)
    found = np.minimum(np.searchsorted(keys, query_keys), len(keys) - 1)
    return np.where(keys[found] == query_keys, values[found], 0).astype(np.float32)


def contexts_of_part(store: ActivationStore, dictionary: torch.nn.Module, commit: CommitRecord,
                     windows: dict[str, np.ndarray], config: AnalysisConfig) -> dict[str, np.ndarray]:
    """The window tokens one part holds: flat (example, position, token_id, value) arrays."""
    device = resolve_device(config.device)
    dictionary = dictionary.to(device)
    table = store.read_part(commit, columns=["doc_id", "position", "token_id", *store.activation_columns])
    part_doc_ids = table.column("doc_id").to_numpy()
    part_positions = table.column("position").to_numpy()
    starts, stops = window_rows(part_doc_ids, part_positions, windows["doc_id"], windows["lowest"],
                                windows["highest"])
    owners, rows = _expand_ranges(starts, stops)
    activations = table_activations(table, store.d_model, store.dtype)
    values = feature_values(dictionary, activations, rows, windows["feature"][owners], config.batch_rows, device)
    return {"example": windows["example"][owners], "position": part_positions[rows],
            "token_id": table.column("token_id").to_numpy()[rows], "value": values}


def _contexts_task(store_url: str, storage_options: dict, dictionary: torch.nn.Module, commit: CommitRecord,
                   windows: dict[str, np.ndarray], config: AnalysisConfig) -> dict[str, np.ndarray]:
    torch.set_num_threads(max(1, round(config.cpus_per_worker)))
    return contexts_of_part(ActivationStore(store_url, storage_options), dictionary, commit, windows, config)


def windows_by_part(store: ActivationStore, examples: pa.Table,
                    config: AnalysisConfig) -> list[tuple[CommitRecord, dict[str, np.ndarray]]]:
    """Each committed part whose doc_id range holds an example's document, with those examples."""
    doc_ids = examples.column("doc_id").to_numpy()
    positions = examples.column("position").to_numpy().astype(np.int64)
    features = examples.column("feature").to_numpy().astype(np.int64)
    work = []
    for commit in store.commits():
        if not commit.rows:
            continue
        inside = np.flatnonzero((doc_ids >= commit.doc_id_min) & (doc_ids <= commit.doc_id_max))
        if len(inside):
            work.append((commit, {"example": inside, "doc_id": doc_ids[inside], "feature": features[inside],
                                  "lowest": positions[inside] - config.window_before,
                                  "highest": positions[inside] + config.window_after}))
    return work


# Window tokens gathered in one pass over the store (~24 bytes each while gathered): more examples
# than this are split into passes over groups of whole features, so memory stays bounded at any width.
WINDOW_TOKENS_PER_PASS = 1 << 25


def feature_groups(examples: pa.Table, window: int, tokens_per_pass: int = WINDOW_TOKENS_PER_PASS) -> list[slice]:
    """Row ranges of ``examples`` (sorted by feature), each of whole features and at most
    ``tokens_per_pass`` window tokens (or one feature's, if that is more)."""
    per_pass = max(1, tokens_per_pass // max(window, 1))
    features = examples.column("feature").to_numpy()
    groups, start = [], 0
    while start < len(features):
        stop = min(start + per_pass, len(features))
        if stop < len(features):  # end on a feature boundary: back to the first row of the cut feature
            boundary = int(np.searchsorted(features, features[stop], side="left"))
            stop = boundary if boundary > start else int(np.searchsorted(features, features[stop], side="right"))
        groups.append(slice(start, stop))
        start = stop
    return groups


def contexts_in_passes(store: ActivationStore, dictionary, examples: pa.Table, tokenizer, config: AnalysisConfig,
                       tokens_per_pass: int = WINDOW_TOKENS_PER_PASS) -> Iterator[pa.Table]:
    """:func:`build_contexts` a group of features at a time (``feature_groups``), each group's rows
    as one table, in feature order; each group reads the store parts that hold its documents."""
    window = config.window_before + config.window_after + 1
    groups = feature_groups(examples, window, tokens_per_pass)
    for number, rows in enumerate(groups):
        if len(groups) > 1:
            log.info("contexts: pass %d of %d (%d examples)", number + 1, len(groups), rows.stop - rows.start)
        yield build_contexts(store, dictionary, examples.slice(rows.start, rows.stop - rows.start), tokenizer, config)


def build_contexts(store: ActivationStore, dictionary, examples: pa.Table, tokenizer,
                   config: AnalysisConfig) -> pa.Table:
    """``examples`` (as :meth:`FeatureStatistics.examples_table` makes) with each example's window:
    rows of its document from ``position - window_before`` to ``position + window_after`` that the
    store holds, as token ids, token strings, the feature's activation on each, and the index of
    the example's own token (``center``). Rows keep the order of ``examples``."""
    config = config.sized()
    module = dictionary_module(dictionary)
    work = windows_by_part(store, examples, config)
    progress = Progress("contexts", len(work), "parts")
    pieces: list[dict[str, np.ndarray]] = []
    if config.workers == 0:
        for commit, windows in work:
            pieces.append(contexts_of_part(store, module, commit, windows, config))
            progress.update(len(pieces), sum(len(piece["example"]) for piece in pieces))
    else:
        _run_tasks(store, module, work, config, pieces, progress)
    progress.update(len(pieces), sum(len(piece["example"]) for piece in pieces), final=True)
    return assemble(examples, pieces, tokenizer, store.url)


def _run_tasks(store: ActivationStore, module: torch.nn.Module, work: list, config: AnalysisConfig,
               pieces: list[dict[str, np.ndarray]], progress: Progress) -> None:
    import ray

    from lexica.cluster import ensure_ray, wants_gpus

    ensure_ray(config.ray_address)
    uses_gpu = wants_gpus(config.device)
    task = ray.remote(_contexts_task).options(num_cpus=config.cpus_per_worker, num_gpus=1 if uses_gpu else 0)
    dictionary_ref = ray.put(on_cpu(module))
    waiting = list(work)
    running: list = []
    try:
        while waiting or running:
            while waiting and len(running) < config.workers:
                commit, windows = waiting.pop(0)
                running.append(task.remote(store.url, store.storage_options, dictionary_ref, commit, windows, config))
            (finished,), _ = ray.wait(running, num_returns=1)
            running.remove(finished)
            pieces.append(ray.get(finished))
            progress.update(len(pieces), sum(len(piece["example"]) for piece in pieces))
    finally:
        for unfinished in running:
            ray.cancel(unfinished)


def assemble(examples: pa.Table, pieces: list[dict[str, np.ndarray]], tokenizer, store_url: str) -> pa.Table:
    """Window tokens from every part, ordered by (example, position), joined to their examples."""
    def gathered(name: str, dtype) -> np.ndarray:
        return np.concatenate([piece[name] for piece in pieces]).astype(dtype) if pieces else np.empty(0, dtype)

    example, position = gathered("example", np.int64), gathered("position", np.int64)
    token_ids, values = gathered("token_id", np.int32), gathered("value", np.float32)
    # Each part's tokens come sorted by (example, position) and a document lives in one part, so a
    # stable sort by example merges a few sorted runs; the two-key sort is for documents split
    # across parts.
    order = np.argsort(example, kind="stable")
    if np.any((example[order][1:] == example[order][:-1]) & (position[order][1:] <= position[order][:-1])):
        order = np.lexsort((position, example))
    example, position, token_ids, values = example[order], position[order], token_ids[order], values[order]
    count = len(examples)
    lengths = np.bincount(example, minlength=count)
    offsets = np.r_[0, np.cumsum(lengths)]
    example_positions = examples.column("position").to_numpy().astype(np.int64)
    at_center = np.flatnonzero(position == example_positions[example])
    center = np.full(count, -1, dtype=np.int32)
    center[example[at_center]] = at_center - offsets[example[at_center]]
    if count and (missing := np.flatnonzero(center < 0)).size:
        first = missing[0]
        raise AnalysisError(
            f"{len(missing)} examples are not in the store {store_url}, e.g. feature "
            f"{examples.column('feature')[first]} at doc_id {examples.column('doc_id')[first]} position "
            f"{example_positions[first]}; were the statistics computed on another store?")
    # Decode each distinct id once; ids index a vocabulary, so a lookup table replaces a sort.
    unique_ids = np.flatnonzero(np.bincount(token_ids)) if len(token_ids) else np.empty(0, np.int64)
    string_of_id = np.zeros(int(unique_ids[-1]) + 1 if len(unique_ids) else 0, dtype=np.int64)
    string_of_id[unique_ids] = np.arange(len(unique_ids))
    strings = pa.array(token_strings(tokenizer, unique_ids), pa.string()).take(pa.array(string_of_id[token_ids]))
    list_offsets = pa.array(offsets.astype(np.int32))
    columns = {name: examples.column(name) for name in EXAMPLE_COLUMNS}
    columns.update({
        "token_ids": pa.ListArray.from_arrays(list_offsets, pa.array(token_ids, pa.int32())),
        "tokens": pa.ListArray.from_arrays(list_offsets, strings),
        "values": pa.ListArray.from_arrays(list_offsets, pa.array(values, pa.float32())),
        "center": pa.array(center, pa.int32()),
    })
    return pa.table(columns).cast(atlas.CONTEXTS_SCHEMA)
