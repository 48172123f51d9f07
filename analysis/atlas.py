"""The feature atlas on storage: where each analysis table lives and what its columns hold.

``<run>/analysis/<dictionary>/`` holds

- ``features.parquet``: one row per feature: ``feature`` int32, ``fires`` int64 (tokens it fired on),
  ``density`` float64 (fires / tokens), ``max_activation`` and ``mean_activation`` float32 (mean over
  the tokens it fired on), ``histogram`` list<int64> (counts in the fixed log-spaced bins of
  :data:`HISTOGRAM_EDGES`; the first bin also takes smaller values, the last larger ones);
- ``contexts.parquet``: one row per shown example: ``feature``, ``kind`` ("top" or "quantile"),
  ``rank`` (order within its kind: top examples by activation, quantile examples band by band),
  ``band`` (quantile band, -1 for top examples), ``activation``, ``doc_id``, ``position``, and the
  window around the token: ``token_ids``, ``tokens`` (decoded strings), ``values`` (the feature's
  activation on each window token) and ``center`` (index of the example token in the window);
- ``logits.parquet``: ``feature``, ``promoted_ids``/``promoted_tokens``/``promoted_values`` and the
  same three for ``suppressed`` (the decoder direction through the final norm and unembedding);
- ``neighbours.parquet``: ``feature``, ``neighbours`` list<int32>, ``cosines`` list<float32>
  (decoder cosine similarity, most similar first, the feature itself excluded);
- ``map.parquet``: ``feature``, ``x``, ``y`` (2-D map of decoder directions: t-SNE or UMAP), ``cluster``;
- ``summary.json``: dictionary, store, model, hook, ``d_sae``, tokens counted, histogram edges,
  the configuration and timings of the run that wrote it;
- ``labels.parquet`` (with ``analysis.label_field``, e.g. ``lang``): ``feature``, ``labels`` and
  ``counts``: how many of its shown examples come from documents of each label, most first;
- ``explanations/`` (``lexica explain``) and ``scores/`` (``lexica score``): Parquet parts, one row
  per feature each, written atomically (``analysis.explain``, ``analysis.score``);
- ``steering_evaluation.parquet`` (``lexica steer --evaluate``): one row per feature, method,
  strength and prompt: the continuation and its measures (``analysis.steer_eval``);
- ``site/``: the feature browser (``analysis/site.py``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lexica import storage
from lexica.errors import LexicaError

# Activations are positive (every architecture's code is); 0.1-decade bins from 1e-3 to 1e4 cover
# raw-activation-space codes of real models, and fixed edges make partial histograms add up exactly.
HISTOGRAM_EDGES = np.round(10.0 ** np.linspace(-3, 4, 71), 12)
HISTOGRAM_BINS = len(HISTOGRAM_EDGES) - 1

FEATURES_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("fires", pa.int64()), ("density", pa.float64()),
    ("max_activation", pa.float32()), ("mean_activation", pa.float32()), ("histogram", pa.list_(pa.int64())),
])
CONTEXTS_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()), ("band", pa.int8()),
    ("activation", pa.float32()), ("doc_id", pa.int64()), ("position", pa.int32()),
    ("token_ids", pa.list_(pa.int32())), ("tokens", pa.list_(pa.string())), ("values", pa.list_(pa.float32())),
    ("center", pa.int32()),
])
LOGITS_SCHEMA = pa.schema([
    ("feature", pa.int32()),
    ("promoted_ids", pa.list_(pa.int32())), ("promoted_tokens", pa.list_(pa.string())),
    ("promoted_values", pa.list_(pa.float32())),
    ("suppressed_ids", pa.list_(pa.int32())), ("suppressed_tokens", pa.list_(pa.string())),
    ("suppressed_values", pa.list_(pa.float32())),
])
NEIGHBOURS_SCHEMA = pa.schema([("feature", pa.int32()), ("neighbours", pa.list_(pa.int32())),
                               ("cosines", pa.list_(pa.float32()))])
MAP_SCHEMA = pa.schema([("feature", pa.int32()), ("x", pa.float32()), ("y", pa.float32()), ("cluster", pa.int32())])

# Row groups of this many rows: the site reads tables a block of features at a time.
ROW_GROUP_ROWS = 65536

TABLES = {"features": FEATURES_SCHEMA, "contexts": CONTEXTS_SCHEMA, "logits": LOGITS_SCHEMA,
          "neighbours": NEIGHBOURS_SCHEMA, "map": MAP_SCHEMA}
STEERING_EVALUATION_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("method", pa.string()), ("strength", pa.string()), ("prompt", pa.string()),
    ("text", pa.string()), ("activation", pa.float32()), ("relative_activation", pa.float32()),
    ("firing_share", pa.float32()), ("judge_yes", pa.float32()), ("perplexity", pa.float32()),
])
LABELS_SCHEMA = pa.schema([("feature", pa.int32()), ("labels", pa.list_(pa.string())),
                           ("counts", pa.list_(pa.int32()))])
# Tables only some atlases have: labels (``analysis.label_field``) and ``lexica steer --evaluate``'s.
LATER_TABLES = {"labels": LABELS_SCHEMA, "steering_evaluation": STEERING_EVALUATION_SCHEMA}


class AtlasMissingError(LexicaError, FileNotFoundError):
    """A dictionary's atlas (or one of its tables) has not been built yet."""


