"""Training batches from an activation store: streamed, shuffled at token level, normalised.

The order is a pure function of the seed: each epoch visits the committed parts in a seeded
permutation, cuts the row stream into blocks of ``buffer_rows`` and permutes every block with its
own seeded generator. So a run is reproducible, and a resumed run can replay to its position.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lexica.errors import ConfigError
from lexica.store import ActivationStore, StoreError


def normalisation_scale(store: ActivationStore) -> float:
    """Scalar s with E‖s·x‖ = √d_model, from the store's statistics (docs/architecture.md)."""
    statistics = store.statistics
    if not store.complete or not statistics or not statistics.get("mean_norm"):
        raise StoreError(f"store {store.url} is not complete (no merged statistics); finish the harvest first")
    return math.sqrt(store.d_model) / statistics["mean_norm"]


def _lane_commits(store: ActivationStore, lanes: int) -> list:
    commits = [commit for commit in store.commits() if commit.rows]
    if not commits:
        raise StoreError(f"store {store.url} has no committed rows to train on")
    if lanes > len(commits):
        raise StoreError(f"store {store.url} has {len(commits)} committed parts, fewer than the {lanes} data lanes; "
                         "use fewer workers/data_lanes or harvest with smaller docs_per_shard")
    return commits


@dataclass
class ReadCount:
    """What a stream has read of its store: parts and their bytes (as committed), for the metrics."""

    parts: int = 0
    bytes: int = 0


def paired_commits(store: ActivationStore, target: ActivationStore) -> None:
    """Refuse a transcoder's two stores unless they come from one harvest: the same plan, model
    and windows, and the same committed parts row for row, so they can be read in lockstep."""
    for key in ("plan_fingerprint", "model", "context_length", "bos"):
        if store.manifest.get(key) != target.manifest.get(key):
            raise StoreError(f"stores {store.url} and {target.url} differ in {key}; a transcoder's input and target "
                             "must come from one harvest (harvest both hooks in one pass: --hook mlp_in.L,mlp_out.L)")
    mine = [(commit.shard, commit.rows) for commit in store.commits() if commit.rows]
    theirs = [(commit.shard, commit.rows) for commit in target.commits() if commit.rows]
    if mine != theirs:
        missing = sorted(set(mine) ^ set(theirs))[:3]
        raise StoreError(f"stores {store.url} and {target.url} hold different parts (shard, rows) {missing}; finish "
                         "the harvest of both (re-running it completes the one behind)")


def _paired_batches(store: ActivationStore, target: ActivationStore, shard: int, read_rows: int):
    """The shard's rows of both stores side by side, checked to be the same tokens."""
    for mine, theirs in zip(store.iter_batches(batch_rows=read_rows, shards=[shard]),
                            target.iter_batches(batch_rows=read_rows, shards=[shard]), strict=True):
        if not (torch.equal(mine.doc_id, theirs.doc_id) and torch.equal(mine.position, theirs.position)):
            raise StoreError(f"shard {shard} of {store.url} and {target.url} hold different tokens; a transcoder's "
                             "stores must come from one harvest")
        yield mine._replace(activation=torch.cat([mine.activation, theirs.activation.to(mine.activation.dtype)], 1))


