"""``lexica explain``: feature choice, prompts built from the atlas, explanations stored in committed
parts, and a rerun (or a run after a crash) explaining only what is left; with a tiny local model."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
from synthetic_atlas import write_synthetic_atlas

from lexica.analysis import atlas
from lexica.analysis.config import ExplainConfig
from lexica.analysis.explain import (
    Example,
    ExplanationStore,
    explain,
    marked_text,
    marked_token_counts,
    parse_features,
    prompt_messages,
    split_examples,
    tidy_explanation,
)
from lexica.analysis.explainers import LocalChat
from lexica.analysis.sources import AnalysisError
from lexica.cli import main as lexica_main

NAME = "topk-1"


def test_feature_specs():
    assert parse_features("all", 4) == [0, 1, 2, 3]
    assert parse_features("0-2,7, 5", 10) == [0, 1, 2, 7, 5]
    assert parse_features("3,3,2-3", 10) == [3, 2]
    assert parse_features("top:2", 4, np.array([0.1, 0.5, 0.5, 0.0])) == [1, 2]  # ties: the lower id
    for bad, message in (("5-2", "runs backwards"), ("0-10", "outside 0-9"), ("x", "not an id"),
                         ("top:0", "positive count"), ("top:3", None)):
        with pytest.raises(AnalysisError, match=message or "features.parquet"):
            parse_features(bad, 10)


def test_explanations_lose_lead_ins_quotes_and_full_stops_only():
    assert tidy_explanation("The marked tokens have in common that they are all names of cities.") == "names of cities"
    assert tidy_explanation("They are all verbs in the past tense") == "verbs in the past tense"
    assert tidy_explanation('Answer: "numbers and dates".') == "numbers and dates"
    assert tidy_explanation("The common theme is: government") == "government"
    assert tidy_explanation("The highlighted words refer to money.") == "money"
    assert tidy_explanation('The feature fires on the verb "be".') == 'the verb "be"'
    assert tidy_explanation("**'commas'**") == "commas"
    for kept in ("Cities in Europe", "all caps words", "The marked tokens", "theory of the state"):
        assert tidy_explanation(kept) == kept  # the answer itself, or all lead-in: unchanged


def test_prompts_mark_the_firing_tokens_and_hold_out_odd_ranks():
    example = Example([" The", " fox", " and", " fox", "es", " ran"], [0, 2.0, 0, 1.0, 0.5, 0], 2.0)
    assert marked_text(example) == "The «fox» and «foxes» ran"
    rows = pa.table({"kind": ["top"] * 6 + ["quantile"] * 4, "rank": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
                     "activation": [9.0, 8, 7, 6, 5, 4, 1, 2, 3, 4],
                     "tokens": [[f"t{i}"] for i in range(10)], "values": [[1.0]] * 10})
    shown, held_out = split_examples(rows, max_examples=4)
    assert [e.tokens[0] for e in shown] == ["t0", "t2", "t4", "t6"]  # top at even ranks, then quantile
    assert len(shown) + len(held_out) == 10
    user = prompt_messages(shown)[1]["content"]
    assert len(re.findall(r"^Example \d+:", user, re.MULTILINE)) == 4
    # The explainer also gets the marked tokens of the shown examples counted, most frequent first.
    shown = [Example([" The", " fox", " ran", ".", " A", " fox"], [0, 1.0, 0, 2.0, 0, 3.0], 3.0),
             Example([" foxes", " and", " The", " fox"], [1.0, 0, 0.5, 1.0], 1.0)]
    assert marked_token_counts(shown) == [("fox", 3), (".", 1), ("foxes", 1), ("The", 1)]
    assert "Marked tokens, most frequent first: «fox» 3x, «.» 1x, «foxes» 1x, «The» 1x" in \
        prompt_messages(shown)[1]["content"]


class Recording:
    """A local explainer that records its prompts, and can fail on a chosen call."""

    def __init__(self, chat: LocalChat, fail_on_call: int | None = None):
        self.chat, self.name, self.prompts, self.calls, self.fail_on_call = chat, chat.name, [], 0, fail_on_call

    def complete(self, prompts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("the explainer went away")
        self.prompts += prompts
        return self.chat.complete(prompts)


@pytest.fixture(scope="module")
def chat(tiny_models):
    return LocalChat(str(tiny_models["llama"]), "cpu", max_new_tokens=4)


def make_run(folder):
    export = folder / "run" / "dictionaries" / NAME / "final"
    export.mkdir(parents=True)
    (export / "cfg.json").write_text("{}")
    write_synthetic_atlas(str(folder / "run" / "analysis" / NAME), features=12, contexts_per_feature=12,
                          tokens_per_context=10)
    return str(folder / "run")


def test_explanations_are_stored_and_a_rerun_skips_them(chat, tmp_path):
    run = make_run(tmp_path)
    recording = Recording(chat)
    result = explain(ExplainConfig(run=run, features="0-5", explainer="unused", max_examples=3, features_per_part=4),
                     recording)
    assert (result["explained"], result["already_explained"]) == (6, 0)
    assert all(len(re.findall(r"^Example \d+:", messages[1]["content"], re.MULTILINE)) == 3
               for messages in recording.prompts)  # never more examples than configured
    store = ExplanationStore(f"{run}/analysis/{NAME}")
    table = store.read()
    assert sorted(table["feature"].to_pylist()) == list(range(6)) and len(store.parts()) == 2
    assert set(table["explainer"].to_pylist()) == {chat.name} and min(table["prompt_tokens"].to_pylist()) > 20

    again = Recording(chat)
    result = explain(ExplainConfig(run=run, features="all", explainer="unused", max_examples=3, features_per_part=4),
                     again)
    assert (result["explained"], result["already_explained"]) == (6, 6) and len(again.prompts) == 6
    assert sorted(store.read()["feature"].to_pylist()) == list(range(12))

    other = Recording(chat)
    other.name = "another explainer"  # explains again; its explanations, the newest, are the ones shown
    result = explain(ExplainConfig(run=run, features="0-1", explainer="unused", max_examples=3), other)
    assert (result["explained"], result["already_explained"]) == (2, 0)
    assert store.latest(["feature", "explainer"]).to_pylist()[:3] == [
        {"feature": 0, "explainer": "another explainer"}, {"feature": 1, "explainer": "another explainer"},
        {"feature": 2, "explainer": chat.name}]


def site_meta(atlas_folder: str) -> dict:
    from lexica.analysis.site_data import read_data_file

    return read_data_file(open(f"{atlas_folder}/site/data/meta.js").read())[1]


def test_a_crash_keeps_every_committed_batch_and_the_site_catches_up(chat, tmp_path):
    from lexica.analysis.site import build_site, site_is_stale

    run = make_run(tmp_path)
    atlas_folder = f"{run}/analysis/{NAME}"
    build_site(atlas_folder)
    assert not site_is_stale(atlas_folder)
    failing = Recording(chat, fail_on_call=2)
    with pytest.raises(RuntimeError, match="went away"):
        explain(ExplainConfig(run=run, features="all", explainer="unused", features_per_part=5), failing)
    store = ExplanationStore(atlas_folder)
    assert sorted(store.explained()) == list(range(5))  # the first batch was committed, the second never was
    assert site_is_stale(atlas_folder) and site_meta(atlas_folder)["explained"] == 0  # killed before its rebuild
    # Nothing left to explain among 0-4, yet the site is rebuilt with what the killed run committed.
    result = explain(ExplainConfig(run=run, features="0-4", explainer="unused"), Recording(chat))
    assert (result["explained"], result["already_explained"]) == (0, 5)
    assert not site_is_stale(atlas_folder) and site_meta(atlas_folder)["explained"] == 5
    result = explain(ExplainConfig(run=run, features="all", explainer="unused", features_per_part=5), Recording(chat))
    assert (result["explained"], result["already_explained"]) == (7, 5)
    assert sorted(store.read()["feature"].to_pylist()) == list(range(12))  # each feature exactly once
    assert site_meta(atlas_folder)["explained"] == 12


def test_the_command_explains_with_a_local_model(tiny_models, tmp_path, capsys):
    run = make_run(tmp_path)
    arguments = ["explain", "--run", run, "--features", "top:3", "--explainer", str(tiny_models["llama"]),
                 "--device", "cpu", "--set", "max_new_tokens=3"]
    assert lexica_main(arguments) == 0
    assert "explained 3 features (0 already were" in capsys.readouterr().out
    assert lexica_main(["explain", "--run", run, "--features", "0-99", "--explainer", "x"]) == 2
    assert "outside 0-11" in capsys.readouterr().err


HOSTILE = '<img src=x onerror="window.__pwned=1"> harbour cities</script>'


def test_explanations_show_in_the_browser_as_text_and_are_searchable(tmp_path, page):
    from lexica.analysis.site import build_site

    run = make_run(tmp_path)
    atlas_folder = f"{run}/analysis/{NAME}"
    store = ExplanationStore(atlas_folder)
    store.commit([{"feature": 3, "explanation": "an old guess", "explainer": "m", "prompt_tokens": 9,
                   "created_at": 1.0}])
    store.commit([{"feature": 3, "explanation": HOSTILE, "explainer": "m", "prompt_tokens": 9, "created_at": 2.0},
                  {"feature": 7, "explanation": "Ports and harbours", "explainer": "m", "prompt_tokens": 9,
                   "created_at": 2.0}])
    build_site(atlas_folder)
    base = (tmp_path / "run" / "analysis" / NAME / "site").as_uri() + "/"
    page.open(f"{base}feature.html#3")
    page.page.wait_for_function("() => document.querySelector('h1')?.textContent === 'Feature 3'")
    assert page.page.text_content("p.explanation") == HOSTILE  # the newest, shown literally
    assert page.page.locator("main img").count() == 0
    page.open(base + "index.html")
    page.page.fill("#search", "harbour")
    page.page.wait_for_function("() => document.body.dataset.query === 'harbour'")
    rows = page.page.eval_on_selector_all("#features tbody tr", "rows => rows.map(r => Number(r.dataset.feature))")
    assert rows == [3, 7]  # the word "harbour" first, then "harbours" (the query is its prefix)
    assert page.page.text_content("#features tbody tr[data-feature='7'] td.explanation") == "Ports and harbours"


def score_row(feature: int, explanation: str, detection_auc: float, created_at: float = 3.0) -> dict:
    from lexica.analysis.score import SCORES_SCHEMA

    row = {name: 0.5 for name in SCORES_SCHEMA.names if name.endswith(("accuracy", "f1", "auc"))}
    row.update({"feature": feature, "explanation": explanation, "scorer": "scorer-m", "detection_auc": detection_auc,
                "fuzzing_auc": 0.61, "baseline_detection_auc": 0.48, "baseline_feature": 1, "positives": 10,
                "negatives": 10, "hard_negatives": 5, "prompt_tokens": 900, "created_at": created_at})
    return row


def test_scores_and_concepts_show_in_the_browser(tmp_path, page):
    from lexica.analysis.score import scores_store
    from lexica.analysis.site import build_site

    run = make_run(tmp_path)
    atlas_folder = f"{run}/analysis/{NAME}"
    ExplanationStore(atlas_folder).commit([
        {"feature": 3, "explanation": HOSTILE, "explainer": "m", "prompt_tokens": 9, "created_at": 2.0},
        {"feature": 7, "explanation": "Ports and harbours", "explainer": "m", "prompt_tokens": 9, "created_at": 2.0},
        {"feature": 9, "explanation": "harbour cranes", "explainer": "m", "prompt_tokens": 9, "created_at": 2.0}])
    scores_store(atlas_folder).commit([score_row(3, HOSTILE, 0.7), score_row(7, "Ports and harbours", 0.9),
                                       score_row(9, "an explanation since replaced", 0.95)])
    atlas.write_table(atlas_folder, "labels", pa.table({"feature": pa.array([7], pa.int32()),
                                                        "labels": [["<b>de</b>", "en"]], "counts": [[5, 2]]}))
    build_site(atlas_folder)
    base = (tmp_path / "run" / "analysis" / NAME / "site").as_uri() + "/"
    page.open(f"{base}feature.html#7")
    page.page.wait_for_function("() => document.querySelector('h1')?.textContent === 'Feature 7'")
    cells = page.page.eval_on_selector_all("table.score-table tr", "rows => rows.map(r => r.innerText)")
    assert cells[1].split("\t") == ["detection", "0.50", "0.50", "0.90"]
    assert cells[2].split("\t")[-1] == "0.48"  # the baseline: another feature's explanation
    assert "Scored by scorer-m on 10 held-out activating and 10 non-activating texts (5 from" in \
        page.page.text_content("div.scores")
    assert page.page.text_content("p.labels") == "examples by label: <b>de</b> 5 · en 2"  # corpus labels as text
    page.open(f"{base}feature.html#9")
    page.page.wait_for_function("() => document.querySelector('h1')?.textContent === 'Feature 9'")
    assert page.page.locator("table.score-table").count() == 0  # its score was of another explanation

    page.open(base + "index.html")
    page.page.select_option("#order", "score")
    page.page.wait_for_function("() => document.body.dataset.listed === 'score'")
    rows = page.page.eval_on_selector_all("#features tbody tr", "rows => rows.map(r => Number(r.dataset.feature))")
    assert rows == [7, 3]  # best explained first; feature 9's stale score is not listed
    assert page.page.text_content("#features tbody tr[data-feature='7'] td.score") == "0.90 / 0.61"

    page.open(base + "concepts.html")
    texts = page.page.eval_on_selector_all("section.concept", "cards => cards.map(c => c.innerText)")
    assert texts and all("cluster" in text for text in texts)
    page.page.fill("#filter", "harbour")
    page.page.wait_for_function("() => document.body.dataset.filter === 'harbour'")
    found = page.page.eval_on_selector_all("section.concept", "cards => cards.map(c => c.innerText)")
    assert found and all("harbour" in text.lower() for text in found)
    assert any("Ports and harbours" in text for text in found) and any(HOSTILE in text for text in found)
    named = page.page.eval_on_selector_all("section.concept", "cards => cards.filter(c => c.innerText.includes("
                                           "'Ports and harbours')).map(c => c.querySelector('.words').textContent)")
    assert "harbours" in named[0].split(" · ") and "ports" in named[0].split(" · ")  # named by its explanations
    assert page.page.locator("main img").count() == 0
    page.assert_inert()


def test_ray_actors_give_the_answers_of_one_process(chat, tiny_models, tmp_path, ray_cluster):
    """Prompts split across two Ray actors, each holding the model: the same (greedy) explanations and
    probabilities, in the prompts' order, as the model in this process."""
    from lexica.analysis.chat_actors import ActorChat

    options = ExplainConfig(run="unused", explainer="unused", device="cpu", workers=2, batch_size=2)
    actors = ActorChat(str(tiny_models["llama"]), options, max_new_tokens=4)
    try:
        run = make_run(tmp_path)
        recording = Recording(chat)
        explain(ExplainConfig(run=run, features="0-4", explainer="unused", max_examples=3, site=False), recording)
        answers, tokens = actors.complete(recording.prompts)
        assert (answers, tokens) == chat.complete(recording.prompts)
        assert len(answers) == 5
        probabilities, _ = actors.yes_probability(recording.prompts)
        assert np.allclose(probabilities, chat.yes_probability(recording.prompts)[0], atol=1e-5)
    finally:
        actors.close()