def histogram_bin(values: np.ndarray) -> np.ndarray:
    """Bin index of each (positive) activation in :data:`HISTOGRAM_EDGES`, clipped to the end bins."""
    return np.clip(np.searchsorted(HISTOGRAM_EDGES, values, side="right") - 1, 0, HISTOGRAM_BINS - 1)


def write_table(folder_url: str, name: str, table: pa.Table, storage_options: dict | None = None) -> str:
    """Write one atlas table atomically (temp file + rename locally, one PUT on object storage)."""
    schema = TABLES.get(name) or LATER_TABLES[name]
    if not table.schema.equals(schema):
        table = table.select(schema.names).cast(schema)
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    fs.makedirs(folder, exist_ok=True)
    path = storage.join(folder, f"{name}.parquet")
    with storage.atomic_open(fs, path) as handle:
        pq.write_table(table, handle, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return path


def write_table_in_parts(folder_url: str, name: str, tables, storage_options: dict | None = None) -> tuple[str, int]:
    """Write one atlas table from an iterable of parts (each a row group or more), atomically as
    :func:`write_table`; memory holds one part at a time. Returns the path and the rows written."""
    schema = TABLES[name]
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    fs.makedirs(folder, exist_ok=True)
    path = storage.join(folder, f"{name}.parquet")
    rows = 0
    with storage.atomic_open(fs, path) as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        for table in tables:
            if not table.schema.equals(schema):
                table = table.select(schema.names).cast(schema)
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            rows += table.num_rows
    return path, rows


def read_table(folder_url: str, name: str, storage_options: dict | None = None) -> pa.Table:
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    path = storage.join(folder, f"{name}.parquet")
    if not storage.exists(fs, path):
        raise AtlasMissingError(f"{folder_url} has no {name}.parquet; run `lexica analysis features` first")
    return storage.open_parquet(fs, path).read(use_threads=storage.parquet_threads(fs))


def has_table(folder_url: str, name: str, storage_options: dict | None = None) -> bool:
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    return storage.exists(fs, storage.join(folder, f"{name}.parquet"))


def write_summary(folder_url: str, summary: dict, storage_options: dict | None = None) -> None:
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    fs.makedirs(folder, exist_ok=True)
    storage.write_json(fs, storage.join(folder, "summary.json"), summary)


def read_summary(folder_url: str, storage_options: dict | None = None) -> dict:
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    path = storage.join(folder, "summary.json")
    if not storage.exists(fs, path):
        raise AtlasMissingError(f"{folder_url} has no summary.json; run `lexica analysis features` first")
    return storage.read_json(fs, path)
