"""The same harvest into a local folder and into S3 (a moto server on 127.0.0.1) gives identical stores."""

from __future__ import annotations

import pyarrow as pa
from conftest import sample_texts, write_jsonl

from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.store import ActivationStore, identity


def harvest_to(run_url: str, storage_options: dict, model_folder, corpus) -> ActivationStore:
    config = HarvestConfig(run=run_url, model=ModelConfig(path=str(model_folder)), hook="mlp_out.2",
                           corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=6), context_length=32,
                           batch_tokens=128, row_group_mb=1, storage_options=storage_options,
                           workers=WorkersConfig(actors=2, cpus_per_actor=1)).validate()
    return ActivationStore(run_harvest(config).store_url, storage_options)


def full_table(store: ActivationStore) -> pa.Table:
    return pa.concat_tables([store.read_part(commit) for commit in store.commits()])


def test_local_and_s3_stores_are_identical(ray_cluster, s3_server, tiny_models, tmp_path):
    endpoint, options = s3_server
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(30, seed=3))
    local = harvest_to(str(tmp_path / "run"), {}, tiny_models["gpt2"], corpus)
    remote = harvest_to("s3://lexica-test/runs/identical", options, tiny_models["gpt2"], corpus)
    assert remote.url.startswith("s3://") and remote.fs.exists("lexica-test/runs/identical/run.yaml")
    assert identity(local.manifest) == identity(remote.manifest)
    assert local.manifest["statistics"] == remote.manifest["statistics"]
    assert [(c.shard, c.rows, c.documents) for c in local.commits()] == \
        [(c.shard, c.rows, c.documents) for c in remote.commits()]
    assert full_table(local).equals(full_table(remote))
    assert remote.verify()["problems"] == [] and remote.orphans() == []
    # The reader's batch, context and Ray Data paths work against object storage too.
    first = next(remote.iter_batches(batch_rows=50))
    context = remote.context(int(first.doc_id[5]), int(first.position[5]), before=2, after=2)
    assert context.position.tolist() == list(range(int(first.position[5]) - 2, int(first.position[5]) + 3))
    assert remote.to_ray_dataset().count() == remote.num_rows
