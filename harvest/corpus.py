"""The corpus: which documents exist, how they map to shards, and reading one shard's documents.

A document's ``doc_id`` is its row index in the whole corpus (files sorted by path, rows in file
order; a dataset's rows in its order), so provenance survives re-runs. Shards are the unit of work,
commit and resume, and there are two kinds of plan, both stored in the manifest so a resume is
exact:

- **indexed** (.txt, .jsonl, .parquet, a saved or loaded dataset): every source is counted first and
  the corpus is cut into shards of about ``shard_tokens`` tokens (estimated from bytes) or
  ``docs_per_shard`` documents. A long document is split between shards at window boundaries, so
  a few long documents still spread over many actors. Every actor reads its own shard straight
  from storage (no shared filesystem between machines is assumed).
- **streamed** (a streaming dataset, compressed files, or a ``max_tokens`` budget): nothing needs
  counting up front. The driver reads the corpus in order, tokenises it and cuts shards as it goes
  (:mod:`harvest.streaming`); a resume reads the same stream again and skips committed shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from lexica import storage
from lexica.errors import LexicaError
from lexica.harvest.config import CorpusConfig
from lexica.storage import to_url, url_to_fs

log = logging.getLogger(__name__)

# suffix → (format, compression); longest suffixes first so ".jsonl.gz" wins over ".gz".
FILE_FORMATS = {".jsonl.gz": ("jsonl", "gzip"), ".jsonl.zst": ("jsonl", "zstd"), ".txt.gz": ("txt", "gzip"),
                ".txt.zst": ("txt", "zstd"), ".txt": ("txt", None), ".jsonl": ("jsonl", None),
                ".parquet": ("parquet", None)}
SCAN_BLOCK_BYTES = 8 << 20
BYTES_PER_TOKEN = 4.0  # before calibration on the corpus's first documents
AUTO_SHARDS = 64  # the default shard size aims at this many shards
AUTO_SHARD_TOKENS = (16384, 1 << 20)
STREAM_SHARD_TOKENS = 1 << 18  # an unbounded stream of unknown length


class CorpusError(LexicaError, ValueError):
    """The corpus cannot be read as configured; the message names the file/row/field."""


@dataclass(frozen=True)
class Source:
    """One corpus file (or a whole datasets split) and how many rows it holds (-1: not counted)."""

    uri: str
    format: str  # txt, jsonl, parquet, dataset (map-style), stream (a streaming dataset)
    rows: int
    size: int
    compression: str | None = None


@dataclass
class ShardPlan:
    sources: list[Source]
    text_field: str
    docs_per_shard: int | None = None
    shard_tokens: int | None = None
    window_tokens: int = 0  # a long document is split between shards at multiples of this
    streamed: bool = False
    max_documents: int | None = None
    max_tokens: int | None = None
    # Indexed plans, per shard: segments [source, first_row, end_row, byte_offset_of_first_row,
    # first_window, end_window]; a window range (end -1: to the document's end) applies to a
    # one-row segment holding part of a long document.
    shards: list[list[list[int]]] = field(default_factory=list)

    @property
    def total_documents(self) -> int:
        return sum(max(source.rows, 0) for source in self.sources)

    def doc_range(self, shard_index: int) -> tuple[int, int]:
        """[first, end) doc ids an indexed shard reads rows of."""
        firsts = self.source_first_docs()
        segments = self.shards[shard_index]
        first = segments[0]
        last = segments[-1]
        return int(firsts[first[0]] + first[1]), int(firsts[last[0]] + last[2])

    def source_first_docs(self) -> np.ndarray:
        return np.cumsum([0] + [max(s.rows, 0) for s in self.sources])

    def to_dict(self) -> dict:
        return {"sources": [asdict(s) for s in self.sources], "text_field": self.text_field,
                "docs_per_shard": self.docs_per_shard, "shard_tokens": self.shard_tokens,
                "window_tokens": self.window_tokens, "streamed": self.streamed,
                "max_documents": self.max_documents, "max_tokens": self.max_tokens, "shards": self.shards}

    @classmethod
    def from_dict(cls, values: dict) -> ShardPlan:
        return cls(**{**values, "sources": [Source(**s) for s in values["sources"]]})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardDocuments:
    """One shard's input: readable documents (or, from a stream, their tokens), plus counts of
    what was skipped and why. ``windows`` maps a doc id to the [first, end) windows this shard
    holds of it (end -1: to its end) when the document is split between shards."""

    documents: list[tuple[int, str]]
    empty: int = 0
    invalid_utf8: list[str] = field(default_factory=list)
    windows: dict[int, tuple[int, int]] = field(default_factory=dict)
    pieces: list | None = None  # streamed shards: packing.Piece, already tokenised by the driver


# ---------------------------------------------------------------- listing


def list_corpus_files(paths: list[str], storage_options: dict | None) -> list[tuple[str, str, str | None, int]]:
    """(url, format, compression, size) of every corpus file named by paths/folders/globs, by URL."""
    found: dict[str, tuple[str, str | None, int]] = {}
    for spec in paths:
        fs, path = url_to_fs(spec, storage_options)
        if any(ch in path for ch in "*?["):
            matches = fs.glob(path)
        elif fs.isdir(path):
            matches = [p for p in fs.find(path) if _format_of(p, strict=False)]
        elif fs.exists(path):
            matches = [path]
        else:
            raise CorpusError(f"corpus path {spec} does not exist")
        if not matches:
            raise CorpusError(f"corpus path {spec} matched no .txt/.jsonl/.parquet files (or .gz/.zst ones)")
        for match in matches:
            if fs.isdir(match):
                continue
            fmt, compression = _format_of(match, strict=True)
            found[to_url(fs, match)] = (fmt, compression, int(fs.size(match)))
    return [(url, fmt, compression, size) for url, (fmt, compression, size) in sorted(found.items())]


def _format_of(path: str, strict: bool) -> tuple[str, str | None] | None:
    for suffix, kind in FILE_FORMATS.items():
        if path.endswith(suffix):
            return kind
    if strict:
        raise CorpusError(f"corpus file {path} has an unsupported type; expected one of {sorted(FILE_FORMATS)}")
    return None


# ---------------------------------------------------------------- planning


def plan_shards(config: CorpusConfig, storage_options: dict | None = None, tokenizer=None,
                window_tokens: int = 1) -> ShardPlan:
    """The corpus's shard plan (see the module docstring). ``tokenizer`` calibrates bytes per token
    and ``window_tokens`` aligns splits of long documents with the harvest's windows."""
    if config.dataset:
        sources, sizes, offsets = _dataset_sources(config)
    else:
        sources, sizes, offsets = _file_sources(config, storage_options)
    streamed = config.max_tokens is not None or any(s.rows < 0 for s in sources)
    plan = ShardPlan(sources=sources, text_field=config.text_field, docs_per_shard=config.docs_per_shard,
                     window_tokens=window_tokens, streamed=streamed, max_documents=config.max_documents,
                     max_tokens=config.max_tokens)
    where = config.dataset or ", ".join(config.paths)
    if streamed:
        plan.shard_tokens = None if config.docs_per_shard else (config.shard_tokens or _stream_shard_tokens(
            config, sources, window_tokens))
        if next(iter_rows(plan, config, storage_options), None) is None:
            raise CorpusError(f"corpus {where} holds no documents")
        return plan
    if plan.total_documents == 0:
        raise CorpusError(f"corpus {where} holds no documents")
    if config.docs_per_shard:
        plan.shards = _cut_by_documents(plan, offsets)
        return plan
    tokens = _estimated_tokens(plan, config, sizes, tokenizer, storage_options)
    plan.shard_tokens = config.shard_tokens or _auto_shard_tokens(float(sum(t.sum() for t in tokens)), window_tokens)
    plan.shards = _cut_by_tokens(plan, tokens, offsets)
    return plan


