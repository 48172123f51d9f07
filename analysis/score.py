"""``lexica score``: how well each explanation lets a scorer model tell where its feature fires.

Two yes/no tests per explained feature; the scorer answers each question with a probability of "Yes":

- **detection**: given the explanation and a text, does the feature fire anywhere in it? Positives
  are the feature's held-out activating examples (odd ranks, top examples and every quantile band;
  the explainer never saw them). Negatives are texts where the feature does not fire: some from its
  nearest decoder neighbours' examples (hard negatives: texts like its own), the rest from random
  other features' examples, each re-encoded from the store and kept only if the feature is zero on
  every token of the window.
- **fuzzing**: given the explanation and a held-out activating text with tokens marked «like this»,
  are the marked tokens the ones it describes? Each positive text is asked once marked where the
  feature fires and once with as many marks on tokens where it does not.

Each test gives accuracy and F1 (answer "Yes" at probability above 0.5) and AUC. The **baseline** is
the same scorer on the same texts given another feature's explanation: an explanation is only
informative as far as it beats that.

Scores are stored with the atlas in ``<atlas>/scores/`` (one row per feature; Parquet parts written
atomically, like explanations). A rerun skips the features whose newest explanation is scored.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lexica.analysis import atlas
from lexica.analysis.config import AnalysisConfig, ScoreConfig
from lexica.analysis.explain import (
    MARK_CLOSE,
    MARK_OPEN,
    AtlasParts,
    Example,
    ExplanationStore,
    marked_text,
    parse_features,
    read_feature_rows,
    refresh_site,
    split_examples,
)
from lexica.analysis.sources import model_config, open_dictionary, open_store
from lexica.config import add_knob_flags, apply_overrides, from_dict, stage_section
from lexica.progress import Progress
from lexica.run import Run

log = logging.getLogger(__name__)

SCORES = "scores"
METRICS = ("accuracy", "f1", "auc")
TESTS = ("detection", "fuzzing")
SCORES_SCHEMA = pa.schema(
    [("feature", pa.int32()), ("explanation", pa.string()), ("scorer", pa.string())]
    + [(f"{prefix}{test}_{metric}", pa.float32()) for prefix in ("", "baseline_") for test in TESTS
       for metric in METRICS]
    + [("baseline_feature", pa.int32()), ("positives", pa.int32()), ("negatives", pa.int32()),
       ("hard_negatives", pa.int32()), ("prompt_tokens", pa.int32()), ("created_at", pa.float64())])

SCORER_SYSTEM = "You check explanations of the features of a language model. Answer Yes or No."
DETECTION_QUESTION = ('A feature of a language model is explained as: "{explanation}"\n\nText: {text}\n\n'
                      "Does this feature fire on some token of the text? Answer Yes or No.")
FUZZING_QUESTION = ('A feature of a language model is explained as: "{explanation}"\n\nText, with some tokens '
                    "marked {open}like this{close}: {text}\n\nAre the marked tokens what the explanation describes? "
                    "Answer Yes or No.")


def scores_store(atlas_url: str, storage_options: dict | None = None, fs=None) -> AtlasParts:
    return AtlasParts(atlas_url, SCORES, SCORES_SCHEMA, storage_options, fs)


def metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy and F1 of answering "Yes" above probability 0.5, and AUC (NaN with one class only)."""
    from sklearn.metrics import f1_score, roc_auc_score

    labels = np.asarray(labels, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not len(labels):
        return dict.fromkeys(METRICS, float("nan"))
    said_yes = probabilities > 0.5
    both = labels.any() and not labels.all()
    return {"accuracy": float((said_yes == labels).mean()),
            "f1": float(f1_score(labels, said_yes, zero_division=0.0)),
            "auc": float(roc_auc_score(labels, probabilities)) if both else float("nan")}


def held_out_positives(held_out: list[Example], count: int) -> list[Example]:
    """Up to ``count`` held-out activating examples, alternating between quantile bands (low to high)
    and top examples, so the positives cover the feature's whole range of activations."""
    quantile = sorted((e for e in held_out if e.kind == "quantile"), key=lambda e: (e.band, -e.activation))
    bands = sorted({e.band for e in quantile})
    by_band = [[e for e in quantile if e.band == band] for band in bands]
    queues = by_band + [[e for e in held_out if e.kind != "quantile"]]
    chosen: list[Example] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def wrong_marks(example: Example, rng: np.random.Generator) -> list[bool] | None:
    """As many marks as the example has firing tokens, put on tokens where the feature is zero (None
    when there are too few such tokens)."""
    values = np.asarray(example.values)
    firing, quiet = int((values > 0).sum()), np.flatnonzero(values <= 0)
    quiet = quiet[[bool((example.tokens[i] or "").strip()) for i in quiet]] if len(quiet) else quiet
    if firing == 0 or len(quiet) < firing:
        return None
    marks = np.zeros(len(values), dtype=bool)
    marks[rng.choice(quiet, size=firing, replace=False)] = True
    return marks.tolist()


def plain_text(example: Example) -> str:
    return "".join(token or "" for token in example.tokens).replace("\n", " ").strip()


@dataclass
class ScoringSet:
    """One feature's questions: detection texts with labels, fuzzing texts (marked) with labels."""
    feature: int
    positives: list[Example] = field(default_factory=list)
    negatives: list[Example] = field(default_factory=list)
    detection: list[tuple[str, bool]] = field(default_factory=list)
    fuzzing: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def hard_negatives(self) -> int:
        return sum(1 for example in self.negatives if example.band == 0)


def candidate_negatives(features: list[int], neighbours: dict[int, list[int]], context_rows: pa.Table,
                        live_features: np.ndarray, config: ScoreConfig) -> pa.Table:
    """Examples of other features that may serve as each feature's negatives, as rows of the contexts
    table's example columns with ``feature`` the feature to check them against: windows of its
    neighbours' examples (``band`` 0: hard) and of random firing features' examples (``band`` 1)."""
    keys = context_rows["feature"].to_numpy()
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]

    def examples_of(owner: int) -> np.ndarray:
        low, high = np.searchsorted(sorted_keys, [owner, owner + 1])
        return order[low:high]

    picks: list[tuple[int, int, int]] = []  # (feature, row of context_rows, band)
    wanted = 3 * config.negatives  # candidates beyond the need: some will turn out to fire
    for feature in features:
        rng = np.random.default_rng([config.seed, feature])
        hard = [examples_of(n) for n in neighbours.get(feature, [])[:config.hard_from]]
        longest = max((len(queue) for queue in hard), default=0)
        rows = [int(queue[i]) for i in range(longest) for queue in hard if i < len(queue)]  # round robin
        picks += [(feature, row, 0) for row in rows[:wanted]]
        others = live_features[live_features != feature]
        if len(others):
            for owner in rng.choice(others, size=min(wanted, len(others)), replace=False):
                rows = examples_of(int(owner))
                if len(rows):
                    picks.append((feature, int(rows[rng.integers(len(rows))]), 1))
    if not picks:
        return pa.table({name: pa.array([], type=atlas.CONTEXTS_SCHEMA.field(name).type)
                         for name in ("feature", "kind", "rank", "band", "activation", "doc_id", "position")})
    owner, row, band = (np.array(column) for column in zip(*picks, strict=True))
    return pa.table({
        "feature": pa.array(owner, pa.int32()), "kind": pa.array(["negative"] * len(owner), pa.string()),
        "rank": pa.array(np.arange(len(owner)), pa.int32()), "band": pa.array(band, pa.int8()),
        "activation": pa.array(np.zeros(len(owner)), pa.float32()),
        "doc_id": context_rows["doc_id"].take(pa.array(row)), "position": context_rows["position"].take(pa.array(row))})


