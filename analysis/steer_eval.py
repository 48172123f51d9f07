"""``lexica steer --evaluate``: does steering a feature bring its concept into the text?

For each chosen feature and each strength (a multiple of the feature's max activation), the model
continues a set of neutral prompts three ways, greedily:

- ``baseline``: untouched;
- ``dictionary``: the feature clamped at the strength (``lexica steer``'s clamp);
- ``mean-difference``: the baseline method of the steering literature, a direction added at every
  position: the mean activation on the feature's top examples (from the store) minus the mean over
  the store's tokens, unit length, times the norm the clamp adds where the feature is silent
  (strength × ‖W_dec[f]‖), so both move the activations equally far.

Each continuation is measured three ways: the feature's own activation re-measured by running the
untouched model on prompt + continuation (mean over the new tokens, relative to the feature's max,
and the share of new tokens where it fires); a judge model's probability that the continuation fits
the feature's explanation (``lexica score``'s detection question); and fluency, the untouched
model's perplexity of the new tokens.

Rows go to ``<atlas>/steering_evaluation.parquet``; a summary table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch

from lexica.analysis import atlas
from lexica.analysis.config import SteerEvalConfig
from lexica.analysis.explain import ExplanationStore, parse_features, read_feature_rows
from lexica.analysis.sources import AnalysisError, check_width, open_run, open_store
from lexica.analysis.steering import feature_values, generate, parse_value, prompt_ids, steering_splices
from lexica.config import add_knob_flags, apply_overrides, from_dict, stage_section
from lexica.hooks import count_blocks
from lexica.models import load_causal_lm
from lexica.progress import Progress
from lexica.run import Run
from lexica.store import table_activations
from lexica.train.evaluate import Splice

METHODS = ("baseline", "dictionary", "mean-difference")
EVALUATION = "steering_evaluation"
EVALUATION_SCHEMA = atlas.STEERING_EVALUATION_SCHEMA


def mean_differences(store, examples: dict[int, list[tuple[int, int]]], background: int = 8192
                     ) -> dict[int, torch.Tensor]:
    """For each feature, the mean activation at its examples' (doc_id, position) minus the mean over
    ``background`` rows spread over the store's parts; each part is read once."""
    wanted = {(int(doc), int(position)) for pairs in examples.values() for doc, position in pairs}
    wanted_docs = {doc for doc, _ in wanted}
    commits = [commit for commit in store.commits() if commit.rows]
    per_part = max(1, background // max(len(commits), 1))
    found: dict[tuple[int, int], torch.Tensor] = {}
    spread = []
    for commit in commits:
        table = store.read_part(commit, columns=["doc_id", "position", *store.activation_columns])
        activations = table_activations(table, store.d_model, store.dtype).float()
        spread.append(activations[::max(1, len(activations) // per_part)][:per_part])
        if any(commit.doc_id_min <= doc <= commit.doc_id_max for doc in wanted_docs):
            for row, key in enumerate(zip(table["doc_id"].to_pylist(), table["position"].to_pylist(), strict=True)):
                if key in wanted:
                    found[key] = activations[row]
    mean = torch.cat(spread).mean(dim=0)
    directions = {}
    for feature, pairs in examples.items():
        rows = [found[(int(doc), int(position))] for doc, position in pairs if (int(doc), int(position)) in found]
        if not rows:
            raise AnalysisError(f"none of feature {feature}'s top examples is in the store {store.url}; was the "
                                "atlas built on another store?")
        directions[feature] = torch.stack(rows).mean(dim=0) - mean
    return directions


@torch.no_grad()
def measure(model, dictionary, hook: str, ids: list[int], new: list[int], feature: int) -> tuple[float, float, float]:
    """(mean activation of ``feature`` over the new tokens, share of them where it fires, perplexity of
    the new tokens), from one pass of the untouched model over prompt + new tokens."""
    if not new:
        return 0.0, 0.0, float("nan")
    device = next(model.parameters()).device
    recorder = Splice(model, hook, count_blocks(model))
    inputs = torch.tensor([ids + new], dtype=torch.long, device=device)
    with recorder:
        logits = model(input_ids=inputs, use_cache=False).logits[0].float()
    seen = recorder.seen[0, len(ids):].float()
    values = feature_values(dictionary.encode(seen), torch.tensor([feature], device=seen.device))[:, 0]
    losses = torch.nn.functional.cross_entropy(logits[len(ids) - 1:-1], inputs[0, len(ids):], reduction="none")
    return float(values.mean()), float((values > 0).float().mean()), float(torch.exp(losses.mean()))


def added_direction(direction: torch.Tensor):
    def replace(activations: torch.Tensor) -> torch.Tensor:
        return activations + direction.to(activations.device, activations.dtype)

    return replace


def evaluate(config: SteerEvalConfig, judge=None) -> dict:
    from lexica.analysis.explainers import open_backend
    from lexica.analysis.score import DETECTION_QUESTION, SCORER_SYSTEM

    config.validate()
    loaded = open_run(config.run, config.dictionary, config.store, config.model, config.storage_options)
    if loaded.dictionary.target_hook:
        raise AnalysisError(f"dictionary {loaded.dictionary.name} is a transcoder; the steering evaluation "
                            "measures autoencoders' features")
    folder = Run(config.run, config.storage_options).atlas_url(loaded.dictionary.name)
    features_table = atlas.read_table(folder, "features", config.storage_options)
    density = np.zeros(loaded.dictionary.d_sae)
    density[features_table["feature"].to_numpy()] = features_table["density"].to_numpy()
    chosen = [f for f in parse_features(config.features, loaded.dictionary.d_sae, density) if density[f] > 0]
    if not chosen:
        raise AnalysisError(f"features = {config.features!r}: none of them ever fired; nothing to steer towards")
    explanations = ExplanationStore(folder, config.storage_options).latest()
    explanation_of = dict(zip(explanations["feature"].to_pylist(), explanations["explanation"].to_pylist(),
                              strict=True))
    model = load_causal_lm(dataclasses.replace(loaded.model, device=config.device))
    check_width(model, loaded)
    device = next(model.parameters()).device
    module = loaded.dictionary.module.to(device)
    tokenizer, hook = loaded.tokenizer, loaded.hook
    bos = bool((loaded.manifest.get("bos") or {}).get("prepend"))
    store = open_store(loaded.dictionary, config.store, config.run, config.storage_options)
    tops = read_feature_rows(folder, "contexts", chosen, ["feature", "kind", "doc_id", "position"],
                             config.storage_options).to_pylist()
    strengths = [value.strip() for value in config.strengths.split(",") if value.strip()]
    if judge is None and config.judge:
        judge = open_backend(config.judge, config, max_new_tokens=3)
    examples: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for row in tops:
        if row["kind"] == "top":
            examples[row["feature"]].append((row["doc_id"], row["position"]))
    directions = mean_differences(store, {feature: examples[feature] for feature in chosen})
    maxima = dict(zip(features_table["feature"].to_pylist(), features_table["max_activation"].to_pylist(),
                      strict=True))
    rows, progress = [], Progress("steer-evaluate", len(chosen), "features")
    for done, feature in enumerate(chosen, 1):
        direction = directions[feature].to(device)
        unit = direction / direction.norm().clamp_min(1e-12)
        decoder_norm = float(module.W_dec[feature].float().norm())
        maximum = float(maxima[feature])
        for strength in strengths:
            # A multiple of the max read above (no second read of features.parquet per strength).
            value = parse_value(strength)
            target = float(value[:-1]) * maximum if isinstance(value, str) else value
            for prompt in config.prompts:
                ids = prompt_ids(tokenizer, prompt, bos)
                for method in METHODS:
                    if method == "baseline" and strength != strengths[0]:
                        continue  # the untouched text does not depend on the strength
                    if method == "baseline":
                        new = generate(model, ids, config.max_new_tokens, 0.0, config.seed)
                    else:
                        if method == "dictionary":
                            splice, _ = steering_splices(model, module, hook, {feature: target})
                        else:
                            splice = Splice(model, hook, count_blocks(model))
                            splice.replace = added_direction(unit * target * decoder_norm)
                        with splice:
                            new = generate(model, ids, config.max_new_tokens, 0.0, config.seed, splice, bos)
                    activation, share, perplexity = measure(model, module, hook, ids, new, feature)
                    rows.append({"feature": feature, "method": method,
                                 "strength": "" if method == "baseline" else strength, "prompt": prompt,
                                 "text": tokenizer.decode(new, skip_special_tokens=True), "activation": activation,
                                 "relative_activation": activation / maximum if maximum else 0.0,
                                 "firing_share": share, "judge_yes": float("nan"), "perplexity": perplexity})
        progress.update(done, 0)
    progress.update(len(chosen), 0, final=True)
    if judge is not None:
        asked = [i for i, row in enumerate(rows) if row["feature"] in explanation_of]
        questions = [[{"role": "system", "content": SCORER_SYSTEM},
                      {"role": "user", "content": DETECTION_QUESTION.format(
                          explanation=explanation_of[rows[i]["feature"]], text=rows[i]["text"].replace("\n", " "))}]
                     for i in asked]
        answers, _ = judge.yes_probability(questions) if questions else ([], [])
        for i, answer in zip(asked, answers, strict=True):
            rows[i]["judge_yes"] = answer
    table = pa.Table.from_pylist(rows, schema=EVALUATION_SCHEMA)
    atlas.write_table(folder, EVALUATION, table, config.storage_options)
    return {"atlas": folder, "features": chosen, "rows": table, "judge": getattr(judge, "name", None)}


def summary_lines(table: pa.Table) -> list[str]:
    """Mean of each measure per method and strength, and how often each steering beats the baseline."""
    frame = table.to_pandas()
    lines = ["| method | strength | activation / max | firing share | judge P(yes) | perplexity (median) | texts |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (method, strength), group in frame.groupby(["method", "strength"], sort=False):
        judge = group["judge_yes"].mean()
        lines.append(f"| {method} | {strength or '–'} | {group['relative_activation'].mean():.3f} | "
                     f"{group['firing_share'].mean():.3f} | {'–' if math.isnan(judge) else f'{judge:.3f}'} | "
                     f"{group['perplexity'].median():.1f} | {len(group)} |")
    return lines


EVALUATE_FLAGS = {"run": "run", "dictionary": "dictionary", "features": "features", "judge": "judge",
               "strengths": "strengths", "device": "device", "max_new_tokens": "max_new_tokens"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexica steer --evaluate",
                                     description="Measure how much steering features raises their concepts in "
                                                 "generations from neutral prompts, against a mean-difference "
                                                 "direction, with fluency beside it.")
    parser.add_argument("--evaluate", action="store_true", required=True)
    add_knob_flags(parser, SteerEvalConfig, "steer_evaluation", EVALUATE_FLAGS)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    values = stage_section(args.config, "steer_evaluation") if args.config else {}
    values = apply_overrides(SteerEvalConfig, values, args, EVALUATE_FLAGS, args.set)
    result = evaluate(from_dict(SteerEvalConfig, values, "steer_evaluation"))
    print("\n".join(summary_lines(result["rows"])))
    print(f"\n{len(result['features'])} features, judged by {result['judge'] or 'no judge'}: "
          f"{result['atlas']}/{EVALUATION}.parquet")
    return 0