def _file_sources(config: CorpusConfig, storage_options: dict | None):
    """Sources of a file corpus, each row's size in bytes (None: not counted) and jsonl row offsets."""
    budget = config.max_documents
    sources, sizes, offsets = [], [], []
    total = 0
    for url, fmt, compression, size in list_corpus_files(config.paths, storage_options):
        if budget is not None and total >= budget:
            break
        row_sizes, row_offsets = None, None
        if compression is not None:
            rows = -1  # counting would mean decompressing the file: such corpora are streamed
        elif fmt == "txt":
            rows, row_sizes = 1, np.array([size], dtype=np.int64)
        elif fmt == "parquet":
            row_sizes = _parquet_row_sizes(url, config.text_field, storage_options)
            rows = len(row_sizes)
        else:
            row_offsets = _scan_jsonl(url, config.text_field, storage_options)
            rows = len(row_offsets) - 1
            row_sizes = np.diff(row_offsets)
        if budget is not None and rows >= 0:
            rows = min(rows, budget - total)
        sources.append(Source(uri=url, format=fmt, rows=rows, size=size, compression=compression))
        sizes.append(None if row_sizes is None else row_sizes[:rows])
        offsets.append(row_offsets)
        total += max(rows, 0)
    return sources, sizes, offsets


def _dataset_sources(config: CorpusConfig):
    if config.streaming:
        load_dataset_split(config)  # fail now, naming the dataset, if it cannot be opened
        uri = f"dataset:{config.dataset}|{config.dataset_config or ''}|{config.split}|streaming"
        return [Source(uri=uri, format="stream", rows=-1, size=0)], [None], [None]
    import pyarrow.compute as pc

    dataset = load_dataset_split(config)
    rows = len(dataset) if config.max_documents is None else min(len(dataset), config.max_documents)
    column = dataset.select(range(rows)).select_columns([config.text_field]).with_format("arrow")
    lengths = [pc.binary_length(batch.column(0)).fill_null(0).to_numpy(zero_copy_only=False)
               for batch in column.iter(batch_size=65536)]
    lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, dtype=np.int64)
    source = Source(uri=_dataset_uri(config, dataset), format="dataset", rows=rows, size=int(lengths.sum()))
    return [source], [lengths], [None]


