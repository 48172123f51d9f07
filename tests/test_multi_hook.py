"""Many hook points from one forward pass: one normal store per hook point, each equal to what a
single-hook harvest writes, resumable per store; mlp_in; the buffer budget; pad ids a model lacks."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_model, sample_texts, write_jsonl
from transformers import AutoTokenizer

from lexica import storage
from lexica.harvest.cli import build_parser, resolve_config
from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.harvester import TokenRangeError
from lexica.harvest.pool import format_summary, run_harvest
from lexica.hooks import Capture, HookError, find_blocks, parse_hooks
from lexica.models import ModelConfig, load_model
from lexica.run import Run, RunError
from lexica.store import ActivationStore

CONTEXT = 24
HOOKS = "resid_post.1,mlp_in.2,mlp_out.2,attn_out.0"


def harvest_config(model, corpus, run, hook, **overrides) -> HarvestConfig:
    values = dict(run=str(run), model=ModelConfig(path=str(model)), hook=hook,
                  corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=4), context_length=CONTEXT,
                  batch_tokens=4 * CONTEXT, workers=WorkersConfig(actors=0))
    values.update(overrides)
    return HarvestConfig(**values).validate()


def rows_of(url: str) -> dict:
    """Every stored row of a store, as columns in storage order."""
    batches = list(ActivationStore(url).iter_batches(batch_rows=10**6))
    return {name: torch.cat([getattr(batch, name) for batch in batches])
            for name in ("doc_id", "position", "token_id", "activation")}


def assert_same_rows(left: dict, right: dict, exact: bool = True) -> None:
    for name in left:
        if exact or name != "activation":
            assert torch.equal(left[name], right[name]), name
        else:  # other batch shapes round differently in the last bit
            torch.testing.assert_close(left[name].float(), right[name].float(), atol=2e-3, rtol=2e-3)


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", sample_texts(14, seed=3) + ["word " * 90])


def test_hook_lists_ranges_and_all():
    names = [hook.name for hook in parse_hooks("resid_post.1-3,mlp_out.middle,resid_post.2", 6)]
    assert names == ["resid_post.1", "resid_post.2", "resid_post.3", "mlp_out.3"]
    assert [hook.layer for hook in parse_hooks("mlp_in.all", 4)] == [0, 1, 2, 3]
    with pytest.raises(HookError, match="runs backwards"):
        parse_hooks("resid_post.5-2", 6)
    with pytest.raises(HookError, match=r"valid layers are 0\.\.5"):
        parse_hooks("resid_post.4-6", 6)
    with pytest.raises(HookError, match="empty hook point"):
        parse_hooks("resid_post.1,,mlp_out.2", 6)


def test_layers_flag_expands_every_kind():
    args = build_parser().parse_args(["--model", "m", "--corpus", "c.jsonl", "--hook", "resid_post,mlp_out",
                                      "--layers", "1-2,5"])
    assert resolve_config(args).hook == "resid_post.1-2,resid_post.5,mlp_out.1-2,mlp_out.5"
    args = build_parser().parse_args(["--model", "m", "--corpus", "c.jsonl", "--hook", "mlp_in", "--layers", "all"])
    assert resolve_config(args).hook == "mlp_in.all"


def test_mlp_in_is_what_the_mlp_reads(tiny_models):
    loaded = load_model(ModelConfig(path=str(tiny_models["llama"])))
    captured = Capture(loaded.model, parse_hooks("mlp_in.2,mlp_out.2", 4))(input_ids=torch.randint(3, 300, (2, 16)))
    mlp = find_blocks(loaded.model)[2][2].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(captured["mlp_in.2"]), captured["mlp_out.2"])


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_one_pass_equals_separate_harvests(tiny_models, tmp_path, corpus, architecture):
    model = tiny_models[architecture]
    summary = run_harvest(harvest_config(model, corpus, tmp_path / "many", HOOKS))
    assert [url.rsplit("/", 1)[1] for url in summary.stores] == HOOKS.split(",")
    assert "4 stores" in format_summary(summary)
    for hook in HOOKS.split(","):
        single = run_harvest(harvest_config(model, corpus, tmp_path / hook, hook))
        many = ActivationStore(Run(tmp_path / "many").store_url(hook))
        assert many.complete and many.manifest["hook"] == hook
        assert many.manifest["plan_fingerprint"] == ActivationStore(single.store_url).manifest["plan_fingerprint"]
        assert_same_rows(rows_of(many.url), rows_of(single.store_url))
    with pytest.raises(RunError, match="wrote 4 stores"):
        Run(tmp_path / "many").harvested_hook()


def test_resume_redoes_a_shard_only_where_it_is_missing(tiny_models, tmp_path, corpus):
    config = harvest_config(tiny_models["llama"], corpus, tmp_path / "run", "resid_post.1,mlp_out.3")
    first = run_harvest(config)
    before = {url: rows_of(url) for url in first.stores}
    kept, redone = (ActivationStore(url) for url in first.stores)
    attempts = {c.shard: c.attempt for c in kept.commits()}
    # A driver killed between the two commits of shard 2: one store has it, the other does not.
    lost = next(c for c in redone.commits() if c.shard == 2)
    redone.fs.rm(storage.join(redone.root, "commits", "shard-000002.json"))
    second = run_harvest(config)
    assert (second.shards_done, second.shards_skipped) == (1, first.shards_total - 1)
    assert second.orphans_removed == 1  # the lost commit's part
    assert {c.shard: c.attempt for c in ActivationStore(kept.url).commits()} == attempts
    assert next(c for c in ActivationStore(redone.url).commits() if c.shard == 2).attempt != lost.attempt
    for url in first.stores:
        assert_same_rows(rows_of(url), before[url])
        assert ActivationStore(url).verify()["orphans"] == []


def test_buffer_budget_shrinks_row_groups_not_results(tiny_models, tmp_path, corpus):
    hooks = "resid_post.0-3"
    roomy = run_harvest(harvest_config(tiny_models["llama"], corpus, tmp_path / "roomy", hooks))
    tight = run_harvest(harvest_config(tiny_models["llama"], corpus, tmp_path / "tight", hooks,
                                       max_buffer_bytes=1 << 20, row_group_mb=64))
    for left, right in zip(roomy.stores, tight.stores, strict=True):
        assert_same_rows(rows_of(left), rows_of(right), exact=False)
    # 4 hooks x 4 buffers x rows of 128 bytes within 1 MiB: row groups of at most 512 rows.
    store = ActivationStore(tight.stores[0])
    groups = [pq.ParquetFile(store.fs.open(store.part_path(c))).metadata for c in store.commits() if c.rows]
    assert max(g.row_group(i).num_rows for g in groups for i in range(g.num_row_groups)) <= 512
    assert sum(g.num_row_groups for g in groups) > len(groups)


def test_pad_id_outside_the_embedding(tiny_models, tmp_path, corpus):
    """A Qwen2-style tokenizer that adds a pad token past the model's embedding still harvests."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    assert tokenizer.pad_token_id == 400  # the embedding has 400 rows: 0..399
    tokenizer.save_pretrained(folder)
    padded = run_harvest(harvest_config(folder, corpus, tmp_path / "padded", "resid_post.1"))
    plain = run_harvest(harvest_config(tiny_models["llama"], corpus, tmp_path / "plain", "resid_post.1"))
    assert_same_rows(rows_of(padded.store_url), rows_of(plain.store_url))


def test_token_ids_outside_the_embedding_are_one_clear_error(tmp_path, corpus, tiny_models):
    folder = tmp_path / "small"
    shutil.copytree(tiny_models["llama"], folder)
    build_model("llama", folder, vocab_size=200)  # the tokenizer still has 400 tokens
    with pytest.raises(TokenRangeError, match=r"outside the model's embedding of 200 rows"):
        run_harvest(harvest_config(folder, corpus, tmp_path / "run", "resid_post.1"))


def test_ray_pool_writes_every_hook_like_the_in_process_path(ray_cluster, tiny_models, tmp_path, corpus):
    hooks = "resid_pre.1,mlp_out.2"
    inline = run_harvest(harvest_config(tiny_models["gpt2"], corpus, tmp_path / "inline", hooks))
    pooled = run_harvest(harvest_config(tiny_models["gpt2"], corpus, tmp_path / "pooled", hooks,
                                        workers=WorkersConfig(actors=2, cpus_per_actor=1)))
    assert pooled.shards_done == inline.shards_total
    for left, right in zip(inline.stores, pooled.stores, strict=True):
        # The actors compute with 1 thread, this process with all: matmuls may round differently.
        assert_same_rows(rows_of(left), rows_of(right), exact=False)