def verified_negatives(windows: pa.Table) -> dict[int, tuple[list[Example], list[Example]]]:
    """(hard, random) negatives of each feature: candidate windows on which the feature is zero at
    every token (``windows``: the candidates with the feature's own values, re-encoded from the store)."""
    found: dict[int, tuple[list[Example], list[Example]]] = {}
    seen: set[tuple[int, int, int]] = set()
    for row in windows.to_pylist():
        key = (row["feature"], row["doc_id"], row["position"])
        if key in seen or not row["tokens"] or max(row["values"]) > 0:
            continue
        seen.add(key)
        hard, rest = found.setdefault(row["feature"], ([], []))
        (hard if row["band"] == 0 else rest).append(
            Example(row["tokens"], row["values"], 0.0, row["doc_id"], row["position"], "negative", row["band"]))
    return found


def scoring_set(feature: int, held_out: list[Example], hard: list[Example], rest: list[Example],
                config: ScoreConfig) -> ScoringSet:
    rng = np.random.default_rng([config.seed, feature, 1])
    positives = held_out_positives(held_out, config.positives)
    take_hard = min(config.hard_negatives, config.negatives, len(hard))
    negatives = hard[:take_hard] + rest[:config.negatives - take_hard]
    if len(negatives) < config.negatives:  # too few random ones: more hard ones
        negatives += hard[take_hard:take_hard + config.negatives - len(negatives)]
    result = ScoringSet(feature, positives, negatives)
    result.detection = [(plain_text(e), True) for e in positives] + [(plain_text(e), False) for e in negatives]
    for example in positives:
        marks = wrong_marks(example, rng)
        if marks is not None:
            result.fuzzing += [(marked_text(example), True), (marked_text(example, marks), False)]
    return result


