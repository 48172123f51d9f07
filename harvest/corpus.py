"""The corpus: which documents exist, how they map to shards, and reading one shard's documents.

A document's ``doc_id`` is its row index in the whole corpus (files sorted by path, rows in file
order), so provenance survives re-runs. The shard plan is a pure function of the corpus listing
and ``docs_per_shard``; the driver stores it in the manifest and every actor reads its own shard
straight from storage (no shared filesystem between machines is assumed).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from lexica.errors import LexicaError
from lexica.harvest.config import CorpusConfig
from lexica.storage import to_url, url_to_fs

log = logging.getLogger(__name__)

FILE_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
SCAN_BLOCK_BYTES = 8 << 20


class CorpusError(LexicaError, ValueError):
    """The corpus cannot be read as configured; the message names the file/row/field."""


@dataclass(frozen=True)
class Source:
    """One corpus file (or a whole datasets split) and how many rows it holds."""

    uri: str
    format: str
    rows: int
    size: int


@dataclass
class ShardPlan:
    sources: list[Source]
    docs_per_shard: int
    text_field: str
    # Per shard: segments [source_index, first_row, end_row, byte_offset_of_first_row].
    shards: list[list[list[int]]] = field(default_factory=list)

    @property
    def total_documents(self) -> int:
        return sum(source.rows for source in self.sources)

    def doc_range(self, shard_index: int) -> tuple[int, int]:
        first = shard_index * self.docs_per_shard
        return first, min(first + self.docs_per_shard, self.total_documents)

    def to_dict(self) -> dict:
        return {"sources": [asdict(s) for s in self.sources], "docs_per_shard": self.docs_per_shard,
                "text_field": self.text_field, "shards": self.shards}

    @classmethod
    def from_dict(cls, values: dict) -> ShardPlan:
        return cls([Source(**s) for s in values["sources"]], values["docs_per_shard"],
                   values["text_field"], values["shards"])

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardDocuments:
    """The readable documents of one shard, plus counts of what was skipped and why."""

    documents: list[tuple[int, str]]
    empty: int = 0
    invalid_utf8: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- planning


def list_corpus_files(paths: list[str], storage_options: dict | None) -> list[tuple[str, str, int]]:
    """(url, format, size) of every corpus file named by paths/folders/globs, sorted by URL."""
    found: dict[str, tuple[str, int]] = {}
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
            raise CorpusError(f"corpus path {spec} matched no .txt/.jsonl/.parquet files")
        for match in matches:
            if fs.isdir(match):
                continue
            found[to_url(fs, match)] = (_format_of(match, strict=True), int(fs.size(match)))
    return [(url, fmt, size) for url, (fmt, size) in sorted(found.items())]


def _format_of(path: str, strict: bool) -> str | None:
    for suffix, fmt in FILE_FORMATS.items():
        if path.endswith(suffix):
            return fmt
    if strict:
        raise CorpusError(f"corpus file {path} has an unsupported type; expected one of {sorted(FILE_FORMATS)}")
    return None


def plan_shards(config: CorpusConfig, storage_options: dict | None = None) -> ShardPlan:
    """Count every source's documents and cut the corpus into shards of ``docs_per_shard``."""
    per_shard = config.docs_per_shard
    budget = config.max_documents
    sources: list[Source] = []
    # Byte offsets of jsonl rows where a shard starts, keyed by source index, so that an actor
    # can seek straight to its rows instead of scanning the file from the top.
    jsonl_offsets: dict[int, dict[int, int]] = {}
    if config.dataset:
        dataset = load_dataset_split(config)
        rows = len(dataset) if budget is None else min(len(dataset), budget)
        sources.append(Source(uri=_dataset_uri(config, dataset), format="dataset", rows=rows, size=0))
    else:
        total = 0
        for url, fmt, size in list_corpus_files(config.paths, storage_options):
            if budget is not None and total >= budget:
                break
            if fmt == "txt":
                rows = 1
            elif fmt == "parquet":
                rows = _parquet_rows(url, config.text_field, storage_options)
            else:
                rows, offsets = _scan_jsonl(url, total, per_shard, config.text_field, storage_options)
                jsonl_offsets[len(sources)] = offsets
            if budget is not None:
                rows = min(rows, budget - total)
            sources.append(Source(uri=url, format=fmt, rows=rows, size=size))
            total += rows
    plan = ShardPlan(sources=[s for s in sources], docs_per_shard=per_shard, text_field=config.text_field)
    if plan.total_documents == 0:
        where = config.dataset or ", ".join(config.paths)
        raise CorpusError(f"corpus {where} holds no documents")
    plan.shards = _cut_segments(plan, jsonl_offsets)
    return plan


