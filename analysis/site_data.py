"""How the browser's data files are encoded, and how atlas tables are read a block of features at a time.

A page opened from ``file://`` may not fetch files, but it may load scripts; so every data file is
a script that hands its payload to the page: ``lexicaData("<key>", "<format>", <payload>)``. The
payload is base64 of zlib-compressed bytes (``format`` "json": UTF-8 JSON; "bin": raw bytes), or
for a feature chunk a list of such strings, one per feature, so a page decompresses only its own.
Base64 holds no character that could end a script or a string, whatever the corpus said.

A feature's record (:func:`feature_record`) is binary, little-endian:

- ``uint32`` length of the head, then the head: UTF-8 JSON with the feature's statistics,
  histogram, contexts (without their tokens), logit effects, neighbours and map position;
- zero padding to a multiple of 4 bytes;
- the tokens of every context, one after another (the head gives each context's length), as
  indices into the site's vocabulary: ``uint16`` when it has at most 65,536 entries, else ``int32``
  (``meta.id_bytes``); then padding to a multiple of 4 bytes;
- ``uint8`` level of the feature's activation on each of those tokens: 0 is no activation,
  1..255 a share of the feature's maximum (``ceil(value / max * 255)``).

The vocabulary (``data/vocab.js``) holds each shown token's string once, with its model id.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lexica import storage

LEVELS = 255
COMPRESSION_LEVEL = 1  # measured on feature records: 4% larger than zlib's default 6, 3x faster
BATCH_ROWS = 65536  # rows read from a table at a time


def packed(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, COMPRESSION_LEVEL)).decode("ascii")


def packed_json(document: object) -> str:
    return packed(json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode())


def data_script(key: str, kind: str, payload: str | list[str]) -> bytes:
    """The text of one data file; ``key`` and ``kind`` are ASCII names made here, ``payload`` is base64."""
    payload_text = json.dumps(payload, separators=(",", ":"))
    return f"lexicaData({json.dumps(key)},{json.dumps(kind)},{payload_text});\n".encode("ascii")


def levels(values: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    """uint8 shading level of each activation relative to its feature's maximum: 0 only for no activation."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0)
    scale = np.where(maxima > 0, maxima, 1.0).astype(np.float32)
    shaded = np.clip(np.ceil(values / scale * LEVELS), 1, LEVELS)
    return np.where(values > 0, shaded, 0).astype(np.uint8)


def feature_record(head: dict, token_ids: np.ndarray, token_levels: np.ndarray) -> bytes:
    head_bytes = json.dumps(head, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    padding = -(4 + len(head_bytes)) % 4
    return b"".join((np.uint32(len(head_bytes)).tobytes(), head_bytes, b"\0" * padding,
                     token_ids.tobytes(), b"\0" * (-token_ids.nbytes % 4), token_levels.astype(np.uint8).tobytes()))


def significant(values: np.ndarray, digits: int = 4) -> list[float]:
    """``values`` rounded to ``digits`` significant digits (short in JSON), NaN and infinities as 0."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    magnitude = np.floor(np.log10(np.abs(np.where(values == 0, 1.0, values))))
    scale = 10.0 ** (digits - 1 - magnitude)
    return (np.round(values * scale) / scale).tolist()


def fnv1a(text: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes; ``common.js`` computes the same to find a word's search shard."""
    value = 0x811C9DC5
    for byte in text.encode("utf-8"):
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def feature_blocks(fs, path: str, columns: list[str], block: int, total: int) -> Iterator[tuple[int, pa.Table]]:
    """``(block index, rows of features [index * block, (index + 1) * block))`` for every block below
    ``total`` features, in order, from a Parquet table sorted by ``feature``: one batch read at a
    time, so memory holds a block, not the table. A table not sorted by feature (not one Lexica
    wrote) is read whole and sorted first."""
    handle = storage.open_parquet(fs, path)
    statistics = [handle.metadata.row_group(group).column(handle.schema_arrow.get_field_index("feature")).statistics
                  for group in range(handle.metadata.num_row_groups)]
    if not _sorted_by_feature(handle, statistics):
        table = handle.read(columns=columns).sort_by("feature")
        yield from _split(table, block, total)
        return
    pending: list[pa.Table] = []
    current = 0
    for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
        table = pa.Table.from_batches([batch])
        features = table.column("feature").to_numpy()
        while len(features) and features[-1] >= (current + 1) * block:
            cut = int(np.searchsorted(features, (current + 1) * block, side="left"))
            pending.append(table.slice(0, cut))
            yield current, pa.concat_tables(pending)
            pending, current = [], current + 1
            table, features = table.slice(cut), features[cut:]
        pending.append(table)
    rest = pa.concat_tables(pending) if pending else handle.schema_arrow.empty_table().select(columns)
    while current * block < total:
        yield current, rest
        rest, current = rest.slice(0, 0), current + 1


def _sorted_by_feature(handle, statistics) -> bool:
    previous = -1
    for group, stats in enumerate(statistics):
        if stats is None or not stats.has_min_max or stats.min < previous:
            return False
        features = handle.read_row_group(group, columns=["feature"]).column("feature").to_numpy()
        if len(features) and np.any(np.diff(features) < 0):
            return False
        previous = stats.max
    return True


def _split(table: pa.Table, block: int, total: int) -> Iterator[tuple[int, pa.Table]]:
    features = table.column("feature").to_numpy()
    for index in range(max(1, -(-total // block))):
        start, stop = np.searchsorted(features, [index * block, (index + 1) * block])
        yield index, table.slice(int(start), int(stop - start))


def list_offsets(lists: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def flat_values(lists: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    return pc.list_flatten(lists)


def read_data_file(text: str) -> tuple[str, object]:
    """(key, decoded payload) of a data file's text: JSON documents parsed, binary payloads as bytes
    (a feature chunk: a list of bytes, empty for ids the atlas does not hold). For tools and tests."""
    prefix, suffix = "lexicaData(", ");\n"
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError("not a Lexica site data file (expected lexicaData(key, kind, payload);)")
    key, kind, payload = json.loads("[" + text[len(prefix):-len(suffix)] + "]")

    def decoded(one: str) -> bytes:
        return zlib.decompress(base64.b64decode(one)) if one else b""

    if kind == "json":
        return key, json.loads(decoded(payload))
    if kind == "bin":
        return key, decoded(payload)
    return key, [decoded(one) for one in payload]


def parse_record(record: bytes, id_bytes: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(head, token indices, activation levels) of one feature record (see the module's layout)."""
    head_length = int(np.frombuffer(record[:4], "<u4")[0])
    head = json.loads(record[4:4 + head_length])
    offset = 4 + head_length + (-(4 + head_length) % 4)
    total = sum(context[5] for context in head["c"])
    ids = np.frombuffer(record, "<u2" if id_bytes == 2 else "<i4", total, offset)
    offset += ids.nbytes + (-ids.nbytes % 4)
    return head, ids, np.frombuffer(record, np.uint8, total, offset)