def questions(item: ScoringSet, explanation: str) -> list[list[dict[str, str]]]:
    def asked(template: str, text: str) -> list[dict[str, str]]:
        content = template.format(explanation=explanation, text=text, open=MARK_OPEN, close=MARK_CLOSE)
        return [{"role": "system", "content": SCORER_SYSTEM}, {"role": "user", "content": content}]

    return ([asked(DETECTION_QUESTION, text) for text, _ in item.detection]
            + [asked(FUZZING_QUESTION, text) for text, _ in item.fuzzing])


def score_row(item: ScoringSet, probabilities: list[float], baseline: list[float] | None) -> dict:
    detection_labels = np.array([label for _, label in item.detection], dtype=bool)
    fuzzing_labels = np.array([label for _, label in item.fuzzing], dtype=bool)
    split = len(detection_labels)
    row: dict = {}
    for prefix, answers in (("", probabilities), ("baseline_", baseline)):
        for test, labels, values in (("detection", detection_labels, answers[:split] if answers else None),
                                     ("fuzzing", fuzzing_labels, answers[split:] if answers else None)):
            result = metrics(labels, np.array(values)) if values is not None else dict.fromkeys(METRICS)
            row.update({f"{prefix}{test}_{name}": value for name, value in result.items()})
    return row


def baseline_features(features: list[int], explained: np.ndarray, seed: int) -> dict[int, int | None]:
    """For each feature, another explained feature whose explanation is its baseline (seeded)."""
    chosen = {}
    for feature in features:
        others = explained[explained != feature]
        chosen[feature] = int(np.random.default_rng([seed, feature, 2]).choice(others)) if len(others) else None
    return chosen


def scoring_sets(folder: str, group: list[int], store, module, tokenizer, window: AnalysisConfig,
                 live_features: np.ndarray, config: ScoreConfig) -> dict[int, ScoringSet]:
    """Each feature's held-out positives and store-checked negatives, and the questions made of them."""
    from lexica.analysis.contexts import build_contexts

    own = read_feature_rows(folder, "contexts", group, ["feature", "kind", "rank", "band", "activation", "doc_id",
                                                       "position", "tokens", "values"], config.storage_options)
    neighbour_rows = read_feature_rows(folder, "neighbours", group, ["feature", "neighbours"], config.storage_options)
    neighbours = dict(zip(neighbour_rows["feature"].to_pylist(), neighbour_rows["neighbours"].to_pylist(), strict=True))
    rng = np.random.default_rng([config.seed, group[0]])
    sources = {n for feature in group for n in neighbours.get(feature, [])[:config.hard_from]}
    if len(live_features):
        sources |= set(rng.choice(live_features, size=min(len(live_features), 4 * config.negatives * len(group)),
                                  replace=False).tolist())
    source_rows = read_feature_rows(folder, "contexts", sorted(sources), ["feature", "doc_id", "position"],
                                    config.storage_options)
    candidates = candidate_negatives(group, neighbours, source_rows,
                                     np.array(sorted(set(source_rows["feature"].to_pylist()))), config)
    negatives = verified_negatives(build_contexts(store, module, candidates, tokenizer, window)) \
        if len(candidates) else {}
    sets = {}
    for feature in group:
        shown, held = split_examples(own.filter(pc.equal(own["feature"], feature)), 1)
        held_out = [example for example in shown + held if example.rank % 2 == 1]  # never shown to the explainer
        hard, rest = negatives.get(feature, ([], []))
        sets[feature] = scoring_set(feature, held_out, hard, rest, config)
    return sets


