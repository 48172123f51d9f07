"""Store format v2 (byte planes + zstd): the same rows as v1, read by every stage, smaller."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
from conftest import sample_texts, write_jsonl

from lexica.analysis.config import AnalysisConfig
from lexica.analysis.features import build_atlas
from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.store import ActivationStore, write_store
from lexica.train.config import TrainConfig
from lexica.train.fit import fit


def all_rows(url: str):
    batches = list(ActivationStore(url).iter_batches(batch_rows=333))
    return [torch.cat([getattr(b, name) for b in batches]) for name in ("doc_id", "position", "token_id", "activation")]


def test_planes_round_trip_both_dtypes(tmp_path):
    torch.manual_seed(0)
    values = torch.randn(1000, 48) * torch.linspace(0.1, 30, 48)
    for dtype in ("float16", "bfloat16"):
        v1 = write_store(str(tmp_path / f"v1-{dtype}"), values, "resid_post.0", dtype=dtype, shards=3)
        v2 = write_store(str(tmp_path / f"v2-{dtype}"), values, "resid_post.0", dtype=dtype, shards=3,
                         format_version=2)
        for left, right in zip(all_rows(v1), all_rows(v2), strict=True):
            assert torch.equal(left.view(torch.int16) if left.is_floating_point() else left,
                               right.view(torch.int16) if right.is_floating_point() else right)
        store = ActivationStore(v2)
        assert store.format_version == 2 and store.verify()["problems"] == []
        assert store.context(1, 5, before=2, after=2).activation.shape == (5, 48)
        # Provenance columns stay plain Parquet columns any reader takes as they are.
        table = pq.read_table(store.part_uris()[0], columns=["doc_id", "position", "token_id"])
        assert table.num_rows == store.commits()[0].rows


def test_harvest_train_and_analysis_read_v2_like_v1(tiny_models, tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(24, seed=8))
    results = {}
    for version in (1, 2):
        run = tmp_path / f"v{version}"
        config = HarvestConfig(run=str(run), model=ModelConfig(path=str(tiny_models["llama"])), hook="resid_post.1",
                               corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=6), context_length=32,
                               batch_tokens=256, store_format=version, workers=WorkersConfig(actors=0))
        summary = run_harvest(config.validate())
        assert ActivationStore(summary.store_url).manifest["format_version"] == version
        trained = fit(TrainConfig(run=str(run), store=summary.store_url, architecture="topk", width="2x", k=4,
                                  batch_size=128, tokens=10 * 128, lr=3e-3, workers=0, buffer_rows=1024,
                                  log_every=5, eval_tokens=0))
        build_atlas(AnalysisConfig(run=str(run), workers=0, top_examples=5, samples=8, window_before=3,
                                   window_after=2, neighbours=4))
        atlas = run / "analysis" / trained["name"]
        features = pq.read_table(atlas / "features.parquet")
        contexts = pq.read_table(atlas / "contexts.parquet")
        results[version] = (all_rows(summary.store_url), summary, trained["final"]["fvu"], features, contexts)
    rows1, summary1, fvu1, features1, contexts1 = results[1]
    rows2, summary2, fvu2, features2, contexts2 = results[2]
    for left, right in zip(rows1, rows2, strict=True):
        assert torch.equal(left, right)
    assert fvu1 == fvu2
    assert features1.equals(features2) and contexts1.equals(contexts2)
    assert summary2.bytes < summary1.bytes
    print(f"bytes per element: v1 {summary1.bytes_per_element:.3f}, v2 {summary2.bytes_per_element:.3f}")
    assert np.isfinite(summary2.bytes_per_element)
