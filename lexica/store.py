"""The activation store (docs/store-format.md): Parquet parts, commit records and a manifest.

Writers produce one part per shard, then its commit record; readers list commit records and never
glob parts, so a half-written or orphaned part from a crashed attempt is invisible to them.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import xxhash

from lexica import storage
from lexica.errors import LexicaError

FORMAT_NAME = "lexica.activations"
FORMAT_VERSION = 1  # what a harvest writes unless told otherwise (harvest.store_format)
FORMAT_VERSIONS = (1, 2)
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Small columns compress to almost nothing. Version 1 stores each activation as its 2-byte values
# in one plain column (zstd saves ~7% on fp16 and halves read speed). Version 2 splits them into
# two byte planes: the high bytes (sign, exponent, top of the mantissa) of one dimension vary little
# across tokens and zstd takes them to ~0.73 bytes; the low bytes are close to noise and stay plain.
COLUMN_COMPRESSION = {"doc_id": "zstd", "position": "zstd", "token_id": "zstd", "activation": "none",
                      "activation_hi": "zstd", "activation_lo": "none"}
COMPRESSION_LEVEL = {"doc_id": 1, "position": 1, "token_id": 1, "activation_hi": 1}
ACTIVATION_COLUMNS = {1: ["activation"], 2: ["activation_hi", "activation_lo"]}
MANIFEST_IDENTITY_KEYS = ("format", "format_version", "hook", "d_model", "dtype", "model", "tokenizer",
                          "context_length", "bos", "corpus", "plan_fingerprint")


class StoreError(LexicaError, ValueError):
    """A store is missing, malformed, or a part does not match its commit record."""


class StoreMismatchError(StoreError):
    """A store exists but was made with a different model, hook or configuration."""


class ActivationBatch(NamedTuple):
    doc_id: torch.Tensor  # int64 [n]
    position: torch.Tensor  # int32 [n]
    token_id: torch.Tensor  # int32 [n]
    activation: torch.Tensor  # float16/bfloat16 [n, d_model]


def part_name(shard_index: int, attempt: str) -> str:
    return f"shard-{shard_index:06d}-{attempt}.parquet"


def commit_name(shard_index: int) -> str:
    return f"shard-{shard_index:06d}.json"


def arrow_schema(d_model: int, dtype_name: str, hook_name: str, format_version: int = FORMAT_VERSION) -> pa.Schema:
    if format_version == 1:
        activation = [("activation", pa.binary(2 * d_model))]
    else:
        activation = [("activation_hi", pa.binary(d_model)), ("activation_lo", pa.binary(d_model))]
    return pa.schema(
        [("doc_id", pa.int64()), ("position", pa.int32()), ("token_id", pa.int32()), *activation],
        metadata={"lexica.format": FORMAT_NAME, "lexica.format_version": str(format_version),
                  "lexica.dtype": dtype_name, "lexica.d_model": str(d_model), "lexica.hook": hook_name},
    )


# ---------------------------------------------------------------- encoding


def encode_activations(activations: torch.Tensor) -> pa.FixedSizeBinaryArray:
    """[n, d] fp16/bf16 CPU tensor → fixed_size_binary[2d] array sharing its memory."""
    if activations.dtype not in (torch.float16, torch.bfloat16) or activations.device.type != "cpu":
        raise TypeError(f"expected a CPU float16/bfloat16 tensor, got {activations.dtype} on {activations.device}")
    contiguous = activations.contiguous()
    raw = contiguous.view(torch.int16).numpy()
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * contiguous.shape[1]), contiguous.shape[0],
                                                [None, pa.py_buffer(raw)])


def _fixed_binary(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[n, w] uint8 array → fixed_size_binary[w] array sharing its memory."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(values.shape[1]), values.shape[0],
                                                [None, pa.py_buffer(values)])


def activation_columns(activations: torch.Tensor, format_version: int) -> dict[str, pa.Array]:
    """The activation column(s) of a part in ``format_version`` for a [n, d] fp16/bf16 CPU tensor."""
    if format_version == 1:
        return {"activation": encode_activations(activations)}
    planes = activations.contiguous().view(torch.uint8).view(activations.shape[0], activations.shape[1], 2).numpy()
    little = np.little_endian  # the low byte of a 2-byte value comes first on little-endian machines
    return {"activation_hi": _fixed_binary(planes[:, :, 1 if little else 0]),
            "activation_lo": _fixed_binary(planes[:, :, 0 if little else 1])}


def _plane(column: pa.Array | pa.ChunkedArray, d_model: int) -> np.ndarray:
    chunk = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if chunk.null_count:
        raise StoreError("activation column holds nulls")
    if chunk.type.byte_width != d_model:
        raise StoreError(f"activation plane is {chunk.type.byte_width} bytes per row; expected {d_model}")
    return np.frombuffer(chunk.buffers()[1], dtype=np.uint8, count=len(chunk) * d_model,
                         offset=chunk.offset * d_model).reshape(len(chunk), d_model)


def table_activations(table: pa.Table | pa.RecordBatch, d_model: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, d] tensor of ``dtype`` from a part's activation column(s), whichever format version."""
    if "activation" in table.column_names:
        return decode_activations(table.column("activation"), d_model, dtype)
    hi, lo = _plane(table.column("activation_hi"), d_model), _plane(table.column("activation_lo"), d_model)
    joined = np.empty((len(hi), d_model, 2), dtype=np.uint8)
    joined[:, :, 1 if np.little_endian else 0] = hi
    joined[:, :, 0 if np.little_endian else 1] = lo
    return torch.from_numpy(joined).view(torch.int16).view(dtype).view(len(hi), d_model)


