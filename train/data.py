"""Training batches from an activation store: streamed, shuffled at token level, normalised.

The order is a pure function of the seed: each epoch visits the committed parts in a seeded
permutation, cuts the row stream into blocks of ``buffer_rows`` and permutes every block with its
own seeded generator. So a run is reproducible, and a resumed run can replay to its position.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator

import torch

from harvest.store import ActivationStore, StoreError


def normalisation_scale(store: ActivationStore) -> float:
    """Scalar s with E‖s·x‖ = √d_model, from the store's statistics (DESIGN.md §6)."""
    statistics = store.statistics
    if not store.complete or not statistics or not statistics.get("mean_norm"):
        raise StoreError(f"store {store.url} is not complete (no merged statistics); finish the harvest first")
    return math.sqrt(store.d_model) / statistics["mean_norm"]


def _row_stream(store: ActivationStore, epoch: int, seed: int, read_rows: int) -> Iterator[torch.Tensor]:
    commits = [commit for commit in store.commits() if commit.rows]
    if not commits:
        raise StoreError(f"store {store.url} has no committed rows to train on")
    order = torch.randperm(len(commits), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    for index in order.tolist():
        commit = commits[index]
        for batch in store.iter_batches(batch_rows=read_rows, shards=[commit.shard]):
            if not torch.isfinite(batch.activation).all():
                raise StoreError(f"shard {commit.shard} (part {commit.part}) of {store.url} holds NaN or infinite "
                                 "activations; re-harvest it (delete its commit record and re-run the harvest)")
            yield batch.activation


def data_variance(store: ActivationStore, scale: float) -> float:
    """E‖s·x − s·μ‖² per token: the fixed denominator that makes the training loss a plain sum."""
    statistics = store.statistics
    mean = torch.tensor(statistics["mean"], dtype=torch.float64)
    return float(scale**2 * (statistics["mean_squared_norm"] - mean.square().sum()))


def shuffled_batches(store: ActivationStore, batch_size: int, buffer_rows: int, seed: int, scale: float,
                     device: torch.device | str = "cpu", skip_batches: int = 0) -> Iterator[torch.Tensor]:
    """Endless float32 batches [batch_size, d_model] of normalised activations.

    ``skip_batches`` resumes the same sequence part-way (a resumed run sees the same data order).
    """
    skip = [skip_batches]
    epoch = 0
    carry = torch.empty(0, store.d_model, dtype=store.dtype)
    while True:
        block_index = 0
        pending: list[torch.Tensor] = []
        pending_rows = 0
        for rows in _row_stream(store, epoch, seed, read_rows=min(buffer_rows, 1 << 16)):
            pending.append(rows)
            pending_rows += len(rows)
            if pending_rows >= buffer_rows:
                yield from _emit_block(pending, seed, epoch, block_index, batch_size, scale, device,
                                       carry_out := [carry], skip)
                carry = carry_out[0]
                pending, pending_rows = [], 0
                block_index += 1
        if pending:
            yield from _emit_block(pending, seed, epoch, block_index, batch_size, scale, device,
                                   carry_out := [carry], skip)
            carry = carry_out[0]
        epoch += 1


def _emit_block(pending: list[torch.Tensor], seed: int, epoch: int, block_index: int, batch_size: int, scale: float,
                device, carry: list[torch.Tensor], skip: list[int]) -> Iterator[torch.Tensor]:
    """Permute one block (plus the rows left over from the previous one) and cut it into batches."""
    block = torch.cat([carry[0], *pending])
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + block_index)
    block = block[torch.randperm(len(block), generator=generator)]
    full = len(block) // batch_size * batch_size
    for start in range(0, full, batch_size):
        if skip[0] > 0:
            skip[0] -= 1
            continue
        yield block[start:start + batch_size].to(device=device, dtype=torch.float32) * scale
    carry[0] = block[full:]


class Prefetcher:
    """Produce the next batches on a background thread while the current step runs (reading
    Parquet, decoding fp16 and permuting release the GIL), and account the time the training
    loop still waits: ``waited`` seconds over ``calls`` batches."""

    _DONE = object()

    def __init__(self, batches: Iterator[torch.Tensor], depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.waited, self.calls = 0.0, 0
        self._thread = threading.Thread(target=self._fill, args=(batches,), name="lexica-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, batches: Iterator[torch.Tensor]) -> None:
        try:
            for batch in batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # handed to the consumer, which raises it as its own
            self._queue.put(error)
            return
        self._queue.put(self._DONE)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        started = time.perf_counter()
        item = self._queue.get()
        self.waited += time.perf_counter() - started
        self.calls += 1
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
