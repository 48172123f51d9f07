"""One shard, start to finish, without Ray: read → tokenise → window → one forward pass to the
deepest hook → per hook point: real tokens → store dtype → Parquet part (background thread) →
commit record.

``Harvester(config).process_shard(plan, index)`` works in a test with no cluster at all; the Ray
actors in :mod:`harvest.pool` are a thin wrapper around it.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from lexica.config import ConfigError
from lexica.errors import FailedError
from lexica.harvest import packing
from lexica.harvest.config import HarvestConfig
from lexica.harvest.corpus import ShardDocuments, ShardPlan, read_shard
from lexica.hooks import Capture, HookPoint, count_blocks, parse_hooks, prune_after
from lexica.models import LoadedModel, load_model
from lexica.run import store_url
from lexica.store import TORCH_DTYPES, PartWriter, activation_columns, arrow_schema

# Per hook point, the stored-dtype rows awaiting their write: the chunk being filled plus the writer
# thread's queue (PartWriter holds up to two queued row groups and one being written).
BUFFERS_PER_HOOK = 4


class TokenRangeError(FailedError):
    """The tokenizer produced an id the model's embedding has no row for."""


def uses_bos(policy: str, tokenizer) -> bool:
    if policy == "never":
        return False
    if tokenizer.bos_token_id is None:
        if policy == "always":
            raise ConfigError("bos is 'always' but the tokenizer has no BOS token; use bos: auto or never")
        return False
    return True


