"""Shards by tokens (long documents split between actors), streamed datasets, compressed corpora,
token budgets, and a streamed harvest killed and resumed: every store row for row equal to the
plain harvest of the same documents."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_texts, write_jsonl

from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.corpus import CorpusError, plan_shards
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.store import ActivationStore

CONTEXT = 24


def config_for(model, run, corpus: CorpusConfig, **overrides) -> HarvestConfig:
    values = dict(run=str(run), model=ModelConfig(path=str(model)), hook="resid_post.1", corpus=corpus,
                  context_length=CONTEXT, batch_tokens=4 * CONTEXT, workers=WorkersConfig(actors=0))
    values.update(overrides)
    return HarvestConfig(**values).validate()


def sorted_rows(url: str) -> dict:
    """Every row of a store in (doc_id, position) order, whatever the shards."""
    batches = list(ActivationStore(url).iter_batches(batch_rows=10**6))
    columns = {name: torch.cat([getattr(b, name) for b in batches]) for name in ("doc_id", "position", "token_id",
                                                                                   "activation")}
    order = torch.argsort(columns["doc_id"] * 10**7 + columns["position"].long())
    return {name: values[order] for name, values in columns.items()}


def assert_same_rows(left: dict, right: dict) -> None:
    keys = torch.stack([left["doc_id"], left["position"].long()], 1)
    assert len(torch.unique(keys, dim=0)) == len(keys), "a (doc_id, position) is stored twice"
    for name in ("doc_id", "position", "token_id"):
        assert torch.equal(left[name], right[name]), name
    # Other shard cuts batch other windows together (other padded lengths): the last bit may differ.
    torch.testing.assert_close(left["activation"].float(), right["activation"].float(), atol=2e-3, rtol=2e-3)


TEXTS = sample_texts(30, seed=11) + ["long " * 400, "", "tail document " * 20]


@pytest.fixture(scope="module")
def texts_folder(tmp_path_factory):
    """The same documents as 3 jsonl files, as .jsonl.gz, .jsonl.zst, zstd Parquet, and a saved dataset."""
    import datasets

    folder = tmp_path_factory.mktemp("corpora")
    parts = [TEXTS[:12], TEXTS[12:25], TEXTS[25:]]
    for index, part in enumerate(parts):
        (folder / "plain").mkdir(exist_ok=True)
        write_jsonl(folder / "plain" / f"part-{index}.jsonl", part)
        lines = "".join(json.dumps({"text": t}) + "\n" for t in part).encode()
        (folder / "gz").mkdir(exist_ok=True)
        (folder / "gz" / f"part-{index}.jsonl.gz").write_bytes(gzip.compress(lines))
        (folder / "zst").mkdir(exist_ok=True)
        (folder / "zst" / f"part-{index}.jsonl.zst").write_bytes(pa.Codec("zstd").compress(lines, asbytes=True))
        (folder / "parquet").mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": part}), folder / "parquet" / f"part-{index}.parquet", compression="zstd",
                       row_group_size=5)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder / "saved"))
    return folder


@pytest.fixture(scope="module")
def reference(tiny_models, texts_folder, tmp_path_factory):
    """Plain jsonl files, planned by documents: what every other way of reading must equal."""
    corpus = CorpusConfig(paths=[str(texts_folder / "plain")], docs_per_shard=4)
    return sorted_rows(run_harvest(config_for(tiny_models["llama"], tmp_path_factory.mktemp("ref") / "run",
                                              corpus)).store_url)


def test_token_plan_splits_long_documents_between_shards(tiny_models, texts_folder, reference, tmp_path):
    corpus = CorpusConfig(paths=[str(texts_folder / "plain")], shard_tokens=4 * CONTEXT)
    summary = run_harvest(config_for(tiny_models["llama"], tmp_path / "run", corpus))
    store = ActivationStore(summary.store_url)
    plan = store.manifest["plan"]
    split = [segment for shard in plan["shards"] for segment in shard if segment[4:] != [0, -1]]
    assert len(split) >= 5, "the 400-word document should spread over several shards"
    assert summary.shards_total >= 8
    assert_same_rows(sorted_rows(summary.store_url), reference)
    # Each document counts once, in the shard holding its first window.
    assert store.statistics["documents"] == len([t for t in TEXTS if t.strip()])
    assert store.statistics["empty_documents"] == 1


def test_default_plan_gives_a_few_long_documents_many_shards(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    books = write_jsonl(tmp_path / "books.jsonl", ["chapter " * 30000, "verse " * 30000])
    plan = plan_shards(CorpusConfig(paths=[str(books)]), None, AutoTokenizer.from_pretrained(tiny_models["llama"]),
                       window_tokens=511)
    assert plan.shard_tokens % 511 == 0 and len(plan.shards) >= 3  # 2 documents, still several shards


@pytest.mark.parametrize("kind", ["gz", "zst", "parquet"])
def test_compressed_files_harvest_like_plain_ones(tiny_models, texts_folder, reference, tmp_path, kind):
    corpus = CorpusConfig(paths=[str(texts_folder / kind)], shard_tokens=6 * CONTEXT)
    summary = run_harvest(config_for(tiny_models["llama"], tmp_path / "run", corpus))
    assert ActivationStore(summary.store_url).manifest["plan"]["streamed"] == (kind != "parquet")
    assert_same_rows(sorted_rows(summary.store_url), reference)


def test_txt_gz_is_one_document(tiny_models, tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(TEXTS[0].encode()))
    (tmp_path / "b.txt").write_text(TEXTS[1], encoding="utf-8")
    config = config_for(tiny_models["llama"], tmp_path / "run", CorpusConfig(paths=[str(tmp_path)]))
    rows = sorted_rows(run_harvest(config).store_url)
    assert sorted(set(rows["doc_id"].tolist())) == [0, 1]


def test_streaming_dataset_equals_the_loaded_dataset(tiny_models, texts_folder, reference, tmp_path):
    """A multi-file dataset through `datasets` with streaming=True (no hub here: local files)."""
    files = [str(texts_folder / "plain" / f"part-{i}.jsonl") for i in range(3)]
    loaded = run_harvest(config_for(tiny_models["llama"], tmp_path / "loaded",
                                    CorpusConfig(dataset=str(texts_folder / "plain"), docs_per_shard=5)))
    streamed = run_harvest(config_for(tiny_models["llama"], tmp_path / "streamed",
                                      CorpusConfig(dataset=str(texts_folder / "plain"), streaming=True,
                                                   shard_tokens=5 * CONTEXT)))
    assert ActivationStore(streamed.store_url).manifest["plan"]["sources"][0]["format"] == "stream"
    assert len(files) == 3 and streamed.shards_total > 3
    assert_same_rows(sorted_rows(streamed.store_url), sorted_rows(loaded.store_url))
    assert_same_rows(sorted_rows(streamed.store_url), reference)


def test_token_budget_is_exact_and_held_out_text_follows_it(tiny_models, texts_folder, reference, tmp_path):
    from lexica.train.evaluate import held_out_documents

    budget = 700
    corpus = CorpusConfig(paths=[str(texts_folder / "plain")], max_tokens=budget, shard_tokens=4 * CONTEXT)
    summary = run_harvest(config_for(tiny_models["llama"], tmp_path / "run", corpus))
    rows = sorted_rows(summary.store_url)
    assert summary.tokens == budget == len(rows["doc_id"])
    assert_same_rows(rows, {name: values[:budget] for name, values in reference.items()})
    manifest = ActivationStore(summary.store_url).manifest
    held_out = held_out_documents(manifest, [], 200, CONTEXT)
    assert held_out and held_out[0][0] == int(rows["doc_id"].max()) + 1


def test_document_budget_on_a_stream(tiny_models, texts_folder, reference, tmp_path):
    corpus = CorpusConfig(paths=[str(texts_folder / "gz")], max_documents=10, shard_tokens=4 * CONTEXT)
    rows = sorted_rows(run_harvest(config_for(tiny_models["llama"], tmp_path / "run", corpus)).store_url)
    keep = reference["doc_id"] < 10
    assert_same_rows(rows, {name: values[keep] for name, values in reference.items()})


def test_empty_stream_is_refused_before_writing(tiny_models, tmp_path):
    (tmp_path / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(CorpusError, match="holds no documents"):
        run_harvest(config_for(tiny_models["llama"], tmp_path / "run", CorpusConfig(paths=[str(tmp_path)])))
    assert not (tmp_path / "run").exists()


def test_killed_streamed_harvest_resumes_exactly(tiny_models, texts_folder, reference, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "lexica", "harvest", "--model", str(tiny_models["llama"]), "--hook",
               "resid_post.1", "--corpus", str(texts_folder / "gz"), "--run", str(run), "--context-length",
               str(CONTEXT), "--batch-tokens", str(CONTEXT), "--actors", "0", "--set", f"corpus.shard_tokens={CONTEXT}"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    commits = run / "activations" / "resid_post.1" / "commits"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if commits.is_dir() and len([n for n in os.listdir(commits) if n.endswith(".json")]) >= 3:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the harvest finished before it was killed: " + process.stderr.read().decode()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    committed_before = len([n for n in os.listdir(commits) if n.endswith(".json")])
    config = config_for(tiny_models["llama"], run, CorpusConfig(paths=[str(texts_folder / "gz")],
                                                                shard_tokens=CONTEXT), batch_tokens=CONTEXT)
    summary = run_harvest(config)
    assert summary.shards_skipped >= committed_before > 0
    assert summary.shards_done == summary.shards_total - summary.shards_skipped > 0
    assert_same_rows(sorted_rows(summary.store_url), reference)
    assert ActivationStore(summary.store_url).verify()["orphans"] == []


def test_streamed_shards_travel_to_ray_actors(ray_cluster, tiny_models, texts_folder, reference, tmp_path):
    corpus = CorpusConfig(paths=[str(texts_folder / "zst")], shard_tokens=3 * CONTEXT)
    summary = run_harvest(config_for(tiny_models["llama"], tmp_path / "run", corpus, hook="resid_post.1,mlp_in.2",
                                     workers=WorkersConfig(actors=2, cpus_per_actor=1)))
    assert summary.shards_done == summary.shards_total > 4
    assert_same_rows(sorted_rows(summary.stores[0]), reference)


def test_streaming_flags(texts_folder):
    from lexica.harvest.cli import build_parser, resolve_config

    args = build_parser().parse_args(["--model", "m", "--corpus", "my/dataset", "--streaming", "--max-tokens", "5000",
                                      "--shard-tokens", "2048"])
    corpus = resolve_config(args).corpus
    assert (corpus.dataset, corpus.streaming, corpus.max_tokens, corpus.shard_tokens) == ("my/dataset", True, 5000,
                                                                                           2048)
    args = build_parser().parse_args(["--model", "m", "--corpus", "data/part-1.jsonl.zst"])
    assert resolve_config(args).corpus.paths == ["data/part-1.jsonl.zst"]