def _stream_shard_tokens(config: CorpusConfig, sources: list[Source], window_tokens: int) -> int:
    if config.max_tokens is not None:
        return _auto_shard_tokens(config.max_tokens, window_tokens)
    if all(s.format != "stream" for s in sources):  # compressed files: guess ~3x their size in text
        return _auto_shard_tokens(3 * sum(s.size for s in sources) / BYTES_PER_TOKEN, window_tokens)
    return _auto_shard_tokens(STREAM_SHARD_TOKENS * AUTO_SHARDS, window_tokens)


def _auto_shard_tokens(estimated_tokens: float, window_tokens: int) -> int:
    low, high = AUTO_SHARD_TOKENS
    tokens = int(min(max(estimated_tokens / AUTO_SHARDS, low), high))
    return max(window_tokens, tokens - tokens % max(window_tokens, 1))


def _estimated_tokens(plan: ShardPlan, config: CorpusConfig, sizes: list, tokenizer,
                      storage_options: dict | None) -> list[np.ndarray]:
    """Estimated tokens per row of every source: bytes over bytes per token, calibrated by
    tokenising the corpus's first documents (a deterministic sample, so re-planning agrees)."""
    bytes_per_token = BYTES_PER_TOKEN
    if tokenizer is not None:
        first_docs = plan.source_first_docs()
        sample_bytes, sample_tokens = 0, 0.0
        for doc_id, text in iter_documents(plan, config, storage_options):
            source = int(np.searchsorted(first_docs, doc_id, side="right") - 1)
            sample = text[:1 << 18]
            # A stored row's bytes include JSON escapes and other fields: scale by the whole text.
            ids = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
            tokens = len(ids) * len(text) / len(sample)
            sample_bytes += int(sizes[source][doc_id - first_docs[source]])
            sample_tokens += tokens
            if sample_bytes >= 1 << 18 or doc_id >= 64:
                break
        if sample_tokens:
            bytes_per_token = sample_bytes / sample_tokens
    return [row_sizes / bytes_per_token for row_sizes in sizes]


def _cut_by_documents(plan: ShardPlan, offsets: list) -> list[list[list[int]]]:
    shards: list[list[list[int]]] = []
    source_first_doc = plan.source_first_docs()
    per_shard = plan.docs_per_shard
    for first in range(0, plan.total_documents, per_shard):
        end = min(first + per_shard, plan.total_documents)
        segments = []
        for source_index in range(len(plan.sources)):
            lo, hi = int(source_first_doc[source_index]), int(source_first_doc[source_index + 1])
            start, stop = max(first, lo), min(end, hi)
            if start < stop:
                segments.append([source_index, start - lo, stop - lo, _row_offset(offsets, source_index, start - lo),
                                 0, -1])
        shards.append(segments)
    return shards


def _row_offset(offsets: list, source_index: int, row: int) -> int:
    row_offsets = offsets[source_index]
    return 0 if row_offsets is None else int(row_offsets[row])