def _row_stream(store: ActivationStore, commits: list, epoch: int, seed: int, lane: int, lanes: int,
                read_rows: int, read_count: ReadCount | None = None,
                target: ActivationStore | None = None) -> Iterator[torch.Tensor]:
    """Rows of this lane's parts for one epoch: the epoch's seeded permutation of all parts, dealt
    to the lanes like cards (lane r gets every lanes-th part from the r-th). With a ``target``
    store (a transcoder's), each row is the input's activation and the target's side by side."""
    order = torch.randperm(len(commits), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    for index in order.tolist()[lane::lanes]:
        commit = commits[index]
        batches = store.iter_batches(batch_rows=read_rows, shards=[commit.shard]) if target is None else \
            _paired_batches(store, target, commit.shard, read_rows)
        for batch in batches:
            if len(batch.activation) and not all_finite(batch.activation):
                raise StoreError(f"shard {commit.shard} (part {commit.part}) of {store.url} holds NaN or infinite "
                                 "activations; re-harvest it (delete its commit record and re-run the harvest)")
            yield batch.activation
        if read_count is not None:
            read_count.parts += 1 if target is None else 2
            read_count.bytes += commit.bytes + (0 if target is None else target_bytes(target, commit.shard))


def all_finite(activations: torch.Tensor) -> bool:
    """One min/max pass (NaN propagates into both; ±inf shows in one): ~10× cheaper on fp16 than
    isfinite(...).all(), which has no vectorised half-precision kernel."""
    low, high = torch.aminmax(activations)
    return math.isfinite(low) and math.isfinite(high)


def data_variance(store: ActivationStore, scale: float) -> float:
    """E‖s·x − s·μ‖² per token: the fixed denominator that makes the training loss a plain sum."""
    statistics = store.statistics
    mean = torch.tensor(statistics["mean"], dtype=torch.float64)
    return float(scale**2 * (statistics["mean_squared_norm"] - mean.square().sum()))


def target_bytes(target: ActivationStore, shard: int) -> int:
    return next(commit.bytes for commit in target.commits() if commit.shard == shard)


def shuffled_batches(store: ActivationStore, batch_size: int, buffer_rows: int, seed: int,
                     scale: float | torch.Tensor, device: torch.device | str = "cpu", skip_batches: int = 0,
                     lanes: int = 1, lane_ids: list[int] | None = None, read_count: ReadCount | None = None,
                     target: ActivationStore | None = None) -> Iterator[torch.Tensor]:
    """Endless float32 batches of normalised activations.

    The stream is made of ``lanes`` independent lanes, each reading its own parts and shuffling
    its own blocks; a global batch is the concatenation of every lane's batch_size/lanes rows. A
    data-parallel worker reads only its lanes (``lane_ids``), so N workers read the store once
    between them, and one worker reading all lanes sees exactly the batches N workers see
    together. ``skip_batches`` resumes the same sequence part-way. ``read_count`` counts the parts
    read. With a ``target`` store (a transcoder's), rows are [input | target] activations and
    ``scale`` a per-column tensor.
    """
    if batch_size % lanes:
        raise ConfigError(f"batch_size {batch_size} is not a multiple of the {lanes} data lanes")
    commits = _lane_commits(store, lanes)
    streams = [_lane_batches(store, commits, batch_size // lanes, max(1, buffer_rows // lanes), seed, lane, lanes,
                             read_count, target)
               for lane in (range(lanes) if lane_ids is None else lane_ids)]
    skipped = 0
    while True:
        parts = [next(stream) for stream in streams]
        if skipped < skip_batches:
            skipped += 1
            continue
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        yield batch.to(device=device, dtype=torch.float32) * scale


def _lane_batches(store: ActivationStore, commits: list, batch_rows: int, buffer_rows: int, seed: int, lane: int,
                  lanes: int, read_count: ReadCount | None = None,
                  target: ActivationStore | None = None) -> Iterator[torch.Tensor]:
    """One lane's endless batches (store dtype, not yet normalised): blocks of ``buffer_rows``,
    each permuted with its own seeded generator, rows left over carried into the next block."""
    carry = torch.empty(0, store.d_model + (target.d_model if target is not None else 0), dtype=store.dtype)
    epoch = 0
    while True:
        block_index = 0
        pending: list[torch.Tensor] = []
        pending_rows = 0
        for rows in _row_stream(store, commits, epoch, seed, lane, lanes, read_rows=min(buffer_rows, 1 << 16),
                                read_count=read_count, target=target):
            pending.append(rows)
            pending_rows += len(rows)
            if pending_rows >= buffer_rows:
                carry = yield from _emit_block(carry, pending, (seed, lane, epoch, block_index), batch_rows)
                pending, pending_rows = [], 0
                block_index += 1
        if pending:
            carry = yield from _emit_block(carry, pending, (seed, lane, epoch, block_index), batch_rows)
        epoch += 1


def _emit_block(carry: torch.Tensor, pending: list[torch.Tensor], key: tuple[int, ...],
                batch_rows: int) -> Iterator[torch.Tensor]:
    """Permute one block (plus the rows carried from the previous one), yield its full batches and
    return the rows left over."""
    block = torch.cat([carry, *pending])
    generator = torch.Generator().manual_seed(hash_key(key))
    block = block.index_select(0, torch.randperm(len(block), generator=generator))  # ~4x block[perm] on the CPU
    full = len(block) // batch_rows * batch_rows
    for start in range(0, full, batch_rows):
        yield block[start:start + batch_rows]
    return block[full:]


def hash_key(key: tuple[int, ...]) -> int:
    """A 63-bit generator seed from (seed, lane, epoch, block): the same on every machine and run."""
    value = 0
    for part in key:
        value = (value * 1_000_003 + part) % (1 << 63)
    return value


# The GIL switch interval while a Prefetcher runs. The prefetch thread holds the GIL in stretches
# (s3fs/aiohttp parsing responses), and the training thread, which takes the GIL back between
# every two ATen calls of its step, waits up to a whole interval each time: Python's default, 5 ms,
# cost a store-fed run from moto S3 ~5% of its speed here; 0.5 ms gives it back.
SWITCH_INTERVAL_SECONDS = 0.0005


class Prefetcher:
    """Produce the next batches on a background thread while the current step runs (reading
    Parquet, decoding fp16 and permuting release the GIL), and account the time the training
    loop still waits: ``waited`` seconds over ``calls`` batches. Lowers the interpreter's GIL
    switch interval to ``SWITCH_INTERVAL_SECONDS`` (process-wide; never raises it)."""

    _DONE = object()

    def __init__(self, batches: Iterator[torch.Tensor], depth: int = 4):
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_SECONDS))
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
