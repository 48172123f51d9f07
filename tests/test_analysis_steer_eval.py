"""``lexica steer --evaluate`` on a harvested store, a trained dictionary and its atlas: every feature,
method, strength and prompt gets a continuation measured by the untouched model (the feature's
activation, perplexity) and by a judge; the mean-difference direction is the store's own means."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import torch
from test_analysis_score import explained_run, store_rows  # noqa: F401 - explained_run is a fixture

from lexica.analysis import atlas
from lexica.analysis.explain import ExplanationStore
from lexica.analysis.sources import open_dictionary, open_store
from lexica.analysis.steer_eval import mean_differences
from lexica.cli import main as lexica_main

PROMPTS = ["The quick brown", "Ask not what"]


def test_the_mean_difference_is_the_stores_means(explained_run):  # noqa: F811
    run, name, _ = explained_run
    dictionary = open_dictionary(str(run), name)
    store = open_store(dictionary, None, str(run))
    contexts = atlas.read_table(f"{run}/analysis/{name}", "contexts").to_pylist()
    feature = contexts[0]["feature"]
    examples = [(row["doc_id"], row["position"]) for row in contexts if row["feature"] == feature and
                row["kind"] == "top"]
    direction = mean_differences(store, {feature: examples}, background=10**9)[feature]
    rows = store_rows(store)
    expected = torch.stack([rows[key] for key in examples]).mean(0) - torch.stack(list(rows.values())).mean(0)
    assert torch.allclose(direction, expected, atol=1e-5)


def test_every_continuation_is_measured_and_judged(explained_run, capsys):  # noqa: F811
    run, name, chat = explained_run
    folder = f"{run}/analysis/{name}"
    explained = sorted(ExplanationStore(folder).explained())[:2]
    features = ",".join(str(feature) for feature in explained)
    code = lexica_main(["steer", "--evaluate", "--run", str(run), "--features", features, "--strengths", "2x,8x",
                        "--judge", chat.name, "--device", "cpu", "--max-new-tokens", "5",
                        "--set", f"prompts={PROMPTS}"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| dictionary | 8x |" in out and "| mean-difference | 2x |" in out and "| baseline | – |" in out
    rows = pq.read_table(f"{folder}/steering_evaluation.parquet").to_pylist()
    assert len(rows) == len(explained) * len(PROMPTS) * (1 + 2 * 2)
    assert {(row["method"], row["strength"]) for row in rows} == {
        ("baseline", ""), ("dictionary", "2x"), ("dictionary", "8x"), ("mean-difference", "2x"),
        ("mean-difference", "8x")}
    for row in rows:
        assert row["text"] is not None and math.isfinite(row["perplexity"]) and row["perplexity"] >= 1
        assert 0 <= row["firing_share"] <= 1 and row["activation"] >= 0
        assert 0 <= row["judge_yes"] <= 1
    # The clamp at 8x the max makes the continuation differ from the untouched one somewhere.
    baseline = {(row["feature"], row["prompt"]): row["text"] for row in rows if row["method"] == "baseline"}
    assert any(row["text"] != baseline[(row["feature"], row["prompt"])] for row in rows
               if row["method"] == "dictionary" and row["strength"] == "8x")