def _cut_segments(plan: ShardPlan, jsonl_offsets: dict[int, dict[int, int]]) -> list[list[list[int]]]:
    shards: list[list[list[int]]] = []
    source_first_doc = np.cumsum([0] + [s.rows for s in plan.sources])
    n_shards = -(-plan.total_documents // plan.docs_per_shard)
    for shard_index in range(n_shards):
        first, end = plan.doc_range(shard_index)
        segments = []
        for source_index in range(len(plan.sources)):
            lo, hi = int(source_first_doc[source_index]), int(source_first_doc[source_index + 1])
            start, stop = max(first, lo), min(end, hi)
            if start < stop:
                row = start - lo
                offset = jsonl_offsets.get(source_index, {}).get(row, 0)
                segments.append([source_index, row, stop - lo, offset])
        shards.append(segments)
    return shards


def _scan_jsonl(url: str, first_doc_id: int, per_shard: int, text_field: str,
                storage_options: dict | None) -> tuple[int, dict[int, int]]:
    """Count the lines of a jsonl file; remember where each shard-starting line begins."""
    fs, path = url_to_fs(url, storage_options)
    offsets = {0: 0}
    rows = 0
    position = 0
    last_byte = b"\n"
    with fs.open(path, "rb") as handle:
        _check_jsonl_field(url, handle, text_field)
        handle.seek(0)
        while block := handle.read(SCAN_BLOCK_BYTES):
            newline_ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + 1 + position
            for index, line_end in enumerate(newline_ends.tolist()):
                next_row = rows + index + 1
                if (first_doc_id + next_row) % per_shard == 0:
                    offsets[next_row] = line_end
            rows += len(newline_ends)
            position += len(block)
            last_byte = block[-1:]
    if last_byte != b"\n":
        rows += 1  # a last line without a trailing newline is still a document
    return rows, offsets


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


def _parquet_rows(url: str, text_field: str, storage_options: dict | None) -> int:
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise CorpusError(f"corpus file {url} has no {text_field!r} column (columns: {names}); "
                              "set corpus.text_field")
        return parquet.metadata.num_rows


def load_dataset_split(config: CorpusConfig):
    import datasets

    try:
        name = config.dataset
        fs, path = url_to_fs(name)
        if fs.isdir(path) and (fs.exists(f"{path}/dataset_info.json") or fs.exists(f"{path}/state.json")):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[config.split]
        else:
            loaded = datasets.load_dataset(name, config.dataset_config, split=config.split)
    except Exception as error:
        raise CorpusError(f"cannot load dataset {config.dataset!r} (split {config.split!r}): {error}") from error
    if config.text_field not in loaded.column_names:
        raise CorpusError(f"dataset {config.dataset} has no {config.text_field!r} column "
                          f"(columns: {loaded.column_names}); set corpus.text_field")
    return loaded


def _dataset_uri(config: CorpusConfig, dataset) -> str:
    fingerprint = getattr(dataset, "_fingerprint", "")
    return f"dataset:{config.dataset}|{config.dataset_config or ''}|{config.split}|{fingerprint}"


# ---------------------------------------------------------------- reading


def read_shard(plan: ShardPlan, shard_index: int, corpus: CorpusConfig,
               storage_options: dict | None = None) -> ShardDocuments:
    """Read the documents of one shard, in doc_id order."""
    result = ShardDocuments(documents=[])
    source_first_doc = np.cumsum([0] + [s.rows for s in plan.sources])
    for source_index, first_row, end_row, byte_offset in plan.shards[shard_index]:
        source = plan.sources[source_index]
        base_doc_id = int(source_first_doc[source_index])
        rows = _read_rows(source, first_row, end_row, byte_offset, corpus, storage_options)
        for row, raw in zip(range(first_row, end_row), rows, strict=True):
            if source.format == "txt":
                where = f"corpus file {source.uri}"  # the whole file is one document
            else:
                where = f"corpus file {source.uri} {'line' if source.format == 'jsonl' else 'row'} {row + 1}"
            text = _as_text(raw, where, corpus.invalid_utf8, result, whole_file=source.format == "txt")
            if text is None:
                continue
            if not text.strip():
                result.empty += 1
                continue
            result.documents.append((base_doc_id + row, text))
    return result


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
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        groups, group_start, skip = [], 0, None
        for group in range(parquet.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            if group_start + group_rows > first_row and group_start < end_row:
                groups.append(group)
                skip = first_row - group_start if skip is None else skip
            group_start += group_rows
        table = parquet.read_row_groups(groups, columns=[text_field])
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
