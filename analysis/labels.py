"""Document labels (``analysis.label_field``): a field of the corpus rows, e.g. ``lang``, read for
each document the store holds, and each feature's shown examples counted by label, its profile
(``labels.parquet``: ``feature``, ``labels`` and ``counts``, most frequent first)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from lexica.analysis.atlas import LABELS_SCHEMA
from lexica.analysis.sources import AnalysisError


def document_labels(corpus: dict, field: str, storage_options: dict | None = None) -> dict[int, str]:
    """doc_id → the value of ``field`` in that corpus row (the store's manifest ``corpus``), for every
    row; doc_ids count rows as the harvest did."""
    from lexica.harvest.config import CorpusConfig
    from lexica.harvest.corpus import iter_rows, plan_shards

    known = {f.name for f in dataclasses.fields(CorpusConfig)}
    config = CorpusConfig(**{key: value for key, value in corpus.items() if key in known})
    config = dataclasses.replace(config, text_field=field, docs_per_shard=1, shard_tokens=None, max_tokens=None)
    try:
        plan = plan_shards(config, storage_options)
        return {doc_id: str(raw) for doc_id, raw, _, _ in iter_rows(plan, config, storage_options)}
    except (OSError, ValueError) as error:
        where = config.dataset or ", ".join(config.paths)
        detail = str(error).removesuffix("; set corpus.text_field")  # here the field is the label's
        raise AnalysisError(f"analysis.label_field = {field!r}: cannot read it from the corpus {where}: "
                            f"{detail}") from None


def label_profiles(contexts: pa.Table, labels: dict[int, str]) -> pa.Table:
    """Each feature's shown examples counted by their document's label (unlabelled ones as "?")."""
    features = contexts["feature"].to_numpy()
    documents = contexts["doc_id"].to_numpy()
    names = sorted(set(labels.values()) | {"?"})
    code_of = {name: index for index, name in enumerate(names)}
    codes = np.array([code_of[labels.get(int(doc), "?")] for doc in documents], dtype=np.int64)
    unique = np.unique(features)
    rows = {"feature": [], "labels": [], "counts": []}
    order = np.argsort(features, kind="stable")
    bounds = np.searchsorted(features[order], np.r_[unique, unique[-1] + 1] if len(unique) else [0])
    for index, feature in enumerate(unique.tolist()):
        counts = np.bincount(codes[order[bounds[index]:bounds[index + 1]]], minlength=len(names))
        present = np.flatnonzero(counts)
        ranked = present[np.lexsort((present, -counts[present]))]
        rows["feature"].append(feature)
        rows["labels"].append([names[i] for i in ranked])
        rows["counts"].append(counts[ranked].tolist())
    return pa.table(rows, schema=LABELS_SCHEMA)