def _readonly_tensor(values: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # Arrow buffers are read-only; these tensors are only ever read, never written in place.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def decode_activations(column: pa.Array | pa.ChunkedArray, d_model: int, dtype: torch.dtype) -> torch.Tensor:
    """fixed_size_binary[2d] → [n, d] tensor of ``dtype``, without per-row Python objects."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    tensors = []
    for chunk in chunks:
        if chunk.null_count:
            raise StoreError("activation column holds nulls")
        width = chunk.type.byte_width
        if width != 2 * d_model:
            raise StoreError(f"activation column is {width} bytes per row; expected {2 * d_model} (d_model {d_model})")
        values = np.frombuffer(chunk.buffers()[1], dtype=np.int16, count=len(chunk) * d_model,
                               offset=chunk.offset * width)
        tensors.append(_readonly_tensor(values).view(dtype).view(len(chunk), d_model))
    if len(tensors) == 1:
        return tensors[0]
    if not tensors:
        return torch.empty(0, d_model, dtype=dtype)
    return torch.cat(tensors)


def batch_from_table(table: pa.Table | pa.RecordBatch, d_model: int, dtype: torch.dtype) -> ActivationBatch:
    def integers(name: str) -> torch.Tensor:
        column = table.column(name)
        array = column.to_numpy() if isinstance(column, pa.ChunkedArray) else column.to_numpy(zero_copy_only=False)
        return _readonly_tensor(np.ascontiguousarray(array))

    return ActivationBatch(integers("doc_id"), integers("position"), integers("token_id"),
                           table_activations(table, d_model, dtype))


# ---------------------------------------------------------------- writing


class _HashingFile:
    """Write-through file wrapper that checksums and counts the bytes of a part as it is written."""

    def __init__(self, handle):
        self._handle = handle
        self._hash = xxhash.xxh3_128()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.size += view.nbytes
        self._handle.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self.closed = True  # the owner closes the underlying handle (commit or discard)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def checksum(self) -> str:
        return f"xxh3_128:{self._hash.hexdigest()}"


@dataclass
class ShardStatistics:
    """Sums over a shard's stored vectors, merged across shards into the manifest."""

    rows: int = 0
    sum_norm: float = 0.0
    sum_squared_norm: float = 0.0
    sum_vector: list[float] | None = None

    def add(self, activations: torch.Tensor) -> None:
        values = activations.float()
        norms = values.norm(dim=1)
        self.rows += values.shape[0]
        self.sum_norm += float(norms.sum(dtype=torch.float64))
        self.sum_squared_norm += float(norms.square().sum(dtype=torch.float64))
        vector = values.sum(dim=0, dtype=torch.float64)
        self.sum_vector = vector.tolist() if self.sum_vector is None else (
            (torch.tensor(self.sum_vector, dtype=torch.float64) + vector).tolist())


@dataclass
class CommitRecord:
    shard: int
    part: str
    rows: int
    documents: int
    empty_documents: int
    invalid_utf8_documents: list[str]
    windows: int
    bytes: int
    checksum: str
    doc_id_min: int
    doc_id_max: int
    statistics: dict
    attempt: str
    seconds: float
    # Of ``seconds``, how long the harvest waited for the writer (a full queue, the final flush):
    # the part of the run that storage bandwidth, not compute, decided.
    write_wait_seconds: float = 0.0
    host: str = field(default_factory=socket.gethostname)
    created_at: float = field(default_factory=time.time)

    @property
    def tokens(self) -> int:
        return self.rows


def commit_from_dict(values: dict, where: str) -> CommitRecord:
    try:
        return CommitRecord(**values)
    except TypeError as error:
        raise StoreError(f"commit record {where} is malformed ({error})") from error


class PartWriter:
    """Writes one shard's part on a background thread, then its commit record.

    ``put(table)`` hands a row group over and returns at once (back-pressure after two queued
    groups), so the next batch computes while this one is written.
    """

    def __init__(self, store_url_: str, shard_index: int, schema: pa.Schema, storage_options: dict | None = None):
        self.fs, self.root = storage.url_to_fs(store_url_, storage_options)
        self.shard_index = shard_index
        self.attempt = uuid.uuid4().hex[:12]
        self.part = part_name(shard_index, self.attempt)
        self.schema = schema
        self.statistics = ShardStatistics()
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._rows = 0
        self.wait_seconds = 0.0  # the producer's time blocked on this writer
        self._context = storage.atomic_open(self.fs, storage.join(self.root, "parts", self.part))
        self._handle = self._context.__enter__()
        self._hashing = _HashingFile(self._handle)
        self._thread = threading.Thread(target=self._drain, name=f"part-writer-{shard_index}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            names = self.schema.names
            writer = pq.ParquetWriter(self._hashing, self.schema,
                                      compression={name: COLUMN_COMPRESSION[name] for name in names},
                                      compression_level={n: v for n, v in COMPRESSION_LEVEL.items() if n in names},
                                      use_dictionary=["doc_id"], write_statistics=["doc_id", "position"],
                                      store_schema=True)
            while (table := self._queue.get()) is not None:
                writer.write_table(table, row_group_size=table.num_rows)
            writer.close()
        except BaseException as error:  # surfaced to the producer on its next call
            self._error = error
            while self._queue.get() is not None:
                pass

    def put(self, table: pa.Table) -> None:
        if self._error is not None:
            raise self._error
        self._rows += table.num_rows
        started = time.perf_counter()
        self._queue.put(table)
        self.wait_seconds += time.perf_counter() - started

    def abort(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._context.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def commit(self, **details: Any) -> CommitRecord:
        """Finish the part, make it visible, then write the commit record that makes it count."""
        started = time.perf_counter()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            self._context.__exit__(type(self._error), self._error, None)
            raise self._error
        self._context.__exit__(None, None, None)  # an upload finishes here
        self.wait_seconds += time.perf_counter() - started
        record = CommitRecord(shard=self.shard_index, part=self.part, rows=self._rows, bytes=self._hashing.size,
                              checksum=self._hashing.checksum, statistics=asdict(self.statistics),
                              attempt=self.attempt, write_wait_seconds=round(self.wait_seconds, 3), **details)
        commit_path = storage.join(self.root, "commits", commit_name(self.shard_index))
        if storage.exists(self.fs, commit_path):
            # Another attempt committed this shard first; ours stays an invisible orphan.
            return commit_from_dict(storage.read_json(self.fs, commit_path), commit_path)
        storage.write_json(self.fs, commit_path, asdict(record))
        return record


# ---------------------------------------------------------------- reading


def merge_statistics(commits: list[CommitRecord]) -> dict:
    rows = sum(c.statistics["rows"] for c in commits)
    counts = {
        "rows": rows,
        "tokens": rows,
        "documents": sum(c.documents for c in commits),
        # Kept even when nothing was stored: "every document was skipped" is exactly when the
        # user needs to see why.
        "empty_documents": sum(c.empty_documents for c in commits),
        "invalid_utf8_documents": sum(len(c.invalid_utf8_documents) for c in commits),
        "bytes": sum(c.bytes for c in commits),
        "shards": len(commits),
        "doc_id_max": max((c.doc_id_max for c in commits if c.rows), default=-1),
    }
    if rows == 0:
        return counts
    vectors = [np.asarray(c.statistics["sum_vector"]) for c in commits if c.statistics["rows"]]
    return {
        **counts,
        "mean_norm": sum(c.statistics["sum_norm"] for c in commits) / rows,
        "mean_squared_norm": sum(c.statistics["sum_squared_norm"] for c in commits) / rows,
        "mean": (np.sum(vectors, axis=0) / rows).tolist(),
    }


class ActivationStore:
    """Read access to a store: manifest checks, committed parts, torch batches, contexts, Ray Data."""

    def __init__(self, url: str, storage_options: dict | None = None, expect: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = storage.url_to_fs(self.url, self.storage_options)
        manifest_path = storage.join(self.root, "manifest.json")
        if not storage.exists(self.fs, manifest_path):
            raise StoreError(f"{self.url} is not an activation store (no manifest.json)")
        self.manifest = storage.read_json(self.fs, manifest_path)
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("format_version") not in FORMAT_VERSIONS:
            raise StoreError(f"{self.url}: manifest format {self.manifest.get('format')!r} "
                             f"v{self.manifest.get('format_version')}; expected {FORMAT_NAME} v1 or v2")
        self.format_version: int = self.manifest["format_version"]
        check_expectations(self.manifest, expect or {}, self.url)
        self.d_model: int = self.manifest["d_model"]
        self.dtype: torch.dtype = TORCH_DTYPES[self.manifest["dtype"]]
        self.hook: str = self.manifest["hook"]
        self._commits: list[CommitRecord] | None = None

    @property
    def activation_columns(self) -> list[str]:
        """The part columns holding activations in this store's format version."""
        return ACTIVATION_COLUMNS[self.format_version]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def statistics(self) -> dict | None:
        return self.manifest.get("statistics")

    def commits(self, refresh: bool = False) -> list[CommitRecord]:
        if self._commits is None or refresh:
            folder = storage.join(self.root, "commits")
            records = []
            for name in storage.list_names(self.fs, folder):
                if name.endswith(".json"):
                    path = storage.join(folder, name)
                    records.append(commit_from_dict(storage.read_json(self.fs, path), path))
            self._commits = sorted(records, key=lambda record: record.shard)
        return self._commits

    def part_path(self, commit: CommitRecord) -> str:
        return storage.join(self.root, "parts", commit.part)

    def part_uris(self) -> list[str]:
        return [storage.to_url(self.fs, self.part_path(c)) for c in self.commits() if c.rows]

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.commits())

    def orphans(self) -> list[str]:
        """Part files no commit record names: debris of crashed or losing attempts."""
        named = {c.part for c in self.commits(refresh=True)}
        return [n for n in storage.list_names(self.fs, storage.join(self.root, "parts")) if n not in named]

    def _open_parquet(self, commit: CommitRecord) -> pq.ParquetFile:
        path = self.part_path(commit)
        with self._reading(commit):
            parquet = storage.open_parquet(self.fs, path)
        if parquet.metadata.num_rows != commit.rows:
            raise StoreError(f"part {commit.part} holds {parquet.metadata.num_rows} rows but its commit record "
                             f"says {commit.rows}; the store at {self.url} is damaged")
        # fp16 and bf16 rows have the same width: only the part's own record tells them apart.
        recorded = parquet.schema_arrow.metadata or {}
        for key, wanted in (("dtype", self.manifest["dtype"]), ("d_model", str(self.d_model))):
            found = recorded.get(f"lexica.{key}".encode(), b"").decode()
            if found and found != wanted:
                raise StoreError(f"part {commit.part} of shard {commit.shard} in {self.url} holds {key} {found} but "
                                 f"the manifest says {wanted}; the store mixes harvests (re-harvest with --overwrite)")
        return parquet

    @contextlib.contextmanager
    def _reading(self, commit: CommitRecord) -> Iterator[None]:
        """Turn Arrow's and the filesystem's errors about one part into a StoreError naming it."""
        try:
            yield
        except FileNotFoundError as error:
            raise StoreError(f"part {commit.part} of committed shard {commit.shard} is missing "
                             f"from {self.url}") from error
        except (pa.ArrowException, OSError) as error:
            # Arrow's messages span lines (e.g. "...\nDeserializing page header failed.\n").
            detail = f"{type(error).__name__}: {' '.join(str(error).split())}"
            if isinstance(error, pa.ArrowInvalid):
                # A part truncated after its commit: "Parquet magic bytes not found in footer".
                raise StoreError(f"part {commit.part} of shard {commit.shard} in {self.url} is corrupt "
                                 f"({detail}); `lexica verify {self.url}` checks every part") from error
            # Arrow reports a damaged page header and a failing disk or network alike as OSError.
            raise StoreError(f"part {commit.part} of shard {commit.shard} in {self.url} cannot be read ({detail}); "
                             f"if storage is reachable the part is damaged: `lexica verify {self.url}` "
                             "checks every part") from error

    def read_part(self, commit: CommitRecord, columns: list[str] | None = None) -> pa.Table:
        parquet = self._open_parquet(commit)
        with self._reading(commit):
            return parquet.read(columns=columns, use_threads=storage.parquet_threads(self.fs))

    def iter_batches(self, batch_rows: int = 65536, shards: list[int] | None = None) -> Iterator[ActivationBatch]:
        """Committed rows in (shard, doc_id, position) order as torch batches of ``batch_rows``."""
        wanted = None if shards is None else set(shards)
        for commit in self.commits():
            if commit.rows == 0 or (wanted is not None and commit.shard not in wanted):
                continue
            record_batches = self._open_parquet(commit).iter_batches(batch_size=batch_rows,
                                                                     use_threads=storage.parquet_threads(self.fs))
            while True:
                with self._reading(commit):
                    record_batch = next(record_batches, None)
                if record_batch is None:
                    break
                yield batch_from_table(record_batch, self.d_model, self.dtype)

    def context(self, doc_id: int, position: int, before: int = 16, after: int = 16) -> ActivationBatch:
        """Rows of the same document from ``position - before`` to ``position + after``."""
        for commit in self.commits():
            if commit.rows and commit.doc_id_min <= doc_id <= commit.doc_id_max:
                # Only the row groups that can hold the document (their statistics say), read as
                # every part is (see storage.open_parquet), not by pq.read_table's dataset scanner.
                parquet = self._open_parquet(commit)
                with self._reading(commit):
                    table = parquet.read_row_groups(_row_groups_holding(parquet.metadata, "doc_id", doc_id),
                                                    use_threads=storage.parquet_threads(self.fs))
                wanted = pc.and_(pc.equal(table["doc_id"], doc_id),
                                 pc.and_(pc.greater_equal(table["position"], position - before),
                                         pc.less_equal(table["position"], position + after)))
                return batch_from_table(table.filter(wanted), self.d_model, self.dtype)
        raise StoreError(f"document {doc_id} is not in any committed shard of {self.url}")

    def to_ray_dataset(self, **read_kwargs: Any):
        """The committed parts as a ``ray.data`` dataset (activation column stays raw bytes)."""
        import ray.data
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        paths = [self.part_path(c) for c in self.commits() if c.rows]
        if not paths:
            raise StoreError(f"{self.url} has no committed rows")
        filesystem = None if storage.is_local(self.fs) else PyFileSystem(FSSpecHandler(self.fs))
        return ray.data.read_parquet(paths, filesystem=filesystem, **read_kwargs)

    def verify(self, checksums: bool = True) -> dict:
        """Check every committed part against its record; list orphans. Raises on damage."""
        problems = []
        for commit in self.commits(refresh=True):
            path = self.part_path(commit)
            if not storage.exists(self.fs, path):
                problems.append(f"shard {commit.shard}: part {commit.part} is missing")
                continue
            size = int(self.fs.size(path))
            if size != commit.bytes:
                problems.append(f"shard {commit.shard}: part {commit.part} is {size} bytes, commit says {commit.bytes}")
                continue
            if checksums:
                digest = xxhash.xxh3_128()
                with self.fs.open(path, "rb") as handle:
                    while block := handle.read(16 << 20):
                        digest.update(block)
                if f"xxh3_128:{digest.hexdigest()}" != commit.checksum:
                    problems.append(f"shard {commit.shard}: part {commit.part} checksum does not match its commit")
        report = {"url": self.url, "shards_committed": len(self.commits()), "rows": self.num_rows,
                  "orphans": self.orphans(), "problems": problems}
        if problems:
            raise StoreError(f"store {self.url} is damaged: " + "; ".join(problems))
        return report


# ---------------------------------------------------------------- the manifest (its one writer)


def new_manifest(*, hook: str, d_model: int, dtype: str, model: dict, tokenizer: dict, context_length: int,
                 bos_prepended: bool, corpus: dict, plan: dict, plan_fingerprint: str,
                 format_version: int = FORMAT_VERSION) -> dict:
    """A store's manifest before any shard is committed (docs/store-format.md lists each key)."""
    return {
        "format": FORMAT_NAME, "format_version": format_version, "hook": hook, "d_model": d_model, "dtype": dtype,
        "model": model, "tokenizer": tokenizer, "context_length": context_length,
        "bos": {"prepend": bos_prepended, "stored": False}, "corpus": corpus,
        "plan_fingerprint": plan_fingerprint, "plan": plan,
        "created_at": time.time(), "complete": False, "statistics": None,
    }


def create_or_check_manifest(url: str, wanted: dict, overwrite: bool, storage_options: dict | None = None) -> bool:
    """Create the store at ``url`` with manifest ``wanted``, or accept an existing store of the same
    identity (a resume). A different store there is refused, or with ``overwrite`` deleted first.
    Returns whether an existing store was replaced."""
    fs, root = storage.url_to_fs(url, storage_options)
    manifest_path = storage.join(root, "manifest.json")
    if storage.exists(fs, manifest_path):
        existing = storage.read_json(fs, manifest_path)
        if identity(existing) == identity(wanted):
            return False
        differences = describe_differences(existing, wanted)
        if not overwrite:
            raise StoreMismatchError(
                f"a store made with a different configuration already exists at {url}: "
                + "; ".join(differences) + ". Re-run with --overwrite to replace it, or choose another --run.")
        fs.rm(root, recursive=True)
        storage.write_json(fs, manifest_path, wanted)
        return True
    storage.write_json(fs, manifest_path, wanted)
    return False


def mark_complete(store: ActivationStore, statistics: dict) -> dict:
    """Record the merged statistics once every planned shard is committed; returns the manifest."""
    manifest = {**store.manifest, "complete": True, "statistics": statistics}
    storage.write_json(store.fs, storage.join(store.root, "manifest.json"), manifest)
    store.manifest = manifest
    return manifest


def write_store(url: str, activations: torch.Tensor, hook: str, *, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, token_ids: torch.Tensor | None = None, shards: int = 1,
                dtype: str = "float16", model: dict | None = None, tokens_per_document: int = 512,
                row_group_rows: int = 4096, storage_options: dict | None = None,
                format_version: int = FORMAT_VERSION) -> str:
    """A complete store at ``url`` holding ``activations`` [n, d_model] (e.g. computed elsewhere,
    or synthetic data for tests and benchmarks), written as a harvest writes one: parts, commit
    records, then the manifest with merged statistics. Without ``doc_ids``/``positions`` each run of
    ``tokens_per_document`` rows counts as one document. Returns ``url``."""
    rows_total, d_model = activations.shape
    order = torch.arange(rows_total)
    doc_ids = order // tokens_per_document if doc_ids is None else doc_ids
    positions = order % tokens_per_document if positions is None else positions
    token_ids = torch.zeros(rows_total, dtype=torch.int32) if token_ids is None else token_ids
    stored = activations.detach().to("cpu", TORCH_DTYPES[dtype])
    schema = arrow_schema(d_model, dtype, hook, format_version)
    commits = []
    for shard, rows in enumerate(torch.arange(rows_total).chunk(shards)):
        writer = PartWriter(url, shard, schema, storage_options)
        writer.statistics.add(stored[rows])
        shard_docs = doc_ids[rows].numpy().astype(np.int64)
        for start in range(0, len(rows), row_group_rows):
            group = rows[start:start + row_group_rows]
            writer.put(pa.table({"doc_id": doc_ids[group].numpy().astype(np.int64),
                                 "position": positions[group].numpy().astype(np.int32),
                                 "token_id": token_ids[group].numpy().astype(np.int32),
                                 **activation_columns(stored[group], format_version)}, schema=schema))
        documents = len(np.unique(shard_docs))
        commits.append(writer.commit(documents=documents, empty_documents=0, invalid_utf8_documents=[],
                                     windows=documents, doc_id_min=int(shard_docs.min(initial=0)),
                                     doc_id_max=int(shard_docs.max(initial=0)), seconds=0.0))
    # Every shard is committed already: the manifest is written once, complete.
    manifest = {"format": FORMAT_NAME, "format_version": format_version, "hook": hook, "d_model": d_model,
                "dtype": dtype, "model": model or {"id": "unknown"}, "created_at": time.time(),
                "complete": True, "statistics": merge_statistics(commits)}
    fs, root = storage.url_to_fs(url, storage_options)
    storage.write_json(fs, storage.join(root, "manifest.json"), manifest)
    return url


def check_expectations(manifest: dict, expect: dict, url: str) -> None:
    """Refuse a store whose manifest disagrees with what the caller needs, naming both sides."""
    mismatches = []
    for key, wanted in expect.items():
        actual: Any = manifest
        for part in key.split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if actual != wanted:
            mismatches.append(f"{key}: store has {actual!r}, expected {wanted!r}")
    if mismatches:
        raise StoreMismatchError(f"store {url} does not match: " + "; ".join(mismatches))


def identity(manifest: dict) -> dict:
    return {key: manifest.get(key) for key in MANIFEST_IDENTITY_KEYS}


def describe_differences(existing: dict, wanted: dict) -> list[str]:
    differences = []
    for key in MANIFEST_IDENTITY_KEYS:
        if existing.get(key) != wanted.get(key):
            differences.append(f"{key}: existing {json.dumps(existing.get(key), sort_keys=True)[:200]} "
                               f"vs requested {json.dumps(wanted.get(key), sort_keys=True)[:200]}")
    return differences


def _row_groups_holding(metadata: pq.FileMetaData, column: str, value: int) -> list[int]:
    """The row groups whose statistics for ``column`` admit ``value`` (all of them without statistics)."""
    if metadata.num_row_groups == 0:
        return []
    first = metadata.row_group(0)
    index = next(i for i in range(first.num_columns) if first.column(i).path_in_schema == column)
    groups = []
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(index).statistics
        if statistics is None or not statistics.has_min_max or statistics.min <= value <= statistics.max:
            groups.append(group)
    return groups