def _cut_by_tokens(plan: ShardPlan, tokens: list[np.ndarray], offsets: list) -> list[list[list[int]]]:
    """Shards of about ``shard_tokens`` estimated tokens. A document longer than a shard is split at
    window boundaries, starting in what is left of the current shard (its last piece runs to the
    document's end, however long the estimate proves)."""
    capacity, window = plan.shard_tokens, max(plan.window_tokens, 1)
    shards: list[list[list[int]]] = []
    current: list[list[int]] = []
    used = 0.0

    def flush():
        nonlocal current, used
        if current:
            shards.append(current)
        current, used = [], 0.0

    for source_index, row_tokens in enumerate(tokens):
        for row, estimate in enumerate(row_tokens.tolist()):
            offset = _row_offset(offsets, source_index, row)
            if estimate <= capacity:
                if used + estimate > capacity:
                    flush()
                previous = current[-1] if current else None
                if previous and previous[0] == source_index and previous[2] == row and previous[4:] == [0, -1]:
                    previous[2] = row + 1  # extend the run of whole rows
                else:
                    current.append([source_index, row, row + 1, offset, 0, -1])
                used += estimate
                continue
            windows_total = int(np.ceil(estimate / window))
            first_window = 0
            while first_window < windows_total:
                room = int((capacity - used) // window)
                if room < 1:
                    flush()
                    continue
                end_window = first_window + room
                current.append([source_index, row, row + 1, offset, first_window,
                                -1 if end_window >= windows_total else end_window])
                used += (min(end_window, windows_total) - first_window) * window
                first_window = end_window
    flush()
    return shards


def _scan_jsonl(url: str, text_field: str, storage_options: dict | None) -> np.ndarray:
    """Byte offset of every line start of a jsonl file, plus its end: rows + 1 values."""
    fs, path = url_to_fs(url, storage_options)
    ends = [np.zeros(1, dtype=np.int64)]
    position = 0
    last_byte = b"\n"
    with fs.open(path, "rb") as handle:
        _check_jsonl_field(url, handle, text_field)
        handle.seek(0)
        while block := handle.read(SCAN_BLOCK_BYTES):
            ends.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64) + 1 + position)
            position += len(block)
            last_byte = block[-1:]
    if last_byte != b"\n":
        ends.append(np.array([position], dtype=np.int64))  # a last line without a newline is still a document
    return np.concatenate(ends)


def _check_jsonl_field(url: str, handle, text_field: str, max_lines: int = 100) -> None:
    """Fail at planning time, not hours into the harvest, when the text field is misnamed.

    Checks the first line that holds a record: blank lines are empty documents and a line that is
    not UTF-8 is for the corpus.invalid_utf8 policy to judge when the shard is read.
    """
    for line_number in range(1, max_lines + 1):
        line = handle.readline()
        if not line:
            return
        if not line.strip():
            continue
        if not isinstance(_jsonl_text(line, url, line_number, text_field), bytes):
            return


