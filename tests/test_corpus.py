"""Corpus planning and reading: deterministic doc ids across .txt/.jsonl/.parquet files and datasets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import sample_texts, write_jsonl

from lexica.harvest.config import CorpusConfig
from lexica.harvest.corpus import plan_shards, read_shard


def all_documents(config: CorpusConfig) -> list[tuple[int, str]]:
    plan = plan_shards(config)
    return [doc for shard in range(len(plan.shards)) for doc in read_shard(plan, shard, config).documents]


def test_shards_span_files_and_doc_ids_follow_sorted_paths(tmp_path):
    texts = sample_texts(23, seed=5)
    write_jsonl(tmp_path / "b.jsonl", texts[:10])
    (tmp_path / "c.txt").write_text(texts[10], encoding="utf-8")
    pq.write_table(pa.table({"text": texts[11:], "n": list(range(12))}), tmp_path / "d.parquet", row_group_size=5)
    (tmp_path / "a-notes.md").write_text("not a corpus file")  # folders take supported types only
    config = CorpusConfig(paths=[str(tmp_path)], docs_per_shard=4)
    plan = plan_shards(config)
    assert [s.format for s in plan.sources] == ["jsonl", "txt", "parquet"]
    assert len(plan.shards) == 6 and plan.doc_range(5) == (20, 23)
    assert all_documents(config) == list(enumerate(texts))
    # Re-planning the same corpus gives the same plan; a changed corpus a different fingerprint.
    assert plan_shards(config).fingerprint() == plan.fingerprint()
    write_jsonl(tmp_path / "b.jsonl", texts[:9])
    assert plan_shards(config).fingerprint() != plan.fingerprint()


def test_jsonl_seek_offsets_make_every_shard_start_at_its_row(tmp_path):
    texts = [f"document number {i} " + "é" * (i % 7) for i in range(50)]
    first = write_jsonl(tmp_path / "first.jsonl", texts[:17])
    second = tmp_path / "second.jsonl"
    second.write_text("\n".join(json.dumps({"text": t}) for t in texts[17:]), encoding="utf-8")  # no final newline
    config = CorpusConfig(paths=[str(first), str(second)], docs_per_shard=3)
    assert all_documents(config) == list(enumerate(texts))
    assert all_documents(CorpusConfig(paths=[str(first), str(second)], docs_per_shard=3, max_documents=20)) == \
        list(enumerate(texts[:20]))


def test_saved_hugging_face_dataset_reads_like_files(tmp_path):
    import datasets

    texts = sample_texts(9, seed=2)
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    config = CorpusConfig(dataset=str(tmp_path / "saved"), text_field="body", docs_per_shard=4)
    plan = plan_shards(config)
    assert plan.sources[0].format == "dataset" and len(plan.shards) == 3
    assert all_documents(config) == list(enumerate(texts))