class Harvester:
    """Holds one model copy; turns shards of a plan into committed parts of one store per hook point."""

    def __init__(self, config: HarvestConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.loaded = loaded or load_model(config.model)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.hooks: list[HookPoint] = parse_hooks(config.hook, count_blocks(self.model))
        prune_after(self.model, self.hooks)
        self.d_model = int(self.model.config.hidden_size)
        self.store_dtype = TORCH_DTYPES[config.store_dtype]
        self.bos = uses_bos(config.bos, self.tokenizer)
        self.window_tokens = config.context_length - (1 if self.bos else 0)
        self.embedding_rows = int(self.model.get_input_embeddings().num_embeddings)
        # Padding sits after every real token and is dropped, so any id the embedding has will do;
        # a tokenizer's own pad id may lie outside a smaller model's embedding (Qwen2-style).
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None and 0 <= pad < self.embedding_rows else 0
        # Rows per Parquet row group: the configured MiB of activations, fewer when many hook points
        # would together hold more than harvest.max_buffer_bytes.
        row_bytes = 2 * self.d_model
        self.row_group_rows = max(1, min((config.row_group_mb << 20) // row_bytes,
                                         config.max_buffer_bytes // (BUFFERS_PER_HOOK * len(self.hooks) * row_bytes)))
        self.batch_tokens = max(1, min(config.batch_tokens, self.row_group_rows))
        # Read by the actor's progress() from another thread while a shard runs.
        self.progress = {"shard": None, "shard_tokens": 0, "shard_documents": 0, "shard_windows": 0,
                         "shard_windows_done": 0, "tokens": 0, "shards": 0, "forward_seconds": 0.0}

    def store_url(self, hook: HookPoint) -> str:
        return store_url(self.config.run, hook.name)

    @torch.inference_mode()
    def activations(self, windows: list[packing.Window], hooks: list[HookPoint]) -> dict[str, torch.Tensor]:
        """Per hook point, stored-dtype activations of every real token of ``windows``, window after window."""
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
        largest = int(input_ids.max(initial=0))
        if largest >= self.embedding_rows:
            where = next(w for w in windows if len(w.token_ids) and int(w.token_ids.max()) == largest)
            raise TokenRangeError(
                f"token id {largest} (document {where.doc_id}) is outside the model's embedding of "
                f"{self.embedding_rows} rows: the tokenizer does not match the model ({self.config.model.path})")
        # Padding sits after every real token, so causal attention never lets a real token see
        # it: no attention mask is needed, and the fused causal kernel stays usable.
        device = self.loaded.device
        keep_mask = torch.from_numpy(keep).to(device)

        def stored_rows(hidden: torch.Tensor) -> torch.Tensor:
            return hidden[keep_mask].to(self.store_dtype).cpu()

        capture = Capture(self.model, hooks)
        return capture(transform=stored_rows, input_ids=torch.from_numpy(input_ids).to(device))

    def process_shard(self, plan: ShardPlan, shard_index: int, hook_names: list[str] | None = None,
                      shard: ShardDocuments | None = None) -> dict:
        """Harvest one shard into the stores of ``hook_names`` (default: every hook point); returns
        each hook's commit record. ``shard`` carries a streamed shard's tokens (an indexed plan's
        shard is read from storage here)."""
        started = time.perf_counter()
        hooks = [h for h in self.hooks if hook_names is None or h.name in hook_names]
        self.progress.update(shard=shard_index, shard_tokens=0, shard_documents=0, shard_windows=0,
                             shard_windows_done=0)
        if shard is None:
            shard = read_shard(plan, shard_index, self.config.corpus, self.config.storage_options)
            doc_tokens = packing.tokenize(self.tokenizer, shard.documents)
            pieces = packing.document_pieces(doc_tokens, shard.windows, self.window_tokens)
        else:
            pieces = shard.pieces
        windows = packing.piece_windows(pieces, self.window_tokens)
        writers = {}
        try:
            for hook in hooks:
                schema = arrow_schema(self.d_model, self.config.store_dtype, hook.name, self.config.store_format)
                writers[hook.name] = PartWriter(self.store_url(hook), shard_index, schema, self.config.storage_options)
            self.progress["shard_windows"] = len(windows)
            for chunk in packing.chunk_windows(windows, self.row_group_rows):
                self._write_chunk(chunk, hooks, writers)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        stored = [piece.doc_id for piece in pieces if len(piece.token_ids)]
        # A document split between shards counts where its first window is; so do skipped ones.
        empty = sum(1 for piece in pieces if not len(piece.token_ids) and piece.start == 0)
        first_doc, end_doc = (plan.doc_range(shard_index) if plan.shards else (0, 1))
        details = dict(
            documents=sum(1 for piece in pieces if len(piece.token_ids) and piece.start == 0),
            empty_documents=shard.empty + empty, invalid_utf8_documents=shard.invalid_utf8, windows=len(windows),
            doc_id_min=min(stored, default=first_doc), doc_id_max=max(stored, default=end_doc - 1),
            seconds=round(time.perf_counter() - started, 3))
        # Every part is finished before the first commit record is written, so a crash leaves
        # either whole commits or none per store; a shard counts as done once every store has it.
        records = {name: writer.commit(**details) for name, writer in writers.items()}
        self.progress["shards"] += 1
        self.progress["shard"] = None
        return records

    def _write_chunk(self, chunk: list[packing.Window], hooks: list[HookPoint], writers: dict) -> None:
        lengths = np.array([len(w.token_ids) for w in chunk])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        activations = {hook.name: torch.empty(int(lengths.sum()), self.d_model, dtype=self.store_dtype)
                       for hook in hooks}
        for batch in packing.group_by_length(lengths.tolist(), self.batch_tokens):
            batch_windows = [chunk[i] for i in batch]
            destination = torch.from_numpy(
                np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in batch]))
            started = time.perf_counter()
            for name, rows in self.activations(batch_windows, hooks).items():
                activations[name][destination] = rows
            self.progress["forward_seconds"] += time.perf_counter() - started
            batch_tokens = int(lengths[batch].sum())
            self.progress["tokens"] += batch_tokens
            self.progress["shard_tokens"] += batch_tokens
            self.progress["shard_documents"] += sum(1 for w in batch_windows if w.last)
            self.progress["shard_windows_done"] += len(batch_windows)
        doc_ids = pa.array(np.repeat([w.doc_id for w in chunk], lengths).astype(np.int64))
        positions = pa.array(np.concatenate([np.arange(w.start, w.start + len(w.token_ids), dtype=np.int32)
                                             for w in chunk]))
        token_ids = pa.array(np.concatenate([w.token_ids for w in chunk]).astype(np.int32))
        for name, values in activations.items():
            writer = writers[name]
            writer.statistics.add(values)
            writer.put(pa.table({"doc_id": doc_ids, "position": positions, "token_id": token_ids,
                                 **activation_columns(values, self.config.store_format)}, schema=writer.schema))