def _parquet_row_sizes(url: str, text_field: str, storage_options: dict | None) -> np.ndarray:
    """Each row's share of its row group's uncompressed text-column bytes (from the footer only)."""
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise CorpusError(f"corpus file {url} has no {text_field!r} column (columns: {names}); "
                              "set corpus.text_field")
        column = names.index(text_field)
        sizes = []
        for group in range(parquet.num_row_groups):
            metadata = parquet.metadata.row_group(group)
            rows = metadata.num_rows
            column_bytes = metadata.column(column).total_uncompressed_size
            sizes.append(np.full(rows, column_bytes // max(rows, 1), dtype=np.int64))
        return np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)


def load_dataset_split(config: CorpusConfig):
    import datasets

    try:
        name = config.dataset
        fs, path = url_to_fs(name)
        if fs.isdir(path) and (fs.exists(f"{path}/dataset_info.json") or fs.exists(f"{path}/state.json")):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[config.split]
            if config.streaming:
                loaded = loaded.to_iterable_dataset()
        else:
            loaded = datasets.load_dataset(name, config.dataset_config, split=config.split,
                                           streaming=config.streaming)
    except Exception as error:
        raise CorpusError(f"cannot load dataset {config.dataset!r} (split {config.split!r}): {error}") from error
    columns = loaded.column_names
    if columns is not None and config.text_field not in columns:
        raise CorpusError(f"dataset {config.dataset} has no {config.text_field!r} column "
                          f"(columns: {columns}); set corpus.text_field")
    return loaded


def _dataset_uri(config: CorpusConfig, dataset) -> str:
    fingerprint = getattr(dataset, "_fingerprint", "")
    return f"dataset:{config.dataset}|{config.dataset_config or ''}|{config.split}|{fingerprint}"


# ---------------------------------------------------------------- reading


def read_shard(plan: ShardPlan, shard_index: int, corpus: CorpusConfig,
               storage_options: dict | None = None) -> ShardDocuments:
    """Read the documents of one shard of an indexed plan, in doc_id order."""
    result = ShardDocuments(documents=[])
    source_first_doc = plan.source_first_docs()
    for source_index, first_row, end_row, byte_offset, first_window, end_window in plan.shards[shard_index]:
        source = plan.sources[source_index]
        base_doc_id = int(source_first_doc[source_index])
        rows = _read_rows(source, first_row, end_row, byte_offset, corpus, storage_options)
        # Skips are counted once per document: by the shard holding its first window.
        counts = result if first_window == 0 else ShardDocuments(documents=[])
        for row, raw in zip(range(first_row, end_row), rows, strict=True):
            text = row_text(raw, source, row, corpus, counts)
            if text is None:
                continue
            result.documents.append((base_doc_id + row, text))
            if (first_window, end_window) != (0, -1):
                result.windows[base_doc_id + row] = (first_window, end_window)
    return result


def _where(source: Source, row: int) -> str:
    if source.format == "txt":
        return f"corpus file {source.uri}"  # the whole file is one document
    if source.format in ("dataset", "stream"):
        return f"dataset {source.uri.split('|')[0].removeprefix('dataset:')} row {row}"
    return f"corpus file {source.uri} {'line' if source.format == 'jsonl' else 'row'} {row + 1}"


def iter_rows(plan: ShardPlan, corpus: CorpusConfig, storage_options: dict | None = None, first_doc: int = 0,
              ) -> Iterator[tuple[int, object, Source, int]]:
    """(doc_id, raw text, source, row) of every row of the corpus in order from ``first_doc``, up to
    ``max_documents``, reading each source from its start (compressed files and streams included;
    counted sources before ``first_doc`` are not opened)."""
    doc_id = 0
    for source in plan.sources:
        if 0 <= source.rows and doc_id + source.rows <= first_doc:
            doc_id += source.rows
            continue
        for row, raw in enumerate(_iter_source(source, corpus, storage_options)):
            if doc_id < first_doc:
                doc_id += 1
                continue
            if plan.max_documents is not None and doc_id >= plan.max_documents:
                return
            if source.rows >= 0 and row >= source.rows:
                break
            yield doc_id, raw, source, row
            doc_id += 1


def row_text(raw: object, source: Source, row: int, corpus: CorpusConfig, counts: ShardDocuments) -> str | None:
    """A row's text, or None when it is skipped (empty, or not UTF-8 under the skip policy;
    ``counts`` records which)."""
    text = _as_text(raw, _where(source, row), corpus.invalid_utf8, counts, whole_file=source.format == "txt")
    if text is not None and not text.strip():
        counts.empty += 1
        return None
    return text


def iter_documents(plan: ShardPlan, corpus: CorpusConfig, storage_options: dict | None = None, first_doc: int = 0,
                   ) -> Iterator[tuple[int, str]]:
    """(doc_id, text) of every readable, non-empty document in order (skips are logged)."""
    counts = ShardDocuments(documents=[])
    for doc_id, raw, source, row in iter_rows(plan, corpus, storage_options, first_doc):
        text = row_text(raw, source, row, corpus, counts)
        if text is not None:
            yield doc_id, text


def _iter_source(source: Source, corpus: CorpusConfig, storage_options: dict | None) -> Iterator[object]:
    if source.format == "stream":
        for record in load_dataset_split(corpus):
            yield record.get(corpus.text_field) if isinstance(record, dict) else None
        return
    if source.format == "dataset":
        dataset = load_dataset_split(corpus).select_columns([corpus.text_field])
        for start in range(0, source.rows, 1024):
            yield from dataset[start:min(start + 1024, source.rows)][corpus.text_field]
        return
    fs, path = url_to_fs(source.uri, storage_options)
    if source.format == "parquet":
        parquet = storage.open_parquet(fs, path)
        for batch in parquet.iter_batches(batch_size=1024, columns=[corpus.text_field],
                                          use_threads=storage.parquet_threads(fs)):
            yield from batch.column(0).to_pylist()
        return
    with _open_text(fs, path, source.compression) as handle:
        if source.format == "txt":
            yield handle.read()
            return
        for line_number, line in enumerate(handle, start=1):
            yield None if not line.strip() else _jsonl_text(line, source.uri, line_number, corpus.text_field)


def _open_text(fs, path: str, compression: str | None):
    """A buffered binary reader of a corpus file, decompressing .gz/.zst with pyarrow's codecs."""
    handle = fs.open(path, "rb")
    if compression is None:
        return handle
    import pyarrow as pa

    stream = pa.CompressedInputStream(pa.PythonFile(handle, mode="r"), compression)
    return io.BufferedReader(_RawStream(stream, handle), buffer_size=1 << 20)


class _RawStream(io.RawIOBase):
    """pyarrow's decompressing stream as a raw file, so io.BufferedReader can read lines from it."""

    def __init__(self, stream, handle):
        self._stream, self._handle = stream, handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._handle.close()
        super().close()


def _as_text(raw: object, where: str, invalid_utf8: str, result: ShardDocuments,
             whole_file: bool = False) -> str | None:
    if raw is None:
        result.empty += 1
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            detail = f"byte 0x{raw[error.start:error.start + 1].hex()}"
            if whole_file:  # a .txt document spans many lines: say which one holds the bad byte
                line = raw.count(b"\n", 0, error.start) + 1
                detail += f" at line {line}"
            return _invalid_utf8(where, f"{detail}: {error.reason}", invalid_utf8, result, error)
    if not isinstance(raw, str):
        raise CorpusError(f"{where}: text field holds {type(raw).__name__}, expected a string")
    try:
        # JSON escapes such as "\ud800" (or surrogatepass decoding) give lone surrogates, which
        # no UTF-8 tokenizer accepts: the same policy applies as to undecodable bytes.
        raw.encode("utf-8")
    except UnicodeEncodeError as error:
        return _invalid_utf8(where, f"lone surrogate {raw[error.start]!r} at character {error.start}",
                             invalid_utf8, result, error)
    return raw


def _invalid_utf8(where: str, detail: str, invalid_utf8: str, result: ShardDocuments,
                  error: UnicodeError) -> None:
    if invalid_utf8 == "fail":
        raise CorpusError(f"{where} is not valid UTF-8 ({detail}); set corpus.invalid_utf8: skip "
                          "to skip such documents") from error
    log.warning("skipping %s: not valid UTF-8 (%s)", where, detail)
    result.invalid_utf8.append(where)
    return None


def _read_rows(source: Source, first_row: int, end_row: int, byte_offset: int,
               corpus: CorpusConfig, storage_options: dict | None) -> list:
    if source.format == "dataset":
        dataset = load_dataset_split(corpus)
        return dataset.select_columns([corpus.text_field])[first_row:end_row][corpus.text_field]
    fs, path = url_to_fs(source.uri, storage_options)
    if source.format == "txt":
        with fs.open(path, "rb") as handle:
            return [handle.read()]
    if source.format == "parquet":
        return _read_parquet_rows(fs, path, source.uri, first_row, end_row, corpus.text_field)
    return _read_jsonl_rows(fs, path, source.uri, first_row, end_row, byte_offset, corpus.text_field)


def _read_parquet_rows(fs, path: str, uri: str, first_row: int, end_row: int, text_field: str) -> list:
    parquet = storage.open_parquet(fs, path)
    groups, group_start, skip = [], 0, None
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        if group_start + group_rows > first_row and group_start < end_row:
            groups.append(group)
            skip = first_row - group_start if skip is None else skip
        group_start += group_rows
    table = parquet.read_row_groups(groups, columns=[text_field], use_threads=storage.parquet_threads(fs))
    column = table.column(text_field).slice(skip or 0, end_row - first_row)
    return column.to_pylist()


def _read_jsonl_rows(fs, path: str, uri: str, first_row: int, end_row: int, byte_offset: int,
                     text_field: str) -> list:
    rows: list = []
    with fs.open(path, "rb") as handle:
        handle.seek(byte_offset)
        reader = io.BufferedReader(handle, buffer_size=1 << 20) if not hasattr(handle, "readline") else handle
        for row in range(first_row, end_row):
            line = reader.readline()
            if not line.strip():
                rows.append(None)
                continue
            rows.append(_jsonl_text(line, uri, row + 1, text_field))
    return rows


def _jsonl_text(line: bytes, uri: str, line_number: int, text_field: str) -> object:
    """The text field of one jsonl line, or the raw bytes when the line is not valid UTF-8
    (the corpus.invalid_utf8 policy judges those)."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return line
    except json.JSONDecodeError as error:
        raise CorpusError(f"corpus file {uri} line {line_number} is not valid JSON ({error})") from error
    if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"corpus file {uri} line {line_number} has no {text_field!r} field "
                          f"(fields: {fields}); set corpus.text_field")
    return record[text_field]
