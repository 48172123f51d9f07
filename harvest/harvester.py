"""One shard, start to finish, without Ray: read → tokenise → window → forward to the hook →
gather real tokens → store dtype → Parquet part (background thread) → commit record.

``Harvester(config).process_shard(plan, index)`` works in a test with no cluster at all; the Ray
actors in :mod:`harvest.pool` are a thin wrapper around it.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from lexica.config import ConfigError
from lexica.harvest import packing
from lexica.harvest.config import HarvestConfig
from lexica.harvest.corpus import ShardPlan, read_shard
from lexica.hooks import Capture, HookPoint, count_blocks, parse_hook, prune_after
from lexica.models import LoadedModel, load_model
from lexica.run import store_url
from lexica.store import TORCH_DTYPES, CommitRecord, PartWriter, arrow_schema, encode_activations


def uses_bos(policy: str, tokenizer) -> bool:
    if policy == "never":
        return False
    if tokenizer.bos_token_id is None:
        if policy == "always":
            raise ConfigError("bos is 'always' but the tokenizer has no BOS token; use bos: auto or never")
        return False
    return True


class Harvester:
    """Holds one model copy; turns shards of a plan into committed parts of a store."""

    def __init__(self, config: HarvestConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.loaded = loaded or load_model(config.model)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.hook: HookPoint = parse_hook(config.hook, count_blocks(self.model))
        prune_after(self.model, self.hook)
        self.capture = Capture(self.model, self.hook)
        self.d_model = int(self.model.config.hidden_size)
        self.store_dtype = TORCH_DTYPES[config.store_dtype]
        self.bos = uses_bos(config.bos, self.tokenizer)
        self.window_tokens = config.context_length - (1 if self.bos else 0)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Rows per Parquet row group: the configured MiB of activations.
        self.row_group_rows = max(1, (config.row_group_mb << 20) // (2 * self.d_model))
        # Read by the actor's progress() from another thread while a shard runs.
        self.progress = {"shard": None, "shard_tokens": 0, "shard_documents": 0, "shard_windows": 0,
                         "shard_windows_done": 0, "tokens": 0, "shards": 0, "forward_seconds": 0.0}

    @property
    def store_url(self) -> str:
        return store_url(self.config.run, self.hook.name)

    @torch.inference_mode()
    def activations(self, windows: list[packing.Window]) -> torch.Tensor:
        """Stored-dtype activations of every real token of ``windows``, window after window."""
        lengths = [len(w.token_ids) for w in windows]
        offset = 1 if self.bos else 0
        width = max(lengths) + offset
        input_ids = np.full((len(windows), width), self.pad_id, dtype=np.int64)
        if self.bos:
            input_ids[:, 0] = self.tokenizer.bos_token_id
        keep = np.zeros((len(windows), width), dtype=bool)
        for row, window in enumerate(windows):
            input_ids[row, offset:offset + lengths[row]] = window.token_ids
            keep[row, offset:offset + lengths[row]] = True
        # Padding sits after every real token, so causal attention never lets a real token see
        # it: no attention mask is needed, and the fused causal kernel stays usable.
        device = self.loaded.device
        hidden = self.capture(input_ids=torch.from_numpy(input_ids).to(device))
        selected = hidden[torch.from_numpy(keep).to(device)]
        return selected.to(self.store_dtype).cpu()

    def process_shard(self, plan: ShardPlan, shard_index: int) -> CommitRecord:
        started = time.perf_counter()
        self.progress.update(shard=shard_index, shard_tokens=0, shard_documents=0, shard_windows=0,
                             shard_windows_done=0)
        shard = read_shard(plan, shard_index, self.config.corpus, self.config.storage_options)
        doc_tokens = packing.tokenize(self.tokenizer, shard.documents)
        windows = packing.split_windows(doc_tokens, self.window_tokens)
        schema = arrow_schema(self.d_model, self.config.store_dtype, self.hook.name)
        writer = PartWriter(self.store_url, shard_index, schema, self.config.storage_options)
        self.progress["shard_windows"] = len(windows)
        try:
            for chunk in packing.chunk_windows(windows, self.row_group_rows):
                writer.put(self._chunk_table(chunk, writer))
        except BaseException:
            writer.abort()
            raise
        doc_ids = [doc_id for doc_id, ids in doc_tokens if len(ids)]
        first_doc, end_doc = plan.doc_range(shard_index)
        record = writer.commit(
            documents=len(doc_ids), empty_documents=shard.empty + sum(1 for _, ids in doc_tokens if not len(ids)),
            invalid_utf8_documents=shard.invalid_utf8, windows=len(windows),
            doc_id_min=min(doc_ids, default=first_doc), doc_id_max=max(doc_ids, default=end_doc - 1),
            seconds=round(time.perf_counter() - started, 3))
        self.progress["shards"] += 1
        self.progress["shard"] = None
        return record

    def _chunk_table(self, chunk: list[packing.Window], writer: PartWriter) -> pa.Table:
        lengths = np.array([len(w.token_ids) for w in chunk])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        activations = torch.empty(int(lengths.sum()), self.d_model, dtype=self.store_dtype)
        for batch in packing.group_by_length(lengths.tolist(), self.config.batch_tokens):
            batch_windows = [chunk[i] for i in batch]
            destination = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in batch])
            started = time.perf_counter()
            activations[torch.from_numpy(destination)] = self.activations(batch_windows)
            self.progress["forward_seconds"] += time.perf_counter() - started
            batch_tokens = int(lengths[batch].sum())
            self.progress["tokens"] += batch_tokens
            self.progress["shard_tokens"] += batch_tokens
            self.progress["shard_documents"] += sum(1 for w in batch_windows if w.last)
            self.progress["shard_windows_done"] += len(batch_windows)
        writer.statistics.add(activations)
        positions = np.concatenate([np.arange(w.start, w.start + len(w.token_ids), dtype=np.int32) for w in chunk])
        return pa.table(
            {"doc_id": pa.array(np.repeat([w.doc_id for w in chunk], lengths).astype(np.int64)),
             "position": pa.array(positions),
             "token_id": pa.array(np.concatenate([w.token_ids for w in chunk]).astype(np.int32)),
             "activation": encode_activations(activations)},
            schema=writer.schema)