def score(config: ScoreConfig, scorer=None) -> dict:
    """Score the newest explanation of each chosen explained feature not yet scored; ``scorer`` (an
    object with ``name`` and ``yes_probability``) defaults to the backend ``config.scorer`` names."""
    from lexica.analysis.explainers import open_backend
    from lexica.models import load_tokenizer

    config.validate()
    dictionary = open_dictionary(config.run, config.dictionary, config.storage_options)
    folder = Run(config.run, config.storage_options).atlas_url(dictionary.name)
    summary = atlas.read_summary(folder, config.storage_options)
    features_table = atlas.read_table(folder, "features", config.storage_options).select(["feature", "density"])
    density = np.zeros(int(summary["d_sae"]))
    density[features_table["feature"].to_numpy()] = features_table["density"].to_numpy()
    chosen = parse_features(config.features, int(summary["d_sae"]), density)
    explanations = ExplanationStore(folder, config.storage_options).latest()
    explanation_of = dict(zip(explanations["feature"].to_pylist(), explanations["explanation"].to_pylist(),
                              strict=True))
    scores = scores_store(folder, config.storage_options)
    scored = scores.latest(["feature", "explanation"])
    already = {feature for feature, text in zip(scored["feature"].to_pylist(), scored["explanation"].to_pylist(),
                                                strict=True) if explanation_of.get(feature) == text}
    todo = [feature for feature in chosen if feature in explanation_of and feature not in already]
    unexplained = sum(1 for feature in chosen if feature not in explanation_of)
    result = {"atlas": folder, "chosen": len(chosen), "unexplained": unexplained,
              "already_scored": len(chosen) - unexplained - len(todo), "scored": 0}
    if not todo:
        refresh_site(folder, config)
        return result
    store = open_store(dictionary, config.store or summary.get("store"), config.run, config.storage_options)
    tokenizer = load_tokenizer(model_config(store, config.model or summary.get("model"), device="cpu"))
    window = AnalysisConfig(run=config.run, window_before=int(summary["config"]["window_before"]),
                            window_after=int(summary["config"]["window_after"]), workers=0, device=config.device)
    live_features = np.flatnonzero(density > 0)
    baselines = baseline_features(todo, np.array(sorted(explanation_of)), config.seed)
    scorer = scorer or open_backend(config.scorer, config, max_new_tokens=3)
    result["scorer"] = scorer.name
    progress = Progress("score", len(todo), "features")
    prompt_total = 0
    for start in range(0, len(todo), config.group_features):
        group = todo[start:start + config.group_features]
        sets = scoring_sets(folder, group, store, dictionary.module, tokenizer, window, live_features, config)
        for first in range(0, len(group), config.features_per_part):
            batch = group[first:first + config.features_per_part]
            prompts, spans = [], []  # each feature's own and baseline questions: slices of prompts
            for item in (sets[feature] for feature in batch):
                asked = questions(item, explanation_of[item.feature])
                own = slice(len(prompts), len(prompts) + len(asked))
                prompts += asked
                other, baseline = explanation_of.get(baselines[item.feature]), None
                if other is not None:
                    asked = questions(item, other)
                    baseline = slice(len(prompts), len(prompts) + len(asked))
                    prompts += asked
                spans.append((item, own, baseline))
            answers, prompt_tokens = scorer.yes_probability(prompts) if prompts else ([], [])
            rows = []
            for item, own, baseline in spans:
                tokens = sum(prompt_tokens[own]) + (sum(prompt_tokens[baseline]) if baseline else 0)
                rows.append({"feature": item.feature, "explanation": explanation_of[item.feature],
                             "scorer": scorer.name,
                             **score_row(item, answers[own], answers[baseline] if baseline else None),
                             "baseline_feature": baselines[item.feature], "positives": len(item.positives),
                             "negatives": len(item.negatives), "hard_negatives": item.hard_negatives,
                             "prompt_tokens": tokens, "created_at": time.time()})
            scores.commit(rows)
            result["scored"] += len(rows)
            prompt_total += sum(prompt_tokens)
            progress.update(start + first + len(batch), prompt_total, f"{result['scored']} scored")
    progress.update(len(todo), prompt_total, f"{result['scored']} scored", final=True)
    refresh_site(folder, config)
    return result


SCORE_FLAGS = {"run": "run", "dictionary": "dictionary", "features": "features", "scorer": "scorer",
               "device": "device", "workers": "workers", "positives": "positives", "negatives": "negatives",
               "batch_size": "batch_size"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexica score",
                                     description="Score features' explanations: detection and fuzzing on held-out "
                                                 "examples, against another feature's explanation as the baseline; "
                                                 "scores are stored with the atlas.")
    add_knob_flags(parser, ScoreConfig, "score", SCORE_FLAGS)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    values = stage_section(args.config, "score") if args.config else {}
    values = apply_overrides(ScoreConfig, values, args, SCORE_FLAGS, args.set)
    result = score(from_dict(ScoreConfig, values, "score"))
    scorer = f" with {result['scorer']}" if "scorer" in result else ""
    print(f"scored {result['scored']} features ({result['already_scored']} already were, {result['unexplained']} "
          f"have no explanation){scorer}: {result['atlas']}/{SCORES}")
    return 0

