"""``lexica analysis features`` end to end on a harvested store and a trained dictionary, and
the inputs it must refuse."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import sample_texts, write_jsonl

from lexica.analysis import atlas
from lexica.analysis.config import AnalysisConfig
from lexica.analysis.sources import AnalysisError, open_dictionary, open_store
from lexica.cli import main
from lexica.config import ConfigError
from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.train.config import TrainConfig
from lexica.train.fit import fit

CONTEXT = 32


def harvest(run, model, corpus, hook: str) -> str:
    config = HarvestConfig(run=str(run), model=ModelConfig(path=str(model)), hook=hook,
                           corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=8, max_documents=24),
                           context_length=CONTEXT, batch_tokens=8 * CONTEXT, workers=WorkersConfig(actors=0))
    return run_harvest(config.validate()).store_url


@pytest.fixture(scope="module")
def trained_run(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    corpus = write_jsonl(folder / "docs.jsonl", sample_texts(30, seed=3))
    run = folder / "run"
    store_url = harvest(run, tiny_models["llama"], corpus, "resid_post.1")
    summary = fit(TrainConfig(run=str(run), store=store_url, architecture="topk", width="2x", k=4, batch_size=128,
                              tokens=20 * 128, lr=3e-3, workers=0, buffer_rows=1024, log_every=10, eval_tokens=0))
    return run, summary["name"], store_url, corpus


def test_features_builds_every_table_and_the_site(trained_run, capsys):
    run, name, store_url, _ = trained_run
    code = main(["analysis", "features", "--run", str(run), "--workers", "0", "--set", "top_examples=5",
                 "--set", "samples=16", "--set", "window_before=4", "--set", "window_after=2"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    folder = run / "analysis" / name
    assert f"feature browser: {folder / 'site' / 'index.html'}" in out
    for table, schema in atlas.TABLES.items():
        assert pq.read_schema(folder / f"{table}.parquet").equals(schema, check_metadata=False), table
    summary = json.loads((folder / "summary.json").read_text())
    d_sae = 2 * 64
    assert summary["d_sae"] == d_sae and summary["neighbours_exact"] and summary["hook"] == "resid_post.1"
    features = pq.read_table(folder / "features.parquet")
    assert features.num_rows == d_sae
    assert sum(features.column("fires").to_pylist()) == summary["tokens"] * 4  # TopK: k latents fire per token
    contexts = pq.read_table(folder / "contexts.parquet").to_pylist()
    assert contexts and all(row["tokens"][row["center"]] is not None for row in contexts)
    assert all(len(row["tokens"]) == len(row["values"]) == len(row["token_ids"]) <= 7 for row in contexts)
    assert (folder / "site" / "index.html").exists()
    run_yaml = (run / "run.yaml").read_text()
    assert "analysis:" in run_yaml and "harvest:" in run_yaml and "train:" in run_yaml


def test_a_store_of_another_hook_is_refused(trained_run, tiny_models, tmp_path):
    run, name, _, corpus = trained_run
    other = harvest(tmp_path / "other", tiny_models["llama"], corpus, "resid_post.2")
    dictionary = open_dictionary(str(run), name)
    with pytest.raises(AnalysisError, match=r"hook: store has 'resid_post.2', expected 'resid_post.1'"):
        open_store(dictionary, other, str(run))


def test_a_store_of_another_model_is_refused(trained_run, tiny_models, tmp_path):
    run, name, _, corpus = trained_run
    other = harvest(tmp_path / "other", tiny_models["gpt2"], corpus, "resid_post.1")
    with pytest.raises(AnalysisError, match="model.config_hash"):
        open_store(open_dictionary(str(run), name), other, str(run))


def test_unknown_dictionary_and_bad_knobs_are_named(trained_run, tmp_path, capsys):
    run, name, _, _ = trained_run
    assert main(["analysis", "features", "--run", str(run), "--dictionary", "nope"]) == 2
    error = capsys.readouterr().err
    assert "'nope'" in error and name in error
    assert main(["analysis", "features", "--run", str(tmp_path / "empty")]) == 2
    assert "no exported dictionary" in capsys.readouterr().err
    assert main(["analysis", "features", "--run", str(run), "--set", "top_examples=0"]) == 2
    assert "top_examples = 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key"):
        from lexica.config import from_dict

        from_dict(AnalysisConfig, {"top_exmaples": 3}, "analysis")


def test_an_empty_store_is_refused(trained_run, tmp_path):
    import shutil

    run, name, store_url, _ = trained_run
    empty = tmp_path / "store"
    shutil.copytree(store_url, empty)
    shutil.rmtree(empty / "commits")
    (empty / "commits").mkdir()
    from lexica.store import StoreError

    with pytest.raises(StoreError, match="no committed rows"):
        open_store(open_dictionary(str(run), name), str(empty), str(run))


def test_examples_are_counted_by_a_corpus_label(trained_run, capsys):
    """analysis.label_field: each feature's shown examples counted by their document's label."""
    run, name, _, corpus = trained_run
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    corpus.write_text("".join(json.dumps({**row, "lang": "de" if index % 3 == 0 else "en"}) + "\n"
                              for index, row in enumerate(rows)))  # the same texts, now labelled
    common = ["analysis", "features", "--run", str(run), "--workers", "0", "--set", "top_examples=5", "--set",
              "samples=8", "--set", "window_before=2", "--set", "window_after=1", "--set", "map=false",
              "--set", "neighbours=0"]
    assert main([*common, "--set", "label_field=lang"]) == 0, capsys.readouterr().err
    folder = run / "analysis" / name
    labels = pq.read_table(folder / "labels.parquet").to_pylist()
    contexts = pq.read_table(folder / "contexts.parquet", columns=["feature", "doc_id"]).to_pylist()
    expected: dict[int, dict[str, int]] = {}
    for row in contexts:
        lang = "de" if row["doc_id"] % 3 == 0 else "en"
        expected.setdefault(row["feature"], {}).setdefault(lang, 0)
        expected[row["feature"]][lang] += 1
    assert {row["feature"]: dict(zip(row["labels"], row["counts"], strict=True)) for row in labels} == expected
    assert all(row["counts"] == sorted(row["counts"], reverse=True) for row in labels)
    assert main([*common, "--set", "label_field=nope"]) == 2
    error = capsys.readouterr().err
    assert "analysis.label_field = 'nope'" in error and "line 1 has no 'nope' field (fields: ['id', 'lang'," in error
