"""``lexica score`` end to end on a harvested store, a trained dictionary and its atlas, with a tiny
local model as explainer and scorer: positives are held out from the explainer, negatives are
checked against the store (and re-checked here by encoding the store's rows independently), scores
and baseline are stored, and reruns and crashes resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_texts, write_jsonl
from test_analysis_features import harvest

from lexica.analysis import atlas
from lexica.analysis.config import AnalysisConfig, ExplainConfig, ScoreConfig
from lexica.analysis.explain import ExplanationStore, explain
from lexica.analysis.explainers import LocalChat
from lexica.analysis.features import build_atlas
from lexica.analysis.score import metrics, score, scores_store, scoring_sets
from lexica.analysis.site import build_site, site_is_stale
from lexica.analysis.site_data import read_data_file
from lexica.analysis.sources import open_dictionary, open_store
from lexica.cli import main as lexica_main
from lexica.models import ModelConfig, load_tokenizer
from lexica.store import table_activations
from lexica.train.config import TrainConfig
from lexica.train.fit import fit

BEFORE, AFTER = 4, 2


@pytest.fixture(scope="module")
def explained_run(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("score")
    corpus = write_jsonl(folder / "docs.jsonl", sample_texts(40, seed=5))
    run = folder / "run"
    store_url = harvest(run, tiny_models["llama"], corpus, "resid_post.1")
    summary = fit(TrainConfig(run=str(run), store=store_url, architecture="topk", width="2x", k=4, batch_size=128,
                              tokens=20 * 128, lr=3e-3, workers=0, buffer_rows=1024, log_every=10, eval_tokens=0))
    build_atlas(AnalysisConfig(run=str(run), workers=0, top_examples=8, samples=16, per_band=2,
                               window_before=BEFORE, window_after=AFTER, site=False))
    chat = LocalChat(str(tiny_models["llama"]), "cpu", max_new_tokens=4, batch_size=16)
    explain(ExplainConfig(run=str(run), features="top:6", explainer="unused", max_examples=4, site=False), chat)
    return run, summary["name"], chat


def test_metrics():
    assert metrics([1, 1, 0, 0], [0.9, 0.6, 0.4, 0.1]) == {"accuracy": 1.0, "f1": 1.0, "auc": 1.0}
    result = metrics([1, 0, 1, 0], [0.9, 0.8, 0.2, 0.1])
    assert result["accuracy"] == 0.5 and result["f1"] == 0.5 and result["auc"] == 0.75
    assert np.isnan(metrics([1, 1], [0.9, 0.2])["auc"])  # one class: no AUC


def store_rows(store) -> dict[tuple[int, int], np.ndarray]:
    rows = {}
    for commit in store.commits():
        table = store.read_part(commit, columns=["doc_id", "position", *store.activation_columns])
        activations = table_activations(table, store.d_model, store.dtype).float()
        for index, (doc, position) in enumerate(zip(table["doc_id"].to_pylist(), table["position"].to_pylist(),
                                                      strict=True)):
            rows[(doc, position)] = activations[index]
    return rows


def test_negatives_never_fire_and_positives_were_never_shown(explained_run):
    run, name, _ = explained_run
    dictionary = open_dictionary(str(run), name)
    store = open_store(dictionary, None, str(run))
    folder = f"{run}/analysis/{name}"
    summary = atlas.read_summary(folder)
    features = sorted(ExplanationStore(folder).explained())
    density = atlas.read_table(folder, "features")["density"].to_numpy()
    config = ScoreConfig(run=str(run), scorer="unused", positives=4, negatives=6, hard_negatives=3)
    window = AnalysisConfig(run=str(run), window_before=BEFORE, window_after=AFTER, workers=0, device="cpu")
    tokenizer = load_tokenizer(ModelConfig(path=summary["model"]))
    sets = scoring_sets(folder, features, store, dictionary.module, tokenizer, window, np.flatnonzero(density > 0),
                        config)
    rows = store_rows(store)
    neighbours = {row["feature"]: row["neighbours"] for row in atlas.read_table(folder, "neighbours").to_pylist()}
    contexts = atlas.read_table(folder, "contexts").to_pylist()
    hard_sources = 0
    for feature, item in sets.items():
        assert 1 <= len(item.positives) <= 4 and all(example.rank % 2 == 1 for example in item.positives)
        assert len(item.negatives) == 6 and len(item.detection) == len(item.positives) + 6
        assert len(item.fuzzing) % 2 == 0 and sum(label for _, label in item.fuzzing) == len(item.fuzzing) // 2
        for example in item.negatives:
            window_rows = torch.stack([rows[(example.doc_id, position)] for position in
                                       range(example.position - BEFORE, example.position + AFTER + 1)
                                       if (example.doc_id, position) in rows])
            with torch.no_grad():
                code = dictionary.module.encode(window_rows)
            fired = (code.indices == feature) & (code.values > 0)
            assert not fired.any(), f"negative of feature {feature} fires at doc {example.doc_id}"
            if example.band == 0:  # a hard negative is an example of one of the feature's neighbours
                assert any(row["feature"] in neighbours[feature][:config.hard_from] and
                           (row["doc_id"], row["position"]) == (example.doc_id, example.position) for row in contexts)
                hard_sources += 1
    assert hard_sources > 0


class Failing:
    def __init__(self, chat, fail_on_call):
        self.chat, self.name, self.calls, self.fail_on_call = chat, chat.name, 0, fail_on_call

    def yes_probability(self, prompts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("the scorer went away")
        return self.chat.yes_probability(prompts)


def site_meta(atlas_folder: str) -> dict:
    with open(f"{atlas_folder}/site/data/meta.js") as meta:
        return read_data_file(meta.read())[1]


def test_scores_and_baseline_are_stored_and_reruns_resume(explained_run, capsys):
    run, name, chat = explained_run
    folder = f"{run}/analysis/{name}"
    explained = sorted(ExplanationStore(folder).explained())
    config = ScoreConfig(run=str(run), scorer="unused", positives=3, negatives=3, hard_negatives=2,
                         features_per_part=2, site=False)
    build_site(folder)
    with pytest.raises(RuntimeError, match="went away"):
        score(config, Failing(chat, fail_on_call=2))
    assert len(scores_store(folder).features()) == 2  # the first part was committed, the second never was
    assert site_is_stale(folder) and site_meta(folder)["scored"] == 0
    # Those two again: nothing to score, but the site (built before the killed run) catches up with it.
    scored = ",".join(str(feature) for feature in sorted(scores_store(folder).features()))
    result = score(dataclasses.replace(config, features=scored, site=True), chat)
    assert result["scored"] == 0 and result["already_scored"] == 2
    assert not site_is_stale(folder) and site_meta(folder)["scored"] == 2
    result = score(config, chat)
    assert result["scored"] == len(explained) - 2 and result["already_scored"] == 2
    table = pq.read_table(f"{folder}/scores").to_pylist()
    assert sorted(row["feature"] for row in table) == explained
    for row in table:
        assert row["positives"] >= 1 and row["negatives"] == 3 and row["baseline_feature"] != row["feature"]
        for prefix in ("", "baseline_"):
            for test in ("detection", "fuzzing"):
                assert 0 <= row[f"{prefix}{test}_accuracy"] <= 1 and 0 <= row[f"{prefix}{test}_f1"] <= 1
            assert 0 <= row[f"{prefix}detection_auc"] <= 1
        assert row["explanation"] and row["prompt_tokens"] > 0
    # A new explanation of one feature: only that feature is scored again, through the CLI.
    ExplanationStore(folder).commit([{"feature": explained[0], "explanation": "a new explanation", "explainer": "x",
                                      "prompt_tokens": 1, "created_at": 2e9}])
    code = lexica_main(["score", "--run", str(run), "--scorer", chat.name, "--device", "cpu", "--set", "positives=3",
                        "--set", "negatives=3", "--set", "hard_negatives=2", "--set", "site=false"])
    assert code == 0, capsys.readouterr().err
    assert f"scored 1 features ({len(explained) - 1} already were" in capsys.readouterr().out
    latest = scores_store(folder).latest(["feature", "explanation"]).to_pylist()
    assert {"feature": explained[0], "explanation": "a new explanation"} in latest
